"""CUDA fast paths of the lookup (lookup.py) and of the gather's de-duplication (gather.py): a few Triton
launches where PyTorch took ~30 small ones.

* `choose_units_cuda(q_sum, reprs, units_before, shared, k)`: lookup.choose_units (unit_scores,
  combine, mask_later, selection_keys, select_units) in two or three launches: the selection keys
  of every block (each representative read once); for long rows the best keys of each 1,024 by a
  bitonic top-k (tl.topk), in parallel; then each row's best, turned back into ids and sorted.
  (On the H100, profile_prefill: a first version that scored and took the top-k of (16 blocks, 256
  units) tiles in one kernel took 390 us per layer (run 4); a scoring pass that loaded each head's
  tile once per block, 87 us (run 5); one that loaded every head's tile at once and reduced
  (heads, units, d) products in registers, 68 us (run 6). Now one IEEE fp32 tl.dot per head scores
  every block of a 64-unit tile.) The scores are fp32 products
  summed in the kernel's order (the PyTorch path's einsum sums in cuBLAS's): they may differ in the
  last bit, so near-ties may break differently between the two paths.
* `distinct_pairs_cuda(ids)`: gather.distinct_pairs (the same outputs: distinct keys sorted, their
  count, each entry's slot) in one program that sorts in registers (ids of one call: a few hundred
  entries; torch.sort's radix sort of 336 took 27 us on the H100, profile_prefill).

Tests compare both with the PyTorch versions. Imported only on CUDA (needs triton).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

DISTINCT_MAX = 4096  # entries distinct_pairs_cuda takes (< 2**13: indices are packed in 13 bits)


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


@triton.jit(do_not_specialize=["n_units", "stride_h", "stride_u", "ub_stride", "stride_r"])
def _unit_keys_kernel(
    QS, R, UB, KEYS, n_units, stride_h, stride_u, ub_stride, stride_r,
    NB: tl.constexpr, NBP: tl.constexpr, KVH: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
    BU: tl.constexpr, SHARED: tl.constexpr,
):  # fmt: skip
    """Program (unit tile, index): the selection keys of units u for every block, written to KEYS (NB, rows,
    n_units). Per head, one product of the blocks' q_sum (NB padded to NBP rows) by the tile's
    representatives R (KVH, >= n_units, D) scores every block at once (fp32, IEEE); q_sum QS
    (NB, KVH, D) fp32 (D padded to DP >= 16 with zeros); units >= UB[b * ub_stride] hidden from block b.
    Several indexes (the stacked rows of a batch, program_id(1)): index i's representatives at
    R + i * stride_r, its blocks, bounds and keys after the NB of each index before it."""
    i = tl.program_id(1)
    R += i * stride_r
    QS += i * NB * KVH * D
    UB += i * NB * ub_stride
    KEYS += i * NB * (1 if SHARED else KVH) * n_units
    u = tl.program_id(0) * BU + tl.arange(0, BU)
    real = u < n_units
    dd = tl.arange(0, DP)
    d_ok = dd < D
    b = tl.arange(0, NBP)
    b_ok = b < NB
    visible = u[None, :] < tl.load(UB + b * ub_stride, mask=b_ok, other=0)[:, None]  # (NBP, BU)
    store_ok = b_ok[:, None] & real[None, :]
    total = tl.zeros((NBP, BU), tl.float32)
    for h in tl.static_range(KVH):
        r = tl.load(R + h * stride_h + u[:, None] * stride_u + dd[None, :], mask=real[:, None] & d_ok[None, :],
                    other=0.0)  # fmt: skip
        q = tl.load(
            QS + (b[:, None] * KVH + h) * D + dd[None, :], mask=b_ok[:, None] & d_ok[None, :], other=0.0
        )
        s = tl.dot(q, tl.trans(r.to(tl.float32)), input_precision="ieee")  # (NBP, BU)
        if SHARED:
            total += s
        else:
            key = _selection_key(s, u[None, :], visible, real[None, :])
            tl.store(KEYS + (b[:, None] * KVH + h) * n_units + u[None, :], key, mask=store_ok)
    if SHARED:
        key = _selection_key(total, u[None, :], visible, real[None, :])
        tl.store(KEYS + b[:, None] * n_units + u[None, :], key, mask=store_ok)


@triton.jit(do_not_specialize=["n", "n_seg"])
def _segment_top_kernel(KEYS, PART, n, n_seg, KP: tl.constexpr, SEG: tl.constexpr):
    """Program (row, segment): the KP best keys of SEG keys of the row (KEYS (rows, n)) to PART (rows, n_seg, KP)."""
    row = tl.program_id(0)
    seg = tl.program_id(1)
    c = seg * SEG + tl.arange(0, SEG)
    x = tl.load(KEYS + row * n + c, mask=c < n, other=-(2**63))
    tl.store(PART + (row * n_seg + seg) * KP + tl.arange(0, KP), tl.topk(x, KP))


@triton.jit(do_not_specialize=["n_cands", "n_out"])
def _final_top_kernel(CANDS, IDS, n_cands, n_out, KP: tl.constexpr, CH: tl.constexpr):
    """Program (row): the KP best of the row's n_cands candidate keys (CANDS (rows, n_cands)), the first
    n_out of them turned back into unit ids, written to IDS (rows, n_out) in ascending order."""
    row = tl.program_id(0)
    best = tl.full((KP,), -(2**63), tl.int64)
    for c0 in range(0, n_cands, CH):
        c = c0 + tl.arange(0, CH)
        top = tl.topk(tl.load(CANDS + row * n_cands + c, mask=c < n_cands, other=-(2**63)), KP)
        best = tl.topk(tl.reshape(tl.join(best, top), (2 * KP,)), KP)
    pos = tl.arange(0, KP)
    ids = tl.full((KP,), 0xFFFFFFFF, tl.int64) - (best & tl.full((KP,), 0xFFFFFFFF, tl.int64))
    ids = tl.sort(tl.where(pos < n_out, ids, tl.full((KP,), 2**62, tl.int64)))
    tl.store(IDS + row * n_out + pos, ids, mask=pos < n_out)


SEGMENT_KEYS = 1024  # keys per program of choose_units_cuda's segment pass
UNITS_PER_PROGRAM = 64  # units per program of its scoring pass


def choose_units_cuda(
    q_sum: torch.Tensor, reprs: torch.Tensor, units_before: torch.Tensor, shared: bool, k: int
) -> torch.Tensor:
    """lookup.choose_units on CUDA in two or three launches: q_sum (blocks, kv_heads, d) fp32; reprs
    (kv_heads, n, d) (last dim contiguous), all n scored; units_before (blocks,) or (1,) (shared by all
    blocks) long on the device -> ids (blocks, 1 if shared else kv_heads, min(k, n)) long, ascending."""
    nb, kvh, d = q_sum.shape
    n = reprs.shape[1]
    if units_before.numel() not in (1, nb):
        raise ValueError(f"units_before has {units_before.numel()} entries for {nb} blocks")
    if reprs.shape[0] != kvh or reprs.shape[2] != d or reprs.stride(2) != 1:
        raise ValueError(f"representatives {tuple(reprs.shape)} do not match q_sum {tuple(q_sum.shape)}")
    rows = 1 if shared else kvh
    kk = min(k, n)
    dev = q_sum.device
    ids = torch.empty(nb, rows, kk, dtype=torch.int64, device=dev)
    if kk == 0 or nb == 0:
        return ids
    kp = max(16, triton.next_power_of_2(kk))
    keys = torch.empty(nb, rows, n, dtype=torch.int64, device=dev)
    _unit_keys_kernel[(triton.cdiv(n, UNITS_PER_PROGRAM), 1)](
        q_sum.float().contiguous(), reprs, units_before, keys, n, reprs.stride(0), reprs.stride(1),
        0 if units_before.numel() == 1 else units_before.stride(0), 0,
        NB=nb, NBP=max(16, triton.next_power_of_2(nb)), KVH=kvh, D=d, DP=max(16, triton.next_power_of_2(d)), BU=UNITS_PER_PROGRAM, SHARED=shared,
        num_warps=4,
    )  # fmt: skip
    return _best_ids(keys, ids, kp)


def _best_ids(keys: torch.Tensor, ids: torch.Tensor, kp: int) -> torch.Tensor:
    """Selection keys (..., n) -> the best ids[-1] of each row into ids (..., kk), ascending: for long rows
    the best kp of each SEGMENT_KEYS first, in parallel, then each row's best."""
    n, kk = keys.shape[-1], ids.shape[-1]
    n_rows = keys.numel() // n
    cands, n_cands = keys, n
    if n > 2 * SEGMENT_KEYS and kp <= SEGMENT_KEYS:  # the best kp of each segment first, in parallel
        n_seg = triton.cdiv(n, SEGMENT_KEYS)
        cands, n_cands = torch.empty(n_rows, n_seg, kp, dtype=torch.int64, device=keys.device), n_seg * kp
        _segment_top_kernel[(n_rows, n_seg)](keys, cands, n, n_seg, KP=kp, SEG=SEGMENT_KEYS, num_warps=4)
    _final_top_kernel[(n_rows,)](cands, ids, n_cands, kk, KP=kp, CH=max(kp, 1024), num_warps=4)
    return ids


def choose_units_stacked_cuda(
    q_sum: torch.Tensor, reprs: torch.Tensor, units: torch.Tensor, shared: bool, k: int
) -> torch.Tensor:
    """The stacked rows' lookup (context/stacked.py: each row a session with its own index) in the same
    launches: q_sum (S, kv_heads, d) fp32, one block per row; reprs (S, kv_heads, n, d) each row's
    representatives padded to n (last dim contiguous); units (S,) long: row s chooses among units
    < units[s] -> ids (S, 1 if shared else kv_heads, min(k, n)) long, ascending (lookup.choose_units of
    each row alone)."""
    n_rows, kvh, d = q_sum.shape
    n = reprs.shape[2]
    if reprs.shape[:2] != (n_rows, kvh) or reprs.shape[3] != d or reprs.stride(3) != 1:
        raise ValueError(f"representatives {tuple(reprs.shape)} do not match q_sum {tuple(q_sum.shape)}")
    if units.numel() != n_rows:
        raise ValueError(f"units has {units.numel()} entries for {n_rows} rows")
    kk = min(k, n)
    ids = torch.empty(n_rows, 1 if shared else kvh, kk, dtype=torch.int64, device=q_sum.device)
    if kk == 0 or n_rows == 0:
        return ids
    return _best_ids(stacked_unit_keys(q_sum, reprs, units, shared), ids, max(16, triton.next_power_of_2(kk)))


def stacked_unit_keys(
    q_sum: torch.Tensor, reprs: torch.Tensor, units: torch.Tensor, shared: bool
) -> torch.Tensor:
    """choose_units_stacked_cuda's scoring launch: (S, 1 or kv_heads, n) int64, lookup.selection_keys of
    each row's masked scores (mask_later(combine(unit_scores)))."""
    n_rows, kvh, d = q_sum.shape
    n = reprs.shape[2]
    keys = torch.empty(n_rows, 1 if shared else kvh, n, dtype=torch.int64, device=q_sum.device)
    _unit_keys_kernel[(triton.cdiv(n, UNITS_PER_PROGRAM), n_rows)](
        q_sum.float().contiguous(), reprs, units, keys, n, reprs.stride(1), reprs.stride(2), units.stride(0),
        reprs.stride(0), NB=1, NBP=16, KVH=kvh, D=d, DP=max(16, triton.next_power_of_2(d)),
        BU=UNITS_PER_PROGRAM, SHARED=shared, num_warps=4,
    )  # fmt: skip
    return keys


@triton.jit(do_not_specialize=["n"])
def _distinct_kernel(IDS, KEYS, COUNT, SLOT, n, H: tl.constexpr, T: tl.constexpr, NP: tl.constexpr):
    """One program: entry i of IDS ((rows, H, T) flat) has key ids[i] * H + its head. The keys, packed
    with their entry index, are sorted in registers (bitonic); a key differing from the one before it
    starts a new slot (SLOT holds the sorted keys meanwhile); KEYS[slot] = key, SLOT[entry] = slot."""
    i = tl.arange(0, NP)
    ok = i < n
    key = tl.load(IDS + i, mask=ok, other=0) * H + (i // T) % H
    packed = tl.sort(tl.where(ok, (key << 13) | i, tl.full((NP,), 2**63 - 1, tl.int64)))
    sorted_key = packed >> 13
    entry = packed & 8191
    tl.store(SLOT + i, sorted_key, mask=ok)
    tl.debug_barrier()
    prev = tl.load(SLOT + i - 1, mask=ok & (i > 0), other=-1)
    new = (sorted_key != prev) & ok
    slot = tl.cumsum(new.to(tl.int32), axis=0) - 1
    tl.store(KEYS + i, tl.zeros((NP,), tl.int64), mask=ok)
    tl.debug_barrier()
    tl.store(KEYS + slot, sorted_key, mask=ok)  # equal keys write equal values
    tl.store(SLOT + entry, slot.to(tl.int64), mask=ok)
    tl.store(COUNT, tl.sum(new.to(tl.int64), axis=0))


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
        ids.contiguous(), keys, count, slot, n, H=h, T=t, NP=max(32, triton.next_power_of_2(n)), num_warps=4,
    )  # fmt: skip
    return keys, count, slot
