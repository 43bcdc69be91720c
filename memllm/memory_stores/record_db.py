"""RecordDB: a FaissStore's SQLite plumbing (memory.db, the source of truth).

One connection (WAL; autocommit, so transactions are explicit), the store's thread lock and file lock
(store.lock, taken around every write, migration and index-file write), read and write transactions,
the embedder (name, dim) the store was built with, and the SQL on the records table: rows to
MemoryRecords, embedding blobs to matrices, inserts, updates, deletes and lookups (`vectors_for` reuses
stored embeddings and embeds the rest with the embedder it is handed). Knows nothing of FAISS indexes.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from filelock import FileLock, Timeout

from memllm.errors import StoreError, is_disk_failure, write_error
from memllm.memory_stores.embeddings import normalize_rows
from memllm.memory_stores.records import MemoryRecord, matches, text_hash
from memllm.memory_stores.schema import migrate

if TYPE_CHECKING:  # pragma: no cover
    from memllm.memory_stores.embeddings import Embedder

COLUMNS = (
    "seq, id, namespace, kind, text, summary, importance, created_at, updated_at, content_hash, "
    "source, span_start, span_end, metadata"
)
_CHUNK = 500  # ids per SQL IN (...) list
# `+namespace` keeps SQLite off the namespace index for these two: it would scan the whole namespace
# (tens of ms at 100K records) where the primary key finds the few rows wanted.
BY_SEQ_SQL = f"SELECT {COLUMNS} FROM records WHERE seq IN ({{marks}}) AND +namespace = ?"
CATCH_UP_SQL = "SELECT seq, embedding FROM records WHERE seq > ? AND +namespace = ? ORDER BY seq"


def chunks(items: Sequence[Any], size: int = _CHUNK) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def row_to_record(row: sqlite3.Row | tuple) -> MemoryRecord:
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


def blob_matrix(blobs: list[bytes], dim: int) -> np.ndarray:
    if not blobs:
        return np.zeros((0, dim), np.float32)
    return np.frombuffer(b"".join(blobs), dtype="<f4").reshape(len(blobs), dim).astype(np.float32)


class RecordDB:
    """The connection to `path / DB_NAME`, its thread lock and the store's file lock.

    `lock` (an RLock) serialises this process's threads on the connection; `file_lock()` adds the
    cross-process lock. `closed` is set by the store when it closes.
    """

    DB_NAME = "memory.db"

    def __init__(self, path: Path, lock_timeout: float, synchronous: str) -> None:
        """Check `path` (a directory, created with its index/ folder if absent) and connect."""
        self.path = path
        if self.path.exists() and not self.path.is_dir():
            raise StoreError(
                f"memory store path {self.path} is a file: pass a directory (it is created if absent)"
            )
        if synchronous.upper() not in ("NORMAL", "FULL"):
            raise StoreError(f"synchronous must be NORMAL or FULL, got {synchronous!r}")
        self.synchronous = synchronous.upper()
        try:
            (self.path / "index").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(
                f"cannot create memory store {self.path} ({exc}): choose a writable --store path"
            ) from exc
        self.lock_timeout = lock_timeout
        self.lock = threading.RLock()
        self._flock = FileLock(str(self.path / "store.lock"), timeout=lock_timeout)
        self.closed = False
        try:
            self.conn = sqlite3.connect(
                str(self.path / self.DB_NAME),
                timeout=lock_timeout,
                isolation_level=None,
                check_same_thread=False,
            )
        except sqlite3.Error as exc:
            raise StoreError(
                f"cannot open memory store {self.path} ({exc}): check the path and its permissions"
            ) from exc

    def prepare(self) -> int:
        """Pragmas and migrations (call under the file lock); returns the schema version."""
        try:
            mode = self.conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            self.conn.execute(f"PRAGMA synchronous={self.synchronous}")
            # secure_delete: forgotten text is overwritten on disk, not left in free pages
            self.conn.execute("PRAGMA secure_delete=ON")
            schema_version = migrate(self.conn)
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
        return schema_version

    @contextmanager
    def file_lock(self) -> Iterator[None]:
        with self.lock:
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
    def write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction under the file lock (BEGIN IMMEDIATE ... COMMIT, ROLLBACK on error)."""
        self.check_open()
        with self.file_lock():
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.conn
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            self.conn.execute("COMMIT")

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: one consistent snapshot of committed data."""
        self.check_open()
        with self.lock:
            self.conn.execute("BEGIN")
            try:
                yield self.conn
            finally:
                self.conn.execute("COMMIT")

    def check_open(self) -> None:
        if self.closed:
            raise StoreError(
                f"memory store {self.path} is closed: open it again with FaissStore(path, embedder)"
            )

    def meta(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def check_embedder(self, embedder: Embedder | None) -> tuple[str | None, int | None]:
        """The (name, dim) of the embedder the store was built with; `embedder`'s, recorded now, for a
        store that has none yet. Raises StoreError when `embedder` is another one. Under the file lock."""
        name, dim = self.meta("embedder"), self.meta("dim")
        dim_: int | None = int(dim) if dim is not None else None
        if embedder is None:
            return name, dim_
        if name is None:
            dim_, name = int(embedder.dim), embedder.name
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.execute("INSERT OR REPLACE INTO meta VALUES ('embedder', ?)", (embedder.name,))
            self.conn.execute("INSERT OR REPLACE INTO meta VALUES ('dim', ?)", (str(dim_),))
            self.conn.execute("COMMIT")
        elif name != embedder.name or dim_ != embedder.dim:
            raise StoreError(
                f"memory store {self.path} was built with embedder {name!r} (dim {dim_}), not "
                f"{embedder.name!r} (dim {embedder.dim}): open it with the same embedder, or "
                "export it (`memllm memory export`) and import the file into a new store"
            )
        return name, dim_

    def checkpoint(self, wait: float) -> bool:
        """PRAGMA wal_checkpoint(TRUNCATE), waiting up to `wait` s for readers; True when the WAL was
        copied into the database and truncated to zero bytes (see FaissStore.purge_wal)."""
        self.check_open()
        with self.lock:
            self.conn.execute(f"PRAGMA busy_timeout={int(wait * 1000)}")
            try:
                busy, log, _done = self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            finally:
                self.conn.execute(f"PRAGMA busy_timeout={int(self.lock_timeout * 1000)}")
        return busy == 0 and log <= 0

    # ------------------------------------------------------------------ records: reads

    def get(self, record_id: str) -> MemoryRecord | None:
        self.check_open()
        with self.lock:
            row = self.conn.execute(f"SELECT {COLUMNS} FROM records WHERE id = ?", (record_id,)).fetchone()
        return row_to_record(row) if row else None

    def get_by_hash(self, namespace: str, content_hash: str) -> MemoryRecord | None:
        self.check_open()
        with self.lock:
            row = self.conn.execute(
                f"SELECT {COLUMNS} FROM records WHERE namespace = ? AND content_hash = ?",
                (namespace, content_hash),
            ).fetchone()
        return row_to_record(row) if row else None

    def ids_with_prefix(self, prefix: str, namespace: str | None) -> list[tuple[str]]:
        """Up to two ids starting with `prefix` (in `namespace` if given)."""
        sql, args = "SELECT id FROM records WHERE id >= ? AND id < ?", [prefix, prefix + "\U0010ffff"]
        if namespace is not None:
            sql, args = sql + " AND namespace = ?", [*args, namespace]
        with self.lock:
            return self.conn.execute(sql + " LIMIT 2", args).fetchall()

    def list(
        self, namespace: str, flt: dict[str, Any], limit: int | None, offset: int, newest_first: bool
    ) -> list[MemoryRecord]:
        """FaissStore.list, with filters already checked (`records.check_filters`)."""
        self.check_open()
        where, args = ["namespace = ?"], [namespace]
        if flt.get("kind") is not None:
            where.append(f"kind IN ({','.join('?' * len(flt['kind']))})")
            args.extend(flt["kind"])
        for key, op in (("source", "="), ("created_after", ">"), ("created_before", "<")):
            if flt.get(key) is not None:
                where.append(f"{'source' if key == 'source' else 'created_at'} {op} ?")
                args.append(flt[key])
        order = "DESC" if newest_first else "ASC"
        sql = f"SELECT {COLUMNS} FROM records WHERE {' AND '.join(where)} ORDER BY created_at {order}, seq {order}"
        with self.lock:
            if not flt.get("metadata"):
                sql += " LIMIT ? OFFSET ?"
                return [
                    row_to_record(r)
                    for r in self.conn.execute(sql, (*args, -1 if limit is None else limit, offset))
                ]
            records = [rec for rec in map(row_to_record, self.conn.execute(sql, args)) if matches(rec, flt)]
        return records[offset : None if limit is None else offset + limit]

    def count(self, namespace: str | None = None) -> int:
        self.check_open()
        with self.lock:
            if namespace is None:
                return int(self.conn.execute("SELECT COUNT(*) FROM records").fetchone()[0])
            return int(
                self.conn.execute(
                    "SELECT COUNT(*) FROM records WHERE namespace = ?", (namespace,)
                ).fetchone()[0]
            )

    def namespaces(self) -> list[str]:
        self.check_open()
        with self.lock:
            return [
                r[0] for r in self.conn.execute("SELECT DISTINCT namespace FROM records ORDER BY namespace")
            ]

    def counts(self) -> dict[str, int]:
        """Records by namespace."""
        return dict(
            self.conn.execute("SELECT namespace, COUNT(*) FROM records GROUP BY namespace").fetchall()
        )

    def seqs(self, namespace: str) -> set[int]:
        with self.lock:
            return {
                int(r[0])
                for r in self.conn.execute("SELECT seq FROM records WHERE namespace = ?", (namespace,))
            }

    def by_seq(self, namespace: str, seqs: list[int]) -> dict[int, MemoryRecord]:
        """The records of `namespace` with these seqs (a seq of another namespace is left out)."""
        out: dict[int, MemoryRecord] = {}
        for part in chunks(seqs):
            marks = ",".join("?" * len(part))
            for row in self.conn.execute(BY_SEQ_SQL.format(marks=marks), (*part, namespace)):
                rec = row_to_record(row)
                if rec.namespace == namespace:  # never another namespace's record
                    out[int(row[0])] = rec
        return out

    def existing(self, keys: list[tuple[str, str]]) -> dict[tuple[str, str], str]:
        """The ids of stored records by (namespace, content hash), for the keys that are stored."""
        by_ns: dict[str, list[str]] = {}
        for ns, chash in keys:
            by_ns.setdefault(ns, []).append(chash)
        out: dict[tuple[str, str], str] = {}
        with self.lock:
            for ns, hashes in by_ns.items():
                for part in chunks(hashes):
                    marks = ",".join("?" * len(part))
                    for chash, rid in self.conn.execute(
                        f"SELECT content_hash, id FROM records WHERE namespace = ? AND content_hash IN ({marks})",
                        (ns, *part),
                    ):
                        out[(ns, chash)] = rid
        return out

    def vectors_for(
        self, records: list[MemoryRecord], dim: int, embedder: Callable[[], Embedder]
    ) -> np.ndarray:
        """(len(records), dim) vectors: reused from stored records of equal text in the same
        namespace, else embedded by `embedder()` (asked for only then), each distinct text once."""
        out = np.zeros((len(records), dim), np.float32)
        hashes = [text_hash(r.text) for r in records]
        stored: dict[tuple[str, str], np.ndarray] = {}
        by_ns: dict[str, list[str]] = {}
        for rec, th in zip(records, hashes, strict=True):
            by_ns.setdefault(rec.namespace, []).append(th)
        with self.lock:
            for ns, ths in by_ns.items():
                for part in chunks(sorted(set(ths))):
                    marks = ",".join("?" * len(part))
                    for th, blob in self.conn.execute(
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
            vectors = normalize_rows(embedder().embed(texts))
            if vectors.shape != (len(texts), dim):
                raise StoreError(f"embedder returned shape {vectors.shape}, expected ({len(texts)}, {dim})")
            for vector, rows in zip(vectors, todo.values(), strict=True):
                out[rows] = vector
        return out

    # ------------------------------------------------------------------ records: writes

    @staticmethod
    def insert(conn: sqlite3.Connection, rec: MemoryRecord, vector: np.ndarray) -> int:
        """Insert a record and its embedding (inside a write transaction); returns its seq."""
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

    def update(self, record_id: str, changed: MemoryRecord) -> None:
        """Write `changed`'s summary, importance, metadata and updated_at to record `record_id`."""
        with self.write() as conn:
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

    @staticmethod
    def delete(conn: sqlite3.Connection, ids: list[str]) -> dict[str, list[int]]:
        """Delete records by id (inside a write transaction); returns the seqs deleted by namespace."""
        found: dict[str, list[int]] = {}
        for part in chunks(ids):
            marks = ",".join("?" * len(part))
            for seq, ns in conn.execute(
                f"SELECT seq, namespace FROM records WHERE id IN ({marks})", tuple(part)
            ):
                found.setdefault(ns, []).append(int(seq))
            conn.execute(f"DELETE FROM records WHERE id IN ({marks})", tuple(part))
        return found
