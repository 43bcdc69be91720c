"""Token-level context memory (InfLLM-style) for transformers RoPE decoders.

`attach(model, config)` scopes the memllm attention function and yields a ContextMemoryCache to pass
as the model's cache (see memllm.compat.cache_kwargs); `prefill.feed` streams long inputs in bounded chunks. Importing this package
registers nothing and changes no global state.
"""

from __future__ import annotations

from memllm.context.attach import attach, new_cache
from memllm.context.cache import ContextMemoryCache, ContextMemoryLayer
from memllm.context.prefill import feed, step
from memllm.context.support import ModelSpec, inspect_model

__all__ = [
    "ContextMemoryCache",
    "ContextMemoryLayer",
    "ModelSpec",
    "attach",
    "feed",
    "inspect_model",
    "new_cache",
    "step",
]
