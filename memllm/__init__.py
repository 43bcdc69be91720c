"""memllm: memory beyond the context window for language models.

The public API is re-exported here lazily, so `import memllm` is cheap (no torch import) and changes
no global state (no attention registration, no env vars, no logging config).
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "MemLLM": "memllm.llm",
    "BatchEngine": "memllm.engine",
    "MemoryConfig": "memllm.config",
    "MemllmError": "memllm.errors",
    "ConfigError": "memllm.errors",
    "ModelNotFoundError": "memllm.errors",
    "ModelPackageMissingError": "memllm.errors",
    "UnsupportedModelError": "memllm.errors",
    "SnapshotError": "memllm.errors",
    "StoreError": "memllm.errors",
    "InputError": "memllm.errors",
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:  # pragma: no cover
    from memllm.config import MemoryConfig  # noqa: F401
    from memllm.engine import BatchEngine  # noqa: F401
    from memllm.errors import (  # noqa: F401
        ConfigError,
        InputError,
        MemllmError,
        ModelNotFoundError,
        ModelPackageMissingError,
        SnapshotError,
        StoreError,
        UnsupportedModelError,
    )
    from memllm.llm import MemLLM  # noqa: F401


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'memllm' has no attribute {name!r}")
    return getattr(import_module(module), name)
