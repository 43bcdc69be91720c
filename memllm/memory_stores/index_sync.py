"""IndexSync: a FaissStore's per-namespace FAISS indexes (index/<ns-key>.faiss), kept in step with SQLite.

Every write bumps its namespace's generation in the same transaction. An index (in memory or on disk)
knows the generation and highest record seq it reflects, so it catches up from SQLite by adding rows
with a higher seq and removing tombstoned ones; an index file whose checksum does not match the one
recorded in SQLite (missing, torn, altered), or an index that no longer fits its size, is rebuilt from
SQLite. Index files are written under the store's file lock, and not over a newer one. The rows kept
for this (namespaces: generations, tombstones, index_state) are written here too.
Knows nothing of embedders or of the store's operations.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from memllm.errors import StoreError
from memllm.memory_stores.record_db import CATCH_UP_SQL, RecordDB, blob_matrix
from memllm.memory_stores.vector_index import IndexConfig, VectorIndex
from memllm.paths import disk_key


@dataclass
class NsIndex:
    """An in-memory index and the namespace state it reflects."""

    index: VectorIndex
    generation: int
    max_seq: int
    unpersisted: int = 0


class IndexSync:
    """The loaded indexes of a store (`indexes`, by namespace) over `db`, with files in `index_dir`.

    dim: the store's embedding dimension (None: no embedder recorded, so no index can be loaded).
    persist_min / persist_fraction: see FaissStore. rebuilds: (namespace, reason) of every rebuild.
    """

    def __init__(
        self,
        db: RecordDB,
        index_dir: Path,
        dim: int | None,
        config: IndexConfig,
        persist_min: int,
        persist_fraction: float,
    ) -> None:
        self.db = db
        self.index_dir = index_dir
        self.dim = dim
        self.config = config
        self.persist_min = persist_min
        self.persist_fraction = persist_fraction
        self.rebuilds: list[tuple[str, str]] = []  # (namespace, reason), for stats and tests
        self.indexes: dict[str, NsIndex] = {}

    def path(self, namespace: str) -> Path:
        return self.index_dir / f"{disk_key(namespace)}.faiss"

    def generation(self, namespace: str) -> int:
        row = self.db.conn.execute(
            "SELECT generation FROM namespaces WHERE namespace = ?", (namespace,)
        ).fetchone()
        return int(row[0]) if row else 0

    def bump(
        self, conn: sqlite3.Connection, namespace: str, removed: list[int] | None = None
    ) -> tuple[int, int]:
        """In the write transaction `conn`: increment the namespace's generation and tombstone the
        seqs `removed` at the new one. Returns the generations (before, after)."""
        before = self.generation(namespace)
        conn.execute(
            "INSERT INTO namespaces VALUES (?, 1) ON CONFLICT(namespace) DO UPDATE SET generation = generation + 1",
            (namespace,),
        )
        after = self.generation(namespace)
        if removed:
            conn.executemany(
                "INSERT OR REPLACE INTO tombstones VALUES (?, ?, ?)", [(s, namespace, after) for s in removed]
            )
        return before, after

    def forget(self, conn: sqlite3.Connection, namespace: str) -> tuple[int, int]:
        """In the write transaction `conn`: delete the rows that name the namespace (tombstones, index
        state, generation) and its index file. Returns (rows, files) removed. The loaded index is the
        caller's to drop, once the transaction committed."""
        rows = 0
        for table in ("tombstones", "index_state", "namespaces"):
            rows += conn.execute(f"DELETE FROM {table} WHERE namespace = ?", (namespace,)).rowcount
        files = 0
        path = self.path(namespace)
        if path.exists():
            path.unlink()
            files += 1
        return rows, files

    def ensure(self, namespace: str) -> NsIndex:
        """The namespace's in-memory index, loaded (or rebuilt) and caught up with SQLite."""
        if self.dim is None:
            raise StoreError(
                f"memory store {self.db.path} has no embedder recorded yet: open it with embedder=..."
            )
        state = self.indexes.get(namespace)
        if state is None:
            state = self._load(namespace)
            self.indexes[namespace] = state
        self._sync(namespace, state)
        if state.index.needs_rebuild():
            state = self._rebuild(
                namespace, f"{state.index.kind} index no longer fits {state.index.ntotal} records"
            )
        return state

    def index_ids(self, namespace: str) -> set[int]:
        """The record seqs the namespace's (caught-up) index holds."""
        with self.db.lock:
            return set(self.ensure(namespace).index.ids().tolist())

    def _load(self, namespace: str) -> NsIndex:
        row = self.db.conn.execute(
            "SELECT generation, max_seq, kind, trained_on, ntotal, checksum FROM index_state WHERE namespace = ?",
            (namespace,),
        ).fetchone()
        if row is None:
            if self.generation(namespace) == 0:  # never written: an empty index, nothing to rebuild
                return NsIndex(VectorIndex(self.dim, self.config), 0, 0)  # type: ignore[arg-type]
            return self._rebuild(namespace, "no index file recorded")
        generation, max_seq, _kind, trained_on, ntotal, checksum = row
        try:
            index = VectorIndex.read(self.path(namespace), self.dim, self.config, checksum, trained_on)  # type: ignore[arg-type]
            if index.ntotal != ntotal:
                raise StoreError(f"index file holds {index.ntotal} vectors, {ntotal} recorded")
        except StoreError as exc:
            return self._rebuild(namespace, str(exc))
        return NsIndex(index, int(generation), int(max_seq))

    def _rebuild(self, namespace: str, reason: str) -> NsIndex:
        """Build the namespace's index from SQLite (the source of truth) and persist it."""
        with self.db.read() as conn:
            generation = self.generation(namespace)
            rows = conn.execute(
                "SELECT seq, embedding FROM records WHERE namespace = ? ORDER BY seq", (namespace,)
            ).fetchall()
        ids = np.array([r[0] for r in rows], dtype=np.int64)
        vectors = blob_matrix([r[1] for r in rows], self.dim)  # type: ignore[arg-type]
        index = VectorIndex.build(self.dim, self.config, vectors, ids)  # type: ignore[arg-type]
        state = NsIndex(index, generation, int(ids.max()) if len(ids) else 0, unpersisted=len(ids))
        self.indexes[namespace] = state
        self.rebuilds.append((namespace, reason))
        self._persist(namespace, state)
        return state

    def _sync(self, namespace: str, state: NsIndex) -> None:
        """Apply the rows added and tombstoned since the generation the index reflects."""
        if self.generation(namespace) == state.generation:
            return
        with self.db.read() as conn:
            generation = self.generation(namespace)
            rows = conn.execute(CATCH_UP_SQL, (state.max_seq, namespace)).fetchall()
            dead = conn.execute(
                "SELECT seq FROM tombstones WHERE namespace = ? AND generation > ?",
                (namespace, state.generation),
            ).fetchall()
        removed = state.index.remove(np.array([d[0] for d in dead], dtype=np.int64))
        if rows:
            state.index.add(
                blob_matrix([r[1] for r in rows], self.dim), np.array([r[0] for r in rows], np.int64)
            )  # type: ignore[arg-type]
            state.max_seq = int(rows[-1][0])
        state.generation = generation
        state.unpersisted += len(rows) + removed

    def after_add(self, namespace: str, before: int, after: int, added: list[tuple[int, np.ndarray]]) -> None:
        """Take in rows (seq, vector) this process just committed, moving the namespace from generation
        `before` to `after`; rebuild the index if it no longer fits, else persist it when due."""
        self._after_write(namespace, before, after, added=added, removed=[])
        state = self.indexes.get(namespace)
        if state is not None:
            if state.index.needs_rebuild():
                self._rebuild(
                    namespace, f"{state.index.kind} index no longer fits {state.index.ntotal} records"
                )
            else:
                self._persist(namespace, state)

    def after_delete(self, namespace: str, before: int, after: int, removed: list[int]) -> None:
        """Drop seqs this process just deleted (generation `before` to `after`) and rewrite the file."""
        if namespace not in self.indexes and self.path(namespace).exists():
            self.ensure(namespace)  # load it so that the file on disk is rewritten without them
        self._after_write(namespace, before, after, added=[], removed=removed)
        if namespace in self.indexes:
            self._persist(namespace, self.indexes[namespace], force=True)

    def _after_write(
        self, namespace: str, before: int, after: int, added: list[tuple[int, np.ndarray]], removed: list[int]
    ) -> None:
        """Bring a loaded index up to a write this process just committed (directly when no other
        process wrote in between, else through SQLite)."""
        state = self.indexes.get(namespace)
        if state is None:
            return  # loaded (and caught up) at its first search
        if state.generation != before:
            self._sync(namespace, state)
            return
        if removed:
            state.index.remove(np.array(removed, dtype=np.int64))
        if added:
            state.index.add(np.stack([v for _, v in added]), np.array([s for s, _ in added], np.int64))
            state.max_seq = max(state.max_seq, max(s for s, _ in added))
        state.generation = after
        state.unpersisted += len(added) + len(removed)

    def _persist(self, namespace: str, state: NsIndex, force: bool = False) -> None:
        if not force and state.unpersisted < max(
            self.persist_min, self.persist_fraction * state.index.ntotal
        ):
            return
        with self.db.file_lock():
            row = self.db.conn.execute(
                "SELECT generation FROM index_state WHERE namespace = ?", (namespace,)
            ).fetchone()
            if row is not None and int(row[0]) > state.generation:
                return  # another process already wrote a newer file
            checksum = state.index.write(self.path(namespace))
            self.db.conn.execute(
                "INSERT OR REPLACE INTO index_state VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    namespace,
                    state.generation,
                    state.max_seq,
                    state.index.kind,
                    state.index.trained_on,
                    state.index.ntotal,
                    checksum,
                ),
            )
        state.unpersisted = 0

    def flush(self) -> None:
        """Write every index file with changes not yet on disk."""
        for ns, state in self.indexes.items():
            if state.unpersisted:
                self._persist(ns, state, force=True)

    def describe(self) -> dict[str, dict[str, Any]]:
        """kind, vectors, generation and unpersisted changes of each loaded index (for stats)."""
        return {
            ns: {
                "kind": s.index.kind,
                "vectors": s.index.ntotal,
                "generation": s.generation,
                "unpersisted": s.unpersisted,
            }
            for ns, s in self.indexes.items()
        }
