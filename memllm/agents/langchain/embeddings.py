"""Embeddings in both directions: memllm's embedders as LangChain `Embeddings`, and any LangChain
`Embeddings` as a memllm `Embedder` (so the FAISS store can index with it).

Vectors from a memllm embedder are L2-normalised float32; LangChain gets them as lists of floats.
Knows nothing of stores or models beyond the embedder protocol.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from langchain_core.embeddings import Embeddings
from pydantic import BaseModel, ConfigDict, Field, model_validator

from memllm.memory_stores.embeddings import Embedder, normalize_rows


class MemllmEmbeddings(BaseModel, Embeddings):
    """A memllm embedder as LangChain `Embeddings`.

    MemllmEmbeddings()                         # packaged all-MiniLM-L6-v2, offline
    MemllmEmbeddings(model="/path/to/st-dir")  # a local sentence-transformers model
    MemllmEmbeddings(embedder=FakeEmbedder())  # any object with the memllm Embedder protocol
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, protected_namespaces=())

    embedder: Any = Field(default=None, exclude=True)
    """A memllm `Embedder` (default: built from `model`, `device` and `batch_size`)."""
    model: str | None = None
    """A local sentence-transformers directory; None for the packaged all-MiniLM-L6-v2."""
    device: str = "cpu"
    batch_size: int = Field(default=64, ge=1)

    @model_validator(mode="after")
    def _build(self) -> MemllmEmbeddings:
        if self.embedder is None:
            from memllm.memory_stores.embeddings import SentenceTransformerEmbedder

            self.embedder = SentenceTransformerEmbedder(
                self.model, device=self.device, batch_size=self.batch_size
            )  # loads the model on the first embed, not here
        elif not isinstance(self.embedder, Embedder):
            raise TypeError(
                f"embedder must follow memllm's Embedder protocol (name, dim, embed), got "
                f"{type(self.embedder).__name__}: wrap LangChain embeddings with LangChainEmbedder"
            )
        return self

    @property
    def name(self) -> str:
        """The vector space (a store built with one embedder refuses another)."""
        return str(self.embedder.name)

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        if not texts:
            return []
        return np.asarray(self.embedder.embed(list(texts)), dtype=np.float32).tolist()

    def embed_query(self, text: str) -> list[float]:
        return self.embed_documents([text])[0]

    # aembed_documents / aembed_query: Embeddings' defaults run the sync methods in a worker thread.


class LangChainEmbedder:
    """Any LangChain `Embeddings` as a memllm `Embedder`: rows are L2-normalised, so the store's
    inner product is a cosine similarity. `name` identifies the vector space in the store (default:
    the class name and its model attribute, if any); `dim` is measured with one probe embedding."""

    def __init__(self, embeddings: Embeddings, *, name: str | None = None) -> None:
        self.embeddings = embeddings
        if name is None:
            model = getattr(embeddings, "model", None) or getattr(embeddings, "model_name", None)
            size = getattr(embeddings, "size", None)
            name = f"langchain:{type(embeddings).__name__}"
            if isinstance(model, str):
                name += f":{model}"
            if isinstance(size, int):
                name += f":{size}"
        self.name = name
        self._dim: int | None = None

    @property
    def dim(self) -> int:
        if self._dim is None:
            self._dim = len(self.embeddings.embed_query("dimension probe"))
        return self._dim

    def embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = normalize_rows(np.asarray(self.embeddings.embed_documents(list(texts)), dtype=np.float32))
        self._dim = vectors.shape[1]
        return vectors

    def embed_query(self, text: str) -> np.ndarray:
        """The query vector, from the wrapped model's query embedding (some models embed queries
        differently from documents)."""
        return normalize_rows(np.asarray([self.embeddings.embed_query(text)], dtype=np.float32))[0]


def as_embedder(embeddings: Embeddings | Embedder) -> Embedder:
    """A memllm Embedder for LangChain embeddings (unwrapping MemllmEmbeddings) or a memllm embedder."""
    if isinstance(embeddings, MemllmEmbeddings):
        return embeddings.embedder
    if isinstance(embeddings, Embeddings):
        return LangChainEmbedder(embeddings)
    if isinstance(embeddings, Embedder):
        return embeddings
    raise TypeError(f"expected LangChain Embeddings or a memllm Embedder, got {type(embeddings).__name__}")
