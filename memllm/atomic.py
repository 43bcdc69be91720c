"""Writing files so that nothing else is lost: a temporary file beside the target, then one rename.

`atomic_file(path)` yields a file created with `tempfile.mkstemp` in the target's own folder (so the
name cannot collide with anything there: no fixed `X.tmp` that might be a user's file or a symlink),
written, flushed and fsynced, then renamed over `path` (and the folder fsynced). Readers see the old
file or the new one, never half of one. A target that is a symbolic link is refused: the link is not
followed and not replaced. On any error only the temporary file this call created is removed.
Knows nothing of what is written.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def refuse_symlink(path: Path) -> None:
    if path.is_symlink():
        raise OSError(
            errno.ELOOP, f"{path} is a symbolic link (memllm never writes through links)", str(path)
        )


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (best effort where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: str | Path, mode: str = "wb", *, encoding: str | None = None,
                durable: bool = True) -> Iterator[IO[Any]]:  # fmt: skip
    """Yield a file to write `path`'s new content to; it replaces `path` when the block ends without
    an error. durable: fsync the file and its folder (survives a power cut, not only a killed process)."""
    target = Path(path)
    refuse_symlink(target)
    if target.is_dir():
        raise IsADirectoryError(errno.EISDIR, f"{target} is a directory", str(target))
    folder = target.parent if str(target.parent) else Path(".")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name[:80]}.", suffix=".tmp", dir=folder)
    tmp = Path(tmp_name)
    done = False
    try:
        with os.fdopen(fd, mode, encoding=encoding) as fh:
            yield fh
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        os.replace(tmp, target)
        done = True
        if durable:
            fsync_dir(folder)
    finally:
        if not done:
            try:
                tmp.unlink()
            except FileNotFoundError:
                pass


def write_bytes(path: str | Path, data: bytes, *, durable: bool = True) -> None:
    with atomic_file(path, "wb", durable=durable) as fh:
        fh.write(data)


def write_text(path: str | Path, text: str, *, durable: bool = True) -> None:
    with atomic_file(path, "w", encoding="utf-8", durable=durable) as fh:
        fh.write(text)


@contextmanager
def atomic_path(path: str | Path, *, durable: bool = True) -> Iterator[Path]:
    """Like atomic_file, for writers that want a file name (safetensors' save_file): yields the path
    of a new empty temporary file beside `path`, renamed over `path` when the block succeeds."""
    target = Path(path)
    refuse_symlink(target)
    folder = target.parent if str(target.parent) else Path(".")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name[:80]}.", suffix=".tmp", dir=folder)
    os.close(fd)
    tmp = Path(tmp_name)
    done = False
    try:
        yield tmp
        if durable:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, target)
        done = True
        if durable:
            fsync_dir(folder)
    finally:
        if not done:
            try:
                tmp.unlink()
            except FileNotFoundError:
                pass
