"""Exact attention over local + memory keys: one softmax over the concatenated logits.

Local keys carry exact relative positions and a causal mask; memory keys (sinks + retrieved units)
are all visible. The result is what dense attention over the union gives. Also returns, per local
key, the attention it received (summed over the block's queries and the heads sharing its KV head),
which picks a unit's representative keys.

Knows nothing of rotary embeddings, caches or units: inputs arrive already rotated.
"""

from __future__ import annotations

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
