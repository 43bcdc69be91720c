"""The attention passes of one call: CUDA kernels (flash.py) equal the PyTorch loops (window.py),
and the loops equal dense attention over the keys the plan allows.

The kernel tests (marked `gpu` and `triton`) also run on the CPU under Triton's interpreter:
`TRITON_INTERPRET=1 pytest -m triton tests/context/test_window.py` with triton installed."""

from __future__ import annotations

import pytest
import torch

from memllm.config import MemoryConfig
from memllm.context.plan import plan_call
from memllm.context.window import joined_memory, local_attention, memory_attention, merge
from tests.context.helpers import kernel_devices, skip_interpreted_runtime_loops

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


@pytest.mark.parametrize("state", STATES)
def test_fused_cpu_local_pass_equals_the_loop(state):
    from memllm.context.window import local_attention_fused

    gen = torch.Generator().manual_seed(state[0] + 1)
    plan = plan_call(*state, MEM.resolved(512))
    W, c = plan.window, plan.c
    q, k, v = rand(gen, 6, c, 16), rand(gen, 2, W + c, 16), rand(gen, 2, W + c, 16)
    got = local_attention_fused(q, k, v, plan, 0.25, torch.float32)
    want = local_attention(q, k, v, plan, 0.25, torch.float32)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


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


def call_inputs(state, device, dtype, d=16, cfg=MEM):
    """A call's plan, q (6 heads), k, v (2 kv heads), the sinks (n_init keys) and each memory block's
    topk units' keys and values."""
    gen = torch.Generator().manual_seed(state[0] + 1)
    plan = plan_call(*state, cfg.resolved(max(512, 4 * cfg.n_local)))
    W, c = plan.window, plan.c

    def r(*shape):
        return rand(gen, *shape, device=device, dtype=dtype)

    q, k, v = r(6, c, d), r(2, W + c, d), r(2, W + c, d)
    n_mb = len(plan.memory_blocks)
    sk, sv = r(2, cfg.n_init, d), r(2, cfg.n_init, d)
    uk, uv = r(n_mb, 2, cfg.topk * cfg.block_size, d), r(n_mb, 2, cfg.topk * cfg.block_size, d)
    return plan, q, k, v, (sk, sv, uk, uv)


def joined(mem):
    """The memory keys and values as window.memory_attention takes them: sinks then units, per block."""
    sk, sv, uk, uv = mem
    return joined_memory(sk, sv, uk, uv, uk.shape[0])


def kernel_case(device, dtype) -> None:
    if device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter gets bf16 dots wrong (the kernels before these did too)")


def tolerance(dtype):
    return {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {"rtol": 1e-3, "atol": 1e-3}


# A larger call with small tiles, so that every kind of tile occurs: key tiles some rows see only in part
# and tiles every row sees whole (local pass), row tiles that see a key tile whole (received pass), and
# memory keys that fill whole tiles (sinks and units multiples of BN: no key masks).
BIG = MemoryConfig(n_init=32, n_local=256, block_size=32, repr_topk=2, topk=4, exc_block_size=128, chunk_size=512,
                   offload_dtype="fp32")  # fmt: skip
BIG_STATE = (5000, 300, True, 100, 500)
SMALL_TILES = {"BM": 16, "BN": 16, "num_warps": 2, "num_stages": 2}
CASES = [(s, MEM, {}) for s in STATES] + [(BIG_STATE, BIG, SMALL_TILES), (BIG_STATE, BIG, {})]


@pytest.mark.gpu
@pytest.mark.triton
@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_equal_loops(device, case, dtype):
    skip_interpreted_runtime_loops(device)
    kernel_case(device, dtype)
    from memllm.context.cuda.window import local_attention_cuda, memory_attention_cuda

    state, cfg, tiles = case
    plan, q, k, v, mem = call_inputs(state, device, dtype, cfg=cfg)
    tol = tolerance(dtype)
    rec = {"BM": tiles["BM"], "BN": tiles["BN"], "ROWS": 4 * tiles["BM"]} if tiles else {}
    got = local_attention_cuda(q, k, v, plan, 0.25, local=tiles or None, **rec)
    want = local_attention(q, k, v, plan, 0.25, torch.float32)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, **tol)
    got_m = memory_attention_cuda(q, *mem, plan, cfg.topk, cfg.block_size, 0.25, **tiles)
    want_m = memory_attention(q, *joined(mem), plan, cfg.n_init, cfg.topk, cfg.block_size, 0.25, torch.float32)
    for a, b in zip(got_m, want_m, strict=True):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.gpu
@pytest.mark.triton
@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_received_row_splits_equal_loop(device, state, dtype):
    """Small row splits (several per call, one row tile or several per split) give the loop's received
    attention, and the same bits on a second run."""
    skip_interpreted_runtime_loops(device)
    kernel_case(device, dtype)
    from memllm.context.cuda.window import received_attention_cuda

    plan, q, k, v, _ = call_inputs(state, device, dtype)
    _, lse, want = local_attention(q, k, v, plan, 0.25, torch.float32)
    for config in ({"ROWS": 64}, {"ROWS": 96, "BM": 32, "BN": 32}):
        got = received_attention_cuda(q, k, lse, plan, 0.25, **config)
        torch.testing.assert_close(got, want, **tolerance(dtype))
        assert torch.equal(got, received_attention_cuda(q, k, lse, plan, 0.25, **config))


@pytest.mark.gpu
@pytest.mark.triton
@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_memory_merge_kernel_equals_merge(device, case, dtype):
    """The memory pass merged in place equals window.merge of the local and memory loops' results; lse is
    only read, and with no memory key (no sinks, nothing chosen) out keeps its values."""
    skip_interpreted_runtime_loops(device)
    kernel_case(device, dtype)
    from memllm.context.cuda.window import memory_attention_merge_cuda

    state, cfg, tiles = case
    plan, q, k, v, mem = call_inputs(state, device, dtype, cfg=cfg)
    out, lse, _ = local_attention(q, k, v, plan, 0.25, torch.float32)
    lse_before = lse.clone()
    want = merge(
        out, lse, *memory_attention(q, *joined(mem), plan, cfg.n_init, cfg.topk, cfg.block_size, 0.25, torch.float32)
    )
    got = out.clone()
    assert memory_attention_merge_cuda(q, *mem, plan, cfg.topk, cfg.block_size, 0.25, got, lse, **tiles) is got
    torch.testing.assert_close(got, want, **tolerance(dtype))
    assert torch.equal(lse, lse_before)
    untouched = out.clone()
    no_sinks = mem[0][:, :0], mem[1][:, :0]
    memory_attention_merge_cuda(q, *no_sinks, None, None, plan, 0, cfg.block_size, 0.25, untouched, lse)
    assert torch.equal(untouched, out)
    heads, c, d = q.shape
    final = torch.empty(c, heads, d, dtype=dtype, device=q.device)
    if len(plan.memory_blocks) == len(plan.blocks):  # every row has memory: the merged rows go to `final`
        kept = out.clone()
        res = memory_attention_merge_cuda(q, *mem, plan, cfg.topk, cfg.block_size, 0.25, kept, lse, final, **tiles)
        assert res.shape == (heads, c, d) and res.data_ptr() == final.data_ptr() and torch.equal(kept, out)
        torch.testing.assert_close(res.float(), got.to(dtype).float(), rtol=0, atol=0)
    else:
        with pytest.raises(ValueError, match="every row"):
            memory_attention_merge_cuda(q, *mem, plan, cfg.topk, cfg.block_size, 0.25, out.clone(), lse, final)
