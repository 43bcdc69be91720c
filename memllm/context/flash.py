"""CUDA kernels (Triton) for the attention passes of one call: the contracts of window.py, batched.

Each is one launch per layer and call, whatever the number of execution blocks in it:
  local_attention_cuda   flash-style (online softmax, nothing materialised), per-row key ranges
                         [row_lo[t], W + t]; returns out, lse, and (second kernel) the attention each
                         window key received (exp(logit - lse) summed over queries and grouped heads);
  memory_attention_cuda  each memory block's queries over its [sinks, chosen units] keys.
Inputs are read in the model dtype and accumulated in fp32. window.py holds the loops these are
tested against. Imported only on CUDA (needs triton).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from memllm.context.plan import CallPlan

BM, BN = 64, 64


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


@triton.jit
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


@triton.jit
def _received(
    Q, K, LSE, ROW_LO, R,
    c, W, scale,
    G: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    kvh = tl.program_id(1)
    n_keys = W + c
    cols = pid_n * BN + tl.arange(0, BN)
    col_ok = cols < n_keys
    dd = tl.arange(0, D)
    k = tl.load(K + (kvh * n_keys + cols[:, None]) * D + dd[None, :], mask=col_ok[:, None], other=0.0)
    total = tl.zeros((BN,), tl.float32)
    r_start = tl.maximum(pid_n * BN - W, 0)
    r_start = (r_start // BM) * BM
    for r0 in range(r_start, c, BM):
        rows = r0 + tl.arange(0, BM)
        row_ok = rows < c
        lo = tl.load(ROW_LO + rows, mask=row_ok, other=2147483647)
        visible = (cols[None, :] >= lo[:, None]) & (cols[None, :] <= W + rows[:, None]) & row_ok[:, None]
        for gi in tl.static_range(G):
            h = kvh * G + gi
            q = tl.load(Q + (h * c + rows[:, None]) * D + dd[None, :], mask=row_ok[:, None], other=0.0)
            lse = tl.load(LSE + h * c + rows, mask=row_ok, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
            p = tl.where(visible, tl.exp(s - lse[:, None]), 0.0)
            total += tl.sum(p, 0)
    tl.store(R + kvh * n_keys + cols, total, mask=col_ok)


@triton.jit
def _memory_fwd(
    Q, KM, VM, OUT, LSE, MB_Q0, MB_Q1, MB_UNITS,
    c, M, n_sinks, n_chosen, block_size, scale,
    KVH: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    kvh = h // G
    q0 = tl.load(MB_Q0 + b)
    q1 = tl.load(MB_Q1 + b)
    if q0 + pid_m * BM < q1:
        units = tl.load(MB_UNITS + b).to(tl.int32)
        limit = n_sinks + tl.minimum(n_chosen, units) * block_size
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
        tl.store(OUT + (h * c + rows[:, None]) * D + dd[None, :], acc / l_safe[:, None], mask=row_ok[:, None])
        tl.store(LSE + h * c + rows, lse, mask=row_ok)


def local_attention_cuda(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: CallPlan, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Contract of window.local_attention (inputs in the model dtype, contiguous)."""
    heads, c, d = q.shape
    kvh, n_keys = k.shape[0], k.shape[1]
    t = plan.tensors(q.device)
    out = torch.empty(heads, c, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(heads, c, dtype=torch.float32, device=q.device)
    received = torch.empty(kvh, n_keys, dtype=torch.float32, device=q.device)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    g = heads // kvh
    _local_fwd[(triton.cdiv(c, BM), heads)](
        q, k, v, out, lse, t["row_lo"], c, plan.window, scale, G=g, D=d, BM=BM, BN=BN, PREC=_prec(q)
    )
    _received[(triton.cdiv(n_keys, BN), kvh)](
        q, k, lse, t["row_lo"], received, c, plan.window, scale, G=g, D=d, BM=BM, BN=BN, PREC=_prec(q)
    )
    return out, lse, received


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
    n_mb, kvh, m = k_mem.shape[0], k_mem.shape[1], k_mem.shape[2]
    t = plan.tensors(q.device)
    out = torch.zeros(heads, c, d, dtype=torch.float32, device=q.device)
    lse = torch.full((heads, c), float("-inf"), dtype=torch.float32, device=q.device)
    if n_mb == 0 or m == 0:
        return out, lse
    longest = max(plan.blocks[i].q1 - plan.blocks[i].q0 for i in plan.memory_blocks)
    _memory_fwd[(triton.cdiv(longest, BM), heads, n_mb)](
        q.contiguous(), k_mem.contiguous(), v_mem.contiguous(), out, lse,
        t["mb_q0"], t["mb_q1"], t["mb_units"],
        c, m, n_sinks, n_chosen, block_size, scale,
        KVH=kvh, G=heads // kvh, D=d, BM=BM, BN=BN, PREC=_prec(q),
    )  # fmt: skip
    return out, lse
