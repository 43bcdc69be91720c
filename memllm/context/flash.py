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

BM, BN = 64, 64  # local and memory passes: query rows and keys per tile
# The received pass's launch configuration, in one place for sweeps. ROWS: rows per split (a multiple
# of BM). At benchmarks/profile_gpu.py's call (W 4480, c 3584) these make 252 key tiles x 3 kv heads x
# 4 splits = 3,024 programs, at most 16 row tiles each (counted on the host). Chosen by a sweep on an
# H100 (triton 3.6, do_bench median, that call, bf16), whole pass with the .sum(0): 124 us; BN 64: 131
# us; BN 64, ROWS 512, 4 warps, 3 stages: 179 us; the one-split kernel this replaced: 344 us.
RECEIVED = {"BM": 64, "BN": 32, "ROWS": 1024, "num_warps": 8, "num_stages": 2}


def _prec(x: torch.Tensor) -> str:
    """fp32 inputs are multiplied in full fp32 (Triton would use TF32), like the PyTorch loops."""
    return "ieee" if x.dtype == torch.float32 else "tf32"


@triton.jit
def _online_tile(q, k, v, visible, m_i, l_i, acc, scale, PREC: tl.constexpr):
    """One key tile of online softmax: q (BM, D), k/v (BN, D), visible (BM, BN)."""
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return m_new, l_i, acc


@triton.jit(do_not_specialize=["c", "W"])
def _local_fwd(
    Q, K, V, OUT, LSE, ROW_LO,
    c, W, scale,
    G: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // G
    n_keys = W + c
    rows = pid_m * BM + tl.arange(0, BM)
    row_ok = rows < c
    dd = tl.arange(0, D)
    lo = tl.load(ROW_LO + rows, mask=row_ok, other=2147483647)
    q = tl.load(Q + (h * c + rows[:, None]) * D + dd[None, :], mask=row_ok[:, None], other=0.0)
    first = tl.load(ROW_LO + pid_m * BM)  # rows' lo is non-decreasing
    last_row = tl.minimum(c, pid_m * BM + BM) - 1
    k_end = W + last_row + 1
    m_i = tl.full((BM,), float("-inf"), tl.float32)
    l_i = tl.zeros((BM,), tl.float32)
    acc = tl.zeros((BM, D), tl.float32)
    for ks in range((first // BN) * BN, k_end, BN):
        cols = ks + tl.arange(0, BN)
        col_ok = cols < n_keys
        k = tl.load(K + (kvh * n_keys + cols[:, None]) * D + dd[None, :], mask=col_ok[:, None], other=0.0)
        v = tl.load(V + (kvh * n_keys + cols[:, None]) * D + dd[None, :], mask=col_ok[:, None], other=0.0)
        visible = (cols[None, :] >= lo[:, None]) & (cols[None, :] <= W + rows[:, None]) & row_ok[:, None]
        m_i, l_i, acc = _online_tile(q, k, v, visible, m_i, l_i, acc, scale, PREC)
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    tl.store(OUT + (h * c + rows[:, None]) * D + dd[None, :], acc / l_safe[:, None], mask=row_ok[:, None])
    tl.store(LSE + h * c + rows, m_i + tl.log(l_safe), mask=row_ok)


@triton.jit(do_not_specialize=["c", "W"])
def _received(
    Q, K, LSE, ROW_LO, R,
    c, W, scale,
    G: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr,
    split_rows=1073741824,
):  # fmt: skip
    """Program (key tile, kv head, split): the tile's received attention from rows
    [split * split_rows, (split + 1) * split_rows) of the call, stored at R[split, kv head, tile].

    Row t sees keys [row_lo[t], W + t] and row_lo is non-decreasing, so the rows that see any key of
    [col0, col_end] are those with t >= col0 - W up to the last with row_lo[t] <= col_end: the first is
    computed, the last found by a binary search over the row tiles' first rows. split_rows is a multiple
    of BM; its default makes one split of all rows (R is then (kv_heads, W + c))."""
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
    # First row tile: row t sees keys up to W + t, so rows before col0 - W see none of the tile.
    t_lo = tl.maximum(s0, col0 - W) // BM
    # Last row tile + 1: the first tile (from t_lo on) whose first row sees nothing at or before col_end.
    t_hi = (s1 + BM - 1) // BM
    a = t_lo
    b = t_hi
    while a < b:
        mid = (a + b) // 2
        past = tl.load(ROW_LO + mid * BM) > col_end
        b = tl.where(past, mid, b)
        a = tl.where(past, a, mid + 1)
    k = tl.load(K + (kvh * n_keys + cols[:, None]) * D + dd[None, :], mask=col_ok[:, None], other=0.0)
    # Summed over rows once, after the loop: a per-tile sum over rows would cross warps every time.
    acc = tl.zeros((BM, BN), tl.float32)
    for r0 in range(t_lo * BM, a * BM, BM):
        rows = r0 + tl.arange(0, BM)
        row_ok = rows < s1
        lo = tl.load(ROW_LO + rows, mask=row_ok, other=2147483647)
        visible = (cols[None, :] >= lo[:, None]) & (cols[None, :] <= W + rows[:, None]) & row_ok[:, None]
        for gi in tl.static_range(G):
            h = kvh * G + gi
            q = tl.load(Q + (h * c + rows[:, None]) * D + dd[None, :], mask=row_ok[:, None], other=0.0)
            lse = tl.load(LSE + h * c + rows, mask=row_ok, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
            acc += tl.where(visible, tl.exp(s - lse[:, None]), 0.0)
    tl.store(R + (split * tl.num_programs(1) + kvh) * n_keys + cols, tl.sum(acc, 0), mask=col_ok)


@triton.jit(do_not_specialize=["c", "M", "n_chosen"])
def _memory_fwd(
    Q, KM, VM, OUT, LSE, MB_Q0, MB_Q1, MB_UNITS,
    c, M, n_sinks, n_chosen, block_size, scale,
    KVH: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr,
    MERGE: tl.constexpr = False,
):  # fmt: skip
    """MERGE False: OUT / LSE receive the memory pass's out and lse (rows without memory keys are left
    as they were: the caller fills 0 and -inf). MERGE True: OUT holds the local out and LSE the local
    lse (read only); OUT's rows become window.merge of the two, rows without memory keys unchanged."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    kvh = h // G
    q0 = tl.load(MB_Q0 + b)
    q1 = tl.load(MB_Q1 + b)
    units = tl.load(MB_UNITS + b).to(tl.int32)
    limit = n_sinks + tl.minimum(n_chosen, units) * block_size
    if (q0 + pid_m * BM < q1) & (limit > 0):
        rows = q0 + pid_m * BM + tl.arange(0, BM)
        row_ok = rows < q1
        dd = tl.arange(0, D)
        q = tl.load(Q + (h * c + rows[:, None]) * D + dd[None, :], mask=row_ok[:, None], other=0.0)
        base = (b * KVH + kvh) * M
        m_i = tl.full((BM,), float("-inf"), tl.float32)
        l_i = tl.zeros((BM,), tl.float32)
        acc = tl.zeros((BM, D), tl.float32)
        for ks in range(0, limit, BN):
            cols = ks + tl.arange(0, BN)
            col_ok = cols < limit
            k = tl.load(KM + (base + cols[:, None]) * D + dd[None, :], mask=col_ok[:, None], other=0.0)
            v = tl.load(VM + (base + cols[:, None]) * D + dd[None, :], mask=col_ok[:, None], other=0.0)
            visible = col_ok[None, :] & row_ok[:, None]
            m_i, l_i, acc = _online_tile(q, k, v, visible, m_i, l_i, acc, scale, PREC)
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        lse = tl.where(l_i > 0, m_i + tl.log(l_safe), float("-inf"))
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
        q, k, lse, plan.tensors(q.device)["row_lo"], part, c, plan.window, scale, split_rows=rows,
        G=heads // kvh, D=d, BM=bm, BN=bn, PREC=_prec(q), num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )  # fmt: skip
    return part[0] if splits == 1 else part.sum(0)


def local_attention_cuda(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: CallPlan, scale: float, **received
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Contract of window.local_attention (inputs in the model dtype). received: overrides of RECEIVED."""
    heads, c, d = q.shape
    t = plan.tensors(q.device)
    out = torch.empty(heads, c, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(heads, c, dtype=torch.float32, device=q.device)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    _local_fwd[(triton.cdiv(c, BM), heads)](
        q, k, v, out, lse, t["row_lo"], c, plan.window, scale,
        G=heads // k.shape[0], D=d, BM=BM, BN=BN, PREC=_prec(q),
    )  # fmt: skip
    return out, lse, received_attention_cuda(q, k, lse, plan, scale, **received)


def _memory_launch(q, k_mem, v_mem, plan, n_sinks, n_chosen, block_size, scale, out, lse, merge):
    heads, c, d = q.shape
    n_mb, kvh, m = k_mem.shape[0], k_mem.shape[1], k_mem.shape[2]
    if n_mb == 0 or m == 0:
        return
    t = plan.tensors(q.device)
    longest = max(plan.blocks[i].q1 - plan.blocks[i].q0 for i in plan.memory_blocks)
    _memory_fwd[(triton.cdiv(longest, BM), heads, n_mb)](
        q.contiguous(), k_mem.contiguous(), v_mem.contiguous(), out, lse,
        t["mb_q0"], t["mb_q1"], t["mb_units"],
        c, m, n_sinks, n_chosen, block_size, scale,
        KVH=kvh, G=heads // kvh, D=d, BM=BM, BN=BN, PREC=_prec(q), MERGE=merge,
    )  # fmt: skip


def memory_attention_cuda(
    q: torch.Tensor,
    k_mem: torch.Tensor,
    v_mem: torch.Tensor,
    plan: CallPlan,
    n_sinks: int,
    n_chosen: int,
    block_size: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Contract of window.memory_attention."""
    heads, c, d = q.shape
    out = torch.zeros(heads, c, d, dtype=torch.float32, device=q.device)
    lse = torch.full((heads, c), float("-inf"), dtype=torch.float32, device=q.device)
    _memory_launch(q, k_mem, v_mem, plan, n_sinks, n_chosen, block_size, scale, out, lse, False)
    return out, lse


def memory_attention_merge_cuda(
    q: torch.Tensor,
    k_mem: torch.Tensor,
    v_mem: torch.Tensor,
    plan: CallPlan,
    n_sinks: int,
    n_chosen: int,
    block_size: int,
    scale: float,
    out: torch.Tensor,
    lse: torch.Tensor,
) -> torch.Tensor:
    """window.merge(out, lse, *window.memory_attention(...)), written into `out` in place; returns it.

    out (heads, c, d) and lse (heads, c): the local pass's, fp32 and contiguous; lse is only read. Rows
    of blocks without memory, and rows whose block sees no memory key, keep their values."""
    heads, c, d = q.shape
    if (
        out.dtype != torch.float32 or lse.dtype != torch.float32 or out.shape != (heads, c, d)
        or lse.shape != (heads, c) or not out.is_contiguous() or not lse.is_contiguous()
    ):  # fmt: skip
        raise ValueError("out (heads, c, d) and lse (heads, c) must be contiguous fp32")
    _memory_launch(q, k_mem, v_mem, plan, n_sinks, n_chosen, block_size, scale, out, lse, True)
    return out
