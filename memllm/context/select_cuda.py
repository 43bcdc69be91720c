"""CUDA fast paths of the lookup (lookup.py) and of the gather's de-duplication (gather.py): one Triton
launch each where PyTorch took ~15 small ones.

* `choose_units_cuda(q_sum, reprs, units_before, shared, k)`: lookup.choose_units (unit_scores,
  combine, mask_later, selection_keys, top_ids) in two launches: pieces of PIECE units scored for
  every block at once (tl.dot in fp32, "ieee"), each row's best keys per piece by a bitonic top-k;
  then each row's best of those, turned back into ids and sorted. The scores are fp32 products
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


@triton.jit(do_not_specialize=["n_units", "stride_h", "stride_u", "ub_stride", "n_pieces"])
def _piece_top_kernel(
    QS, R, UB, PART, n_units, stride_h, stride_u, ub_stride, n_pieces,
    NB: tl.constexpr, NBP: tl.constexpr, KVH: tl.constexpr, D: tl.constexpr, P: tl.constexpr, KP: tl.constexpr,
    SHARED: tl.constexpr,
):  # fmt: skip
    """Program (piece): the scores of units [piece * P, (piece + 1) * P) for every block at once (one
    read of the representatives R (KVH, >= n_units, D), q_sum QS (NB, KVH, D) fp32), made selection
    keys, and each row's KP best written to PART (NB, rows, n_pieces, KP)."""
    piece = tl.program_id(0)
    u = piece * P + tl.arange(0, P)
    real = u < n_units
    b = tl.arange(0, NBP)
    b_ok = b < NB
    visible = u[None, :] < tl.load(UB + b * ub_stride, mask=b_ok, other=0)[:, None]  # (NBP, P)
    dd = tl.arange(0, D)
    kk = tl.arange(0, KP)
    total = tl.zeros((NBP, P), tl.float32)
    for h in tl.static_range(KVH):
        q = tl.load(QS + (b[:, None] * KVH + h) * D + dd[None, :], mask=b_ok[:, None], other=0.0)
        r = tl.load(R + h * stride_h + u[:, None] * stride_u + dd[None, :], mask=real[:, None], other=0.0)
        s = tl.dot(q, tl.trans(r.to(tl.float32)), input_precision="ieee")  # (NBP, P) fp32
        if SHARED:
            total += s
        else:
            top = tl.topk(_selection_key(s, u[None, :], visible, real[None, :]), KP)
            tl.store(PART + (((b * KVH + h) * n_pieces + piece) * KP)[:, None] + kk[None, :], top,
                     mask=b_ok[:, None])  # fmt: skip
    if SHARED:
        top = tl.topk(_selection_key(total, u[None, :], visible, real[None, :]), KP)
        tl.store(PART + ((b * n_pieces + piece) * KP)[:, None] + kk[None, :], top, mask=b_ok[:, None])


@triton.jit(do_not_specialize=["n_cands", "n_out"])
def _final_top_kernel(PART, IDS, n_cands, n_out, KP: tl.constexpr, CH: tl.constexpr):
    """Program (row): the KP best of the row's n_cands candidate keys, the first n_out of them turned
    back into unit ids, written to IDS (rows, n_out) in ascending order."""
    row = tl.program_id(0)
    worst = tl.full((KP,), -(2**63), tl.int64)
    best = worst
    for c0 in range(0, n_cands, CH):
        c = c0 + tl.arange(0, CH)
        x = tl.load(PART + row * n_cands + c, mask=c < n_cands, other=-(2**63))
        top = tl.topk(x, KP)
        best = tl.topk(tl.reshape(tl.join(best, top), (2 * KP,)), KP)
    pos = tl.arange(0, KP)
    ids = tl.full((KP,), 0xFFFFFFFF, tl.int64) - (best & tl.full((KP,), 0xFFFFFFFF, tl.int64))
    ids = tl.sort(tl.where(pos < n_out, ids, tl.full((KP,), 2**62, tl.int64)))
    tl.store(IDS + row * n_out + pos, ids, mask=pos < n_out)


PIECE = 256  # units per program of choose_units_cuda's first pass


def choose_units_cuda(
    q_sum: torch.Tensor, reprs: torch.Tensor, units_before: torch.Tensor, shared: bool, k: int
) -> torch.Tensor:
    """lookup.choose_units on CUDA in two launches: q_sum (blocks, kv_heads, d) fp32; reprs (kv_heads, n, d)
    (last dim contiguous), all n scored; units_before (blocks,) or (1,) (shared by all blocks) long on
    the device -> ids (blocks, 1 if shared else kv_heads, min(k, n)) long, ascending per row."""
    nb, kvh, d = q_sum.shape
    n = reprs.shape[1]
    if units_before.numel() not in (1, nb):
        raise ValueError(f"units_before has {units_before.numel()} entries for {nb} blocks")
    if reprs.shape[0] != kvh or reprs.shape[2] != d or reprs.stride(2) != 1:
        raise ValueError(f"representatives {tuple(reprs.shape)} do not match q_sum {tuple(q_sum.shape)}")
    rows = 1 if shared else kvh
    kk = min(k, n)
    ids = torch.empty(nb, rows, kk, dtype=torch.int64, device=q_sum.device)
    if kk == 0 or nb == 0:
        return ids
    kp = max(16, triton.next_power_of_2(kk))
    piece = max(PIECE, kp)
    pieces = triton.cdiv(n, piece)
    part = torch.empty(nb, rows, pieces, kp, dtype=torch.int64, device=q_sum.device)
    _piece_top_kernel[(pieces,)](
        q_sum.float().contiguous(), reprs, units_before, part, n, reprs.stride(0), reprs.stride(1),
        0 if units_before.numel() == 1 else units_before.stride(0), pieces,
        NB=nb, NBP=max(16, triton.next_power_of_2(nb)), KVH=kvh, D=d, P=piece, KP=kp, SHARED=shared, num_warps=4,
    )  # fmt: skip
    _final_top_kernel[(nb * rows,)](part, ids, pieces * kp, kk, KP=kp, CH=max(kp, 1024), num_warps=4)
    return ids


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
