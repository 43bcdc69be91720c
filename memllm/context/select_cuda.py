"""CUDA fast paths of the lookup (lookup.py) and of the gather's de-duplication (gather.py): one Triton
launch each where PyTorch took ~15 small ones.

* `unit_keys_cuda(q_sum, reprs, n_units, units_before, shared)`: lookup.unit_scores, combine and
  mask_later, then lookup.selection_keys, in one pass over the representatives: (blocks, rows, n_pad)
  int64 selection keys, padded past n_units with keys that lose to every real one. The scores are
  fp32 products summed in the kernel's order (the PyTorch path's einsum sums in cuBLAS's): they may
  differ in the last bit, so near-ties may break differently between the two paths.
* `distinct_pairs_cuda(ids)`: gather.distinct_pairs (the same outputs: distinct keys sorted, their
  count, each entry's slot) by counting instead of sorting, in one program (ids of one call: a few
  hundred entries; a radix sort of 336 took 27 us on the H100, profile_prefill).

Tests compare both with the PyTorch versions. Imported only on CUDA (needs triton).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from memllm.context.lookup import SEGMENT

DISTINCT_MAX = 4096  # distinct_pairs_cuda handles calls of at most this many chosen (unit, head) pairs


@triton.jit
def _selection_key(s, u, visible, real):
    """lookup.selection_keys for scores s of units u: hidden units score -inf; padding (not real) loses to all."""
    s = tl.where(visible, s, float("-inf"))
    s = tl.where(s == 0.0, 0.0, s)  # -0.0 -> 0.0: equal as floats, equal keys
    bits = s.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # int order = float order
    low = tl.full(u.shape, 0xFFFFFFFF, tl.int64) - u.to(tl.int64)  # lower index wins ties
    key = (ordered.to(tl.int64) << 32) | low
    return tl.where(real, key, tl.full(u.shape, -(2**63), tl.int64))


@triton.jit(do_not_specialize=["n_units", "n_pad", "stride_h", "stride_u"])
def _unit_keys_kernel(
    QS, R, UB, KEYS, n_units, n_pad, stride_h, stride_u, ub_stride,
    KVH: tl.constexpr, D: tl.constexpr, BU: tl.constexpr, SHARED: tl.constexpr,
):  # fmt: skip
    """Program (unit tile, block b): keys of units u for block b, from q_sum QS (blocks, KVH, D) fp32 and
    representatives R (KVH, >= n_units, D); units >= UB[b * ub_stride] hidden."""
    u = tl.program_id(0) * BU + tl.arange(0, BU)
    b = tl.program_id(1)
    real = u < n_units
    visible = u < tl.load(UB + b * ub_stride)
    dd = tl.arange(0, D)
    total = tl.zeros((BU,), tl.float32)
    for h in tl.static_range(KVH):
        q = tl.load(QS + (b * KVH + h) * D + dd)
        r = tl.load(R + h * stride_h + u[:, None] * stride_u + dd[None, :], mask=real[:, None], other=0.0)
        s = tl.sum(r.to(tl.float32) * q[None, :], axis=1)
        if SHARED:
            total += s
        else:
            tl.store(KEYS + (b * KVH + h) * n_pad + u, _selection_key(s, u, visible, real), mask=u < n_pad)
    if SHARED:
        tl.store(KEYS + b * n_pad + u, _selection_key(total, u, visible, real), mask=u < n_pad)


def unit_keys_cuda(
    q_sum: torch.Tensor, reprs: torch.Tensor, n_units: int, units_before: torch.Tensor, shared: bool
) -> torch.Tensor:
    """q_sum (blocks, kv_heads, d) fp32; reprs (kv_heads, >= n_units, d) (last dim contiguous); units_before
    (blocks,) or (1,) (shared by all blocks) long on the device -> selection keys (blocks, 1 if shared else kv_heads, n_pad) int64, where
    n_pad is n_units, or a multiple of lookup.SEGMENT past 2 segments (padding keys lose to all)."""
    nb, kvh, d = q_sum.shape
    if units_before.numel() not in (1, nb):
        raise ValueError(f"units_before has {units_before.numel()} entries for {nb} blocks")
    if reprs.shape[0] != kvh or reprs.shape[2] != d or reprs.stride(2) != 1 or reprs.shape[1] < n_units:
        raise ValueError(f"representatives {tuple(reprs.shape)} do not match q_sum {tuple(q_sum.shape)}")
    n_pad = -(-n_units // SEGMENT) * SEGMENT if n_units > 2 * SEGMENT else n_units
    keys = torch.empty(nb, 1 if shared else kvh, n_pad, dtype=torch.int64, device=q_sum.device)
    if n_pad == 0 or nb == 0:
        return keys
    bu = 64
    _unit_keys_kernel[(triton.cdiv(n_pad, bu), nb)](
        q_sum.float().contiguous(), reprs, units_before, keys, n_units, n_pad, reprs.stride(0), reprs.stride(1),
        0 if units_before.numel() == 1 else units_before.stride(0), KVH=kvh, D=d, BU=bu, SHARED=shared, num_warps=4,
    )  # fmt: skip
    return keys


@triton.jit(do_not_specialize=["n"])
def _distinct_kernel(IDS, KEYS, COUNT, SLOT, n, H: tl.constexpr, T: tl.constexpr, NP: tl.constexpr,
                     BJ: tl.constexpr):  # fmt: skip
    """One program: entry i of IDS ((rows, H, T) flat) has key ids[i] * H + its head; its slot is the
    number of distinct keys below it; KEYS[r] the distinct key of rank r (0 past the count)."""
    i = tl.arange(0, NP)
    ok_i = i < n
    key_i = tl.load(IDS + i, mask=ok_i, other=0) * H + (i // T) % H
    rank = tl.zeros((NP,), tl.int32)
    count = tl.sum(tl.zeros((BJ,), tl.int32), axis=0)
    for j0 in range(0, n, BJ):
        j = j0 + tl.arange(0, BJ)
        ok_j = j < n
        key_j = tl.load(IDS + j, mask=ok_j, other=0) * H + (j // T) % H
        same_before = (key_i[None, :] == key_j[:, None]) & (i[None, :] < j[:, None])  # (BJ, NP)
        first = (tl.sum(same_before.to(tl.int32), axis=1) == 0) & ok_j  # j is its key's first entry
        count += tl.sum(first.to(tl.int32), axis=0)
        rank += tl.sum(((key_j[:, None] < key_i[None, :]) & first[:, None]).to(tl.int32), axis=0)
    tl.store(SLOT + i, rank.to(tl.int64), mask=ok_i)
    tl.store(COUNT, count.to(tl.int64))
    for r0 in tl.static_range(0, NP, BJ):
        r = r0 + tl.arange(0, BJ)
        hit = (rank[None, :] == r[:, None]) & ok_i[None, :]
        val = tl.max(tl.where(hit, key_i[None, :], 0), axis=1)
        tl.store(KEYS + r, val, mask=r < n)


def distinct_pairs_cuda(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """gather.distinct_pairs in one launch: ids (rows, kv_heads, t) long on CUDA, at most DISTINCT_MAX
    entries -> keys (n,), count (1,), slot (n,), all long."""
    rows, h, t = ids.shape
    n = ids.numel()
    if n > DISTINCT_MAX:
        raise ValueError(f"{n} chosen (unit, head) pairs: distinct_pairs_cuda takes at most {DISTINCT_MAX}")
    keys = torch.empty(n, dtype=torch.int64, device=ids.device)
    slot = torch.empty_like(keys)
    count = torch.empty(1, dtype=torch.int64, device=ids.device)
    if n == 0:
        return keys, count.zero_(), slot
    _distinct_kernel[(1,)](
        ids.contiguous(), keys, count, slot, n, H=h, T=t, NP=max(32, triton.next_power_of_2(n)), BJ=32,
        num_warps=8,
    )  # fmt: skip
    return keys, count, slot
