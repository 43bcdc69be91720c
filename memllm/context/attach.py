"""attach(model, config): scoped, reversible use of context memory on a transformers model.

On entry: checks the model is supported (support.py), registers the memllm attention function with
transformers' AttentionInterface (if no attach is open yet), switches the model to it with
`set_attn_implementation`, and makes the cache active for this context. On exit: restores the model's
previous implementation and removes the registration when the last attach closes. Importing memllm
registers nothing. Knows nothing of text or sessions.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import AttentionInterface

from memllm.config import MemoryConfig
from memllm.context.attention import ACTIVE_CACHE, ATTN_NAME, context_memory_attention
from memllm.context.cache import ContextMemoryCache
from memllm.context.support import inspect_model

_lock = threading.Lock()
_open = 0


def _register() -> None:
    global _open
    with _lock:
        if _open == 0:
            AttentionInterface.register(ATTN_NAME, context_memory_attention)
        _open += 1


def _unregister() -> None:
    global _open
    with _lock:
        _open -= 1
        if _open == 0:
            AttentionInterface._global_mapping.pop(ATTN_NAME, None)


def new_cache(model: torch.nn.Module, config: MemoryConfig | None = None) -> ContextMemoryCache:
    """A fresh ContextMemoryCache sized for `model` (raises UnsupportedModelError / ConfigError)."""
    return ContextMemoryCache(inspect_model(model), config or MemoryConfig())


@contextmanager
def attach(
    model: torch.nn.Module,
    config: MemoryConfig | None = None,
    cache: ContextMemoryCache | None = None,
    inspect: bool = True,
) -> Iterator[ContextMemoryCache]:
    """`with attach(model, MemoryConfig(...)) as cache: model(ids, cache=cache)` (`past_key_values=` before transformers 5.24; `memllm.compat.cache_kwargs` picks).

    inspect=False skips checking that `model` is supported (support.inspect_model walks its modules:
    ~1.6 ms for a 30-layer model on a slow CPU) for a `cache` made for this very model, when a caller
    attaches once per token (memllm.engine.BatchEngine's steps)."""
    if cache is None:
        cache = new_cache(model, config)
    elif inspect:
        inspect_model(model)
    _register()
    previous = model.config._attn_implementation
    token = None
    try:
        model.set_attn_implementation(ATTN_NAME)
        token = ACTIVE_CACHE.set(cache)
        yield cache
    finally:
        if token is not None:
            ACTIVE_CACHE.reset(token)
        if model.config._attn_implementation != previous:
            model.set_attn_implementation(previous)
        _unregister()
