"""Model-level chunked prefill and single steps through a ContextMemoryCache (inside `attach`).

Chunks end at absolute multiples of chunk_size, the model computes logits only for the last position,
so activations stay bounded by chunk_size whatever the stream length. Knows nothing of text.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from memllm.compat import cache_kwargs
from memllm.context.cache import ContextMemoryCache


def upload(ids: torch.Tensor, device: torch.device) -> torch.Tensor:
    """ids on `device`; from the host to CUDA through pinned memory, asynchronously (no host wait)."""
    device = torch.device(device)
    if ids.device == device:
        return ids
    if device.type == "cuda" and ids.device.type == "cpu":
        return ids.pin_memory().to(device, non_blocking=True)
    return ids.to(device)


@torch.no_grad()
def step(model: torch.nn.Module, cache: ContextMemoryCache, ids: torch.Tensor) -> torch.Tensor:
    """Feed ids (1, n) in one model call (n <= chunk_size); returns the last position's logits (vocab,) fp32.

    The call goes through the cache's DecodeGraph when it has one and the call is static: a single
    token or a short call (static.MAX_ROWS) that cuts nothing, or a chunk that cuts units in phase 2."""
    ids = upload(ids, cache.layers[0].device)
    plain = cache.is_probing or cache.variant  # a variant's config is not the one the graph's buffers were made with
    graph = None if plain else cache.decode_graph()
    logits = graph.step(model, ids) if graph is not None else None
    if logits is not None:
        return logits
    out = model(
        input_ids=ids,
        **cache_kwargs(model, cache),
        position_ids=cache.next_position_ids(ids.shape[1]),
        use_cache=True,
        logits_to_keep=1,
    )
    return out.logits[0, -1].float()


@torch.no_grad()
def feed(
    model: torch.nn.Module,
    cache: ContextMemoryCache,
    ids: torch.Tensor,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor | None:
    """Feed ids (1, n) in chunks; progress(done, total) after each. Returns the last logits (None if n == 0).

    The ids go to the device once, without waiting (from pinned memory): a chunk's own upload from
    pageable memory would wait for the GPU to finish the chunk before it, so the host's work for each
    chunk (its plan, the stores' room, the graph's bookkeeping) would add to the GPU's instead of
    running ahead of it."""
    total = ids.shape[1]
    ids = upload(ids, cache.layers[0].device)
    chunk = cache.config.chunk_size
    cache.reserve(total)
    done = 0
    logits = None
    while done < total:
        seen = cache.seen_tokens
        end = min(total, done + chunk - seen % chunk)
        logits = step(model, cache, ids[:, done:end])
        done = end
        if progress is not None:
            progress(done, total)
    return logits


@torch.no_grad()
def greedy(
    model: torch.nn.Module, cache: ContextMemoryCache, logits: torch.Tensor, n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """n greedy steps from logits (vocab,), tokens kept on the device: no host synchronisation
    (generation.decode on the device).

    Returns (ids (n,) on the device, the logits after the last one). Stop tokens are not checked
    (that needs the host); callers cut the ids at the first stop token afterwards.
    """
    from memllm.generation import decode

    last = [logits]

    def fwd(tok: torch.Tensor) -> torch.Tensor:
        last[0] = step(model, cache, tok)
        return last[0]

    toks = list(decode(logits, fwd, n, feed_last=True, on_device=True))
    return torch.cat(toks).view(-1), last[0]
