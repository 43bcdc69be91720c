"""CUDA kernels (Triton) for the attention passes of one call: the contracts of window.py, batched.

Each pass is one launch per layer and call, whatever the number of execution blocks in it:
  local_attention_cuda          flash-style (online softmax, nothing materialised), per-row key ranges
                                [row_lo[t], W + t]; returns out, lse, and (second kernel) the attention
                                each window key received (exp(logit - lse) summed over queries and
                                grouped heads);
  memory_attention_cuda         each memory block's queries over its [sinks, chosen units] keys;
  memory_attention_merge_cuda   the same pass, merged in place into the local output (window.merge's
                                math), so the memory pass's out and lse never reach global memory.
Inputs are read in the model dtype and accumulated in fp32. Integers that change from call to call (the
call's length, the window's) are not specialised on (`do_not_specialize`): Triton would otherwise
compile a variant per divisibility class: a stall of about a second in the middle of answering
questions of varying length (the likely cause of one 1.3 s answer among 0.13-0.33 s ones in the
H100 read-once run 15). window.py holds the loops these are
tested against. Imported only on CUDA (needs triton).

The received pass is split over key tiles, kv heads and row splits of RECEIVED["ROWS"] rows: each
program sums its rows into a partial buffer (splits, kv_heads, W + c) fp32 and one `.sum(0)` adds the
splits (no atomics: the result is the same run to run). Measured on an H100 (torch.profiler,
SmolLM2-135M shapes, 3584 queries over ~8K keys), before the split: local 163 us, received 300 us
(one program per key tile and kv head, ~360 programs), memory 63 us per layer and call. Measured after
it (H100, triton 3.6, do_bench median, benchmarks/profile_gpu.py's kernel call, bf16): received 124 us
(the old kernel 339 us in the same run), local 167 us, memory_attention_merge_cuda 71 us against
180 us for memory_attention_cuda followed by window.merge.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from memllm.context.plan import CallPlan

BM, BN = 64, 64  # default query rows and keys per tile (local and memory passes)
# Launch configurations, in one place for sweeps (benchmarks/profile_gpu.py's kernel_sweep). LOCAL and
# MEMORY: tile sizes, warps and pipeline stages of the local and memory passes. RECEIVED's ROWS: rows
# per split (a multiple of BM). Chosen by that sweep on an H100 (triton 3.6, do_bench medians, one
# steady call: c 3584, W 4480, bf16; benchmarks/results/profiles/profile_gpu_kernels_run10.json): local +
# received 227 us at LOCAL 64 x 128 (249 us at 64 x 64, 230 us at 128 x 64); received alone 97 us at
# BN 64 (119 us at BN 32, 199 us at BM 128); memory 65 us at 64 x 64 (86 us at 64 x 128). The kernels
# before the unmasked runs took 294 us for local + received at their best tiles.
LOCAL = {"BM": 64, "BN": 128, "num_warps": 4, "num_stages": 3}
MEMORY = {"BM": BM, "BN": BN, "num_warps": 4, "num_stages": 3}
RECEIVED = {"BM": 64, "BN": 64, "ROWS": 1024, "num_warps": 8, "num_stages": 2}
LOG2E = 1.4426950408889634  # softmax in base 2 (exp2): logits scaled by scale * LOG2E, lse returned in nats
_LOG2E = tl.constexpr(LOG2E)  # the kernels' copies (a Triton kernel reads only constexpr globals)
_LN2 = tl.constexpr(0.6931471805599453)


def _prec(x: torch.Tensor) -> str:
    """fp32 inputs are multiplied in full fp32 (Triton would use TF32), like the PyTorch loops."""
    return "ieee" if x.dtype == torch.float32 else "tf32"


@triton.jit
def _online_tile(q, k, v, visible, m_i, l_i, acc, qk_scale, MASKED: tl.constexpr, PREC: tl.constexpr):
    """One key tile of online softmax in base 2: q (BM, D), k/v (BN, D), visible (BM, BN) or broadcast
    to it, read only when MASKED (a tile every row sees whole skips the mask and the -inf guards)."""
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
    if MASKED:
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = m_new
    p = tl.math.exp2(s - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return m_new, l_i, acc


@triton.jit
def _local_keys_run(q, K, V, row0, n_keys, lo, rows, row_ok, W, qk_scale,
                    D: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr,
                    start, end, m_i, l_i, acc, MASKED: tl.constexpr):  # fmt: skip
    """Online softmax of the row tile over key tiles [start, end) of K / V (rows row0..); MASKED: each
    row's [lo, W + row] applied (else every row sees the tiles whole)."""
    dd = tl.arange(0, D)
    for ks in range(start, end, BN):
        cols = ks + tl.arange(0, BN)
        if MASKED:
            col_ok = cols < n_keys
            k = tl.load(K + (row0 + cols[:, None]) * D + dd[None, :], mask=col_ok[:, None], other=0.0)
            v = tl.load(V + (row0 + cols[:, None]) * D + dd[None, :], mask=col_ok[:, None], other=0.0)
            visible = (cols[None, :] >= lo[:, None]) & (cols[None, :] <= W + rows[:, None]) & row_ok[:, None]
            m_i, l_i, acc = _online_tile(q, k, v, visible, m_i, l_i, acc, qk_scale, True, PREC)
        else:
            k = tl.load(K + (row0 + cols[:, None]) * D + dd[None, :])
            v = tl.load(V + (row0 + cols[:, None]) * D + dd[None, :])
            m_i, l_i, acc = _online_tile(q, k, v, row_ok[:, None], m_i, l_i, acc, qk_scale, False, PREC)
    return m_i, l_i, acc


@triton.jit(do_not_specialize=["c", "W"])
def _local_fwd(
    Q, K, V, OUT, LSE, ROW_LO,
    c, W, qk_scale,
    G: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Program (row tile, head). Key tiles come in three runs: those some row sees only in part (from the
    first row's lo), those every row of the tile sees whole (no mask), and the last ones (the diagonal)."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // G
    n_keys = W + c
    r0 = pid_m * BM
    rows = r0 + tl.arange(0, BM)
    row_ok = rows < c
    dd = tl.arange(0, D)
    lo = tl.load(ROW_LO + rows, mask=row_ok, other=2147483647)
    q = tl.load(Q + (h * c + rows[:, None]) * D + dd[None, :], mask=row_ok[:, None], other=0.0)
    last_row = tl.minimum(c, r0 + BM) - 1
    first = tl.load(ROW_LO + r0)  # rows' lo is non-decreasing
    lo_last = tl.load(ROW_LO + last_row)
    k_end = W + last_row + 1
    # Whole tiles: keys from lo_last (every row's lo is at most it) to W + r0 (every row sees up to it).
    mid_lo = tl.minimum((lo_last + BN - 1) // BN * BN, k_end)
    mid_hi = tl.maximum(mid_lo, tl.minimum((W + r0 + 1) // BN * BN, k_end))
    m_i = tl.full((BM,), float("-inf"), tl.float32)
    l_i = tl.zeros((BM,), tl.float32)
    acc = tl.zeros((BM, D), tl.float32)
    base = kvh * n_keys
    m_i, l_i, acc = _local_keys_run(q, K, V, base, n_keys, lo, rows, row_ok, W, qk_scale, D, BN, PREC,
                                    (first // BN) * BN, mid_lo, m_i, l_i, acc, True)  # fmt: skip
    m_i, l_i, acc = _local_keys_run(q, K, V, base, n_keys, lo, rows, row_ok, W, qk_scale, D, BN, PREC,
                                    mid_lo, mid_hi, m_i, l_i, acc, False)  # fmt: skip
    m_i, l_i, acc = _local_keys_run(q, K, V, base, n_keys, lo, rows, row_ok, W, qk_scale, D, BN, PREC,
                                    mid_hi, k_end, m_i, l_i, acc, True)  # fmt: skip
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    tl.store(OUT + (h * c + rows[:, None]) * D + dd[None, :], acc / l_safe[:, None], mask=row_ok[:, None])
    tl.store(LSE + h * c + rows, (m_i + tl.math.log2(l_safe)) * _LN2, mask=row_ok)


@triton.jit
def _first_tile_past(ROW_LO, a, b, col, BM: tl.constexpr, OFF: tl.constexpr):
    """The first row tile j in [a, b) whose row OFF (0: its first, BM - 1: its last) has lo > col,
    else b (row_lo is non-decreasing: a binary search)."""
    while a < b:
        mid = (a + b) // 2
        past = tl.load(ROW_LO + mid * BM + OFF) > col
        b = tl.where(past, mid, b)
        a = tl.where(past, a, mid + 1)
    return a


@triton.jit
def _received_rows(Q, LSE, ROW_LO, k, acc, r_start, r_end, s1, cols, c, W, qk_scale,
                   G: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, PREC: tl.constexpr,
                   MASKED: tl.constexpr, kvh):  # fmt: skip
    """acc (BM, BN) += exp(logit - lse) of rows [r_start, r_end) (whole row tiles) over the key tile k."""
    dd = tl.arange(0, D)
    for r0 in range(r_start, r_end, BM):
        rows = r0 + tl.arange(0, BM)
        if MASKED:
            row_ok = rows < s1
            lo = tl.load(ROW_LO + rows, mask=row_ok, other=2147483647)
            visible = (cols[None, :] >= lo[:, None]) & (cols[None, :] <= W + rows[:, None]) & row_ok[:, None]
        for gi in tl.static_range(G):
            h = kvh * G + gi
            if MASKED:
                q = tl.load(Q + (h * c + rows[:, None]) * D + dd[None, :], mask=row_ok[:, None], other=0.0)
                lse = tl.load(LSE + h * c + rows, mask=row_ok, other=0.0) * _LOG2E
            else:
                q = tl.load(Q + (h * c + rows[:, None]) * D + dd[None, :])
                lse = tl.load(LSE + h * c + rows) * _LOG2E
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
            if MASKED:
                acc += tl.where(visible, tl.math.exp2(s - lse[:, None]), 0.0)
            else:
                acc += tl.math.exp2(s - lse[:, None])
    return acc


@triton.jit(do_not_specialize=["c", "W"])
def _received(
    Q, K, LSE, ROW_LO, R,
    c, W, qk_scale,
    G: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr,
    split_rows=1073741824,
):  # fmt: skip
    """Program (key tile, kv head, split): the tile's received attention from rows
    [split * split_rows, (split + 1) * split_rows) of the call, stored at R[split, kv head, tile].

    Row t sees keys [row_lo[t], W + t] and row_lo is non-decreasing, so the rows that see any key of
    [col0, col_end] are those with t >= col0 - W up to the last with row_lo[t] <= col_end; of those,
    the row tiles that see the whole key tile (no mask) start where t >= col_end - W and end before
    the first whose last row has row_lo > col0. split_rows is a multiple of BM; its default makes one
    split of all rows (R is then (kv_heads, W + c))."""
    pid_n = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    n_keys = W + c
    col0 = pid_n * BN
    col_end = col0 + BN - 1
    cols = col0 + tl.arange(0, BN)
    col_ok = cols < n_keys
    dd = tl.arange(0, D)
    s0 = split * split_rows
    s1 = tl.minimum(c, s0 + split_rows)
    # Row tiles [t_lo, t_hi) see some key of the tile; [w_lo, w_hi) within them see all of it.
    t_lo = tl.maximum(s0, col0 - W) // BM
    t_hi = _first_tile_past(ROW_LO, t_lo, (s1 + BM - 1) // BM, col_end, BM, 0)
    w_lo = tl.minimum(tl.maximum(t_lo, (tl.maximum(s0, col_end - W) + BM - 1) // BM), t_hi)
    w_hi = tl.maximum(w_lo, _first_tile_past(ROW_LO, w_lo, tl.minimum(t_hi, s1 // BM), col0, BM, BM - 1))
    k = tl.load(K + (kvh * n_keys + cols[:, None]) * D + dd[None, :], mask=col_ok[:, None], other=0.0)
    # Summed over rows once, after the loops: a per-tile sum over rows would cross warps every time.
    acc = tl.zeros((BM, BN), tl.float32)
    acc = _received_rows(Q, LSE, ROW_LO, k, acc, t_lo * BM, w_lo * BM, s1, cols, c, W, qk_scale, G, D, BM,
                         PREC, True, kvh)  # fmt: skip
    acc = _received_rows(Q, LSE, ROW_LO, k, acc, w_lo * BM, w_hi * BM, s1, cols, c, W, qk_scale, G, D, BM,
                         PREC, False, kvh)  # fmt: skip
    acc = _received_rows(Q, LSE, ROW_LO, k, acc, w_hi * BM, t_hi * BM, s1, cols, c, W, qk_scale, G, D, BM,
                         PREC, True, kvh)  # fmt: skip
    tl.store(R + (split * tl.num_programs(1) + kvh) * n_keys + cols, tl.sum(acc, 0), mask=col_ok)


@triton.jit
def _memory_keys_run(Q_TILE, KP, VP, row0, n, m_i, l_i, acc, qk_scale,
                     D: tl.constexpr, BN: tl.constexpr, EVEN: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    """Online softmax of q over n keys at rows row0.. of KP / VP ((rows, D) arrays); EVEN: n % BN == 0."""
    dd = tl.arange(0, D)
    for ks in range(0, n, BN):
        cols = ks + tl.arange(0, BN)
        if EVEN:
            k = tl.load(KP + (row0 + cols[:, None]) * D + dd[None, :])
            v = tl.load(VP + (row0 + cols[:, None]) * D + dd[None, :])
            m_i, l_i, acc = _online_tile(Q_TILE, k, v, cols[None, :], m_i, l_i, acc, qk_scale, False, PREC)
        else:
            col_ok = cols < n
            k = tl.load(KP + (row0 + cols[:, None]) * D + dd[None, :], mask=col_ok[:, None], other=0.0)
            v = tl.load(VP + (row0 + cols[:, None]) * D + dd[None, :], mask=col_ok[:, None], other=0.0)
            m_i, l_i, acc = _online_tile(Q_TILE, k, v, col_ok[None, :], m_i, l_i, acc, qk_scale, True, PREC)
    return m_i, l_i, acc


@triton.jit(do_not_specialize=["c", "n_unit_keys", "n_chosen"])
def _memory_fwd(
    Q, SK, SV, UK, UV, OUT, LSE, MB_Q0, MB_Q1, MB_UNITS, FINAL,
    c, n_sinks, n_unit_keys, n_chosen, block_size, qk_scale,
    KVH: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr,
    MERGE: tl.constexpr = False, EVEN: tl.constexpr = False, TO_FINAL: tl.constexpr = False,
):  # fmt: skip
    """Memory block b's queries over its keys: the sinks SK/SV (kv_heads, n_sinks, D), then the first
    min(n_chosen, its units) units of UK/UV (blocks, kv_heads, n_unit_keys, D). EVEN: n_sinks and
    block_size are multiples of BN (no key masks).

    MERGE False: OUT / LSE receive the memory pass's out and lse (rows without memory keys are left
    as they were: the caller fills 0 and -inf). MERGE True: OUT holds the local out and LSE the local
    lse (read only); OUT's rows become window.merge of the two, rows without memory keys unchanged;
    TO_FINAL: the merged rows go to FINAL (c, heads, D) in its dtype instead (OUT is only read)."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    kvh = h // G
    q0 = tl.load(MB_Q0 + b)
    q1 = tl.load(MB_Q1 + b)
    units = tl.load(MB_UNITS + b).to(tl.int32)
    unit_keys = tl.minimum(n_chosen, units) * block_size
    if (q0 + pid_m * BM < q1) & (n_sinks + unit_keys > 0):
        rows = q0 + pid_m * BM + tl.arange(0, BM)
        row_ok = rows < q1
        dd = tl.arange(0, D)
        q = tl.load(Q + (h * c + rows[:, None]) * D + dd[None, :], mask=row_ok[:, None], other=0.0)
        m_i = tl.full((BM,), float("-inf"), tl.float32)
        l_i = tl.zeros((BM,), tl.float32)
        acc = tl.zeros((BM, D), tl.float32)
        m_i, l_i, acc = _memory_keys_run(q, SK, SV, kvh * n_sinks, n_sinks, m_i, l_i, acc, qk_scale, D, BN,
                                         EVEN, PREC)  # fmt: skip
        m_i, l_i, acc = _memory_keys_run(q, UK, UV, (b * KVH + kvh) * n_unit_keys, unit_keys, m_i, l_i, acc,
                                         qk_scale, D, BN, EVEN, PREC)  # fmt: skip
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        lse = tl.where(l_i > 0, (m_i + tl.math.log2(l_safe)) * _LN2, float("-inf"))
        res = acc / l_safe[:, None]
        out_ptr = OUT + (h * c + rows[:, None]) * D + dd[None, :]
        if MERGE:
            # window.merge: m = max(lse_a, lse_b); (out_a wa + out_b wb) / (wa + wb).
            lse_a = tl.load(LSE + h * c + rows, mask=row_ok, other=0.0)
            out_a = tl.load(out_ptr, mask=row_ok[:, None], other=0.0)
            m = tl.maximum(lse_a, lse)
            wa = tl.exp(lse_a - m)
            wb = tl.exp(lse - m)
            res = (out_a * wa[:, None] + res * wb[:, None]) / (wa + wb)[:, None]
            if TO_FINAL:
                final = FINAL + (rows[:, None] * (KVH * G) + h) * D + dd[None, :]
                tl.store(final, res.to(FINAL.dtype.element_ty), mask=row_ok[:, None])
            else:
                tl.store(out_ptr, res, mask=row_ok[:, None])
        else:
            tl.store(out_ptr, res, mask=row_ok[:, None])
            tl.store(LSE + h * c + rows, lse, mask=row_ok)


def received_attention_cuda(
    q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, plan: CallPlan, scale: float, **config
) -> torch.Tensor:
    """The attention each window key received, (kv_heads, W + c) fp32, from q (heads, c, d), k
    (kv_heads, W + c, d) (contiguous, model dtype) and the local pass's lse (heads, c).

    config overrides RECEIVED's entries (BM, BN, ROWS, num_warps, num_stages)."""
    cfg = RECEIVED | config
    bm, bn, rows = cfg["BM"], cfg["BN"], cfg["ROWS"]
    if rows % bm:
        raise ValueError(f"rows per split ({rows}) must be a multiple of BM ({bm})")
    heads, c, d = q.shape
    kvh, n_keys = k.shape[0], k.shape[1]
    splits = max(1, triton.cdiv(c, rows))
    part = torch.empty(splits, kvh, n_keys, dtype=torch.float32, device=q.device)
    _received[(triton.cdiv(n_keys, bn), kvh, splits)](
        q, k, lse, plan.tensors(q.device)["row_lo"], part, c, plan.window, scale * LOG2E, split_rows=rows,
        G=heads // kvh, D=d, BM=bm, BN=bn, PREC=_prec(q), num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )  # fmt: skip
    return part[0] if splits == 1 else part.sum(0)


def local_attention_cuda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: CallPlan,
    scale: float,
    local: dict | None = None,
    **received,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Contract of window.local_attention (inputs in the model dtype). local: overrides of LOCAL's
    entries; received: of RECEIVED's."""
    cfg = LOCAL | (local or {})
    heads, c, d = q.shape
    t = plan.tensors(q.device)
    out = torch.empty(heads, c, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(heads, c, dtype=torch.float32, device=q.device)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    _local_fwd[(triton.cdiv(c, cfg["BM"]), heads)](
        q, k, v, out, lse, t["row_lo"], c, plan.window, scale * LOG2E,
        G=heads // k.shape[0], D=d, BM=cfg["BM"], BN=cfg["BN"], PREC=_prec(q), num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )  # fmt: skip
    return out, lse, received_attention_cuda(q, k, lse, plan, scale, **received)


def _memory_launch(q, sink_k, sink_v, unit_k, unit_v, plan, n_chosen, block_size, scale, out, lse, merge, cfg,
                   final=None):  # fmt: skip
    heads, c, d = q.shape
    n_mb, kvh, n_sinks = len(plan.memory_blocks), sink_k.shape[0], sink_k.shape[1]
    if unit_k is None or n_chosen == 0:
        unit_k, unit_v, n_chosen = sink_k, sink_v, 0  # not read
    n_unit_keys = n_chosen * block_size
    if n_mb == 0 or n_sinks + n_unit_keys == 0:
        return
    if unit_k.shape[:3] != (n_mb, kvh, n_unit_keys) and n_chosen:
        raise ValueError(f"unit keys {tuple(unit_k.shape)}: want ({n_mb}, {kvh}, {n_unit_keys}, {d})")
    t = plan.tensors(q.device)
    bm, bn = cfg["BM"], cfg["BN"]
    longest = max(plan.blocks[i].q1 - plan.blocks[i].q0 for i in plan.memory_blocks)
    _memory_fwd[(triton.cdiv(longest, bm), heads, n_mb)](
        q.contiguous(), sink_k.contiguous(), sink_v.contiguous(), unit_k.contiguous(), unit_v.contiguous(),
        out, lse, t["mb_q0"], t["mb_q1"], t["mb_units"], out if final is None else final,
        c, n_sinks, n_unit_keys, n_chosen, block_size, scale * LOG2E,
        KVH=kvh, G=heads // kvh, D=d, BM=bm, BN=bn, PREC=_prec(q), MERGE=merge,
        EVEN=n_sinks % bn == 0 and block_size % bn == 0, TO_FINAL=final is not None, num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )  # fmt: skip


def memory_attention_cuda(
    q: torch.Tensor,
    sink_k: torch.Tensor,
    sink_v: torch.Tensor,
    unit_k: torch.Tensor | None,
    unit_v: torch.Tensor | None,
    plan: CallPlan,
    n_chosen: int,
    block_size: int,
    scale: float,
    **config,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Contract of window.memory_attention, with the memory keys in two parts: the sinks (kv_heads,
    n_sinks, d), shared by every memory block, and the chosen units' keys (memory blocks, kv_heads,
    n_chosen * block_size, d) (None when nothing is chosen). config: overrides of MEMORY's entries."""
    heads, c, d = q.shape
    out = torch.zeros(heads, c, d, dtype=torch.float32, device=q.device)
    lse = torch.full((heads, c), float("-inf"), dtype=torch.float32, device=q.device)
    _memory_launch(q, sink_k, sink_v, unit_k, unit_v, plan, n_chosen, block_size, scale, out, lse, False,
                   MEMORY | config)  # fmt: skip
    return out, lse


def memory_attention_merge_cuda(
    q: torch.Tensor,
    sink_k: torch.Tensor,
    sink_v: torch.Tensor,
    unit_k: torch.Tensor | None,
    unit_v: torch.Tensor | None,
    plan: CallPlan,
    n_chosen: int,
    block_size: int,
    scale: float,
    out: torch.Tensor,
    lse: torch.Tensor,
    final: torch.Tensor | None = None,
    **config,
) -> torch.Tensor:
    """window.merge(out, lse, *memory_attention_cuda(...)), written into `out` in place; returns it.

    out (heads, c, d) and lse (heads, c): the local pass's, fp32 and contiguous; lse is only read. Rows
    of blocks without memory, and rows whose block sees no memory key, keep their values.

    final: a (c, heads, d) contiguous tensor (the model dtype, the layout the attention function
    returns) that receives the merged rows instead of `out`; then every row must have memory keys
    (every block a memory block, sinks set), and final.transpose(0, 1) is returned."""
    heads, c, d = q.shape
    if final is not None:
        if final.shape != (c, heads, d) or not final.is_contiguous():
            raise ValueError(f"final must be a contiguous ({c}, {heads}, {d}) tensor")
        if len(plan.memory_blocks) != len(plan.blocks) or sink_k.shape[1] == 0:
            raise ValueError("final needs memory keys for every row: every block a memory block, sinks set")
    if (
        out.dtype != torch.float32 or lse.dtype != torch.float32 or out.shape != (heads, c, d)
        or lse.shape != (heads, c) or not out.is_contiguous() or not lse.is_contiguous()
    ):  # fmt: skip
        raise ValueError("out (heads, c, d) and lse (heads, c) must be contiguous fp32")
    _memory_launch(q, sink_k, sink_v, unit_k, unit_v, plan, n_chosen, block_size, scale, out, lse, True,
                   MEMORY | config, final)  # fmt: skip
    return out if final is None else final.transpose(0, 1)
