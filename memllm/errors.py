"""Named exceptions of memllm. Each message names the fix; the CLI maps them to exit codes.

Knows nothing of models, tensors or the CLI.
"""

from __future__ import annotations


class MemllmError(Exception):
    """Base of every error memllm raises on purpose. `exit_code` is what the CLI exits with."""

    exit_code = 1


class ConfigError(MemllmError, ValueError):
    """A configuration value is invalid (e.g. n_local < block_size)."""

    exit_code = 2


class ModelNotFoundError(MemllmError):
    """A model name is neither an alias, a local path nor a reachable Hugging Face id."""

    exit_code = 3


class ModelPackageMissingError(MemllmError):
    """An alias is known but the package that carries its weights is not installed."""

    exit_code = 3


class UnsupportedModelError(MemllmError):
    """The model cannot run with context memory (no RoPE, attention not via the interface...)."""

    exit_code = 4


class SnapshotError(MemllmError):
    """A memory snapshot is missing, corrupt, or from an incompatible version/model."""

    exit_code = 5


class StoreError(MemllmError):
    """The text memory store cannot be opened or written."""

    exit_code = 6


class InputError(MemllmError):
    """Input text/documents cannot be read (empty, binary, too large)."""

    exit_code = 7


class MemoryLimitError(MemllmError):
    """Work would need more memory than the process may use (host RAM, the container's cgroup limit
    or RLIMIT_AS): refused before the memory is spent, with what to do instead."""

    exit_code = 8


class HostBudgetError(MemoryLimitError):
    """The context memories of this process's live sessions would hold more host memory (pinned, on a
    GPU) than the budget set for them (`MemLLM(host_budget=...)`, `memllm serve --host-budget`):
    refused before the memory is allocated."""


class BusyError(MemllmError):
    """Another process holds what this one needs (a user's kv memory) and did not let go in time."""

    exit_code = 9


class WriteError(MemllmError):
    """A file could not be written (disk full, a file-size or quota limit, a read-only folder). What
    was being written is left out whole (atomic writes): the previous version stays."""

    exit_code = 10


class DistributedError(MemllmError):
    """Work spread over a cluster (Ray) failed: the cluster cannot be reached, or a worker died or
    raised something memllm does not name."""

    exit_code = 11


DISK_ERRNOS = frozenset({5, 27, 28, 30, 122})  # EIO, EFBIG, ENOSPC, EROFS, EDQUOT
SQLITE_DISK_CODES = frozenset({8, 10, 13})  # SQLITE_READONLY, SQLITE_IOERR, SQLITE_FULL (primary codes)


def is_disk_failure(exc: BaseException) -> bool:
    """Whether `exc` is a failed write of the disk's making (full, size limit, read-only, I/O), as an
    OSError or an sqlite3 error."""
    if isinstance(exc, OSError):
        return exc.errno in DISK_ERRNOS
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in SQLITE_DISK_CODES


def write_error(exc: BaseException, what: str) -> WriteError:
    """The WriteError for a failed write of `what` (an OSError, or an sqlite3 error of the disk)."""
    reason = (exc.strerror if isinstance(exc, OSError) else None) or str(exc)
    return WriteError(
        f"could not write {what}: {reason}; the previous version is kept: free disk "
        "space (or raise the quota / file size limit) and run it again"
    )
