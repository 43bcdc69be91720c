"""Text memory: the record model, the store protocol, embedders and the FAISS+SQLite store.

    from memllm.memory_stores import FaissStore, MemoryRecord, SentenceTransformerEmbedder
    store = FaissStore("~/.cache/memllm/memory", SentenceTransformerEmbedder())
    store.add(MemoryRecord("I live in Lyon", namespace="alice", kind="fact"))
    store.search("where does alice live?", k=3, namespace="alice")

Importing this package loads numpy only; FAISS, SQLite and sentence-transformers load on first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "MemoryRecord": "memllm.memory_stores.records",
    "SearchResult": "memllm.memory_stores.records",
    "MemoryStore": "memllm.memory_stores.records",
    "KINDS": "memllm.memory_stores.records",
    "content_hash": "memllm.memory_stores.records",
    "Embedder": "memllm.memory_stores.embeddings",
    "FakeEmbedder": "memllm.memory_stores.embeddings",
    "SentenceTransformerEmbedder": "memllm.memory_stores.embeddings",
    "FaissStore": "memllm.memory_stores.faiss_store",
    "StoreStats": "memllm.memory_stores.faiss_store",
    "IndexConfig": "memllm.memory_stores.vector_index",
}

__all__ = [
    "KINDS",
    "Embedder",
    "FaissStore",
    "FakeEmbedder",
    "IndexConfig",
    "MemoryRecord",
    "MemoryStore",
    "SearchResult",
    "SentenceTransformerEmbedder",
    "StoreStats",
    "content_hash",
]

if TYPE_CHECKING:  # pragma: no cover
    from memllm.memory_stores.embeddings import Embedder, FakeEmbedder, SentenceTransformerEmbedder
    from memllm.memory_stores.faiss_store import FaissStore, StoreStats
    from memllm.memory_stores.records import KINDS, MemoryRecord, MemoryStore, SearchResult, content_hash
    from memllm.memory_stores.vector_index import IndexConfig


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'memllm.memory_stores' has no attribute {name!r}")
    return getattr(import_module(module), name)
