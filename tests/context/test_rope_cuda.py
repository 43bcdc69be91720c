"""The Triton rotation (rope_cuda.py) equals positions.Rotary's PyTorch rotations."""

from __future__ import annotations

import pytest
import torch

from memllm.context.positions import Rotary
from tests.context.helpers import tiny_model


def kernel_devices() -> list[str]:
    return ["cuda"] if torch.cuda.is_available() else []


def check_rotations(device: str, dtype: torch.dtype) -> None:
    from memllm.context.rope_cuda import rotate

    model = tiny_model("llama3")
    rot = Rotary(model.model.rotary_emb, 512, 16)
    cos, sin, _ = rot.tables(device)
    x = torch.randn(3, 2, 37, 16, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    tol = {"rtol": 1e-2, "atol": 1e-2} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-5}
    for start, step in ((5, 1), (-200, 1), (300, -1), (0, -1)):
        want = rot.rotate(x, start, step).to(dtype)
        got = rotate(x, rot._row(start), 1, step, cos, sin, dtype)
        torch.testing.assert_close(got, want, **tol)
    for angle in (0, 17, -450):
        want = rot.rotate_const(x, angle).to(dtype)
        torch.testing.assert_close(rotate(x, rot._row(angle), 0, 1, cos, sin, dtype), want, **tol)
    # fp32 output from bf16 input, as the memory queries are made
    torch.testing.assert_close(
        rotate(x, rot._row(9), 1, -1, cos, sin, torch.float32), rot.rotate(x, 9, -1), **tol
    )


@pytest.mark.gpu
@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_kernel_equals_rotary(device, dtype):
    check_rotations(device, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("device", kernel_devices())
def test_rotated_dispatches_to_the_kernel(device):
    model = tiny_model("llama")
    rot = Rotary(model.model.rotary_emb, 512, 16)
    x = torch.randn(2, 11, 16, device=device)
    torch.testing.assert_close(rot.rotated(x, 40, -1, torch.float32, kernel=True), rot.rotate(x, 40, -1))
    torch.testing.assert_close(
        rot.rotated(x, 7, 1, torch.float32, per_row=False, kernel=True), rot.rotate_const(x, 7)
    )
