"""Attention passes of one call (see plan.py for the coordinates), in plain PyTorch.

local_attention: each query over the window keys its block sees [lo_b, W + t] (causal, exact relative
positions), returning the output, its log-sum-exp and the attention each window key received
(softmax over the local keys, summed over the call's queries and the heads sharing its KV head).
memory_attention: the queries of each memory block over that block's sinks + chosen units.
merge: one softmax over both key sets, from the two (output, lse) pairs: exactly what dense
attention over the union gives.

These loops over execution blocks are the reference and the CPU path; cuda/window.py holds the CUDA
kernels with the same contracts, which tests compare with these. Knows nothing of rotations or units.
"""

from __future__ import annotations

import torch

from memllm.context.plan import CallPlan


def local_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: CallPlan, scale: float, compute: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (heads, c, d) rotated at window positions; k, v (kv_heads, W + c, d).

    Returns out (heads, c, d) fp32, lse (heads, c) fp32, received (kv_heads, W + c) fp32."""
    heads, c, d = q.shape
    kvh, n_keys = k.shape[0], k.shape[1]
    g = heads // kvh
    W = plan.window
    out = torch.empty(heads, c, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(heads, c, dtype=torch.float32, device=q.device)
    received = torch.zeros(kvh, n_keys, dtype=torch.float32, device=q.device)
    for b in plan.blocks:
        n, hi = b.q1 - b.q0, W + b.q1
        qb = q[:, b.q0 : b.q1].to(compute).reshape(kvh, g * n, d)
        kb, vb = k[:, b.lo : hi].to(compute), v[:, b.lo : hi].to(compute)
        logits = torch.matmul(qb, kb.transpose(1, 2)).float() * scale  # (kvh, g*n, hi - lo)
        rows = torch.arange(n, device=q.device).repeat(g) + W + b.q0  # each row's own key
        cols = torch.arange(b.lo, hi, device=q.device)
        logits = logits.masked_fill(cols[None, :] > rows[:, None], float("-inf"))
        lse_b = torch.logsumexp(logits, dim=-1, keepdim=True)
        p = torch.exp(logits - lse_b)
        out[:, b.q0 : b.q1] = torch.matmul(p.to(compute), vb).float().reshape(heads, n, d)
        lse[:, b.q0 : b.q1] = lse_b.reshape(heads, n)
        received[:, b.lo : hi] += p.sum(dim=1)
    return out, lse, received


def received_scores(q: torch.Tensor, lse: torch.Tensor, k: torch.Tensor, first: int, scale: float) -> torch.Tensor:
    """The attention that keys k (kv_heads, n, d) received from queries q (heads, m, d) at window
    positions first, first + 1, ... of k that saw every key of k up to their own,
    given the queries' log-sum-exp (heads, m) -> (kv_heads, n) fp32, summed over queries and the heads
    sharing a KV head: what local_attention's `received` adds up for one block's band (k from its first
    key), also computed later for deferred calls (cache.flush_scores)."""
    heads, m, d = q.shape
    kvh, n = k.shape[0], k.shape[1]
    g = heads // kvh
    out = torch.zeros(kvh, n, dtype=torch.float32, device=q.device)
    kf = k.float()
    for lo in range(0, m, 512):
        hi = min(m, lo + 512)
        rows = hi - lo
        top = min(n, first + hi)  # keys the block's queries saw
        qb = q[:, lo:hi].float().reshape(kvh, g * rows, d)
        p = torch.baddbmm(-lse[:, lo:hi].float().reshape(kvh, g * rows, 1), qb, kf[:, :top].transpose(1, 2),
                          alpha=scale).exp_()  # fmt: skip
        own = first + lo  # the block's first query's own key
        if own < top:
            hidden = torch.ones(rows, top - own, dtype=torch.bool, device=q.device).triu_(1)
            p[:, :, own:].masked_fill_(hidden.repeat(g, 1)[None], 0.0)
        out[:, :top] += p.sum(dim=1)
    return out


def local_attention_fused(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: CallPlan, scale: float, compute: torch.dtype,
    with_received: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """local_attention's contract through PyTorch's fused CPU attention (flash attention for the CPU,
    which returns the log-sum-exp). Per execution block, two fused calls without a mask tensor: the
    keys before the block's own (seen by every row) and the block's own keys (causal, a square), merged
    by their log-sum-exps; `received` from the merged lse by received_scores (no PV product, no
    separate log-sum-exp pass). The CPU path of impl "fast" (kernels.TorchKernels); the same numbers
    as the loop within fp32 rounding (tests/context/test_window.py)."""
    heads, c, d = q.shape
    kvh, n_keys = k.shape[0], k.shape[1]
    g = heads // kvh
    W = plan.window
    out = torch.empty(heads, c, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(heads, c, dtype=torch.float32, device=q.device)
    received = torch.zeros(kvh, n_keys, dtype=torch.float32, device=q.device) if with_received else None
    fused = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    k_h = k.to(compute).repeat_interleave(g, 0)[None]  # (1, heads, keys, d): the fused call has no GQA
    v_h = v.to(compute).repeat_interleave(g, 0)[None]
    for b in plan.blocks:
        n, own = b.q1 - b.q0, W + b.q0  # the block's own keys: [own, own + n)
        qb = q[:, b.q0 : b.q1].to(compute)[None]
        o_b, lse_b = fused(qb, k_h[:, :, own : own + n], v_h[:, :, own : own + n], is_causal=True, scale=scale)[:2]
        o_b, lse_b = o_b[0].float(), lse_b[0].float()
        if own > b.lo:  # the earlier keys its queries see, all of them
            o_p, lse_p = fused(qb, k_h[:, :, b.lo : own], v_h[:, :, b.lo : own], scale=scale)[:2]
            o_b = merge(o_b, lse_b, o_p[0].float(), lse_p[0].float())
            lse_b = torch.logaddexp(lse_b, lse_p[0].float())
        out[:, b.q0 : b.q1] = o_b
        lse[:, b.q0 : b.q1] = lse_b
        if not with_received:
            continue
        received[:, b.lo : own + n] += received_scores(qb[0], lse_b, k[:, b.lo : own + n], own - b.lo, scale)
    return out, lse, received if with_received else None


def joined_memory(
    sink_k: torch.Tensor,
    sink_v: torch.Tensor,
    unit_k: torch.Tensor | None,
    unit_v: torch.Tensor | None,
    n_blocks: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The memory keys and values as memory_attention takes them, (n_blocks, kv_heads, M, d): the sinks
    (kv_heads, n_sinks, d) for every block, then each block's units (n_blocks, kv_heads, t, d), if any."""
    k = sink_k.unsqueeze(0).expand(n_blocks, -1, -1, -1)
    v = sink_v.unsqueeze(0).expand(n_blocks, -1, -1, -1)
    if unit_k is None:
        return k, v
    return torch.cat([k, unit_k], dim=2), torch.cat([v, unit_v], dim=2)


def memory_attention(
    q: torch.Tensor,
    k_mem: torch.Tensor,
    v_mem: torch.Tensor,
    plan: CallPlan,
    n_sinks: int,
    n_chosen: int,
    block_size: int,
    scale: float,
    compute: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q (heads, c, d) rotated at the fixed distance; k_mem, v_mem (memory blocks, kv_heads, M, d) laid
    out [sinks, chosen units]; memory block i sees n_sinks + min(n_chosen, units_before) * block_size keys.

    Returns out (heads, c, d) fp32 (0 on rows without memory) and lse (heads, c) (-inf there)."""
    heads, c, d = q.shape
    kvh = k_mem.shape[1]
    g = heads // kvh
    out = torch.zeros(heads, c, d, dtype=torch.float32, device=q.device)
    lse = torch.full((heads, c), float("-inf"), dtype=torch.float32, device=q.device)
    for i, bi in enumerate(plan.memory_blocks):
        b = plan.blocks[bi]
        n = b.q1 - b.q0
        m = n_sinks + min(n_chosen, b.units_before) * block_size
        if m == 0:
            continue
        qb = q[:, b.q0 : b.q1].to(compute).reshape(kvh, g * n, d)
        logits = torch.matmul(qb, k_mem[i, :, :m].to(compute).transpose(1, 2)).float() * scale
        lse_b = torch.logsumexp(logits, dim=-1, keepdim=True)
        p = torch.exp(logits - lse_b)
        out[:, b.q0 : b.q1] = (
            torch.matmul(p.to(compute), v_mem[i, :, :m].to(compute)).float().reshape(heads, n, d)
        )
        lse[:, b.q0 : b.q1] = lse_b.reshape(heads, n)
    return out, lse


def merge(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor) -> torch.Tensor:
    """Two attentions over disjoint key sets -> attention over their union. lse_a must be finite."""
    m = torch.maximum(lse_a, lse_b)
    wa = torch.exp(lse_a - m).unsqueeze(-1)
    wb = torch.exp(lse_b - m).unsqueeze(-1)
    return (out_a * wa + out_b * wb) / (wa + wb)
