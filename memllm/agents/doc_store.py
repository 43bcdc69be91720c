"""An in-memory chunk store (the parts of the MemoryStore protocol that document QA uses), exact cosine.

For places where the persistent FAISS + SQLite store is not available or not wanted (a benchmark on a
machine without faiss, a throwaway reading): records live in a list, vectors in one numpy matrix, and
search is an exact inner product over normalised embeddings, as the FAISS store's exact index does.
Namespaces are kept apart as in every store. Nothing is persisted. Knows nothing of models or agents.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from memllm.memory_stores.embeddings import Embedder, normalize_rows
from memllm.memory_stores.records import MemoryRecord, SearchResult, check_filters, matches


class InMemoryChunkStore:
    """Records and their embeddings in memory; `search` is exact (brute-force cosine)."""

    def __init__(self, embedder: Embedder) -> None:
        self.embedder = embedder
        self.records: list[MemoryRecord] = []
        self._vectors: list[np.ndarray] = []
        self._matrix: np.ndarray | None = None
        self._by_hash: dict[tuple[str, str], MemoryRecord] = {}

    def add(self, record: MemoryRecord) -> str:
        return self.add_many([record])[0]

    def add_many(self, records: Sequence[MemoryRecord]) -> list[str]:
        ids: list[str] = []
        new: list[MemoryRecord] = []
        for rec in records:
            key = (rec.namespace, rec.content_hash)
            if key in self._by_hash:
                ids.append(self._by_hash[key].id)
                continue
            self._by_hash[key] = rec
            new.append(rec)
            ids.append(rec.id)
        if new:
            vectors = normalize_rows(np.asarray(self.embedder.embed([r.text for r in new]), dtype=np.float32))
            self.records.extend(new)
            self._vectors.append(vectors)
            self._matrix = None
        return ids

    def _all(self) -> np.ndarray:
        if self._matrix is None:
            dim = self.embedder.dim
            self._matrix = np.concatenate(self._vectors) if self._vectors else np.zeros((0, dim), np.float32)
        return self._matrix

    def search(
        self, query: str, k: int = 5, *, namespace: str, filters: Mapping[str, Any] | None = None
    ) -> list[SearchResult]:
        flt = check_filters(filters)
        if not self.records or k <= 0:
            return []
        q = normalize_rows(np.asarray(self.embedder.embed([query]), dtype=np.float32))[0]
        scores = self._all() @ q
        order = np.argsort(-scores, kind="stable")
        out = []
        for i in order:
            rec = self.records[int(i)]
            if rec.namespace == namespace and matches(rec, flt):
                out.append(SearchResult(rec, float(scores[i])))
                if len(out) == k:
                    break
        return out

    def get(self, record_id: str) -> MemoryRecord | None:
        return next((r for r in self.records if r.id == record_id), None)

    def get_by_hash(self, namespace: str, content_hash: str) -> MemoryRecord | None:
        return self._by_hash.get((namespace, content_hash))

    def list(self, namespace: str, *, filters: Mapping[str, Any] | None = None, limit: int | None = None,
             offset: int = 0, newest_first: bool = False) -> list[MemoryRecord]:  # fmt: skip
        flt = check_filters(filters)
        recs = sorted((r for r in self.records if r.namespace == namespace and matches(r, flt)),
                      key=lambda r: (r.created_at, r.id), reverse=newest_first)  # fmt: skip
        return recs[offset : None if limit is None else offset + limit]

    def count(self, namespace: str | None = None) -> int:
        return sum(1 for r in self.records if namespace is None or r.namespace == namespace)

    def namespaces(self) -> list[str]:
        return sorted({r.namespace for r in self.records})

    def delete(self, record_ids: Iterable[str]) -> int:
        drop = set(record_ids)
        keep = [i for i, r in enumerate(self.records) if r.id not in drop]
        removed = len(self.records) - len(keep)
        if removed:
            matrix = self._all()[keep]
            self.records = [self.records[i] for i in keep]
            self._vectors, self._matrix = [matrix], None
            self._by_hash = {(r.namespace, r.content_hash): r for r in self.records}
        return removed

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass
