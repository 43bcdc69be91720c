"""Differences between the transformers versions memllm supports (5.17 to 5.x).

transformers 5.24 renamed the forward argument `past_key_values` to `cache` (the old name warns, and is
removed in 5.40). `cache_kwargs` passes a cache under the name the model's forward takes, decided once
per model class from its signature. This module knows nothing of memllm's own caches.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any


@functools.cache
def cache_argument(model_class: type) -> str:
    """'cache' where `model_class.forward` takes it (transformers 5.24+), else 'past_key_values'."""
    try:
        params = inspect.signature(model_class.forward).parameters
    except (TypeError, ValueError):  # a forward without a readable signature: the older name works everywhere
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """`model(input_ids=..., **cache_kwargs(model, cache))`: the cache under the name `model` expects."""
    return {cache_argument(type(model)): cache}
