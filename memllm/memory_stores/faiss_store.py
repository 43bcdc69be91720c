"""FaissStore: the default persistent text memory. SQLite (WAL) is the source of truth; FAISS is derived.

Layout of a store directory:
    memory.db            records, their float32 embeddings, namespace generations, tombstones, index state
    index/<ns-key>.faiss one FAISS index per namespace, written with faiss.write_index (never pickle)
    store.lock           a file lock taken around every write, migration and index-file write

Every write bumps its namespace's generation in the same transaction; indexes catch up from SQLite
(or are rebuilt from it), so another process's committed writes are seen at the next search.
Per-namespace indexes make isolation structural, and every hit is re-read from SQLite under its
namespace before it is returned. This module holds the store's operations; the store owns a RecordDB
(record_db.py: connection, locks, transactions, records SQL) and an IndexSync (index_sync.py: the
per-namespace indexes and their sync). Knows nothing of prompts, controllers or LLMs.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from memllm.errors import StoreError
from memllm.memory_stores.embeddings import Embedder, normalize_rows
from memllm.memory_stores.index_sync import IndexSync
from memllm.memory_stores.jsonl import read_jsonl, write_jsonl
from memllm.memory_stores.record_db import BY_SEQ_SQL, CATCH_UP_SQL, COLUMNS, RecordDB, row_to_record
from memllm.memory_stores.records import MemoryRecord, SearchResult, check_filters, matches, new_id
from memllm.memory_stores.vector_index import IndexConfig, remove_stale_temps

# BY_SEQ_SQL and CATCH_UP_SQL are re-exported: they lived here before record_db.py (tests import them)
__all__ = ["BY_SEQ_SQL", "CATCH_UP_SQL", "FaissStore", "ImportResult", "StoreStats"]


@dataclass(frozen=True)
class ImportResult:
    """ids: the id here of each imported line; stored: records added; present: already there."""

    ids: list[str]
    stored: int
    present: int


@dataclass
class StoreStats:
    path: str
    embedder: str | None
    dim: int | None
    schema_version: int
    records: dict[str, int]
    indexes: dict[str, dict[str, Any]] = field(default_factory=dict)
    rebuilds: list[tuple[str, str]] = field(default_factory=list)


def _delegated(part: str, name: str) -> property:
    """Attribute `name` of the store's `part` (its RecordDB `_db` or IndexSync `_index`)."""
    return property(
        lambda self: getattr(getattr(self, part), name),
        lambda self, value: setattr(getattr(self, part), name, value),
    )


class FaissStore:
    """A persistent, namespaced text memory (the `MemoryStore` protocol) in directory `path`.

    embedder: needed to add records or search by text; None opens the store for listing, getting,
    updating, deleting and exporting only (no model loaded). A store remembers the embedder it was
    built with and refuses another. persist_min / persist_fraction: an index file is rewritten once
    max(persist_min, persist_fraction * size) changes are not yet on disk (and on flush/close).
    synchronous: SQLite's setting; NORMAL survives a killed process, FULL also a power cut.
    """

    DB_NAME = RecordDB.DB_NAME

    def __init__(
        self,
        path: str | Path,
        embedder: Embedder | None = None,
        *,
        index: IndexConfig | None = None,
        persist_min: int = 2000,
        persist_fraction: float = 0.25,
        lock_timeout: float = 60.0,
        synchronous: str = "NORMAL",
    ) -> None:
        self.path = Path(path).expanduser()
        self._db = RecordDB(self.path, lock_timeout, synchronous)  # checks and creates the directory
        self.embedder = embedder
        self.lock_timeout = lock_timeout
        self.wal_clean = True  # False after a delete whose text another reader kept in the WAL
        self._lock = self._db.lock  # the connection's thread lock
        try:
            with self._db.file_lock():
                # pragmas, migrations and the embedder check, under the file lock
                self.schema_version = self._db.prepare()
                self.embedder_name, self.dim = self._db.check_embedder(embedder)
                self.stale_removed = remove_stale_temps(self.path / "index")
        except BaseException:
            self._db.conn.close()
            raise
        self._index = IndexSync(
            self._db, self.path / "index", self.dim, index or IndexConfig(), persist_min, persist_fraction
        )

    # the parts' attributes, read and set through the store as before the split
    _conn = _delegated("_db", "conn")
    _closed = _delegated("_db", "closed")
    index_config = _delegated("_index", "config")
    persist_min = _delegated("_index", "persist_min")
    persist_fraction = _delegated("_index", "persist_fraction")
    rebuilds = _delegated("_index", "rebuilds")  # (namespace, reason) of each index rebuilt from SQLite

    def _require_embedder(self) -> Embedder:
        if self.embedder is None:
            raise StoreError(
                f"memory store {self.path} was opened without an embedder: pass embedder=... to add or search"
            )
        return self.embedder

    # ------------------------------------------------------------------ writes

    def add(self, record: MemoryRecord, *, embedding: np.ndarray | None = None) -> str:
        """Store one record (embedding it unless `embedding` is given); returns its id (or the id of
        the identical record already stored in its namespace)."""
        return self.add_many(
            [record], embeddings=None if embedding is None else np.asarray(embedding)[None, :]
        )[0]

    def add_many(self, records: Sequence[MemoryRecord], *, embeddings: np.ndarray | None = None) -> list[str]:
        """Store records in one transaction; returns one id per input, in order. A record whose
        content hash is already stored in its namespace (also earlier in the batch) is not stored
        again: the existing id is returned and its updated_at refreshed. A text already embedded in
        the namespace, or twice in the batch, is embedded once.
        embeddings: optional precomputed (len(records), dim) vectors (normalised here)."""
        return self._add(records, embeddings=embeddings)[0]

    def _add(
        self,
        records: Sequence[MemoryRecord],
        *,
        embeddings: np.ndarray | None = None,
        fresh_ids: bool = False,
    ) -> tuple[list[str], int]:
        """add_many, also returning how many records were stored new. fresh_ids: a record whose id is
        held by another record (checked inside the write transaction) gets a fresh id."""
        self._db.check_open()
        records = list(records)
        if not records:
            return [], 0
        if self.dim is None:
            self._require_embedder()
        if embeddings is not None:
            embeddings = normalize_rows(embeddings)
            if embeddings.shape != (len(records), self.dim):
                raise StoreError(
                    f"embeddings must have shape ({len(records)}, {self.dim}), got {embeddings.shape}"
                )
        first: dict[tuple[str, str], int] = {}
        for i, rec in enumerate(records):
            first.setdefault((rec.namespace, rec.content_hash), i)
        known = self._db.existing(list(first))
        fresh = [i for key, i in first.items() if key not in known]
        vectors = (
            embeddings[fresh]
            if embeddings is not None
            else self._db.vectors_for([records[i] for i in fresh], int(self.dim or 0), self._require_embedder)
        )
        with self._lock:
            added: dict[str, list[tuple[int, np.ndarray]]] = {}
            gens: dict[str, tuple[int, int]] = {}
            with self._db.write() as conn:
                known.update(
                    self._db.existing([(records[i].namespace, records[i].content_hash) for i in fresh])
                )
                for row, i in enumerate(fresh):
                    rec = records[i]
                    key = (rec.namespace, rec.content_hash)
                    if key in known:  # another process stored it meanwhile
                        continue
                    if fresh_ids and conn.execute("SELECT 1 FROM records WHERE id = ?", (rec.id,)).fetchone():
                        rec = MemoryRecord(**{**rec.to_dict(), "id": new_id(), "span": rec.span})
                    seq = self._db.insert(conn, rec, vectors[row])
                    known[key] = rec.id
                    added.setdefault(rec.namespace, []).append((seq, vectors[row]))
                refreshed = [
                    (rec.updated_at, known[(rec.namespace, rec.content_hash)])
                    for i, rec in enumerate(records)
                    if first[(rec.namespace, rec.content_hash)] != i
                    or known[(rec.namespace, rec.content_hash)] != rec.id
                ]
                conn.executemany("UPDATE records SET updated_at = max(updated_at, ?) WHERE id = ?", refreshed)
                for ns in added:
                    gens[ns] = self._index.bump(conn, ns)
            for ns, rows in added.items():
                self._index.after_add(ns, *gens[ns], added=rows)
        stored = sum(len(rows) for rows in added.values())
        return [known[(rec.namespace, rec.content_hash)] for rec in records], stored

    def update(
        self,
        record_id: str,
        *,
        summary: str | None = None,
        importance: float | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> MemoryRecord:
        """Change a record's summary, importance or metadata (its text, and so its embedding, stay)."""
        record = self.get(record_id)
        if record is None:
            raise StoreError(f"no memory record {record_id!r}: list ids with `memllm memory list`")
        changed = MemoryRecord(
            **{
                **record.to_dict(),
                "summary": record.summary if summary is None else summary,
                "importance": record.importance if importance is None else importance,
                "metadata": record.metadata if metadata is None else metadata,
                "updated_at": time.time(),
                "span": record.span,
            }
        )
        self._db.update(record_id, changed)
        return changed

    def delete(self, record_ids: Iterable[str]) -> int:
        """Forget records: removed from SQLite (overwritten on disk) and from the index, whose file is
        rewritten at once. Returns how many existed."""
        ids = list(dict.fromkeys(record_ids))
        with self._lock:
            gens: dict[str, tuple[int, int]] = {}
            with self._db.write() as conn:
                found = self._db.delete(conn, ids)
                for ns, seqs in found.items():
                    gens[ns] = self._index.bump(conn, ns, removed=seqs)
            for ns, seqs in found.items():
                self._index.after_delete(ns, *gens[ns], removed=seqs)
            if found:
                self.purge_wal()
        return sum(len(s) for s in found.values())

    def purge_wal(self, wait: float = 2.0) -> bool:
        """Copy the write-ahead log into the database and truncate it to zero bytes, so that text just
        deleted (kept in old page versions in memory.db-wal) is gone from disk. False when another
        connection still reads an older snapshot (a process in the middle of a read): the WAL then
        keeps the text until that process's connection moves on or closes (SQLite checkpoints at the
        last close). `self.wal_clean` keeps the latest answer."""
        self.wal_clean = self._db.checkpoint(wait)
        return self.wal_clean

    def delete_namespace(self, namespace: str) -> int:
        """Forget every record of a namespace; returns how many there were."""
        ids = [r[0] for r in self._conn.execute("SELECT id FROM records WHERE namespace = ?", (namespace,))]
        return self.delete(ids)

    def purge_namespace(self, namespace: str) -> dict[str, int]:
        """Remove every trace of a namespace: its records, its index file, and the rows that name it
        (generation, tombstones, index state); then checkpoint the WAL into the database and truncate
        it (purge_wal; `wal_clean` says whether another reader kept it), so no copy of a removed page
        stays in the log (deleted pages are overwritten: secure_delete).
        Returns what was removed: records, index_files, bookkeeping rows."""
        self._db.check_open()
        with self._lock:
            records = self.delete_namespace(namespace)
            with self._db.write() as conn:
                rows, files = self._index.forget(conn, namespace)
            self._index.indexes.pop(namespace, None)
            self.purge_wal()
        return {"records": records, "index_files": files, "bookkeeping_rows": rows}

    # ------------------------------------------------------------------ reads

    def get(self, record_id: str) -> MemoryRecord | None:
        return self._db.get(record_id)

    def get_by_hash(self, namespace: str, content_hash: str) -> MemoryRecord | None:
        """The record of `namespace` with this content hash (see `records.content_hash`), if stored."""
        return self._db.get_by_hash(namespace, content_hash)

    def resolve_id(self, prefix: str, namespace: str | None = None) -> str:
        """The full id of the one record whose id starts with `prefix` (for CLIs showing short ids)."""
        self._db.check_open()
        if not prefix:
            raise StoreError(f"invalid record id {prefix!r}: copy an id from `memllm memory list`")
        rows = self._db.ids_with_prefix(prefix, namespace)
        if not rows:
            raise StoreError(
                f"no memory record with id {prefix!r}"
                + (f" for {namespace!r}" if namespace else "")
                + ": list ids with `memllm memory list`"
            )
        if len(rows) > 1:
            raise StoreError(f"id prefix {prefix!r} matches several records: give more characters")
        return rows[0][0]

    def search(
        self, query: str, k: int = 5, *, namespace: str, filters: Mapping[str, Any] | None = None
    ) -> list[SearchResult]:
        """The k records of `namespace` most similar to `query` that pass `filters`, best first."""
        vector = self._require_embedder().embed([query])
        return self.search_vector(vector[0], k, namespace=namespace, filters=filters)

    def search_vector(
        self, vector: np.ndarray, k: int = 5, *, namespace: str, filters: Mapping[str, Any] | None = None
    ) -> list[SearchResult]:
        """Like `search`, from a query embedding (normalised here)."""
        flt = check_filters(filters)
        if k <= 0:
            return []
        query = normalize_rows(np.asarray(vector, dtype=np.float32).reshape(1, -1))[0]
        self._db.check_open()
        with self._lock:
            state = self._index.ensure(namespace)
            if query.shape[0] != state.index.dim:
                raise StoreError(f"query vector has dim {query.shape[0]}, the store {state.index.dim}")
            fetch = k if not flt else 4 * k
            while True:
                scores, seqs = state.index.search(query, fetch)
                found = self._db.by_seq(namespace, seqs.tolist())
                results = [
                    SearchResult(found[s], float(sc))
                    for sc, s in zip(scores.tolist(), seqs.tolist(), strict=True)
                    if s in found and matches(found[s], flt)
                ]
                if len(results) >= k or len(seqs) < fetch or fetch >= state.index.ntotal:
                    return results[:k]
                fetch *= 4

    def list(
        self,
        namespace: str,
        *,
        filters: Mapping[str, Any] | None = None,
        limit: int | None = None,
        offset: int = 0,
        newest_first: bool = False,
    ) -> list[MemoryRecord]:
        """Records of a namespace in time order (created_at, then insertion)."""
        return self._db.list(namespace, check_filters(filters), limit, offset, newest_first)

    def count(self, namespace: str | None = None) -> int:
        return self._db.count(namespace)

    def namespaces(self) -> list[str]:
        return self._db.namespaces()

    def index_ids(self, namespace: str) -> set[int]:
        """The record seqs the namespace's (caught-up) index holds; for checks and tests."""
        return self._index.index_ids(namespace)

    def record_seqs(self, namespace: str) -> set[int]:
        """The seqs SQLite holds for a namespace; equal to `index_ids` whenever the store is healthy."""
        return self._db.seqs(namespace)

    def stats(self) -> StoreStats:
        self._db.check_open()
        with self._lock:
            counts = self._db.counts()
            indexes = self._index.describe()
        return StoreStats(
            str(self.path),
            self.embedder_name,
            self.dim,
            self.schema_version,
            counts,
            indexes,
            list(self.rebuilds),
        )

    # ------------------------------------------------------------------ export / import

    def export_jsonl(self, dest: str | Path | IO[str], namespace: str | None = None) -> int:
        """Write records (all, or one namespace's) as JSON lines in insertion order, from one consistent
        snapshot; returns how many. Embeddings are not exported: importing re-embeds."""
        self._db.check_open()
        sql, args = f"SELECT {COLUMNS} FROM records", ()
        if namespace is not None:
            sql, args = sql + " WHERE namespace = ?", (namespace,)
        with self._db.read() as conn:
            return write_jsonl(map(row_to_record, conn.execute(sql + " ORDER BY seq", args)), dest)

    def import_jsonl(
        self, src: str | Path | IO[str], namespace: str | None = None, *, batch: int = 256
    ) -> list[str]:
        """Add the records of a JSONL export (into `namespace` if given); returns their ids here.
        Records already present are not added twice; an id taken by another record gets a fresh one.
        All or nothing: see `import_file`. (`batch` is accepted for compatibility and unused.)"""
        return self.import_file(src, namespace).ids

    def import_file(self, src: str | Path | IO[str], namespace: str | None = None) -> ImportResult:
        """Import a JSONL export in one transaction: every line is checked first (the first bad one
        is named and nothing is stored), ids are checked inside the write transaction (an id held by
        another record, also by a concurrent import, gets a fresh one), and the result counts the
        records stored and those already present."""
        records = read_jsonl(src, namespace)
        ids, stored = self._add(records, fresh_ids=True)
        return ImportResult(ids, stored, len(set(ids)) - stored)

    # ------------------------------------------------------------------ lifecycle

    def flush(self) -> None:
        """Write every index file with changes not yet on disk."""
        self._db.check_open()
        with self._lock:
            self._index.flush()

    def close(self) -> None:
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._db.closed = True
            self._db.conn.close()

    def __enter__(self) -> FaissStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
