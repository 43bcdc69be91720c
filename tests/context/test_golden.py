"""Golden rule: while the stream fits in n_init + n_local, logits equal plain full attention (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from memllm.compat import cache_kwargs
from memllm.context import attach, step
from memllm.context.attention import ATTN_NAME
from tests.context.helpers import rel_err, small_memory, tiny_model

KINDS = ["llama", "qwen2", "llama3"]
N = 56  # <= n_init + n_local (+ less than a block): nothing is cut


def full_attention_logits(model: torch.nn.Module, ids: torch.Tensor, impl: str) -> torch.Tensor:
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model(ids, **cache_kwargs(model, DynamicCache(config=model.config)), use_cache=True).logits[0]


@pytest.fixture(scope="module", params=KINDS)
def setup(request):
    model = tiny_model(request.param)
    ids = torch.randint(0, 512, (1, N), generator=torch.Generator().manual_seed(1))
    ref = full_attention_logits(model, ids, "eager")
    assert rel_err(full_attention_logits(model, ids, "sdpa"), ref) < 1e-5
    return model, ids, ref


def run_chunks(model, ids, cuts, **mem):
    outs = []
    with attach(model, small_memory(**mem)) as cache, torch.no_grad():
        for a, b in zip(cuts[:-1], cuts[1:], strict=True):
            outs.append(model(input_ids=ids[:, a:b], **cache_kwargs(model, cache), use_cache=True).logits[0])
    assert cache.stats()["units"] == 0
    return torch.cat(outs)


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_at_once(setup, impl):
    model, ids, ref = setup
    assert rel_err(run_chunks(model, ids, [0, N], chunk_size=N, impl=impl), ref) < 1e-4


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_uneven_chunks(setup, impl):
    model, ids, ref = setup
    assert rel_err(run_chunks(model, ids, [0, 1, 8, 21, 22, 50, N], impl=impl), ref) < 1e-4


def test_token_by_token_decode(setup):
    model, ids, ref = setup
    got = []
    with attach(model, small_memory()) as cache:
        step(model, cache, ids[:, :20])
        for i in range(20, N):
            got.append(step(model, cache, ids[:, i : i + 1]))
    assert rel_err(torch.stack(got), ref[20:]) < 1e-4


def test_attach_is_scoped_and_import_registers_nothing(setup):
    from transformers import AttentionInterface

    import memllm.context  # noqa: F401

    model, ids, _ = setup
    model.set_attn_implementation("sdpa")
    assert ATTN_NAME not in AttentionInterface._global_mapping
    with attach(model, small_memory()):
        assert model.config._attn_implementation == ATTN_NAME
    assert model.config._attn_implementation == "sdpa"
    assert ATTN_NAME not in AttentionInterface._global_mapping


@pytest.mark.gpu
def test_golden_on_cuda():
    model = tiny_model("qwen2").cuda()
    ids = torch.randint(0, 512, (1, N), generator=torch.Generator().manual_seed(1)).cuda()
    ref = full_attention_logits(model, ids, "sdpa")
    got = run_chunks(model, ids, [0, 3, 17, 40, N])
    assert rel_err(got, ref) < 1e-4
