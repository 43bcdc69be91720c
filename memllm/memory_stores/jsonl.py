"""JSON-lines export and import of memory records, for any `MemoryStore`.

One record per line, as `MemoryRecord.to_dict()` writes it; embeddings are not exported (an import
re-embeds with the importing store's embedder). Knows nothing of SQLite or FAISS.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

from memllm.atomic import atomic_file
from memllm.errors import StoreError
from memllm.memory_stores.records import MAX_RECORD_BYTES, MemoryRecord, MemoryStore, new_id

_HINT = "use a file written by `memllm memory export`"
MAX_LINE_CHARS = 4 * MAX_RECORD_BYTES  # one exported record: text, summary and metadata, JSON-escaped


def write_jsonl(records: Iterable[MemoryRecord], dest: str | Path | IO[str]) -> int:
    """Write records as JSON lines to a path or an open text stream; returns how many. A path is
    written atomically (memllm.atomic: a temp file from `tempfile` beside it, then a rename): no
    other file is touched (`X.tmp` is never used nor removed), and a symlink is never followed."""

    def write(out: IO[str]) -> int:
        n = 0
        for rec in records:
            out.write(json.dumps(rec.to_dict(), ensure_ascii=False) + "\n")
            n += 1
        return n

    if not isinstance(dest, (str, Path)):
        return write(dest)
    try:
        with atomic_file(dest, "w", encoding="utf-8") as f:
            return write(f)
    except OSError as exc:
        raise StoreError(f"cannot write {dest} ({exc.strerror or exc}): choose another path") from exc


def _lines(src: str | Path | IO[str]) -> Iterator[str]:
    """Lines of an export, each at most MAX_LINE_CHARS long (an endless line is refused, not read)."""
    if isinstance(src, (str, Path)):
        try:
            fh: IO[str] = open(src, encoding="utf-8")
        except OSError as exc:
            raise StoreError(f"cannot read {src} ({exc.strerror or exc}): {_HINT}") from exc
    else:
        fh = src
    try:
        lineno = 0
        while True:
            try:
                line = fh.readline(MAX_LINE_CHARS + 1)
            except UnicodeDecodeError as exc:
                raise StoreError(f"cannot read {src} as UTF-8 ({exc.reason}): {_HINT}") from exc
            if not line:
                return
            lineno += 1
            if len(line) > MAX_LINE_CHARS:
                raise StoreError(
                    f"line {lineno} of the import is longer than {MAX_LINE_CHARS:,} characters: records are "
                    f"at most {MAX_RECORD_BYTES:,} bytes of text; {_HINT}"
                )
            yield line
    finally:
        if fh is not src:
            fh.close()


def read_jsonl(src: str | Path | IO[str], namespace: str | None = None) -> list[MemoryRecord]:
    """Parse an export (into `namespace` if given), every line checked (StoreError naming the
    first bad line). Content hashes are recomputed, so an edited text is accepted as a new content."""
    records = []
    for lineno, line in enumerate(_lines(src), 1):
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
