"""Unit lookup: score memory units against execution blocks of queries, keep the top k per KV head.

Score of unit u for KV head g: (sum of the block's queries of the heads in group g, rotated at the
fixed distance) . (mean of u's representative keys, rotated at position 0), as InfLLM does.
Selection ("shared", the default): the `topk` units with the highest score summed over KV heads, the
same units for every head; ("per_head"): the topk per KV head. A block may only choose among the
units cut before it (`units_before`): later ones score -inf, so they sort last and a block with
fewer than topk candidates keeps its valid ids first. Ties: lower unit index first (equal keys make
exact ties, e.g. the same token in layer 0); ids come sorted by unit index. All blocks of a call
are scored and selected at once on the device (no host synchronisation); `select_units_reference`
is the plain loop the tests compare with.

Knows nothing of where unit K/V live or of attention.
"""

from __future__ import annotations

import torch


def block_query_sums(
    q_mem: torch.Tensor, row_block: torch.Tensor, n_blocks: int, kv_heads: int
) -> torch.Tensor:
    """q_mem (heads, c, d); row_block (c,) long: each row's memory block or -1 -> (n_blocks, kv_heads, d) fp32.

    A one-hot product rather than a scatter, so the sums are deterministic on every device."""
    heads, c, d = q_mem.shape
    per_kv = q_mem.float().reshape(kv_heads, heads // kv_heads, c, d).sum(dim=1)  # (kv_heads, c, d)
    onehot = (row_block[None, :] == torch.arange(n_blocks, device=q_mem.device)[:, None]).float()
    return torch.matmul(onehot, per_kv.transpose(0, 1).reshape(c, kv_heads * d)).reshape(
        n_blocks, kv_heads, d
    )


def unit_scores(q_sum: torch.Tensor, repr_keys: torch.Tensor) -> torch.Tensor:
    """q_sum (..., kv_heads, head_dim); repr_keys (kv_heads, n_units, head_dim), each unit's mean
    representative key, or one index per leading row (..., kv_heads, n_units, head_dim: a batch's
    sessions, context/batch.py) -> (..., kv_heads, n_units) fp32.

    Computed in fp32: a bf16 product would round the scores to 8 bits of mantissa, making ties (broken
    by unit index) among units whose scores differ. The fp32 copy of the keys is transient (one layer)."""
    return torch.einsum("...hd,...hud->...hu", q_sum.float(), repr_keys.float())


def combine(scores: torch.Tensor, mode: str) -> torch.Tensor:
    """Per-head scores (..., kv_heads, n_units) -> the rows selection runs on: one summed row ("shared") or all."""
    return scores.sum(dim=-2, keepdim=True) if mode == "shared" else scores


def mask_later(scores: torch.Tensor, units_before: torch.Tensor) -> torch.Tensor:
    """scores (blocks, rows, n_units); units_before (blocks,) -> units >= units_before[b] set to -inf."""
    later = torch.arange(scores.shape[-1], device=scores.device)[None, :] >= units_before[:, None]
    return scores.masked_fill(later[:, None, :], float("-inf"))


SEGMENT = 1024  # select_units: rows longer than 2 segments take the top k per segment first


def selection_keys(scores: torch.Tensor) -> torch.Tensor:
    """scores (..., n_units) -> int64 keys (..., n_units) that order like (score, -index): the score's fp32
    bits made order-preserving in the high 32 bits, the index reversed in the low 32. Every key is
    distinct, so which ids a top-k of keys picks is exact (select_units)."""
    n = scores.shape[-1]
    bits = (scores.float() + 0.0).view(torch.int32)  # + 0.0: -0.0 becomes 0.0, equal as floats
    ordered = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(torch.int64)  # int order = float order
    index = torch.arange(n, device=scores.device, dtype=torch.int64)
    return (ordered << 32) | (0xFFFFFFFF - index)


def select_units(scores: torch.Tensor, k: int) -> torch.Tensor:
    """scores (..., n_units) -> ids (..., min(k, n_units)) long, ascending per row, on scores' device.

    The k largest, ties broken by lower index, as a stable descending sort would give, but by top-k
    over selection_keys (distinct, so which ids win is exact; the ids are read back from the winning
    keys): on the H100 the two stable sorts this replaced took ~2 ms of GPU time per prefill call at
    1M tokens (8,159 units, profile). A long row is cut into SEGMENT-key pieces, the top k of each
    taken first, then the top k of those (distinct keys: the same k win): one top-k over a whole row
    runs in one thread block, 49 us per layer for 7 rows of 10,233 (profile_prefill, H100)."""
    n = scores.shape[-1]
    k = min(k, n)
    keys = selection_keys(scores)
    if n > 2 * SEGMENT and k <= SEGMENT:
        pieces = -(-n // SEGMENT)
        # Padding keys lose to every real key (whose high half is at least -inf's ordered bits).
        keys = torch.nn.functional.pad(keys, (0, pieces * SEGMENT - n), value=torch.iinfo(torch.int64).min)
        keys = keys.view(*keys.shape[:-1], pieces, SEGMENT).topk(k, dim=-1, sorted=False).values.flatten(-2)
    best = torch.topk(keys, k, dim=-1, sorted=False).values
    return torch.sort(0xFFFFFFFF - (best & 0xFFFFFFFF), dim=-1).values


def choose_units(
    q_sum: torch.Tensor, reprs: torch.Tensor, units_before: torch.Tensor, mode: str, k: int, impl: str
) -> torch.Tensor:
    """The whole lookup: q_sum (blocks, kv_heads, d), representatives (kv_heads, n, d), all n scored;
    units_before (blocks,) or (1,) long: block b chooses among units < units_before[b] -> ids
    (blocks, 1 or kv_heads, min(k, n)) long. The PyTorch paths ("reference": select_units_reference); impl
    "fast" on CUDA is cuda/lookup.choose_units_cuda (two or three launches), chosen by kernels.py."""
    blocks = q_sum.shape[0]
    scores = mask_later(combine(unit_scores(q_sum, reprs), mode), units_before.expand(blocks))
    return (select_units_reference if impl == "reference" else select_units)(scores, k)


def select_units_reference(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Same selection as `select_units`, by sorting on the host (ties broken by lower index)."""
    rows = []
    flat = scores.detach().reshape(-1, scores.shape[-1])
    for row in flat.to("cpu", torch.float64).tolist():
        order = sorted(range(len(row)), key=lambda u: (-row[u], u))[:k]
        rows.append(sorted(order))
    n = min(k, scores.shape[-1])
    return torch.tensor(rows, dtype=torch.long, device=scores.device).reshape(*scores.shape[:-1], n)
