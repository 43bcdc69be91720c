"""memllm inside LangChain/LangGraph: langchain-core adapters over memllm's model and memory.

    from memllm.agents.langchain import (
        ChatMemLLM,                 # BaseChatModel: streaming, stop sequences, usage, optional memory
        MemllmChatMessageHistory,   # BaseChatMessageHistory persisted in a memory store namespace
        MemllmRetriever,            # BaseRetriever: controller-selected, token-budgeted memory
        MemllmEmbeddings,           # Embeddings over a memllm embedder (default all-MiniLM-L6-v2)
        MemllmVectorStore,          # VectorStore over the FAISS+SQLite store
    )

Each adapter is a thin layer: the logic lives in memllm (llm, memory_stores, agents.controller).
Importing this package imports langchain-core, not torch; models and stores load on first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "ChatMemLLM": "memllm.agents.langchain.chat_model",
    "load_model": "memllm.agents.langchain.chat_model",
    "MemllmChatMessageHistory": "memllm.agents.langchain.history",
    "MemllmRetriever": "memllm.agents.langchain.retriever",
    "MemllmEmbeddings": "memllm.agents.langchain.embeddings",
    "LangChainEmbedder": "memllm.agents.langchain.embeddings",
    "MemllmVectorStore": "memllm.agents.langchain.vectorstore",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from memllm.agents.langchain.chat_model import ChatMemLLM, load_model  # noqa: F401
    from memllm.agents.langchain.embeddings import LangChainEmbedder, MemllmEmbeddings  # noqa: F401
    from memllm.agents.langchain.history import MemllmChatMessageHistory  # noqa: F401
    from memllm.agents.langchain.retriever import MemllmRetriever  # noqa: F401
    from memllm.agents.langchain.vectorstore import MemllmVectorStore  # noqa: F401


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'memllm.agents.langchain' has no attribute {name!r}")
    return getattr(import_module(module), name)
