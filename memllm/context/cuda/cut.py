"""CUDA fast path of cutting units in a static call: ContextMemoryLayer.cut_units followed by
UnitStore.write_at, in one Triton launch instead of about a dozen.

Program (unit i, kv head h, part p) of `cut_units_cuda`:
  * rotates its rows of the unit's keys back to position 0 (cuda/positions.rotate_rows, as cut_units'
    rotation does, rounded to the model dtype) and writes them and the values into the store's
    segment at unit first + i (through the segment tables, as cuda/gather.write_units_uva);
  * part 0 also picks the unit's repr_topk keys that received the most attention (the lower index
    first among equal scores) and writes the mean of their rotated keys (in fp32, rounded to the
    model dtype as UnitStore._mean) into the representatives' buffer at unit first + i.
The unit index `first` is a device scalar, so a CUDA graph can replay the call. bf16/fp16/fp32 units
only (int8 units are quantized on the plain path). Tests compare it with cut_units + write_at.
Imported only on CUDA (needs triton).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from memllm.context.cuda.gather import TL_DTYPES, segment_tables
from memllm.context.cuda.positions import rotate_rows
from memllm.context.units import UnitStore

ROWS = 32  # key rows per program


@triton.jit(do_not_specialize=["n_keys", "cut_start", "row0", "repr_stride"])
def _cut_kernel(
    K, V, SCORE, COS, SIN, FIRST, K_TABLE, V_TABLE, REPR,
    n_keys, cut_start, row0, repr_stride,
    KVH: tl.constexpr, SEG_UNITS: tl.constexpr, BS: tl.constexpr, HALF: tl.constexpr, R: tl.constexpr,
    BT: tl.constexpr, DST: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    part = tl.program_id(1)
    i = pid // KVH
    h = pid % KVH
    d: tl.constexpr = 2 * HALF
    key0 = cut_start + i * BS  # the unit's first key in the window
    u = tl.load(FIRST) + i
    seg = u // SEG_UNITS
    j = tl.arange(0, HALF)
    rows = part * BT + tl.arange(0, BT)
    src = (h * n_keys + key0 + rows)[:, None] * d
    table = (row0 + i * BS + rows)[:, None] * d
    every = rows[:, None] < BS
    k1, k2 = rotate_rows(K + src, COS + table, SIN + table, j[None, :], every, -1.0, HALF)
    dst = (((u % SEG_UNITS) * KVH + h) * BS + rows)[:, None] * d + j[None, :]
    k_dst = tl.load(K_TABLE + seg).to(tl.pointer_type(DST))
    v_dst = tl.load(V_TABLE + seg).to(tl.pointer_type(DST))
    tl.store(k_dst + dst, k1.to(K.dtype.element_ty).to(DST))
    tl.store(k_dst + dst + HALF, k2.to(K.dtype.element_ty).to(DST))
    tl.store(v_dst + dst, tl.load(V + src + j[None, :]).to(DST))
    tl.store(v_dst + dst + HALF, tl.load(V + src + HALF + j[None, :]).to(DST))
    if part == 0:
        t = tl.arange(0, BS)
        score = tl.load(SCORE + h * n_keys + key0 + t)
        taken = t < 0
        acc1 = tl.zeros((HALF,), tl.float32)
        acc2 = tl.zeros((HALF,), tl.float32)
        for _ in tl.static_range(R):
            best = tl.max(tl.where(taken, float("-inf"), score), axis=0)
            pick = tl.min(tl.where((score == best) & (~taken), t, BS - 1), axis=0)
            taken = taken | (t == pick)
            r1, r2 = rotate_rows(K + (h * n_keys + key0 + pick) * d, COS + (row0 + i * BS + pick) * d,
                                 SIN + (row0 + i * BS + pick) * d, j, j < HALF, -1.0, HALF)  # fmt: skip
            acc1 += r1.to(K.dtype.element_ty).to(tl.float32)
            acc2 += r2.to(K.dtype.element_ty).to(tl.float32)
        out = REPR + h * repr_stride + u * d + j
        tl.store(out, (acc1 / R).to(REPR.dtype.element_ty))
        tl.store(out + HALF, (acc2 / R).to(REPR.dtype.element_ty))


def cut_units_cuda(
    store: UnitStore,
    first: torch.Tensor,
    k_all: torch.Tensor,
    v_all: torch.Tensor,
    score: torch.Tensor,
    cut_start: int,
    n: int,
    table_row: int,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> None:
    """Units [cut_start, cut_start + n * block_size) of the window (k_all / v_all (kv_heads, W, d) in the
    model dtype, score (kv_heads, W) fp32) written at units first, first + 1, ... (first (1,) long on
    the device): keys rotated back by the angles of Rotary table rows table_row + t (sin negated),
    representatives from the scores. The room must exist (UnitStore.ensure_room)."""
    if n == 0:
        return
    kvh, n_keys, d = k_all.shape
    bs = store.block_size
    if store.offload_dtype == "int8":
        raise ValueError("cut_units_cuda does not quantize: int8 units take the plain path")
    if d & (d - 1) or bs & (bs - 1) or store.repr_topk > bs:
        raise ValueError(f"cut_units_cuda needs power-of-two head_dim and block_size (got {d}, {bs})")
    for name, t in (("k_all", k_all), ("v_all", v_all), ("score", score)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    tables = segment_tables(store)
    reprs = store.repr_buffer()
    if reprs.stride(1) != d or reprs.stride(2) != 1:
        raise ValueError("the representatives' buffer must be (kv_heads, capacity, head_dim) contiguous")
    bt = min(ROWS, bs)
    _cut_kernel[(n * kvh, bs // bt)](
        k_all, v_all, score, cos, sin, first.reshape(1), tables["k"], tables["v"], reprs,
        n_keys, cut_start, table_row, reprs.stride(0),
        KVH=kvh, SEG_UNITS=store.segment_units, BS=bs, HALF=d // 2, R=store.repr_topk, BT=bt,
        DST=TL_DTYPES[store.host_dtype], num_warps=4,
    )  # fmt: skip
