"""The attention function memllm registers with transformers' AttentionInterface (name: "memllm_context").

It looks up the ContextMemoryCache made active by `attach` (a context variable, so concurrent threads
and nested attaches do not see each other's cache), checks that the K/V it received are the ones the
cache's layer recorded in `update`, and lets that layer compute the output (cache.py). Registration
is done by attach.py, never at import. Knows nothing of the rule itself.
"""

from __future__ import annotations

import contextvars

import torch

ATTN_NAME = "memllm_context"

ACTIVE_CACHE: contextvars.ContextVar = contextvars.ContextVar("memllm_active_context_cache", default=None)


def context_memory_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """query (b, heads, q, d), key/value (b, kv_heads, q, d), rotated by the model -> ((b, q, heads, d), None)."""
    cache = ACTIVE_CACHE.get()
    if cache is None:
        raise RuntimeError(
            f"attention '{ATTN_NAME}' was called outside memllm.context.attach(): use `with attach(model, config) "
            "as cache:` and pass that cache to the model (memllm.compat.cache_kwargs(model, cache))"
        )
    for unsupported in ("softcap", "s_aux"):
        if kwargs.get(unsupported) is not None:
            raise RuntimeError(f"attention '{ATTN_NAME}' does not support {unsupported}")
    layer = cache.layers[module.layer_idx]
    if layer.pending is None or layer.pending[0] is not key:
        raise RuntimeError(
            "the model's keys did not come from the active ContextMemoryCache: pass the cache from attach() to the "
            "model (memllm.compat.cache_kwargs(model, cache)) and use_cache=True"
        )
    layer.pending = None
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    given = kwargs.get("position_ids")
    if given is not None and (query.device.type == "cpu" or cache.config.impl == "reference"):
        # The rotation is undone at the cache's positions; check the model used them (on the CPU and on
        # the reference path only: reading device tensors would synchronise the host).
        # (n,) for a ContextMemoryCache, (B, n) for a BatchCache (batch.py): each row its session's
        n = query.shape[2]
        want = layer.model_positions(n, query.device).reshape(-1, n)
        if not torch.equal(given.reshape(want.shape[0], -1)[:, -n:].to(want.device), want):
            raise RuntimeError(
                "position_ids must be the ContextMemoryCache's own (leave them out, or pass cache.next_position_ids(n))"
            )
    with torch.no_grad():
        static = cache.static  # a static call (cuda/graph.py): one token, a few rows, or a steady chunk
        if static is not None and static.cut is not None:
            out = static.attend_cut(layer, static.cut, query, key, value, scale)
        elif static is not None:
            out = static.attend(layer, query, key, value, scale)
        else:
            out = layer.attend(query, key, value, scale)
    return out.transpose(1, 2).contiguous(), None
