"""The Triton rotation (rope_cuda.py) equals positions.Rotary's PyTorch rotations."""

from __future__ import annotations

import pytest
import torch

from memllm.context.lookup import block_query_sums
from memllm.context.plan import plan_call
from memllm.context.positions import Rotary
from tests.context.helpers import kernel_devices, small_memory, tiny_model


def check_rotations(device: str, dtype: torch.dtype) -> None:
    from memllm.context.cuda.positions import rotate

    model = tiny_model("llama3")
    rot = Rotary(model.model.rotary_emb, 512, 16)
    cos, sin, _ = rot.tables(device)
    x = torch.randn(3, 2, 37, 16, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    tol = {"rtol": 1e-2, "atol": 1e-2} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-5}
    for start, step in ((5, 1), (-200, 1), (300, -1), (0, -1)):
        want = rot.rotate(x, start, step).to(dtype)
        got = rotate(x, rot.row(start), 1, step, cos, sin, dtype)
        torch.testing.assert_close(got, want, **tol)
    for angle in (0, 17, -450):
        want = rot.rotate_const(x, angle).to(dtype)
        torch.testing.assert_close(rotate(x, rot.row(angle), 0, 1, cos, sin, dtype), want, **tol)
    # fp32 output from bf16 input, as the memory queries are made
    torch.testing.assert_close(
        rotate(x, rot.row(9), 1, -1, cos, sin, torch.float32), rot.rotate(x, 9, -1), **tol
    )


@pytest.mark.gpu
@pytest.mark.triton
@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_kernel_equals_rotary(device, dtype):
    check_rotations(device, dtype)


@pytest.mark.gpu
@pytest.mark.triton
@pytest.mark.parametrize("device", kernel_devices())
def test_rotated_dispatches_to_the_kernel(device):
    """kernels.CudaKernels.rotated (the fast path's rotation: one Triton launch) equals Rotary's PyTorch rotations."""
    from memllm.context.kernels import CudaKernels

    model = tiny_model("llama")
    rot = Rotary(model.model.rotary_emb, 512, 16)
    x = torch.randn(2, 11, 16, device=device)
    kernels = CudaKernels()
    torch.testing.assert_close(kernels.rotated(rot, x, 40, -1, torch.float32), rot.rotate(x, 40, -1))
    torch.testing.assert_close(kernels.rotated(rot, x, 7, 1, torch.float32, per_row=False), rot.rotate_const(x, 7))


@pytest.mark.gpu
@pytest.mark.triton
@pytest.mark.parametrize("device", kernel_devices())
def test_rotate_reads_and_writes_row_views(device):
    """rope_cuda.rotate from a slice of a longer buffer into a slice of another (the window keys joined
    to the call's: cache.local_pass): the same values as from and to contiguous copies."""
    from memllm.context.cuda.positions import rotate

    model = tiny_model("llama")
    rot = Rotary(model.model.rotary_emb, 512, 16)
    cos, sin, _ = rot.tables(device)
    buf = torch.randn(3, 40, 16, generator=torch.Generator().manual_seed(1)).to(device)
    joined = torch.zeros(3, 50, 16, device=device)
    rotate(buf[:, :25], rot.row(-30), 0, 1, cos, sin, torch.float32, out=joined[:, 10:35])
    torch.testing.assert_close(joined[:, 10:35], rot.rotate_const(buf[:, :25].contiguous(), -30))
    heads_first = buf.transpose(0, 1)  # (40, 3, 16) rows 3 * 16 apart
    torch.testing.assert_close(rotate(heads_first, rot.row(5), 0, 1, cos, sin, torch.float32),
                               rot.rotate_const(heads_first.contiguous(), 5))  # fmt: skip
    assert bool((joined[:, :10] == 0).all()) and bool((joined[:, 35:] == 0).all())
    with pytest.raises(ValueError, match="out must be"):
        rotate(buf[:, :25], rot.row(0), 0, 1, cos, sin, torch.float32, out=joined[:, :20])


@pytest.mark.gpu
@pytest.mark.triton
@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_memory_queries_equal_rotation_and_block_sums(device, dtype):
    """rope_cuda.memory_queries: the memory blocks' rows rotated as Rotary.rotated(q, start, -1) and
    their per-block sums as lookup.block_query_sums, from one launch."""
    from memllm.context.cuda.positions import memory_queries

    model = tiny_model("llama3")
    rot = Rotary(model.model.rotary_emb, 512, 16)
    cos, sin, _ = rot.tables(device)
    plan = plan_call(700, 53, True, 80, 137, small_memory(exc_block_size=128).resolved(512))
    t = plan.tensors(device)
    # (heads, c, d) as a view of (c, heads, d), as the model hands queries over
    q = torch.randn(137, 6, 16, generator=torch.Generator().manual_seed(2)).to(device, dtype).transpose(0, 1)
    longest = max(plan.blocks[i].q1 - plan.blocks[i].q0 for i in plan.memory_blocks)
    q_mem, q_sum = memory_queries(q, rot.row(-100), cos, sin, t["mb_q0"], t["mb_q1"], 2, dtype, longest)
    want = rot.rotate(q, -100, -1)
    rows = t["row_block"].cpu() >= 0
    assert bool(rows.any()) and max(b.q1 - b.q0 for b in plan.blocks) > 64  # several splits per block
    tol = {"rtol": 1e-2, "atol": 1e-2} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(q_mem[:, rows.to(device)], want[:, rows.to(device)].to(dtype), **tol)
    sums = block_query_sums(want, t["row_block"], len(plan.memory_blocks), 2)
    torch.testing.assert_close(q_sum, sums, rtol=1e-4, atol=1e-4)
