"""JSON-lines export and import of memory records, for any `MemoryStore`.

One record per line, as `MemoryRecord.to_dict()` writes it; embeddings are not exported (an import
re-embeds with the importing store's embedder). Knows nothing of SQLite or FAISS.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import IO

from memllm.errors import StoreError
from memllm.memory_stores.records import MemoryRecord, MemoryStore, new_id

_HINT = "use a file written by `memllm memory export`"


def write_jsonl(records: Iterable[MemoryRecord], dest: str | Path | IO[str]) -> int:
    """Write records as JSON lines to a path (atomically: temp file, then rename) or an open text
    stream; returns how many."""

    def write(out: IO[str]) -> int:
        n = 0
        for rec in records:
            out.write(json.dumps(rec.to_dict(), ensure_ascii=False) + "\n")
            n += 1
        return n

    if not isinstance(dest, (str, Path)):
        return write(dest)
    tmp = Path(f"{dest}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            n = write(f)
        tmp.replace(dest)
    except OSError as exc:
        raise StoreError(f"cannot write {dest} ({exc}): choose a writable path") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return n


def read_jsonl(src: str | Path | IO[str], namespace: str | None = None) -> list[MemoryRecord]:
    """Parse an export (into `namespace` if given). Content hashes are recomputed, so an edited text
    is accepted as a new content."""
    if isinstance(src, (str, Path)):
        try:
            with open(src, encoding="utf-8") as f:
                lines = f.readlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise StoreError(f"cannot read {src} ({exc}): {_HINT}") from exc
    else:
        lines = src.readlines()
    records = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
            data.pop("content_hash", None)
            if namespace is not None:
                data["namespace"] = namespace
            records.append(MemoryRecord.from_dict(data))
        except (json.JSONDecodeError, TypeError, AttributeError, ValueError, StoreError) as exc:
            raise StoreError(f"line {lineno} of the import is not a memory record ({exc}): {_HINT}") from exc
    return records


def import_records(store: MemoryStore, records: list[MemoryRecord], batch: int = 256) -> list[str]:
    """Add records to a store in batches; returns their ids there. Records already present (same
    namespace, kind and text) are not added twice; an id held by another record gets a fresh one."""
    ids: list[str] = []
    for start in range(0, len(records), batch):
        part = records[start : start + batch]
        for i, rec in enumerate(part):
            holder = store.get(rec.id)
            if holder is not None and (holder.namespace, holder.content_hash) != (
                rec.namespace,
                rec.content_hash,
            ):
                part[i] = MemoryRecord(**{**rec.to_dict(), "id": new_id(), "span": rec.span})
        ids.extend(store.add_many(part))
    return ids
