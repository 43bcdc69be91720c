"""Exact attention over local + memory keys: one softmax over the concatenated logits.

Local keys carry exact relative positions and a causal mask; memory keys (sinks + retrieved units)
are all visible. The result is what dense attention over the union gives. Also returns, per local
key, the attention it received (summed over the block's queries and the heads sharing its KV head),
which picks a unit's representative keys.

Knows nothing of rotary embeddings, caches or units: inputs arrive already rotated.
"""

from __future__ import annotations

import functools

import torch


def merged_attention(
    q_local: torch.Tensor,
    k_local: torch.Tensor,
    v_local: torch.Tensor,
    q_mem: torch.Tensor | None,
    k_mem: torch.Tensor | None,
    v_mem: torch.Tensor | None,
    scale: float,
    causal_offset: int,
    compute_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attend a block of queries to local and memory keys.

    q_local, q_mem: (heads, e, head_dim), the same queries rotated for each key set.
    k_local, v_local: (kv_heads, L, head_dim); query i sees local keys j <= causal_offset + i.
    k_mem, v_mem: (kv_heads, M, head_dim), seen by every query (None: no memory).
    Returns out (heads, e, head_dim) fp32 and received (kv_heads, L) fp32.
    """
    heads, e, d = q_local.shape
    kv_heads, n_local = k_local.shape[0], k_local.shape[1]
    g = heads // kv_heads
    cd = compute_dtype
    ql = q_local.to(cd).reshape(kv_heads, g * e, d)
    logits_l = torch.matmul(ql, k_local.to(cd).transpose(1, 2)).float() * scale  # (kv_heads, g*e, L)
    qi = torch.arange(e, device=q_local.device).repeat(g)  # query index of each row
    kj = torch.arange(n_local, device=q_local.device)
    masked = kj[None, :] > (causal_offset + qi)[:, None]  # (g*e, L)
    logits_l = logits_l.masked_fill(masked, float("-inf"))
    m = logits_l.amax(dim=-1, keepdim=True)
    logits_m = None
    if k_mem is not None and k_mem.shape[1] > 0:
        qm = q_mem.to(cd).reshape(kv_heads, g * e, d)
        logits_m = torch.matmul(qm, k_mem.to(cd).transpose(1, 2)).float() * scale  # (kv_heads, g*e, M)
        m = torch.maximum(m, logits_m.amax(dim=-1, keepdim=True))
    p_l = torch.exp(logits_l - m)
    denom = p_l.sum(dim=-1, keepdim=True)
    out = torch.matmul(p_l.to(cd), v_local.to(cd)).float()
    if logits_m is not None:
        p_m = torch.exp(logits_m - m)
        denom = denom + p_m.sum(dim=-1, keepdim=True)
        out = out + torch.matmul(p_m.to(cd), v_mem.to(cd)).float()
    out = out / denom
    received = (p_l / denom).sum(dim=1)  # (kv_heads, L)
    return out.reshape(heads, e, d), received


@functools.lru_cache(maxsize=4)
def _bias(
    e: int, g: int, n_mem: int, n_local: int, causal_offset: int, device: torch.device, dtype: torch.dtype
):
    """(g*e, n_mem + n_local) additive mask: 0 where allowed, -inf on local keys after each query."""
    qi = torch.arange(e, device=device).repeat(g)
    kj = torch.arange(n_local, device=device)
    bias = torch.zeros(g * e, n_mem + n_local, device=device, dtype=dtype)
    bias[:, n_mem:].masked_fill_(kj[None, :] > (causal_offset + qi)[:, None], float("-inf"))
    return bias


def merged_attention_fused(
    q_local: torch.Tensor,
    k_local: torch.Tensor,
    v_local: torch.Tensor,
    q_mem: torch.Tensor | None,
    k_mem: torch.Tensor | None,
    v_mem: torch.Tensor | None,
    scale: float,
    causal_offset: int,
    compute_dtype: torch.dtype = torch.bfloat16,
    q_pair: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `merged_attention`, with fewer passes over memory (the device path).

    q_pair (heads, e, 2, head_dim), if given, holds [q_local, q_mem] already side by side.

    Both query rotations ride in one product: q' = [q_local, q_mem] (2*head_dim) against
    k' = [0, k_mem] for memory keys and [k_local, 0] for local keys, so one GEMM (with the mask added
    in its epilogue) gives the concatenated logits, and one softmax merges them exactly.
    """
    heads, e, d = q_local.shape
    kv_heads, n_local = k_local.shape[0], k_local.shape[1]
    g = heads // kv_heads
    cd = compute_dtype
    n_mem = 0 if k_mem is None else k_mem.shape[1]
    if n_mem:
        if q_pair is None:
            q_pair = torch.stack([q_local, q_mem], dim=2)
        q = q_pair.to(cd).reshape(kv_heads, g * e, 2 * d)
        k = torch.zeros(kv_heads, n_mem + n_local, 2 * d, dtype=cd, device=k_local.device)
        k[:, :n_mem, d:] = k_mem
        k[:, n_mem:, :d] = k_local
        v = torch.cat([v_mem.to(cd), v_local.to(cd)], dim=1)
    else:
        q = q_local.to(cd).reshape(kv_heads, g * e, d)
        k, v = k_local.to(cd), v_local.to(cd)
    bias = _bias(e, g, n_mem, n_local, causal_offset, q.device, cd)
    logits = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=scale)  # (kv_heads, g*e, n_mem + n_local)
    p = torch.softmax(logits, dim=-1)
    out = torch.bmm(p, v).float().reshape(heads, e, d)
    received = p[:, :, n_mem:].sum(dim=1, dtype=torch.float32)  # (kv_heads, L)
    return out, received
