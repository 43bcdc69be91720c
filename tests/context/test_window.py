"""The attention passes of one call: CUDA kernels (flash.py) equal the PyTorch loops (window.py),
and the loops equal dense attention over the keys the plan allows."""

from __future__ import annotations

import pytest
import torch

from memllm.config import MemoryConfig
from memllm.context.plan import plan_call
from memllm.context.window import local_attention, memory_attention, merge

MEM = MemoryConfig(n_init=4, n_local=48, block_size=8, repr_topk=2, topk=3, exc_block_size=64, chunk_size=200,
                   offload_dtype="fp32")  # fmt: skip
# (seen, window, cut, units, c): phase 1, the first cut inside the call, phase 2 unaligned, decode.
# (1000, 60, True, 120, 400): several blocks and cuts, so row_lo moves past key tiles within a row split.
STATES = [(0, 0, False, 0, 200), (40, 40, False, 0, 150), (700, 53, True, 80, 137), (901, 50, True, 100, 1),
          (1000, 60, True, 120, 400)]  # fmt: skip


def rand(gen, *shape, device="cpu", dtype=torch.float32):
    return torch.randn(*shape, generator=gen).to(device, dtype)


def dense(q, k, v, allowed, scale):
    """q (heads, c, d), k/v (kvh, n, d), allowed (c, n) bool -> out, lse, per-key received."""
    heads, kvh = q.shape[0], k.shape[0]
    kk = k.repeat_interleave(heads // kvh, 0).double()
    logits = (q.double() @ kk.transpose(1, 2)) * scale
    logits = logits.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(logits, -1)
    p = torch.exp(logits - lse[..., None])
    recv = p.sum(1).reshape(kvh, heads // kvh, -1).sum(1)
    return p @ v.repeat_interleave(heads // kvh, 0).double(), lse, recv


@pytest.mark.parametrize("state", STATES)
def test_local_loop_equals_dense(state):
    gen = torch.Generator().manual_seed(state[0])
    plan = plan_call(*state, MEM.resolved(512))
    W, c = plan.window, plan.c
    q, k, v = rand(gen, 6, c, 16), rand(gen, 2, W + c, 16), rand(gen, 2, W + c, 16)
    allowed = torch.zeros(c, W + c, dtype=torch.bool)
    for b in plan.blocks:
        for t in range(b.q0, b.q1):
            allowed[t, b.lo : W + t + 1] = True
    out, lse, recv = local_attention(q, k, v, plan, 0.25, torch.float64)
    want_out, want_lse, want_recv = dense(q, k, v, allowed, 0.25)
    torch.testing.assert_close(out.double(), want_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(recv.double(), want_recv, rtol=1e-5, atol=1e-5)


def test_merge_equals_one_softmax():
    gen = torch.Generator().manual_seed(0)
    q, k, v = rand(gen, 4, 5, 8), rand(gen, 2, 30, 8), rand(gen, 2, 30, 8)
    every = torch.ones(5, 30, dtype=torch.bool)
    first, second = every.clone(), every.clone()
    first[:, 12:], second[:, :12] = False, False
    oa, la, _ = dense(q, k, v, first, 0.3)
    ob, lb, _ = dense(q, k, v, second, 0.3)
    want, _, _ = dense(q, k, v, every, 0.3)
    torch.testing.assert_close(merge(oa, la, ob, lb), want)
    torch.testing.assert_close(merge(oa, la, ob, torch.full_like(lb, float("-inf"))), oa)


def kernel_devices() -> list[str]:
    return ["cuda"] if torch.cuda.is_available() else []


def call_inputs(state, device, dtype, d=16):
    """A call's plan, q (6 heads), k, v (2 kv heads) and memory keys/values (n_init + topk units)."""
    gen = torch.Generator().manual_seed(state[0] + 1)
    plan = plan_call(*state, MEM.resolved(512))
    W, c = plan.window, plan.c
    q, k, v = (rand(gen, 6, c, d, device=device, dtype=dtype), rand(gen, 2, W + c, d, device=device, dtype=dtype),
               rand(gen, 2, W + c, d, device=device, dtype=dtype))  # fmt: skip
    n_mb = len(plan.memory_blocks)
    m = MEM.n_init + MEM.topk * MEM.block_size
    km, vm = (
        rand(gen, n_mb, 2, m, d, device=device, dtype=dtype),
        rand(gen, n_mb, 2, m, d, device=device, dtype=dtype),
    )
    return plan, q, k, v, km, vm


def tolerance(dtype):
    return {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {"rtol": 1e-3, "atol": 1e-3}


@pytest.mark.gpu
@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_equal_loops(device, state, dtype):
    from memllm.context.flash import local_attention_cuda, memory_attention_cuda

    plan, q, k, v, km, vm = call_inputs(state, device, dtype)
    tol = tolerance(dtype)
    got = local_attention_cuda(q, k, v, plan, 0.25)
    want = local_attention(q, k, v, plan, 0.25, torch.float32)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, **tol)
    args = (plan, MEM.n_init, MEM.topk, MEM.block_size, 0.25)
    got_m = memory_attention_cuda(q, km, vm, *args)
    want_m = memory_attention(q, km, vm, *args, torch.float32)
    for a, b in zip(got_m, want_m, strict=True):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.gpu
@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_received_row_splits_equal_loop(device, state, dtype):
    """Small row splits (several per call, one row tile or several per split) give the loop's received
    attention, and the same bits on a second run."""
    from memllm.context.flash import received_attention_cuda

    plan, q, k, v, _, _ = call_inputs(state, device, dtype)
    _, lse, want = local_attention(q, k, v, plan, 0.25, torch.float32)
    for config in ({"ROWS": 64}, {"ROWS": 96, "BM": 32, "BN": 32}):
        got = received_attention_cuda(q, k, lse, plan, 0.25, **config)
        torch.testing.assert_close(got, want, **tolerance(dtype))
        assert torch.equal(got, received_attention_cuda(q, k, lse, plan, 0.25, **config))


@pytest.mark.gpu
@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_memory_merge_kernel_equals_merge(device, state, dtype):
    """The memory pass merged in place equals window.merge of the local and memory loops' results; lse is
    only read, and with no memory key (no sinks, nothing chosen) out keeps its values."""
    from memllm.context.flash import memory_attention_merge_cuda

    plan, q, k, v, km, vm = call_inputs(state, device, dtype)
    out, lse, _ = local_attention(q, k, v, plan, 0.25, torch.float32)
    lse_before = lse.clone()
    args = (plan, MEM.n_init, MEM.topk, MEM.block_size, 0.25)
    want = merge(out, lse, *memory_attention(q, km, vm, *args, torch.float32))
    got = out.clone()
    assert memory_attention_merge_cuda(q, km, vm, *args, got, lse) is got
    torch.testing.assert_close(got, want, **tolerance(dtype))
    assert torch.equal(lse, lse_before)
    untouched = out.clone()
    memory_attention_merge_cuda(q, km, vm, plan, 0, 0, MEM.block_size, 0.25, untouched, lse)
    assert torch.equal(untouched, out)
