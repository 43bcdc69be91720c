"""Lookup: chosen units are exactly the brute-force top-k, on the device path and the reference path."""

from __future__ import annotations

import pytest
import torch

from memllm.context.lookup import (
    combine,
    mask_later,
    select_units,
    select_units_reference,
    unit_scores,
)
from tests.context.helpers import kernel_devices, skip_interpreted_runtime_loops


def brute_force(q_sum: torch.Tensor, repr_keys: torch.Tensor, k: int, mode: str) -> list[list[int]]:
    per_head = []
    for g in range(q_sum.shape[0]):
        per_head.append(
            [sum(float(q_sum[g].double() @ r.double()) for r in repr_keys[g, u]) / repr_keys.shape[2]
             for u in range(repr_keys.shape[1])]
        )  # fmt: skip
    rows = [[sum(col) for col in zip(*per_head, strict=True)]] if mode == "shared" else per_head
    return [sorted(sorted(range(len(row)), key=lambda u: (-row[u], u))[:k]) for row in rows]


def devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("mode", ["shared", "per_head"])
@pytest.mark.parametrize("n_units,k", [(1, 4), (7, 3), (50, 16), (300, 16)])
def test_topk_equals_brute_force(device, mode, n_units, k):
    gen = torch.Generator().manual_seed(n_units)
    q_sum = torch.randn(3, 16, generator=gen)
    repr_keys = torch.randn(3, n_units, 4, 16, generator=gen)  # (kv_heads, units, repr_topk, head_dim)
    want = brute_force(q_sum, repr_keys, k, mode)
    scores = combine(unit_scores(q_sum.to(device), repr_keys.mean(dim=2).to(device)), mode)
    fast = select_units(scores, k)
    assert fast.device.type == device
    assert fast.tolist() == want
    assert select_units_reference(scores, k).tolist() == want


def test_ties_prefer_lower_index():
    scores = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.5]])
    assert select_units(scores, 2).tolist() == [[1, 2]]
    assert select_units_reference(scores, 2).tolist() == [[1, 2]]


@pytest.mark.gpu
def test_uva_gather_equals_reference():
    from memllm.context.kernels import gather_units
    from memllm.context.units import UnitStore

    for dtype_name in ("bf16", "int8"):
        store = UnitStore(3, 8, 16, 2, dtype_name, torch.device("cuda"), segment_units=4)
        for _ in range(11):
            k = torch.randn(3, 8, 16, device="cuda", dtype=torch.bfloat16)
            store.append(k, torch.randn_like(k), k[:, :2])
        ids = torch.tensor([[0, 5, 10], [3, 4, 9], [1, 2, 8]], device="cuda")
        fast = gather_units(store, ids, torch.bfloat16, "fast")
        ref = gather_units(store, ids, torch.bfloat16, "reference")
        for a, b in zip(fast, ref, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("device", devices())
def test_selection_keys_order_like_floats(device):
    """Negative, zero (both signs), -inf and equal scores: the same ids as the reference sort."""
    gen = torch.Generator().manual_seed(7)
    base = torch.tensor([-0.0, 0.0, float("-inf"), -1e-30, 1e-30, -3.5, 3.5, 3.5, float("-inf"), -0.0])
    for _ in range(20):
        scores = base[torch.randint(0, len(base), (4, 40), generator=gen)]
        scores = torch.where(
            torch.rand(4, 40, generator=gen) < 0.3, torch.randn(4, 40, generator=gen), scores
        )
        for k in (1, 5, 16, 40):
            got = select_units(scores.to(device), k)
            assert got.tolist() == select_units_reference(scores, k).tolist()


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("n", [2 * 1024 + 1, 5000, 3 * 1024])
def test_long_rows_select_by_pieces_like_the_reference(device, n):
    """Rows longer than two segments (a top-k per piece first, the last piece padded): the same ids as
    the reference, with many equal scores, -inf tails (later units) and winners inside one piece."""
    gen = torch.Generator().manual_seed(n)
    scores = torch.randn(3, 2, n, generator=gen).round(decimals=1)  # many ties
    scores[0, :, n // 3 :] = float("-inf")
    scores[1, 0, 1500:1530] = 9.0  # every winner in one piece, ties among them
    scores[2, 1] = 0.0  # all tied: the lowest indices win
    for k in (1, 16, 40):
        got = select_units(scores.to(device), k)
        assert got.tolist() == select_units_reference(scores, k).tolist()


def test_distinct_pairs_cover_every_choice():
    """Each chosen (unit, head) maps to a slot holding it; the first `count` slots are distinct."""
    from memllm.context.gather import distinct_pairs

    gen = torch.Generator().manual_seed(8)
    ids = torch.randint(0, 9, (5, 3, 4), generator=gen)
    keys, count, slot = distinct_pairs(ids)
    n = int(count)
    heads = torch.arange(3).view(1, 3, 1).expand_as(ids)
    assert torch.equal(keys[slot].reshape(ids.shape), ids * 3 + heads)
    assert n == len({(u, h) for u, h in zip(ids.flatten().tolist(), heads.flatten().tolist(), strict=True)})
    assert keys[:n].unique().numel() == n and int(slot.max()) == n - 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the UVA gather needs CUDA")
@pytest.mark.parametrize("dtype_name", ["bf16", "int8"])
def test_uva_gather_of_several_blocks_reads_each_unit_once_and_equals_reference(dtype_name):
    from memllm.context.cuda.gather import gather_units_uva
    from memllm.context.kernels import gather_units
    from memllm.context.units import UnitStore

    store = UnitStore(3, 8, 16, 2, dtype_name, torch.device("cuda"), segment_units=4)
    for _ in range(11):
        k = torch.randn(3, 8, 16, device="cuda", dtype=torch.bfloat16)
        store.append(k, torch.randn_like(k), k[:, :2])
    gen = torch.Generator().manual_seed(9)
    ids = torch.randint(0, 11, (4, 3, 5), generator=gen).cuda()  # 4 blocks, repeats within and across
    ids[2] = ids[1]
    ref = gather_units(store, ids, torch.bfloat16, "reference")
    for dedup in (True, False):
        fast = gather_units_uva(store, ids, torch.bfloat16, dedup=dedup)
        for a, b in zip(fast, ref, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.triton
@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("mode", ["shared", "per_head"])
@pytest.mark.parametrize("n,blocks", [(7, 4), (300, 4), (2 * 1024 + 5, 7), (5000, 1), (600, 17)])
def test_choose_units_kernels_equal_pytorch(device, mode, n, blocks):
    """select_cuda.choose_units_cuda (through choose_units): the ids select_units takes from
    mask_later(combine(unit_scores)), for k below, at and above a power of two, with units hidden per
    block or for all blocks at once. Small integers make every product and sum exact in fp32, so the
    two paths must agree exactly, ties (broken by the lower index) included."""
    from memllm.context import kernels
    from memllm.context.cuda.lookup import choose_units_cuda

    skip_interpreted_runtime_loops(device)
    gen = torch.Generator().manual_seed(n)
    q_sum = torch.randint(-3, 4, (blocks, 3, 16), generator=gen).float()  # 3 kv heads
    reprs = torch.randint(-2, 3, (3, n, 16), generator=gen).to(torch.bfloat16)
    spread = torch.linspace(0, n, blocks).long()
    for before in (spread, torch.tensor([max(0, n - 3)])):
        scores = mask_later(combine(unit_scores(q_sum, reprs), mode), before.expand(blocks))
        for k in (1, 5, 16, 40):
            got = choose_units_cuda(
                q_sum.to(device), reprs.to(device), before.to(device), mode == "shared", k
            )
            assert got.cpu().tolist() == select_units(scores, k).tolist()
            if device == "cuda":  # kernels.choose_units takes the kernels on CUDA
                got = kernels.choose_units(
                    q_sum.to(device), reprs.to(device), before.to(device), mode, k, "fast"
                )
                assert got.cpu().tolist() == select_units(scores, k).tolist()


@pytest.mark.gpu
@pytest.mark.triton
@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize(
    "shape,units", [((1, 3, 1), 4), ((5, 3, 4), 9), ((7, 3, 16), 40), ((8, 8, 16), 3000)]
)
def test_distinct_pairs_kernel_equals_pytorch(device, shape, units):
    """select_cuda.distinct_pairs_cuda: the same keys, count and slots as gather.distinct_pairs."""
    from memllm.context.cuda.lookup import distinct_pairs_cuda
    from memllm.context.gather import distinct_pairs

    gen = torch.Generator().manual_seed(units)
    ids = torch.randint(0, units, shape, generator=gen)
    ids[-1] = ids[0]  # repeats across rows
    got = distinct_pairs_cuda(ids.to(device))
    for a, b in zip(got, distinct_pairs(ids), strict=True):
        assert torch.equal(a.cpu(), b)


@pytest.mark.gpu
@pytest.mark.triton
@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("mode", ["shared", "per_head"])
@pytest.mark.parametrize("n,rows", [(7, 3), (300, 5), (2 * 1024 + 5, 2)])
def test_stacked_lookup_kernels_equal_each_row_alone(device, mode, n, rows):
    """cuda/lookup.choose_units_stacked_cuda (the stacked rows of a batched step, each with its own index
    padded to n and its own unit count) takes for every row the ids choose_units takes for that row alone,
    ties included (small integers: exact fp32), and so does the PyTorch path (kernels.TorchKernels). Under
    TRITON_INTERPRET=1 the scoring launch's keys are compared (the interpreter cannot run the top-k
    launch's loop over a runtime bound with NumPy >= 2.4: helpers.skip_interpreted_runtime_loops)."""
    from memllm.context.cuda.lookup import choose_units_stacked_cuda, stacked_unit_keys
    from memllm.context.kernels import TorchKernels
    from memllm.context.lookup import selection_keys

    gen = torch.Generator().manual_seed(n + rows)
    q_sum = torch.randint(-3, 4, (rows, 3, 16), generator=gen).float()
    reprs = torch.randint(-2, 3, (rows, 3, n, 16), generator=gen).to(torch.bfloat16)
    units = torch.linspace(max(1, n // 3), n, rows).long()
    for k in (1, 5, 16):
        alone = [select_units(mask_later(combine(unit_scores(q_sum[r : r + 1], reprs[r]), mode), units[r : r + 1]), k)[0]
                 for r in range(rows)]  # fmt: skip
        want = torch.stack(alone).tolist()
        assert TorchKernels("fast").choose_units_stacked(q_sum, reprs, units, mode, k).tolist() == want
        if device == "cuda":
            got = choose_units_stacked_cuda(q_sum.cuda(), reprs.cuda(), units.cuda(), mode == "shared", k)
            assert got.cpu().tolist() == want
    scores = mask_later(combine(unit_scores(q_sum, reprs), mode), units)
    keys = stacked_unit_keys(q_sum.to(device), reprs.to(device), units.to(device), mode == "shared")
    assert torch.equal(keys.cpu(), selection_keys(scores))
