"""The static decode step's attention in two Triton launches (CUDA): static.py's `step_attention` contract.

One query token per head, so the work is small and its cost was in launches and fp32 copies: the
PyTorch path converts the whole window buffer and the gathered units to fp32 and runs batched fp32
matmuls (torch.profiler on the H100, per layer and token: ~120 us in two gemm kernels alone, plus
~25 small launches). Here:
  * `_partials`: program (key tile, kv head, row) over one tile of BN keys, either of the window buffer
    (keys [0, W] visible) or of the memory keys (sinks, then the chosen units; the first
    n_sinks + min(units, topk) * block_size visible): the tile's softmax partials (max, sum, weighted
    values) for the group's query heads, padded to 16 rows for tl.dot;
  * `_finish`: program (window tile, kv head, row) combines the window partials into the window's
    log-sum-exp, recomputes its tile's logits and adds the attention each key received (summed over
    the group's heads) to the score buffer; program (0, kv head) also combines all partials into the
    window and memory outputs and merges them (window.merge's math) into the output.
Inputs in the model dtype (or fp32), math in fp32 (ieee dot). W and the unit count are device
scalars, so a CUDA graph replays the launches unchanged. A row is one session: `step_attention_cuda`
runs one (static.py's step), `stacked_attention_cuda` the stacked rows of a batched step (stacked.py),
their window buffers head-major (kv_heads, rows, cap, d) as the stacked buffers are, one launch each
for every row; `stacked_inputs_cuda` is the stacked rows' inputs (queries rotated, new keys and values
written) in one launch. Imported only on CUDA (needs triton).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BN = 64  # keys per tile
GP = 16  # query rows per kv head, padded (tl.dot needs 16)


@triton.jit
def _rows(P, rows, ok, D: tl.constexpr):
    """(len(rows), D) fp32: rows of a (n, D) array (rows not ok: 0)."""
    dd = tl.arange(0, D)
    return tl.load(P + rows[:, None] * D + dd[None, :], mask=ok[:, None], other=0.0).to(tl.float32)


@triton.jit
def _logits(Q, k, ok, h, scale, G: tl.constexpr, D: tl.constexpr):
    """(GP, BN) logits of the group's queries Q[h * G + g] against keys k (BN, D) fp32 (rows >= G and
    keys not ok: -inf)."""
    g = tl.arange(0, 16)
    q = _rows(Q, h * G + g, g < G, D)
    s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
    return tl.where((g[:, None] < G) & ok[None, :], s, float("-inf"))


@triton.jit
def _window_tile(WK, WIN, tile, h, cap, BN: tl.constexpr, D: tl.constexpr):
    """Window key tile `tile`: its columns, which are visible (keys [0, W]), and its keys (BN, D) fp32."""
    cols = tile * BN + tl.arange(0, BN)
    ok = (cols <= tl.load(WIN)) & (cols < cap)
    return cols, ok, _rows(WK, h * cap + cols, ok, D)


@triton.jit
def _memory_keys(SK, SV, UK, UV, cols, ok, h, n_sinks, n_unit_keys, D: tl.constexpr):
    """K, V (BN, D) fp32 of memory keys `cols`: sinks [0, n_sinks), then the gathered units."""
    in_s = ok & (cols < n_sinks)
    in_u = ok & (cols >= n_sinks)
    s_rows = h * n_sinks + cols
    u_rows = h * n_unit_keys + cols - n_sinks
    k = _rows(SK, s_rows, in_s, D) + _rows(UK, u_rows, in_u, D)
    v = _rows(SV, s_rows, in_s, D) + _rows(UV, u_rows, in_u, D)
    return k, v


@triton.jit
def _partials(
    QL, QM, WK, WV, SK, SV, UK, UV, WIN, UNITS, PM, PL, PACC,
    cap, n_sinks, n_unit_keys, topk_keys, block_size, scale, S, KVH,
    TW: tl.constexpr, T: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BN: tl.constexpr,
    ALL_UNITS: tl.constexpr = False,
):  # fmt: skip
    tile = tl.program_id(0)
    h = tl.program_id(1)
    r = tl.program_id(2)  # the row (a session of a stacked batch; 0 alone)
    hr = r * KVH + h  # (row, head) of the row-major inputs: queries, sinks, units, partials
    wr = h * S + r  # ... and of the head-major window buffers
    g = tl.arange(0, 16)
    dd = tl.arange(0, D)
    if tile < TW:
        cols, ok, k = _window_tile(WK, WIN + r, tile, wr, cap, BN, D)
        s = _logits(QL, k, ok, hr, scale, G, D)
        v = _rows(WV, wr * cap + cols, ok, D)
    else:
        cols = (tile - TW) * BN + tl.arange(0, BN)
        if ALL_UNITS:  # every gathered key is visible (UNITS is not read)
            limit = n_sinks + topk_keys
        else:
            limit = n_sinks + tl.minimum(tl.load(UNITS + r) * block_size, topk_keys)
        ok = cols < limit
        k, v = _memory_keys(SK, SV, UK, UV, cols, ok, hr, n_sinks, n_unit_keys, D)
        s = _logits(QM, k, ok, hr, scale, G, D)
    m = tl.max(s, 1)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    p = tl.exp(s - m_safe[:, None])
    base = hr * T + tile
    tl.store(PM + base * 16 + g, m)
    tl.store(PL + base * 16 + g, tl.sum(p, 1))
    tl.store(PACC + (base * 16 + g[:, None]) * D + dd[None, :], tl.dot(p, v, input_precision="ieee"))


@triton.jit
def _stats(PM, PL, h, t0, t1, T: tl.constexpr, TP: tl.constexpr):
    """Partials of tiles [t0, t1) -> their common max (16,) (0 where every tile's is -inf) and the sum
    of exp(logit - max) over their keys (16,) (0 for rows with no visible key)."""
    g = tl.arange(0, 16)
    ts = tl.arange(0, TP)
    tok = (ts >= t0) & (ts < t1)
    m = tl.load(PM + (h * T + ts[:, None]) * 16 + g[None, :], mask=tok[:, None], other=float("-inf"))
    mx = tl.max(m, 0)
    mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
    l_t = tl.load(PL + (h * T + ts[:, None]) * 16 + g[None, :], mask=tok[:, None], other=0.0)
    return mx_safe, tl.sum(l_t * tl.exp(m - mx_safe[None, :]), 0)


@triton.jit
def _combine(PM, PL, PACC, h, t0, t1, T: tl.constexpr, TP: tl.constexpr, D: tl.constexpr):
    """Partials of tiles [t0, t1) -> out (16, D), lse (16,) (rows with no visible key: lse -inf, out 0)."""
    g = tl.arange(0, 16)
    dd = tl.arange(0, D)
    mx_safe, total = _stats(PM, PL, h, t0, t1, T, TP)
    acc = tl.zeros((16, D), tl.float32)
    for t in range(t0, t1):
        mt = tl.load(PM + (h * T + t) * 16 + g)
        a = tl.load(PACC + ((h * T + t) * 16 + g[:, None]) * D + dd[None, :])
        acc += a * tl.exp(mt - mx_safe)[:, None]
    safe = tl.where(total > 0, total, 1.0)
    lse = tl.where(total > 0, mx_safe + tl.log(safe), float("-inf"))
    return acc / safe[:, None], lse


@triton.jit
def _finish(
    QL, WK, WIN, SCORE, SCORE_OUT, PM, PL, PACC, OUT,
    cap, scale, S, KVH,
    TW: tl.constexpr, T: tl.constexpr, TP: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BN: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    h = tl.program_id(1)
    r = tl.program_id(2)
    hr = r * KVH + h
    wr = h * S + r
    g = tl.arange(0, 16)
    # The window's log-sum-exp from its tiles' partials.
    mx_safe, total = _stats(PM, PL, hr, 0, TW, T, TP)
    lse_w = mx_safe + tl.log(tl.where(total > 0, total, 1.0))  # padding rows: masked below
    cols, ok, k = _window_tile(WK, WIN + r, tile, wr, cap, BN, D)
    s = _logits(QL, k, ok, hr, scale, G, D)
    p = tl.where((g[:, None] < G) & ok[None, :], tl.exp(s - lse_w[:, None]), 0.0)
    got = tl.load(SCORE + wr * cap + cols, mask=cols < cap, other=0.0)
    tl.store(SCORE_OUT + wr * cap + cols, got + tl.sum(p, 0), mask=cols < cap)
    if tile == 0:
        dd = tl.arange(0, D)
        out_w, lse_w = _combine(PM, PL, PACC, hr, 0, TW, T, TP, D)
        out_m, lse_m = _combine(PM, PL, PACC, hr, TW, T, T, TP, D)
        mm = tl.maximum(lse_w, lse_m)
        wa = tl.exp(lse_w - mm)
        wb = tl.exp(lse_m - mm)
        out = (out_w * wa[:, None] + out_m * wb[:, None]) / (wa + wb)[:, None]
        tl.store(OUT + (hr * G + g[:, None]) * D + dd[None, :], out, mask=g[:, None] < G)


def step_attention_cuda(
    q_loc: torch.Tensor,
    q_mem: torch.Tensor,
    win_k: torch.Tensor,
    win_v: torch.Tensor,
    score: torch.Tensor,
    window: torch.Tensor,
    sink_k: torch.Tensor,
    sink_v: torch.Tensor,
    unit_k: torch.Tensor,
    unit_v: torch.Tensor,
    units: torch.Tensor,
    topk: int,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """q_loc / q_mem (kv_heads, g, d) the token's queries at its window position and at the fixed
    distance; win_k / win_v (kv_heads, cap, d) and score (kv_heads, cap) fp32 the window buffers
    (keys [0, window] visible; score gets the received attention added in place); sinks
    (kv_heads, n_sinks, d); unit_k / unit_v (kv_heads, topk * block_size, d) the gathered units, the
    first min(units, topk) * block_size keys visible. window, units: (1,) long device scalars.
    Returns (kv_heads, g, d) fp32: the merged attention (static.py's torch path, same contract)."""
    if not score.is_contiguous():
        raise ValueError(
            "step_attention_cuda: score must be contiguous (the received attention is added in place)"
        )
    # one row: the row-major inputs get a row axis in front, the window buffers after the heads
    ql, qm, sk, sv, uk, uv = (t.unsqueeze(0) for t in (q_loc, q_mem, sink_k, sink_v, unit_k, unit_v))
    wk, wv = win_k.unsqueeze(1), win_v.unsqueeze(1)
    out = _rows_attention(ql, qm, wk, wv, score, score, window, units, sk, sv, uk, uv, topk * block_size,
                          block_size, scale)  # fmt: skip
    return out[0]


def stacked_attention_cuda(
    q_loc: torch.Tensor,
    q_mem: torch.Tensor,
    win_k: torch.Tensor,
    win_v: torch.Tensor,
    score: torch.Tensor,
    window: torch.Tensor,
    sink_k: torch.Tensor,
    sink_v: torch.Tensor,
    unit_k: torch.Tensor,
    unit_v: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The stacked rows of a batched decode step (context/stacked.py) in the same two launches, a row per
    session: q_loc / q_mem (S, kv_heads, g, d); win_k / win_v (kv_heads, S, cap, d) and score
    (kv_heads, S, cap) fp32, row s's keys [0, window[s]] visible; sinks (S, kv_heads, n_sinks, d);
    unit_k / unit_v (S, kv_heads, n_unit_keys, d), every key visible (a steady row reads topk units).
    Returns (S, kv_heads, g, d) fp32 and the received scores (kv_heads, S, cap) fp32 in a NEW tensor
    (score is read, not written: views of it may be held). static.stacked_attention's contract."""
    score_out = torch.empty(score.shape, dtype=torch.float32, device=score.device)
    out = _rows_attention(
        q_loc, q_mem, win_k, win_v, score.contiguous(), score_out, window, None, sink_k, sink_v, unit_k, unit_v,
        unit_k.shape[2], 1, scale,
    )  # fmt: skip
    return out, score_out


def _rows_attention(
    q_loc: torch.Tensor,
    q_mem: torch.Tensor,
    win_k: torch.Tensor,
    win_v: torch.Tensor,
    score: torch.Tensor,
    score_out: torch.Tensor,
    window: torch.Tensor,
    units: torch.Tensor | None,
    sink_k: torch.Tensor,
    sink_v: torch.Tensor,
    unit_k: torch.Tensor,
    unit_v: torch.Tensor,
    topk_keys: int,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """The two launches for S rows: q (S, kv_heads, g, d), window buffers (kv_heads, S, cap, d), score and
    score_out (kv_heads, S, cap) fp32 contiguous (the same tensor: added in place), window (S,); units
    (S,) (row s sees its first min(units[s] * block_size, topk_keys) unit keys) or None (all of them);
    sinks and units (S, kv_heads, n, d) -> the merged attention (S, kv_heads, g, d) fp32."""
    n_rows, kvh, g, d = q_loc.shape
    cap = win_k.shape[2]
    n_sinks, n_unit_keys = sink_k.shape[2], unit_k.shape[2]
    if g > GP or score.dtype != torch.float32:
        raise ValueError(
            "the static step's attention kernels: at most 16 query heads per kv head; score fp32"
        )
    if n_sinks < 1:
        raise ValueError("the static step's attention kernels need the sinks (phase 2)")
    tw = triton.cdiv(cap, BN)
    t = tw + triton.cdiv(n_sinks + n_unit_keys, BN)
    dev = q_loc.device
    pm = torch.empty(n_rows * kvh, t, GP, dtype=torch.float32, device=dev)
    pl = torch.empty_like(pm)
    pacc = torch.empty(n_rows * kvh, t, GP, d, dtype=torch.float32, device=dev)
    out = torch.empty(n_rows, kvh, g, d, dtype=torch.float32, device=dev)
    ql, qm, wk = q_loc.contiguous(), q_mem.contiguous(), win_k.contiguous()
    _partials[(t, kvh, n_rows)](
        ql, qm, wk, win_v.contiguous(), sink_k.contiguous(), sink_v.contiguous(), unit_k.contiguous(),
        unit_v.contiguous(), window, window if units is None else units, pm, pl, pacc,
        cap, n_sinks, n_unit_keys, topk_keys, block_size, scale, n_rows, kvh,
        TW=tw, T=t, G=g, D=d, BN=BN, ALL_UNITS=units is None,
    )  # fmt: skip
    _finish[(tw, kvh, n_rows)](
        ql, wk, window, score, score_out, pm, pl, pacc, out, cap, scale, n_rows, kvh,
        TW=tw, T=t, TP=triton.next_power_of_2(t), G=g, D=d, BN=BN,
    )  # fmt: skip
    return out


@triton.jit
def _stacked_inputs(
    Q, K, V, ROWS, ANG, WK, WV, WIN, QL, QM,
    q_sb, q_sh, k_sb, k_sh, v_sb, v_sh, cap, n_rows,
    HEADS: tl.constexpr, D: tl.constexpr, HAS_ROWS: tl.constexpr,
):  # fmt: skip
    """Program (row, head of heads + kv_heads): a query head rotated to the row's window position and to the
    memory distance (QL, QM (S, HEADS, D) fp32), or a kv head's key rotated to the window position and
    its value, written at WIN[row] of the row's window buffers WK / WV (kv_heads, S, cap, D). ANG
    (4, S, D): cos and sin to the window position, then to the memory distance."""
    s = tl.program_id(0)
    h = tl.program_id(1)
    if HAS_ROWS:
        b = tl.load(ROWS + s)
    else:
        b = s
    dd = tl.arange(0, D)
    other = (dd + D // 2) % D  # rotate_half: (-x[half:], x[:half])
    sign = tl.where(dd < D // 2, -1.0, 1.0)
    cos_l = tl.load(ANG + s * D + dd)
    sin_l = tl.load(ANG + (n_rows + s) * D + dd)
    if h < HEADS:
        x = tl.load(Q + b * q_sb + h * q_sh + dd).to(tl.float32)
        xr = tl.load(Q + b * q_sb + h * q_sh + other).to(tl.float32) * sign
        cos_m = tl.load(ANG + (2 * n_rows + s) * D + dd)
        sin_m = tl.load(ANG + (3 * n_rows + s) * D + dd)
        tl.store(QL + (s * HEADS + h) * D + dd, x * cos_l + xr * sin_l)
        tl.store(QM + (s * HEADS + h) * D + dd, x * cos_m + xr * sin_m)
    else:
        kh = h - HEADS
        x = tl.load(K + b * k_sb + kh * k_sh + dd).to(tl.float32)
        xr = tl.load(K + b * k_sb + kh * k_sh + other).to(tl.float32) * sign
        at = ((kh * n_rows + s) * cap + tl.load(WIN + s)) * D + dd
        tl.store(WK + at, (x * cos_l + xr * sin_l).to(WK.dtype.element_ty))
        tl.store(WV + at, tl.load(V + b * v_sb + kh * v_sh + dd).to(WV.dtype.element_ty))


def stacked_inputs_cuda(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    rows: torch.Tensor | None,
    angles: torch.Tensor,
    win_k: torch.Tensor,
    win_v: torch.Tensor,
    window: torch.Tensor,
    slots: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """static.stacked_inputs in one launch (its contract; `slots` is not read: the kernel writes at
    `window`)."""
    kvh, n_rows, cap, d = win_k.shape
    heads = query.shape[1]
    if any(t.stride(-1) != 1 for t in (query, key, value)) or not (
        win_k.is_contiguous() and win_v.is_contiguous()
    ):
        raise ValueError(
            "stacked_inputs_cuda: query, key, value with a contiguous last dim; contiguous buffers"
        )
    if not angles.is_contiguous() or angles.shape != (4, n_rows, d):
        raise ValueError(
            f"stacked_inputs_cuda: angles {tuple(angles.shape)}, not contiguous (4, {n_rows}, {d})"
        )
    ql = torch.empty(n_rows, heads, d, dtype=torch.float32, device=query.device)
    qm = torch.empty_like(ql)
    _stacked_inputs[(n_rows, heads + kvh)](
        query, key, value, rows if rows is not None else window, angles, win_k, win_v, window, ql, qm,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        cap, n_rows, HEADS=heads, D=d, HAS_ROWS=rows is not None,
    )  # fmt: skip
    return ql, qm
