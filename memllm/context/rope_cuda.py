"""CUDA fast path of positions.Rotary's rotations: one Triton launch instead of five PyTorch ones.

`rotate(x, table_row, per_row, sign, cos, sin, dtype)`: row t of x (..., n, head_dim) is rotated by
the angle of table row `table_row + per_row * t` (per_row 1: one angle per row, as Rotary.rotate;
0: one angle for all rows, as Rotary.rotate_const), with sin negated when sign is -1; computed in
fp32 as Rotary.apply (x * cos + rotate_half(x) * sin), written in `dtype`. The tables are Rotary's
(normalised cos/sin over angles -(P-1)..(P-1)). Tests compare it with Rotary on CUDA. Imported only
on CUDA (needs triton).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["n_rows", "n", "row0"])
def _rotate_kernel(
    X, OUT, COS, SIN, n_rows, n, row0, per_row, sign,
    HALF: tl.constexpr, BR: tl.constexpr,
):  # fmt: skip
    r = tl.program_id(0) * BR + tl.arange(0, BR)  # flat row over (..., n)
    ok = r < n_rows
    t = r % n
    table = row0 + per_row * t
    j = tl.arange(0, HALF)
    d: tl.constexpr = 2 * HALF
    x1 = tl.load(X + r[:, None] * d + j[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    x2 = tl.load(X + r[:, None] * d + HALF + j[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    c1 = tl.load(COS + table[:, None] * d + j[None, :], mask=ok[:, None], other=0.0)
    c2 = tl.load(COS + table[:, None] * d + HALF + j[None, :], mask=ok[:, None], other=0.0)
    s1 = tl.load(SIN + table[:, None] * d + j[None, :], mask=ok[:, None], other=0.0) * sign
    s2 = tl.load(SIN + table[:, None] * d + HALF + j[None, :], mask=ok[:, None], other=0.0) * sign
    o1 = x1 * c1 - x2 * s1
    o2 = x2 * c2 + x1 * s2
    tl.store(OUT + r[:, None] * d + j[None, :], o1.to(OUT.dtype.element_ty), mask=ok[:, None])
    tl.store(OUT + r[:, None] * d + HALF + j[None, :], o2.to(OUT.dtype.element_ty), mask=ok[:, None])


def rotate(
    x: torch.Tensor,
    table_row: int,
    per_row: int,
    sign: int,
    cos: torch.Tensor,
    sin: torch.Tensor,
    dtype: torch.dtype,
) -> torch.Tensor:
    """x (..., n, head_dim) on CUDA -> rotated copy in `dtype` (see the module docstring)."""
    x = x.contiguous()
    d = x.shape[-1]
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    n = x.shape[-2]
    n_rows = x.numel() // d
    if n_rows == 0:
        return out
    br = 32
    _rotate_kernel[(triton.cdiv(n_rows, br),)](
        x, out, cos, sin, n_rows, n, table_row, per_row, float(sign), HALF=d // 2, BR=br
    )
    return out
