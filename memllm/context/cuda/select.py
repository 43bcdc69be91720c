"""CUDA fast path of the probe's scan (select.unit_lse): every unit's log-sum-exp for every query row, in one launch.

The reference reads the units' keys in chunks through the gather (K and V, into device memory) and runs a
matmul and a log-sum-exp per chunk: with 16 MB of logits a chunk, a 120-token question at 1M tokens is
hundreds of chunks per layer, thousands of launches per question. Here one program per (unit, KV head)
reads the unit's keys once from pinned host memory through the segment tables (cuda/gather.py; no V, no
copy in device memory; int8 keys dequantized and rounded to the model dtype as the gather does) and loops
over the query rows in tiles: logits of a tile (rows, block) stay in registers, only each row's
log-sum-exp over the unit's keys is written. The products are fp32's to rounding: PRECISION "tf32x3"
(three TF32 tensor-core products, the split of each fp32 operand into a TF32 part and its remainder) or
"ieee" (fp32 FMA, as the reference's fp32 matmul, on the CUDA cores).
Imported only on CUDA (needs triton).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from memllm.context.cuda.gather import TL_DTYPES, segment_tables
from memllm.context.units import UnitStore

ROWS = 64  # query rows a program's tile holds: (ROWS, block) fp32 logits in registers
PRECISION = "tf32x3"  # tl.dot's input_precision (module docstring)


@triton.jit(do_not_specialize=["n_units", "rows"])
def _unit_lse_kernel(
    q_ptr,  # (kv_heads, rows, HEAD_DIM) fp32, contiguous
    k_table,  # (segments,) int64 base addresses of K segments
    ks_table,  # int8 only: key scales (segment_units, kv_heads, 1, head_dim) fp32
    out_ptr,  # (kv_heads, n_units, rows) fp32
    n_units,
    rows,
    scale,
    KV_HEADS: tl.constexpr,
    SEG_UNITS: tl.constexpr,
    BLOCK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    SRC_DTYPE: tl.constexpr,
    KEY_DTYPE: tl.constexpr,  # the gather's output dtype: keys are rounded to it, as the reference reads them
    QUANT: tl.constexpr,
    ROWS: tl.constexpr,
    PRECISION: tl.constexpr,
):
    u = tl.program_id(0)
    h = tl.program_id(1)
    seg = u // SEG_UNITS
    off = u % SEG_UNITS
    t = tl.arange(0, BLOCK)
    d = tl.arange(0, HEAD_DIM)
    k_src = tl.load(k_table + seg).to(tl.pointer_type(SRC_DTYPE))
    k = tl.load(k_src + (off * KV_HEADS + h) * BLOCK * HEAD_DIM + t[:, None] * HEAD_DIM + d[None, :]).to(tl.float32)
    if QUANT:
        ks = tl.load(ks_table + seg).to(tl.pointer_type(tl.float32))
        k = k * tl.load(ks + (off * KV_HEADS + h) * HEAD_DIM + d)[None, :]
    kt = tl.trans(k.to(KEY_DTYPE).to(tl.float32))  # (HEAD_DIM, BLOCK)
    out = out_ptr + (h * n_units + u).to(tl.int64) * rows  # kv_heads * units * rows may pass 2**31
    for r0 in range(0, rows, ROWS):
        r = r0 + tl.arange(0, ROWS)
        live = r < rows
        q = tl.load(q_ptr + (h * rows + r)[:, None] * HEAD_DIM + d[None, :], mask=live[:, None], other=0.0)
        s = tl.dot(q, kt, input_precision=PRECISION) * scale  # (ROWS, BLOCK)
        top = tl.max(s, axis=1)
        lse = top + tl.log(tl.sum(tl.exp(s - top[:, None]), axis=1))
        tl.store(out + r, lse, mask=live)


def supports(store: UnitStore) -> bool:
    """Shapes the kernel takes: block and head_dim powers of two of at least 16 (tl.dot, tl.arange)."""
    bs, d = store.block_size, store.head_dim
    return bs >= 16 and d >= 16 and bs & (bs - 1) == 0 and d & (d - 1) == 0


def unit_lse_uva(q: torch.Tensor, store: UnitStore, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """select.unit_lse on CUDA: q (kv_heads, rows, head_dim) -> (kv_heads, rows, n_units) fp32, every unit's
    log-sum-exp of scale * q . k over its keys (read in `dtype`, the model's, as the gather would give them).
    The result is a transposed view of a (kv_heads, n_units, rows) tensor."""
    kvh, rows, d = q.shape
    n = store.n_units
    out = torch.empty(kvh, n, rows, dtype=torch.float32, device=q.device)
    if n == 0 or rows == 0:
        return out.transpose(1, 2)
    tables = segment_tables(store)
    quant = store.offload_dtype == "int8"
    _unit_lse_kernel[(n, kvh)](
        q.float().contiguous(),
        tables["k"],
        tables["k_scale"] if quant else tables["k"],
        out,
        n,
        rows,
        float(scale),
        KV_HEADS=kvh,
        SEG_UNITS=store.segment_units,
        BLOCK=store.block_size,
        HEAD_DIM=d,
        SRC_DTYPE=TL_DTYPES[store.host_dtype],
        KEY_DTYPE=TL_DTYPES[dtype],
        QUANT=quant,
        ROWS=ROWS,
        PRECISION=PRECISION,
        num_warps=4,
    )
    return out.transpose(1, 2)
