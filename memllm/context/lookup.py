"""Unit lookup: score memory units against an execution block of queries, keep the top k per KV head.

Score of unit u for KV head g: (sum of the block's queries of the heads in group g, rotated at the
fixed distance) . (mean of u's representative keys, rotated at position 0), as InfLLM does.
Selection ("shared", the default): the `topk` units with the highest score summed over KV heads, the
same units for every head; ("per_head"): the topk per KV head. Ties: lower unit index first (equal
keys make exact ties, e.g. the same token in layer 0); ids come sorted by unit index. `select_units` runs on the device
(no host synchronisation); `select_units_reference` is the plain loop the tests compare it with.

Knows nothing of where unit K/V live or of attention.
"""

from __future__ import annotations

import torch


def unit_scores(q_sum: torch.Tensor, repr_keys: torch.Tensor) -> torch.Tensor:
    """q_sum (kv_heads, head_dim); repr_keys (kv_heads, n_units, repr_topk, head_dim) -> (kv_heads, n_units) fp32.

    Computed in the keys' dtype (one product over all units and representatives), no copy of the keys."""
    return torch.einsum("hd,hurd->hur", q_sum.to(repr_keys.dtype), repr_keys).float().mean(dim=-1)


def combine(scores: torch.Tensor, mode: str) -> torch.Tensor:
    """Per-head scores (kv_heads, n_units) -> the rows selection runs on: one summed row ("shared") or all."""
    return scores.sum(dim=0, keepdim=True) if mode == "shared" else scores


def select_units(scores: torch.Tensor, k: int) -> torch.Tensor:
    """scores (rows, n_units) -> ids (rows, min(k, n_units)) long, ascending per row, on scores' device."""
    k = min(k, scores.shape[1])
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    return torch.sort(order, dim=1).values


def select_units_reference(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Same selection as `select_units`, by sorting on the host (ties broken by lower index)."""
    rows = []
    for row in scores.detach().to("cpu", torch.float64).tolist():
        order = sorted(range(len(row)), key=lambda u: (-row[u], u))[:k]
        rows.append(sorted(order))
    return torch.tensor(rows, dtype=torch.long, device=scores.device).reshape(scores.shape[0], -1)
