"""FaissStore: the default persistent text memory. SQLite (WAL) is the source of truth; FAISS is derived.

Layout of a store directory:
    memory.db            records, their float32 embeddings, namespace generations, tombstones, index state
    index/<ns-key>.faiss one FAISS index per namespace, written with faiss.write_index (never pickle)
    store.lock           a file lock taken around every write, migration and index-file write

Every write bumps its namespace's generation in the same transaction. An index (in memory or on disk)
knows the generation and highest record seq it reflects, so it catches up from SQLite by adding rows
with a higher seq and removing tombstoned ones; an index file whose checksum does not match the one
recorded in SQLite (missing, torn, altered) is rebuilt from SQLite. Record seqs are never reused, so
another process's committed writes are seen at the next search. Per-namespace indexes make isolation
structural, and every hit is re-read from SQLite under its namespace before it is returned.
Knows nothing of prompts, controllers or LLMs.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
from filelock import FileLock, Timeout

from memllm.errors import StoreError, is_disk_failure, write_error
from memllm.memory_stores.embeddings import Embedder, normalize_rows
from memllm.memory_stores.jsonl import read_jsonl, write_jsonl
from memllm.memory_stores.records import (
    MemoryRecord,
    SearchResult,
    check_filters,
    matches,
    new_id,
    text_hash,
)
from memllm.memory_stores.schema import migrate
from memllm.memory_stores.vector_index import IndexConfig, VectorIndex, remove_stale_temps
from memllm.paths import disk_key

_COLUMNS = (
    "seq, id, namespace, kind, text, summary, importance, created_at, updated_at, content_hash, "
    "source, span_start, span_end, metadata"
)
_CHUNK = 500  # ids per SQL IN (...) list
# `+namespace` keeps SQLite off the namespace index for these two: it would scan the whole namespace
# (tens of ms at 100K records) where the primary key finds the few rows wanted.
BY_SEQ_SQL = f"SELECT {_COLUMNS} FROM records WHERE seq IN ({{marks}}) AND +namespace = ?"
CATCH_UP_SQL = "SELECT seq, embedding FROM records WHERE seq > ? AND +namespace = ? ORDER BY seq"


def _chunks(items: Sequence[Any], size: int = _CHUNK) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _row_to_record(row: sqlite3.Row | tuple) -> MemoryRecord:
    (_, rid, ns, kind, text, summary, imp, created, updated, chash, source, s0, s1, meta) = row
    return MemoryRecord(
        id=rid,
        namespace=ns,
        kind=kind,
        text=text,
        summary=summary,
        importance=imp,
        created_at=created,
        updated_at=updated,
        content_hash=chash,
        source=source,
        span=(s0, s1) if s0 is not None else None,
        metadata=json.loads(meta),
    )


def _blob_matrix(blobs: list[bytes], dim: int) -> np.ndarray:
    if not blobs:
        return np.zeros((0, dim), np.float32)
    return np.frombuffer(b"".join(blobs), dtype="<f4").reshape(len(blobs), dim).astype(np.float32)


@dataclass
class _NsIndex:
    """An in-memory index and the namespace state it reflects."""

    index: VectorIndex
    generation: int
    max_seq: int
    unpersisted: int = 0


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


class FaissStore:
    """A persistent, namespaced text memory (the `MemoryStore` protocol) in directory `path`.

    embedder: needed to add records or search by text; None opens the store for listing, getting,
    updating, deleting and exporting only (no model loaded). A store remembers the embedder it was
    built with and refuses another. persist_min / persist_fraction: an index file is rewritten once
    max(persist_min, persist_fraction * size) changes are not yet on disk (and on flush/close).
    synchronous: SQLite's setting; NORMAL survives a killed process, FULL also a power cut.
    """

    DB_NAME = "memory.db"

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
        if self.path.exists() and not self.path.is_dir():
            raise StoreError(
                f"memory store path {self.path} is a file: pass a directory (it is created if absent)"
            )
        if synchronous.upper() not in ("NORMAL", "FULL"):
            raise StoreError(f"synchronous must be NORMAL or FULL, got {synchronous!r}")
        try:
            (self.path / "index").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(
                f"cannot create memory store {self.path} ({exc}): choose a writable --store path"
            ) from exc
        self.embedder = embedder
        self.index_config = index or IndexConfig()
        self.persist_min = persist_min
        self.persist_fraction = persist_fraction
        self.lock_timeout = lock_timeout
        self.rebuilds: list[tuple[str, str]] = []  # (namespace, reason), for stats and tests
        self._lock = threading.RLock()
        self._flock = FileLock(str(self.path / "store.lock"), timeout=lock_timeout)
        self._indexes: dict[str, _NsIndex] = {}
        self._closed = False
        self.wal_clean = True  # False after a delete whose text another reader kept in the WAL
        try:
            self._conn = sqlite3.connect(
                str(self.path / self.DB_NAME),
                timeout=lock_timeout,
                isolation_level=None,
                check_same_thread=False,
            )
        except sqlite3.Error as exc:
            raise StoreError(
                f"cannot open memory store {self.path} ({exc}): check the path and its permissions"
            ) from exc
        try:
            with self._file_lock():
                self._prepare(synchronous.upper())
        except BaseException:
            self._conn.close()
            raise

    def _prepare(self, synchronous: str) -> None:
        """Pragmas, migrations and the embedder check, under the file lock."""
        try:
            mode = self._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            self._conn.execute(f"PRAGMA synchronous={synchronous}")
            # secure_delete: forgotten text is overwritten on disk, not left in free pages
            self._conn.execute("PRAGMA secure_delete=ON")
            self.schema_version = migrate(self._conn)
        except sqlite3.DatabaseError as exc:
            if is_disk_failure(exc):
                raise write_error(exc, f"the memory store {self.path / self.DB_NAME}") from exc
            raise StoreError(
                f"{self.path / self.DB_NAME} is not a memllm memory store ({exc}): pass another --store path"
            ) from exc
        if mode.lower() != "wal":
            raise StoreError(
                f"memory store {self.path} cannot use SQLite WAL mode (got {mode}): use a local disk"
            )
        self._check_embedder()
        self.stale_removed = remove_stale_temps(self.path / "index")

    # ------------------------------------------------------------------ plumbing

    @contextmanager
    def _file_lock(self) -> Iterator[None]:
        with self._lock:
            try:
                self._flock.acquire()
            except Timeout as exc:
                raise StoreError(
                    f"memory store {self.path} stayed locked by another process for {self.lock_timeout:.0f}s: "
                    "wait for it to finish (or stop it), then retry"
                ) from exc
            try:
                yield
            finally:
                self._flock.release()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction under the file lock (BEGIN IMMEDIATE ... COMMIT, ROLLBACK on error)."""
        self._check_open()
        with self._file_lock():
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: one consistent snapshot of committed data."""
        self._check_open()
        with self._lock:
            self._conn.execute("BEGIN")
            try:
                yield self._conn
            finally:
                self._conn.execute("COMMIT")

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(
                f"memory store {self.path} is closed: open it again with FaissStore(path, embedder)"
            )

    def _meta(self, key: str) -> str | None:
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def _check_embedder(self) -> None:
        name, dim = self._meta("embedder"), self._meta("dim")
        self.dim: int | None = int(dim) if dim is not None else None
        self.embedder_name = name
        if self.embedder is None:
            return
        if name is None:
            self.dim, self.embedder_name = int(self.embedder.dim), self.embedder.name
            self._conn.execute("BEGIN IMMEDIATE")
            self._conn.execute("INSERT OR REPLACE INTO meta VALUES ('embedder', ?)", (self.embedder.name,))
            self._conn.execute("INSERT OR REPLACE INTO meta VALUES ('dim', ?)", (str(self.dim),))
            self._conn.execute("COMMIT")
        elif name != self.embedder.name or self.dim != self.embedder.dim:
            raise StoreError(
                f"memory store {self.path} was built with embedder {name!r} (dim {self.dim}), not "
                f"{self.embedder.name!r} (dim {self.embedder.dim}): open it with the same embedder, or "
                "export it (`memllm memory export`) and import the file into a new store"
            )

    def _require_embedder(self) -> Embedder:
        if self.embedder is None:
            raise StoreError(
                f"memory store {self.path} was opened without an embedder: pass embedder=... to add or search"
            )
        return self.embedder

    def _index_path(self, namespace: str) -> Path:
        return self.path / "index" / f"{disk_key(namespace)}.faiss"

    def _generation(self, namespace: str) -> int:
        row = self._conn.execute(
            "SELECT generation FROM namespaces WHERE namespace = ?", (namespace,)
        ).fetchone()
        return int(row[0]) if row else 0

    def _bump(self, conn: sqlite3.Connection, namespace: str) -> int:
        conn.execute(
            "INSERT INTO namespaces VALUES (?, 1) ON CONFLICT(namespace) DO UPDATE SET generation = generation + 1",
            (namespace,),
        )
        return self._generation(namespace)

    # ------------------------------------------------------------------ indexes

    def _ensure(self, namespace: str) -> _NsIndex:
        """The namespace's in-memory index, loaded (or rebuilt) and caught up with SQLite."""
        if self.dim is None:
            raise StoreError(
                f"memory store {self.path} has no embedder recorded yet: open it with embedder=..."
            )
        state = self._indexes.get(namespace)
        if state is None:
            state = self._load(namespace)
            self._indexes[namespace] = state
        self._sync(namespace, state)
        if state.index.needs_rebuild():
            state = self._rebuild(
                namespace, f"{state.index.kind} index no longer fits {state.index.ntotal} records"
            )
        return state

    def _load(self, namespace: str) -> _NsIndex:
        row = self._conn.execute(
            "SELECT generation, max_seq, kind, trained_on, ntotal, checksum FROM index_state WHERE namespace = ?",
            (namespace,),
        ).fetchone()
        if row is None:
            if self._generation(namespace) == 0:  # never written: an empty index, nothing to rebuild
                return _NsIndex(VectorIndex(self.dim, self.index_config), 0, 0)  # type: ignore[arg-type]
            return self._rebuild(namespace, "no index file recorded")
        generation, max_seq, _kind, trained_on, ntotal, checksum = row
        try:
            index = VectorIndex.read(
                self._index_path(namespace), self.dim, self.index_config, checksum, trained_on
            )  # type: ignore[arg-type]
            if index.ntotal != ntotal:
                raise StoreError(f"index file holds {index.ntotal} vectors, {ntotal} recorded")
        except StoreError as exc:
            return self._rebuild(namespace, str(exc))
        return _NsIndex(index, int(generation), int(max_seq))

    def _rebuild(self, namespace: str, reason: str) -> _NsIndex:
        """Build the namespace's index from SQLite (the source of truth) and persist it."""
        with self._read() as conn:
            generation = self._generation(namespace)
            rows = conn.execute(
                "SELECT seq, embedding FROM records WHERE namespace = ? ORDER BY seq", (namespace,)
            ).fetchall()
        ids = np.array([r[0] for r in rows], dtype=np.int64)
        vectors = _blob_matrix([r[1] for r in rows], self.dim)  # type: ignore[arg-type]
        index = VectorIndex.build(self.dim, self.index_config, vectors, ids)  # type: ignore[arg-type]
        state = _NsIndex(index, generation, int(ids.max()) if len(ids) else 0, unpersisted=len(ids))
        self._indexes[namespace] = state
        self.rebuilds.append((namespace, reason))
        self._persist(namespace, state)
        return state

    def _sync(self, namespace: str, state: _NsIndex) -> None:
        """Apply the rows added and tombstoned since the generation the index reflects."""
        if self._generation(namespace) == state.generation:
            return
        with self._read() as conn:
            generation = self._generation(namespace)
            rows = conn.execute(CATCH_UP_SQL, (state.max_seq, namespace)).fetchall()
            dead = conn.execute(
                "SELECT seq FROM tombstones WHERE namespace = ? AND generation > ?",
                (namespace, state.generation),
            ).fetchall()
        removed = state.index.remove(np.array([d[0] for d in dead], dtype=np.int64))
        if rows:
            state.index.add(
                _blob_matrix([r[1] for r in rows], self.dim), np.array([r[0] for r in rows], np.int64)
            )  # type: ignore[arg-type]
            state.max_seq = int(rows[-1][0])
        state.generation = generation
        state.unpersisted += len(rows) + removed

    def _after_write(
        self, namespace: str, before: int, after: int, added: list[tuple[int, np.ndarray]], removed: list[int]
    ) -> None:
        """Bring a loaded index up to a write this process just committed (directly when no other
        process wrote in between, else through SQLite)."""
        state = self._indexes.get(namespace)
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

    def _persist(self, namespace: str, state: _NsIndex, force: bool = False) -> None:
        if not force and state.unpersisted < max(
            self.persist_min, self.persist_fraction * state.index.ntotal
        ):
            return
        with self._file_lock():
            row = self._conn.execute(
                "SELECT generation FROM index_state WHERE namespace = ?", (namespace,)
            ).fetchone()
            if row is not None and int(row[0]) > state.generation:
                return  # another process already wrote a newer file
            checksum = state.index.write(self._index_path(namespace))
            self._conn.execute(
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
        self, records: Sequence[MemoryRecord], *, embeddings: np.ndarray | None = None, fresh_ids: bool = False
    ) -> tuple[list[str], int]:
        """add_many, also returning how many records were stored new. fresh_ids: a record whose id is
        held by another record (checked inside the write transaction) gets a fresh id."""
        self._check_open()
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
        known = self._existing(list(first))
        fresh = [i for key, i in first.items() if key not in known]
        vectors = (
            embeddings[fresh] if embeddings is not None else self._vectors_for([records[i] for i in fresh])
        )
        with self._lock:
            added: dict[str, list[tuple[int, np.ndarray]]] = {}
            gens: dict[str, tuple[int, int]] = {}
            with self._write() as conn:
                known.update(self._existing([(records[i].namespace, records[i].content_hash) for i in fresh]))
                for row, i in enumerate(fresh):
                    rec = records[i]
                    key = (rec.namespace, rec.content_hash)
                    if key in known:  # another process stored it meanwhile
                        continue
                    if fresh_ids and conn.execute("SELECT 1 FROM records WHERE id = ?", (rec.id,)).fetchone():
                        rec = MemoryRecord(**{**rec.to_dict(), "id": new_id(), "span": rec.span})
                    seq = self._insert(conn, rec, vectors[row])
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
                    before = self._generation(ns)
                    gens[ns] = (before, self._bump(conn, ns))
            for ns, rows in added.items():
                self._after_write(ns, *gens[ns], added=rows, removed=[])
                state = self._indexes.get(ns)
                if state is not None:
                    if state.index.needs_rebuild():
                        self._rebuild(
                            ns, f"{state.index.kind} index no longer fits {state.index.ntotal} records"
                        )
                    else:
                        self._persist(ns, state)
        stored = sum(len(rows) for rows in added.values())
        return [known[(rec.namespace, rec.content_hash)] for rec in records], stored

    def _vectors_for(self, records: list[MemoryRecord]) -> np.ndarray:
        """(len(records), dim) vectors: reused from stored records of equal text in the same
        namespace, else embedded, each distinct text once."""
        dim = int(self.dim or 0)
        out = np.zeros((len(records), dim), np.float32)
        hashes = [text_hash(r.text) for r in records]
        stored: dict[tuple[str, str], np.ndarray] = {}
        by_ns: dict[str, list[str]] = {}
        for rec, th in zip(records, hashes, strict=True):
            by_ns.setdefault(rec.namespace, []).append(th)
        with self._lock:
            for ns, ths in by_ns.items():
                for part in _chunks(sorted(set(ths))):
                    marks = ",".join("?" * len(part))
                    for th, blob in self._conn.execute(
                        f"SELECT text_hash, embedding FROM records WHERE namespace = ? AND text_hash IN ({marks})",
                        (ns, *part),
                    ):
                        stored[(ns, th)] = np.frombuffer(blob, dtype="<f4")
        todo: dict[str, list[int]] = {}
        for row, (rec, th) in enumerate(zip(records, hashes, strict=True)):
            if (rec.namespace, th) in stored:
                out[row] = stored[(rec.namespace, th)]
            else:
                todo.setdefault(th, []).append(row)
        if todo:
            texts = [records[rows[0]].text for rows in todo.values()]
            vectors = normalize_rows(self._require_embedder().embed(texts))
            if vectors.shape != (len(texts), dim):
                raise StoreError(f"embedder returned shape {vectors.shape}, expected ({len(texts)}, {dim})")
            for vector, rows in zip(vectors, todo.values(), strict=True):
                out[rows] = vector
        return out

    def _existing(self, keys: list[tuple[str, str]]) -> dict[tuple[str, str], str]:
        by_ns: dict[str, list[str]] = {}
        for ns, chash in keys:
            by_ns.setdefault(ns, []).append(chash)
        out: dict[tuple[str, str], str] = {}
        with self._lock:
            for ns, hashes in by_ns.items():
                for part in _chunks(hashes):
                    marks = ",".join("?" * len(part))
                    for chash, rid in self._conn.execute(
                        f"SELECT content_hash, id FROM records WHERE namespace = ? AND content_hash IN ({marks})",
                        (ns, *part),
                    ):
                        out[(ns, chash)] = rid
        return out

    def _insert(self, conn: sqlite3.Connection, rec: MemoryRecord, vector: np.ndarray) -> int:
        try:
            cur = conn.execute(
                "INSERT INTO records (id, namespace, kind, text, summary, importance, created_at, updated_at, "
                "content_hash, source, span_start, span_end, embedding, metadata, text_hash) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    rec.id,
                    rec.namespace,
                    rec.kind,
                    rec.text,
                    rec.summary,
                    rec.importance,
                    rec.created_at,
                    rec.updated_at,
                    rec.content_hash,
                    rec.source,
                    rec.span[0] if rec.span else None,
                    rec.span[1] if rec.span else None,
                    np.asarray(vector, dtype="<f4").tobytes(),
                    json.dumps(rec.metadata, ensure_ascii=False),
                    text_hash(rec.text),
                ),
            )
        except sqlite3.IntegrityError as exc:
            raise StoreError(
                f"record id {rec.id!r} is already used by another record: leave id unset for a new record, "
                "or use update() to change an existing one"
            ) from exc
        except (TypeError, ValueError) as exc:
            raise StoreError(f"record {rec.id}: metadata must be JSON-serialisable ({exc})") from exc
        return int(cur.lastrowid)

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
        with self._write() as conn:
            conn.execute(
                "UPDATE records SET summary = ?, importance = ?, metadata = ?, updated_at = ? WHERE id = ?",
                (
                    changed.summary,
                    changed.importance,
                    json.dumps(changed.metadata, ensure_ascii=False),
                    changed.updated_at,
                    record_id,
                ),
            )
        return changed

    def delete(self, record_ids: Iterable[str]) -> int:
        """Forget records: removed from SQLite (overwritten on disk) and from the index, whose file is
        rewritten at once. Returns how many existed."""
        ids = list(dict.fromkeys(record_ids))
        with self._lock:
            found: dict[str, list[int]] = {}
            gens: dict[str, tuple[int, int]] = {}
            with self._write() as conn:
                for part in _chunks(ids):
                    marks = ",".join("?" * len(part))
                    for seq, ns in conn.execute(
                        f"SELECT seq, namespace FROM records WHERE id IN ({marks})", tuple(part)
                    ):
                        found.setdefault(ns, []).append(int(seq))
                    conn.execute(f"DELETE FROM records WHERE id IN ({marks})", tuple(part))
                for ns, seqs in found.items():
                    before = self._generation(ns)
                    gens[ns] = (before, self._bump(conn, ns))
                    conn.executemany(
                        "INSERT OR REPLACE INTO tombstones VALUES (?, ?, ?)",
                        [(s, ns, gens[ns][1]) for s in seqs],
                    )
            for ns, seqs in found.items():
                if ns not in self._indexes and self._index_path(ns).exists():
                    self._ensure(ns)  # load it so that the file on disk is rewritten without them
                self._after_write(ns, *gens[ns], added=[], removed=seqs)
                if ns in self._indexes:
                    self._persist(ns, self._indexes[ns], force=True)
            if found:
                self.purge_wal()
        return sum(len(s) for s in found.values())

    def purge_wal(self, wait: float = 2.0) -> bool:
        """Copy the write-ahead log into the database and truncate it to zero bytes, so that text just
        deleted (kept in old page versions in memory.db-wal) is gone from disk. False when another
        connection still reads an older snapshot (a process in the middle of a read): the WAL then
        keeps the text until that process's connection moves on or closes (SQLite checkpoints at the
        last close). `self.wal_clean` keeps the latest answer."""
        self._check_open()
        with self._lock:
            self._conn.execute(f"PRAGMA busy_timeout={int(wait * 1000)}")
            try:
                busy, log, _done = self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            finally:
                self._conn.execute(f"PRAGMA busy_timeout={int(self.lock_timeout * 1000)}")
        self.wal_clean = busy == 0 and log <= 0
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
        self._check_open()
        with self._lock:
            records = self.delete_namespace(namespace)
            files = 0
            with self._write() as conn:
                rows = 0
                for table in ("tombstones", "index_state", "namespaces"):
                    rows += conn.execute(f"DELETE FROM {table} WHERE namespace = ?", (namespace,)).rowcount
                path = self._index_path(namespace)
                if path.exists():
                    path.unlink()
                    files += 1
            self._indexes.pop(namespace, None)
            self.purge_wal()
        return {"records": records, "index_files": files, "bookkeeping_rows": rows}

    # ------------------------------------------------------------------ reads

    def get(self, record_id: str) -> MemoryRecord | None:
        self._check_open()
        with self._lock:
            row = self._conn.execute(f"SELECT {_COLUMNS} FROM records WHERE id = ?", (record_id,)).fetchone()
        return _row_to_record(row) if row else None

    def get_by_hash(self, namespace: str, content_hash: str) -> MemoryRecord | None:
        """The record of `namespace` with this content hash (see `records.content_hash`), if stored."""
        self._check_open()
        with self._lock:
            row = self._conn.execute(
                f"SELECT {_COLUMNS} FROM records WHERE namespace = ? AND content_hash = ?",
                (namespace, content_hash),
            ).fetchone()
        return _row_to_record(row) if row else None

    def resolve_id(self, prefix: str, namespace: str | None = None) -> str:
        """The full id of the one record whose id starts with `prefix` (for CLIs showing short ids)."""
        self._check_open()
        if not prefix:
            raise StoreError(f"invalid record id {prefix!r}: copy an id from `memllm memory list`")
        sql, args = "SELECT id FROM records WHERE id >= ? AND id < ?", [prefix, prefix + "\U0010ffff"]
        if namespace is not None:
            sql, args = sql + " AND namespace = ?", [*args, namespace]
        with self._lock:
            rows = self._conn.execute(sql + " LIMIT 2", args).fetchall()
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
        self._check_open()
        with self._lock:
            state = self._ensure(namespace)
            if query.shape[0] != state.index.dim:
                raise StoreError(f"query vector has dim {query.shape[0]}, the store {state.index.dim}")
            fetch = k if not flt else 4 * k
            while True:
                scores, seqs = state.index.search(query, fetch)
                found = self._by_seq(namespace, seqs.tolist())
                results = [
                    SearchResult(found[s], float(sc))
                    for sc, s in zip(scores.tolist(), seqs.tolist(), strict=True)
                    if s in found and matches(found[s], flt)
                ]
                if len(results) >= k or len(seqs) < fetch or fetch >= state.index.ntotal:
                    return results[:k]
                fetch *= 4

    def _by_seq(self, namespace: str, seqs: list[int]) -> dict[int, MemoryRecord]:
        out: dict[int, MemoryRecord] = {}
        for part in _chunks(seqs):
            marks = ",".join("?" * len(part))
            for row in self._conn.execute(BY_SEQ_SQL.format(marks=marks), (*part, namespace)):
                rec = _row_to_record(row)
                if rec.namespace == namespace:  # never another namespace's record
                    out[int(row[0])] = rec
        return out

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
        flt = check_filters(filters)
        self._check_open()
        where, args = ["namespace = ?"], [namespace]
        if flt.get("kind") is not None:
            where.append(f"kind IN ({','.join('?' * len(flt['kind']))})")
            args.extend(flt["kind"])
        for key, op in (("source", "="), ("created_after", ">"), ("created_before", "<")):
            if flt.get(key) is not None:
                where.append(f"{'source' if key == 'source' else 'created_at'} {op} ?")
                args.append(flt[key])
        order = "DESC" if newest_first else "ASC"
        sql = f"SELECT {_COLUMNS} FROM records WHERE {' AND '.join(where)} ORDER BY created_at {order}, seq {order}"
        with self._lock:
            if not flt.get("metadata"):
                sql += " LIMIT ? OFFSET ?"
                return [
                    _row_to_record(r)
                    for r in self._conn.execute(sql, (*args, -1 if limit is None else limit, offset))
                ]
            records = [rec for rec in map(_row_to_record, self._conn.execute(sql, args)) if matches(rec, flt)]
        return records[offset : None if limit is None else offset + limit]

    def count(self, namespace: str | None = None) -> int:
        self._check_open()
        with self._lock:
            if namespace is None:
                return int(self._conn.execute("SELECT COUNT(*) FROM records").fetchone()[0])
            return int(
                self._conn.execute(
                    "SELECT COUNT(*) FROM records WHERE namespace = ?", (namespace,)
                ).fetchone()[0]
            )

    def namespaces(self) -> list[str]:
        self._check_open()
        with self._lock:
            return [
                r[0] for r in self._conn.execute("SELECT DISTINCT namespace FROM records ORDER BY namespace")
            ]

    def index_ids(self, namespace: str) -> set[int]:
        """The record seqs the namespace's (caught-up) index holds; for checks and tests."""
        with self._lock:
            return set(self._ensure(namespace).index.ids().tolist())

    def record_seqs(self, namespace: str) -> set[int]:
        """The seqs SQLite holds for a namespace; equal to `index_ids` whenever the store is healthy."""
        with self._lock:
            return {
                int(r[0])
                for r in self._conn.execute("SELECT seq FROM records WHERE namespace = ?", (namespace,))
            }

    def stats(self) -> StoreStats:
        self._check_open()
        with self._lock:
            counts = dict(
                self._conn.execute("SELECT namespace, COUNT(*) FROM records GROUP BY namespace").fetchall()
            )
            indexes = {
                ns: {
                    "kind": s.index.kind,
                    "vectors": s.index.ntotal,
                    "generation": s.generation,
                    "unpersisted": s.unpersisted,
                }
                for ns, s in self._indexes.items()
            }
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
        self._check_open()
        sql, args = f"SELECT {_COLUMNS} FROM records", ()
        if namespace is not None:
            sql, args = sql + " WHERE namespace = ?", (namespace,)
        with self._read() as conn:
            return write_jsonl(map(_row_to_record, conn.execute(sql + " ORDER BY seq", args)), dest)

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
        self._check_open()
        with self._lock:
            for ns, state in self._indexes.items():
                if state.unpersisted:
                    self._persist(ns, state, force=True)

    def close(self) -> None:
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            self._conn.close()

    def __enter__(self) -> FaissStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
