"""MemllmVectorStore: memllm's persistent FAISS+SQLite store as a LangChain `VectorStore`.

One vector store is one namespace of a `FaissStore` (records of kind 'chunk' by default). A
Document's metadata is kept verbatim in the record's metadata (a string 'source' also fills the
record's source); its id is the record id. Adding a document under an id that exists replaces it.
Scores are cosine similarities (vectors are L2-normalised); relevance scores are those clipped to
[0, 1]. As everywhere in memllm, one namespace holds one copy of a text: adding a text already
stored (without an id, or under another id) keeps one record (see `add_texts`).

Async methods are LangChain's defaults, which run the sync ones in a worker thread.
Knows nothing of models, prompts or controllers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings
from langchain_core.vectorstores import VectorStore
from langchain_core.vectorstores.utils import maximal_marginal_relevance

from memllm.agents.langchain.embeddings import LangChainEmbedder, as_embedder
from memllm.errors import StoreError
from memllm.memory_stores.records import MemoryRecord, SearchResult, new_id


def record_to_document(record: MemoryRecord) -> Document:
    return Document(id=record.id, page_content=record.text, metadata=dict(record.metadata))


class MemllmVectorStore(VectorStore):
    """A namespace of a memllm FaissStore as a LangChain VectorStore.

        store = MemllmVectorStore(MemllmEmbeddings(), path="~/.cache/memllm/stores/docs")
        store = MemllmVectorStore.from_texts(texts, MemllmEmbeddings(), path=..., namespace="manual")
        store = MemllmVectorStore(embedding, store=existing_faiss_store, namespace="alice")

    embedding: LangChain `Embeddings` (MemllmEmbeddings, or any other: it is wrapped so the store
    indexes with it) used for documents and queries. path / store: where records live (a FaissStore
    is opened at `path` when `store` is not given; a given store must search by vector, as
    FaissStore.search_vector does). namespace: the collection. kind: record kind.
    """

    def __init__(
        self,
        embedding: Embeddings,
        *,
        path: str | Path | None = None,
        store: Any = None,
        namespace: str = "langchain",
        kind: str = "chunk",
    ) -> None:
        if not namespace:
            raise StoreError("MemllmVectorStore needs a namespace (a collection name), got an empty one")
        self.embedding = embedding
        self.embedder = as_embedder(embedding)
        if store is None:
            from memllm.memory_stores import FaissStore

            if path is None:
                raise StoreError(
                    "MemllmVectorStore needs a store directory: pass path=... (created if absent) or store=..."
                )
            store = FaissStore(path, self.embedder)
        elif getattr(store, "embedder", None) is None:
            raise StoreError("the FaissStore given to MemllmVectorStore was opened without an embedder")
        self.store = store
        self.namespace = namespace
        self.kind = kind

    @property
    def embeddings(self) -> Embeddings:
        return self.embedding

    # ------------------------------------------------------------------ writes

    def add_texts(
        self,
        texts: Iterable[str],
        metadatas: list[dict[str, Any]] | None = None,
        *,
        ids: list[str | None] | None = None,
        **kwargs: Any,
    ) -> list[str]:
        """Embed and store texts; returns their ids. A given id that exists is replaced (upsert).
        A text already stored in this namespace is stored once: without an id, the existing record's
        id is returned; with an id, the existing record is replaced by one under the given id."""
        texts = list(texts)
        if metadatas is not None and len(metadatas) != len(texts):
            raise StoreError(f"got {len(metadatas)} metadatas for {len(texts)} texts")
        if ids is not None and len(ids) != len(texts):
            raise StoreError(f"got {len(ids)} ids for {len(texts)} texts")
        if not texts:
            return []
        wanted = list(ids) if ids is not None else [None] * len(texts)
        records = []
        for i, text in enumerate(texts):
            meta = dict(metadatas[i]) if metadatas is not None and metadatas[i] is not None else {}
            source = meta.get("source")
            records.append(
                MemoryRecord(
                    text,
                    namespace=self.namespace,
                    kind=self.kind,  # type: ignore[arg-type]
                    metadata=meta,
                    source=source if isinstance(source, str) else None,
                    id=wanted[i] or new_id(),
                )
            )
        given = [r.id for r, w in zip(records, wanted, strict=True) if w]
        for rid in given:
            other = self.store.get(rid)
            if other is not None and other.namespace != self.namespace:
                raise StoreError(
                    f"id {rid!r} is used by a record of namespace {other.namespace!r} in this store: "
                    "ids are unique across namespaces, pick another id"
                )
        if given:
            self.store.delete(given)  # upsert: a given id is replaced
        stored = self.store.add_many(records)
        clash = [i for i, (w, got) in enumerate(zip(wanted, stored, strict=True)) if w and got != w]
        if clash:  # the text was stored under another id: the given id wins
            others = {stored[i] for i in clash} - {w for w in wanted if w}
            self.store.delete(sorted(others))
            for i, got in zip(clash, self.store.add_many([records[i] for i in clash]), strict=True):
                stored[i] = got  # still another id only for a text repeated within this batch
        return stored

    def delete(self, ids: list[str] | None = None, **kwargs: Any) -> bool | None:
        """Delete records of this namespace by id (missing ids are ignored); None deletes them all."""
        if ids is None:
            self.store.delete([r.id for r in self.store.list(self.namespace)])
            return True
        mine = [d.id for d in self.get_by_ids(ids) if d.id is not None]
        self.store.delete(mine)
        return True

    # ------------------------------------------------------------------ reads

    def get_by_ids(self, ids: Sequence[str], /) -> list[Document]:
        """The documents with these ids, in the order given (missing ones left out)."""
        out = []
        for rid in ids:
            record = self.store.get(rid)
            if record is not None and record.namespace == self.namespace:
                out.append(record_to_document(record))
        return out

    def _query_vector(self, query: str) -> np.ndarray:
        if isinstance(self.embedder, LangChainEmbedder):
            return self.embedder.embed_query(query)
        return self.embedder.embed([query])[0]

    def _search(
        self, vector: Sequence[float] | np.ndarray, k: int, filter: dict | None
    ) -> list[SearchResult]:
        filters = {"metadata": dict(filter)} if filter else None
        return self.store.search_vector(
            np.asarray(vector, dtype=np.float32), k, namespace=self.namespace, filters=filters
        )

    def similarity_search_with_score(
        self, query: str, k: int = 4, filter: dict[str, Any] | None = None, **kwargs: Any
    ) -> list[tuple[Document, float]]:
        """(document, cosine similarity), best first. filter: metadata key -> required value."""
        hits = self._search(self._query_vector(query), k, filter)
        return [(record_to_document(h.record), float(h.score)) for h in hits]

    def similarity_search(
        self, query: str, k: int = 4, filter: dict[str, Any] | None = None, **kwargs: Any
    ) -> list[Document]:
        return [doc for doc, _ in self.similarity_search_with_score(query, k, filter=filter)]

    def similarity_search_by_vector(
        self, embedding: list[float], k: int = 4, filter: dict[str, Any] | None = None, **kwargs: Any
    ) -> list[Document]:
        return [record_to_document(h.record) for h in self._search(embedding, k, filter)]

    def _select_relevance_score_fn(self) -> Callable[[float], float]:
        return lambda score: min(1.0, max(0.0, float(score)))

    def max_marginal_relevance_search_by_vector(
        self,
        embedding: list[float],
        k: int = 4,
        fetch_k: int = 20,
        lambda_mult: float = 0.5,
        filter: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> list[Document]:
        """k documents chosen among the fetch_k most similar for relevance and diversity (MMR)."""
        hits = self._search(embedding, max(fetch_k, k), filter)
        if not hits:
            return []
        vectors = self.embedder.embed([h.record.text for h in hits])
        query = np.asarray(embedding, dtype=np.float32)
        chosen = maximal_marginal_relevance(query, vectors.tolist(), lambda_mult=lambda_mult, k=k)
        return [record_to_document(hits[i].record) for i in chosen]

    def max_marginal_relevance_search(
        self,
        query: str,
        k: int = 4,
        fetch_k: int = 20,
        lambda_mult: float = 0.5,
        filter: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> list[Document]:
        return self.max_marginal_relevance_search_by_vector(
            self._query_vector(query).tolist(), k, fetch_k, lambda_mult, filter=filter
        )

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_texts(
        cls,
        texts: list[str],
        embedding: Embeddings,
        metadatas: list[dict[str, Any]] | None = None,
        *,
        ids: list[str] | None = None,
        path: str | Path | None = None,
        store: Any = None,
        namespace: str = "langchain",
        kind: str = "chunk",
        **kwargs: Any,
    ) -> MemllmVectorStore:
        vs = cls(embedding, path=path, store=store, namespace=namespace, kind=kind)
        vs.add_texts(texts, metadatas, ids=ids)
        return vs
