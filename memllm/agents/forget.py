"""Forget a chat user entirely: text records, index entries and files, and the KV dialogue snapshot.

The snapshot is found through `ChatAgent.snapshot_path`, the one function that names it, so a change
of how users map to folders carries over. Another user's data is never touched: the store removes by
exact namespace, and the snapshot folder is the one named for this user. Knows nothing of the CLI.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from memllm.agents.chat import ChatAgent, user_namespace
from memllm.errors import BusyError


@dataclass
class ForgetReport:
    """What `forget_user` removed."""

    user: str
    records: int = 0
    index_files: int = 0
    bookkeeping_rows: int = 0
    kv_snapshot: str | None = None  # the folder removed, if there was one
    kv_files: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "user": self.user,
            "records": self.records,
            "index_files": self.index_files,
            "bookkeeping_rows": self.bookkeeping_rows,
            "kv_snapshot": self.kv_snapshot,
            "kv_files": self.kv_files,
        }

    def describe(self) -> str:
        kv = f"the KV memory snapshot ({len(self.kv_files)} files)" if self.kv_snapshot else "no KV snapshot"
        return (
            f"forgot everything of {self.user}: {self.records} record(s), {self.index_files} index file(s), "
            f"{self.bookkeeping_rows} bookkeeping row(s), {kv}"
        )


def kv_snapshot_path(store: Any, user: str) -> Path | None:
    """Where the chat agent keeps `user`'s KV dialogue snapshot in `store` (None for a store without a path)."""
    holder = SimpleNamespace(store=store, controller=SimpleNamespace(namespace=user_namespace(user)))
    return ChatAgent.snapshot_path(holder)  # type: ignore[arg-type]


def forget_user(store: Any, user: str) -> ForgetReport:
    """Remove every trace of `user` from `store` (a FaissStore or any store with delete_namespace).

    The user's kv memory is removed under its lock (the one a kv chat holds): while a chat of that user
    runs, BusyError, and nothing is removed."""
    from filelock import FileLock, Timeout

    ns = user_namespace(user)
    report = ForgetReport(user)
    path = kv_snapshot_path(store, user)
    lock = None
    if path is not None and path.parent.is_dir():
        lock = FileLock(str(path) + ".lock")
        try:
            lock.acquire(timeout=0)
        except Timeout as exc:
            raise BusyError(
                f"a memllm chat of {user} is running (it holds their kv memory): end it, then forget"
            ) from exc
    try:
        _forget(store, ns, path, report)
    finally:
        if lock is not None:
            lock.release()
            Path(str(path) + ".lock").unlink(missing_ok=True)
    return report


def _forget(store: Any, ns: str, path: Path | None, report: ForgetReport) -> None:
    if hasattr(store, "purge_namespace"):
        done = store.purge_namespace(ns)
        report.records = done["records"]
        report.index_files = done["index_files"]
        report.bookkeeping_rows = done["bookkeeping_rows"]
    else:
        report.records = store.delete_namespace(ns)
    if path is not None and path.exists():
        report.kv_files = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())
        shutil.rmtree(path)
        report.kv_snapshot = str(path)


__all__ = ["ForgetReport", "forget_user", "kv_snapshot_path"]
