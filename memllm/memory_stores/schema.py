"""The SQLite schema of the memory store and its ordered migrations.

`MIGRATIONS[i]` brings a database from version i to version i + 1; `migrate` applies the missing ones
in one transaction each. A database newer than this code is refused. Knows nothing of FAISS or records.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

from memllm.errors import StoreError


def _v1(conn: sqlite3.Connection) -> None:
    """The first layout: records with their embeddings, per-namespace generations, tombstones and the
    state of each persisted index file."""
    # Statement by statement: executescript would commit the migration's transaction midway.
    script = """
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE records (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- the FAISS id, never reused
            id TEXT NOT NULL UNIQUE,
            namespace TEXT NOT NULL,
            kind TEXT NOT NULL,
            text TEXT NOT NULL,
            summary TEXT,
            importance REAL NOT NULL,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            content_hash TEXT NOT NULL,
            source TEXT,
            span_start INTEGER,
            span_end INTEGER,
            embedding BLOB NOT NULL,                -- float32, little endian, normalised
            UNIQUE (namespace, content_hash)
        );
        CREATE TABLE namespaces (namespace TEXT PRIMARY KEY, generation INTEGER NOT NULL);
        CREATE TABLE tombstones (seq INTEGER PRIMARY KEY, namespace TEXT NOT NULL, generation INTEGER NOT NULL);
        CREATE TABLE index_state (
            namespace TEXT PRIMARY KEY,
            generation INTEGER NOT NULL,   -- the namespace generation the file reflects
            max_seq INTEGER NOT NULL,      -- the highest record seq the file holds
            kind TEXT NOT NULL,
            trained_on INTEGER NOT NULL,
            ntotal INTEGER NOT NULL,
            checksum TEXT NOT NULL
        );
    """
    for statement in script.split(";"):
        if statement.strip():
            conn.execute(statement)


def _v2(conn: sqlite3.Connection) -> None:
    """Records gain a JSON metadata dict; listing by time gets an index."""
    conn.execute("ALTER TABLE records ADD COLUMN metadata TEXT NOT NULL DEFAULT '{}'")
    conn.execute("CREATE INDEX records_ns_time ON records (namespace, created_at)")


def _v3(conn: sqlite3.Connection) -> None:
    """Catching an index up reads the tombstones of one namespace newer than a generation: index them."""
    conn.execute("CREATE INDEX tombstones_ns_gen ON tombstones (namespace, generation)")


def _v4(conn: sqlite3.Connection) -> None:
    """Turns become events (their content hash includes created_at: the same words said twice are two
    turns), and records gain text_hash, under which equal texts share one embedding."""
    from memllm.memory_stores.records import content_hash, text_hash

    conn.execute("ALTER TABLE records ADD COLUMN text_hash TEXT")
    rows = conn.execute("SELECT seq, kind, text, created_at FROM records").fetchall()
    conn.executemany(
        "UPDATE records SET text_hash = ?, content_hash = ? WHERE seq = ?",
        [(text_hash(text), content_hash(kind, text, created), seq) for seq, kind, text, created in rows],
    )
    conn.execute("CREATE INDEX records_ns_text ON records (namespace, text_hash)")


MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [_v1, _v2, _v3, _v4]
SCHEMA_VERSION = len(MIGRATIONS)


def current_version(conn: sqlite3.Connection) -> int:
    exists = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
    ).fetchone()
    if not exists:
        return 0
    row = conn.execute("SELECT version FROM schema_version").fetchone()
    return int(row[0]) if row else 0


def migrate(conn: sqlite3.Connection, target: int = SCHEMA_VERSION) -> int:
    """Apply migrations up to `target` (each in its own transaction); returns the version reached.

    The caller holds the store's write lock. `conn` must be in autocommit mode (isolation_level=None).
    """
    version = current_version(conn)
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"this memory store has schema version {version}, newer than this memllm supports "
            f"({SCHEMA_VERSION}): upgrade memllm (pip install -U memllm)"
        )
    while version < target:
        conn.execute("BEGIN IMMEDIATE")
        try:
            if version == 0:
                conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
                conn.execute("DELETE FROM schema_version")
                conn.execute("INSERT INTO schema_version (version) VALUES (0)")
            MIGRATIONS[version](conn)
            version += 1
            conn.execute("UPDATE schema_version SET version = ?", (version,))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    return version
