"""The fused (device) merge equals the plain reference merge: outputs and received attention."""

from __future__ import annotations

import pytest
import torch

from memllm.context.merge import merged_attention, merged_attention_fused


def devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("n_mem,e,n_prev", [(0, 5, 0), (0, 1, 30), (24, 8, 40), (40, 1, 17)])
def test_fused_equals_reference(device, n_mem, e, n_prev):
    gen = torch.Generator().manual_seed(e * 100 + n_mem)
    heads, kvh, d = 6, 2, 16
    rand = lambda *s: torch.randn(*s, generator=gen).to(device)  # noqa: E731
    q_loc, q_mem = rand(heads, e, d), rand(heads, e, d)
    k_loc, v_loc = rand(kvh, n_prev + e, d), rand(kvh, n_prev + e, d)
    k_mem = rand(kvh, n_mem, d) if n_mem else None
    v_mem = rand(kvh, n_mem, d) if n_mem else None
    args = (q_loc, k_loc, v_loc, q_mem if n_mem else None, k_mem, v_mem, d**-0.5, n_prev)
    out_r, rec_r = merged_attention(*args, torch.float64 if device == "cpu" else torch.float32)
    out_f, rec_f = merged_attention_fused(*args, torch.float32)
    torch.testing.assert_close(out_f, out_r.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(rec_f, rec_r.float(), rtol=1e-4, atol=1e-5)
    assert (
        torch.allclose(rec_f.sum(), torch.tensor(float(heads // kvh * e * kvh), device=device), rtol=1e-4)
        or n_mem
    )
