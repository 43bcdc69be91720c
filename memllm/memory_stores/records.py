"""The text-memory record model and the store protocol.

`MemoryRecord` is one entry of the memory stream (a dialogue turn, a document chunk, a summary or a
fact); `SearchResult` is a record with its similarity; `MemoryStore` is what every store implements.
Knows nothing of FAISS, SQLite or embedders.
"""

from __future__ import annotations

import hashlib
import math
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal, Protocol, runtime_checkable

from memllm import validate
from memllm.errors import StoreError

KINDS = ("turn", "chunk", "summary", "fact")
Kind = Literal["turn", "chunk", "summary", "fact"]
FILTER_KEYS = ("kind", "source", "created_after", "created_before", "metadata")
MAX_RECORD_BYTES = 256 * 1024  # text (and summary) of one record, UTF-8: long text goes in as chunks
MAX_NAME_CHARS = 4096  # id, content_hash, source
MAX_TIMESTAMP = 32503680000.0  # 3000-01-01: timestamps are UNIX seconds within [0, this]


def new_id() -> str:
    """A fresh record id: 32 hex characters (uuid4)."""
    return uuid.uuid4().hex


def text_hash(text: str) -> str:
    """sha256 of the whitespace-normalised text: records with equal text_hash share one embedding."""
    return hashlib.sha256(" ".join(text.split()).encode()).hexdigest()


def content_hash(kind: str, text: str, created_at: float | None = None) -> str:
    """The dedup key of a record within its namespace.

    A chunk, summary or fact is its content: kind + normalised text, so it is stored once. A turn is an
    event: the same words said again later are a new turn (its created_at is part of the key), which
    still reuses the stored embedding of that text (see `text_hash`).
    """
    stamp = f"\x00{float(created_at)!r}" if kind == "turn" else ""
    return hashlib.sha256(f"{kind}\x00{text_hash(text)}{stamp}".encode()).hexdigest()


def _timestamp(name: str, value: Any) -> float:
    try:
        t = float(value)
    except (TypeError, ValueError):
        raise StoreError(f"record {name} must be a number of UNIX seconds, got {value!r}") from None
    if not math.isfinite(t) or not 0.0 <= t <= MAX_TIMESTAMP:
        raise StoreError(
            f"record {name} must be UNIX seconds between 0 and {MAX_TIMESTAMP:.0f} (year 3000), got {value!r}"
        )
    return t


@dataclass
class MemoryRecord:
    """One entry of the memory stream.

    importance is in [0, 1]. `span` is the (start, end) character span of the text in `source`
    (a document path, a session id...), when there is one. Timestamps are UNIX seconds;
    `updated_at` defaults to `created_at`. `content_hash` is computed (see `content_hash`).
    """

    text: str
    namespace: str = "default"
    kind: Kind = "turn"
    summary: str | None = None
    importance: float = 0.5
    created_at: float = field(default_factory=time.time)
    updated_at: float | None = None
    source: str | None = None
    span: tuple[int, int] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    id: str = field(default_factory=new_id)
    content_hash: str = ""

    def __post_init__(self) -> None:
        for name in ("id", "content_hash", "source"):  # strings, or None where optional
            validate.text(getattr(self, name), f"record {name}", StoreError, MAX_NAME_CHARS, name == "source")
        if self.summary is not None and not isinstance(self.summary, str):
            raise StoreError(f"record summary must be a string or null, got {type(self.summary).__name__}")
        if not self.id:
            raise StoreError("record id must be non-empty")
        if not isinstance(self.text, str) or not self.text.strip():
            raise StoreError("a memory record needs non-empty text: skip empty turns/chunks before adding")
        if not isinstance(self.namespace, str) or not self.namespace:
            raise StoreError("a memory record needs a namespace (a user or document name), got an empty one")
        if self.kind not in KINDS:
            raise StoreError(f"record kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        self.importance = validate.number(self.importance, "record importance", StoreError, 0.0, 1.0)
        for name in ("text", "summary"):
            value = getattr(self, name)
            if value is not None and len(value) > MAX_RECORD_BYTES // 4:
                size = len(value.encode("utf-8", "surrogatepass"))
                if size > MAX_RECORD_BYTES:
                    raise StoreError(
                        f"record {name} is {size:,} bytes, over the limit of {MAX_RECORD_BYTES:,}: split it "
                        "into several records (`memllm ask` reads long documents as chunks)"
                    )
        self.created_at = _timestamp("created_at", self.created_at)
        self.updated_at = (
            self.created_at if self.updated_at is None else _timestamp("updated_at", self.updated_at)
        )
        if self.span is not None:
            span = list(self.span) if isinstance(self.span, list | tuple) else None
            if span is None or len(span) != 2:
                raise StoreError(f"record span must be (start, end), got {self.span!r}")
            start, end = (validate.integer(v, "record span", StoreError) for v in span)
            if end < start:
                raise StoreError(
                    f"record span must be (start, end) with 0 <= start <= end, got {self.span!r}"
                )
            self.span = (start, end)
        if not isinstance(self.metadata, dict):
            raise StoreError(f"record metadata must be a dict, got {type(self.metadata).__name__}")
        validate.plain_json(self.metadata, "record metadata", StoreError, MAX_RECORD_BYTES)
        expected = content_hash(self.kind, self.text, self.created_at)
        if self.content_hash and self.content_hash != expected:
            raise StoreError(f"record {self.id}: content_hash does not match its text (edited export file?)")
        self.content_hash = expected

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the JSONL export line)."""
        return {
            "id": self.id,
            "namespace": self.namespace,
            "kind": self.kind,
            "text": self.text,
            "summary": self.summary,
            "importance": self.importance,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "source": self.source,
            "span": list(self.span) if self.span is not None else None,
            "metadata": self.metadata,
            "content_hash": self.content_hash,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MemoryRecord:
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise StoreError(f"unknown memory record fields: {', '.join(sorted(unknown))}")
        values = dict(data)
        if values.get("metadata") is None:
            values["metadata"] = {}
        return cls(**values)


@dataclass(frozen=True)
class SearchResult:
    """A record found by a search; `score` is the cosine similarity to the query (higher is closer)."""

    record: MemoryRecord
    score: float


def check_filters(filters: Mapping[str, Any] | None) -> dict[str, Any]:
    """Validate a search/list filter dict; returns a normalised copy (kind always a tuple)."""
    if not filters:
        return {}
    unknown = set(filters) - set(FILTER_KEYS)
    if unknown:
        raise StoreError(
            f"unknown search filter(s) {', '.join(sorted(unknown))}: use {', '.join(FILTER_KEYS)}"
        )
    out = dict(filters)
    if "kind" in out and out["kind"] is not None:
        kinds = (out["kind"],) if isinstance(out["kind"], str) else tuple(out["kind"])
        bad = [k for k in kinds if k not in KINDS]
        if bad:
            raise StoreError(f"filter kind must be among {', '.join(KINDS)}, got {', '.join(bad)}")
        out["kind"] = kinds
    if "metadata" in out and out["metadata"] is not None and not isinstance(out["metadata"], Mapping):
        raise StoreError("filter 'metadata' must be a dict of key -> required value")
    return out


def matches(record: MemoryRecord, filters: Mapping[str, Any]) -> bool:
    """Whether a record passes a (normalised) filter dict."""
    kinds = filters.get("kind")
    if kinds is not None and record.kind not in kinds:
        return False
    source = filters.get("source")
    if source is not None and record.source != source:
        return False
    after = filters.get("created_after")
    if after is not None and record.created_at <= after:
        return False
    before = filters.get("created_before")
    if before is not None and record.created_at >= before:
        return False
    meta = filters.get("metadata")
    return not meta or all(record.metadata.get(k) == v for k, v in meta.items())


@runtime_checkable
class MemoryStore(Protocol):
    """A persistent, namespaced text memory with similarity search.

    `add`/`add_many` return the id stored for each record: a record whose content hash is already
    present in its namespace is not stored again, and the existing id is returned; a text already
    embedded in the namespace is not embedded again.
    `search` only ever returns records of the given namespace.
    """

    def add(self, record: MemoryRecord) -> str: ...

    def add_many(self, records: Sequence[MemoryRecord]) -> list[str]: ...

    def get(self, record_id: str) -> MemoryRecord | None: ...

    def get_by_hash(self, namespace: str, content_hash: str) -> MemoryRecord | None: ...

    def update(
        self,
        record_id: str,
        *,
        summary: str | None = None,
        importance: float | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> MemoryRecord: ...

    def search(
        self, query: str, k: int = 5, *, namespace: str, filters: Mapping[str, Any] | None = None
    ) -> list[SearchResult]: ...

    def delete(self, record_ids: Iterable[str]) -> int: ...

    def list(
        self,
        namespace: str,
        *,
        filters: Mapping[str, Any] | None = None,
        limit: int | None = None,
        offset: int = 0,
        newest_first: bool = False,
    ) -> list[MemoryRecord]: ...

    def count(self, namespace: str | None = None) -> int: ...

    def namespaces(self) -> list[str]: ...

    def export_jsonl(self, dest: str | Path | IO[str], namespace: str | None = None) -> int: ...

    def import_jsonl(self, src: str | Path | IO[str], namespace: str | None = None) -> list[str]: ...

    def close(self) -> None: ...
