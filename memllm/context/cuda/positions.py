"""CUDA fast path of positions.Rotary's rotations: one Triton launch instead of five PyTorch ones.

`rotate(x, table_row, per_row, sign, cos, sin, dtype)`: row t of x (..., n, head_dim) is rotated by
the angle of table row `table_row + per_row * t` (per_row 1: one angle per row, as Rotary.rotate;
0: one angle for all rows, as Rotary.rotate_const), with sin negated when sign is -1; computed in
fp32 as Rotary.apply (x * cos + rotate_half(x) * sin), written in `dtype`. The tables are Rotary's
(normalised cos/sin over angles -(P-1)..(P-1)); `out` lets it write into a slice of a longer buffer.
`rotate_rows` is the rotation itself, shared by every kernel that rotates (here, cuda/cut.py), so
they round alike. `memory_queries` rotates the memory blocks' queries and sums them per block (the
lookup's q_sum) in one pass. Tests compare them with Rotary (and lookup.block_query_sums). Imported
only on CUDA (needs triton).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def rotate_rows(XP, CP, SP, j, ok, sign, HALF: tl.constexpr):
    """Rows at XP (pointers to row starts, broadcast against j = arange(HALF)) rotated by the table rows
    at CP / SP, sin times sign: the two halves, fp32. Every kernel that rotates keys uses this, so
    they round alike."""
    x1 = tl.load(XP + j, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(XP + HALF + j, mask=ok, other=0.0).to(tl.float32)
    c1 = tl.load(CP + j, mask=ok, other=0.0)
    c2 = tl.load(CP + HALF + j, mask=ok, other=0.0)
    s1 = tl.load(SP + j, mask=ok, other=0.0) * sign
    s2 = tl.load(SP + HALF + j, mask=ok, other=0.0) * sign
    return x1 * c1 - x2 * s1, x2 * c2 + x1 * s2


@triton.jit(do_not_specialize=["n_rows", "n", "row0", "x_batch", "x_row", "out_batch"])
def _rotate_kernel(
    X, OUT, COS, SIN, n_rows, n, row0, per_row, sign, x_batch, x_row, out_batch,
    HALF: tl.constexpr, BR: tl.constexpr,
):  # fmt: skip
    r = tl.program_id(0) * BR + tl.arange(0, BR)  # flat row over (batch, n)
    ok = r < n_rows
    t = r % n
    table = row0 + per_row * t
    j = tl.arange(0, HALF)
    d: tl.constexpr = 2 * HALF
    src = (r // n) * x_batch + t * x_row
    dst = OUT + ((r // n) * out_batch + t * d)[:, None] + j[None, :]
    o1, o2 = rotate_rows(X + src[:, None], COS + table[:, None] * d, SIN + table[:, None] * d, j[None, :],
                         ok[:, None], sign, HALF)  # fmt: skip
    tl.store(dst, o1.to(OUT.dtype.element_ty), mask=ok[:, None])
    tl.store(dst + HALF, o2.to(OUT.dtype.element_ty), mask=ok[:, None])


def _rows_view(t: torch.Tensor, packed: bool = True) -> torch.Tensor | None:
    """t (..., n, d) as a (batch, n, d) view with a contiguous last dim (packed: rows d apart), or None."""
    if t.dim() != 3:
        if not t.is_contiguous():
            return None
        t = t.reshape(-1, t.shape[-2], t.shape[-1])
    if t.stride(2) != 1 or (packed and t.stride(1) != t.shape[2] and t.shape[1] != 1):
        return None
    return t


def rotate(
    x: torch.Tensor,
    table_row: int,
    per_row: int,
    sign: int,
    cos: torch.Tensor,
    sin: torch.Tensor,
    dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """x (..., n, head_dim) on CUDA -> rotated copy in `dtype` (see the module docstring). out: where to
    write it instead of a new tensor, (batch, n, head_dim) with rows head_dim apart (a slice of a
    longer buffer along n, say); x may be any (batch, n, head_dim) view with a contiguous last dim
    (the model's queries are (heads, c, d) views of (c, heads, d))."""
    d, n = x.shape[-1], x.shape[-2]
    rows = _rows_view(x, packed=False)
    if rows is None:
        rows = _rows_view(x.contiguous())
    if out is None:
        out = torch.empty(x.shape, dtype=dtype, device=x.device)
    target = _rows_view(out)
    if target is None or target.shape != rows.shape or out.dtype != dtype:
        raise ValueError(f"out must be {dtype} (batch, n, d) rows {d} apart, shaped like x {tuple(x.shape)}")
    n_rows = rows.shape[0] * n
    if n_rows == 0:
        return out
    br = 32
    _rotate_kernel[(triton.cdiv(n_rows, br),)](
        rows, target, cos, sin, n_rows, n, table_row, per_row, float(sign), rows.stride(0), rows.stride(1),
        target.stride(0),
        HALF=d // 2, BR=br,
    )  # fmt: skip
    return out


@triton.jit(do_not_specialize=["c", "row0", "splits"])
def _memory_queries_kernel(
    Q, OUT, PART, COS, SIN, MB_Q0, MB_Q1, c, row0, splits, stride_h, stride_c,
    G: tl.constexpr, KVH: tl.constexpr, HALF: tl.constexpr, BR: tl.constexpr,
):  # fmt: skip
    """Program (memory block b, kv head h, split s): rows [MB_Q0[b] + s * BR, ...) of block b, for the
    group's heads, rotated by the angles of table rows row0 + t with sin negated, written to OUT
    (heads, c, D); their fp32 sum to PART[b, s, h]."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    rows = tl.load(MB_Q0 + b) + split * BR + tl.arange(0, BR)
    ok = rows < tl.load(MB_Q1 + b)
    j = tl.arange(0, HALF)
    d: tl.constexpr = 2 * HALF
    table = (row0 + rows)[:, None] * d
    s1 = tl.zeros((HALF,), tl.float32)
    s2 = tl.zeros((HALF,), tl.float32)
    for g in tl.static_range(G):
        src = Q + ((h * G + g) * stride_h + rows * stride_c)[:, None]
        o1, o2 = rotate_rows(src, COS + table, SIN + table, j[None, :], ok[:, None], -1.0, HALF)
        dst = OUT + ((h * G + g) * c + rows)[:, None] * d + j[None, :]
        tl.store(dst, o1.to(OUT.dtype.element_ty), mask=ok[:, None])
        tl.store(dst + HALF, o2.to(OUT.dtype.element_ty), mask=ok[:, None])
        s1 += tl.sum(o1, axis=0)  # masked rows rotate zeros
        s2 += tl.sum(o2, axis=0)
    at = PART + ((b * splits + split) * KVH + h) * d + j
    tl.store(at, s1)
    tl.store(at + HALF, s2)


ROWS = 64  # rows of one block per program of memory_queries


def memory_queries(
    q: torch.Tensor,
    table_row: int,
    cos: torch.Tensor,
    sin: torch.Tensor,
    mb_q0: torch.Tensor,
    mb_q1: torch.Tensor,
    kv_heads: int,
    dtype: torch.dtype,
    longest: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The memory pass's queries and the lookup's sums in two launches: q (heads, c, d) on CUDA (any view
    with a contiguous last dim); row t rotated by the angle of table row table_row + t with sin negated
    (Rotary.rotated(q, start, -1)) -> (q_mem (heads, c, d) in `dtype`, written for the memory blocks'
    rows only (mb_q0 / mb_q1 (blocks,) int32 on the device, the longest block `longest` rows); q_sum
    (blocks, kv_heads, d) fp32: lookup.block_query_sums of the fp32 rotation, summed per ROWS rows,
    then those partial sums in order)."""
    heads, c, d = q.shape
    if q.stride(2) != 1:
        q = q.contiguous()
    n_mb = mb_q0.shape[0]
    splits = max(1, triton.cdiv(longest, ROWS))
    out = torch.empty(heads, c, d, dtype=dtype, device=q.device)
    part = torch.empty(n_mb, splits, kv_heads, d, dtype=torch.float32, device=q.device)
    if n_mb == 0 or c == 0:
        return out, part.sum(1)
    _memory_queries_kernel[(n_mb, kv_heads, splits)](
        q, out, part, cos, sin, mb_q0, mb_q1, c, table_row, splits, q.stride(0), q.stride(1),
        G=heads // kv_heads, KVH=kv_heads, HALF=d // 2, BR=ROWS, num_warps=4,
    )  # fmt: skip
    return out, part.sum(1)
