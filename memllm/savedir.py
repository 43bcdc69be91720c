"""Folders memllm writes whole: a snapshot folder given by the user, and private temporary folders.

`check_target(path, kind, allowed)` refuses a `--save-memory` folder unless it is absent, empty, or a
memllm snapshot of the same kind holding only files memllm writes (it names the first file that is
not, or which kind of snapshot it is). `replace_folder(path)` builds the new content in a temporary
folder beside `path` and swaps it in with renames, so nothing of the old content is removed before
the new one is complete, and nothing memllm did not write is ever removed.
`private_tempdir(tag)` makes a 0700 folder under the system temp dir named with this process's id;
`remove_stale_tempdirs(tag)` removes such folders left by processes that no longer run (killed with
-9). Knows nothing of what the snapshots hold.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from memllm.errors import SnapshotError

MARKERS = {  # file at a snapshot's top -> (format field value, kind in words)
    "docqa.json": ("memllm-docqa", "document memory (`memllm ask --save-memory`)"),
    "manifest.json": ("memllm-context-snapshot", "context memory snapshot (Session.save)"),
}


def snapshot_kind(folder: Path) -> str | None:
    """The format of the memllm snapshot in `folder` ('memllm-docqa', ...), or None."""
    for marker, (fmt, _) in MARKERS.items():
        path = folder / marker
        try:
            if path.is_file() and not path.is_symlink() and path.stat().st_size < 1 << 20:
                data = json.loads(path.read_text(encoding="utf-8"))
                if isinstance(data, dict) and data.get("format") == fmt:
                    return fmt
        except (OSError, ValueError):
            continue
    return None


def _kind_words(fmt: str) -> str:
    return next(words for f, words in MARKERS.values() if f == fmt)


def _files(folder: Path) -> Iterator[str]:
    for root, dirs, files in os.walk(folder):
        rel = Path(root).relative_to(folder)
        for name in sorted(files) + [d for d in sorted(dirs) if (Path(root) / d).is_symlink()]:
            yield (rel / name).as_posix()


def check_target(path: str | Path, kind: str, allowed: Callable[[str], bool]) -> Path:
    """`path` as a Path when memllm may write a snapshot of format `kind` there, else SnapshotError
    saying why. `allowed(relative_path)` says which files a snapshot of that kind holds."""
    folder = Path(path)
    if folder.is_symlink():
        raise SnapshotError(f"{folder} is a symbolic link: give a real folder to save memory to")
    if not folder.exists():
        return folder
    if not folder.is_dir():
        raise SnapshotError(f"{folder} is a file, not a folder: give a new or empty folder to save memory to")
    try:
        first = next(iter(folder.iterdir()), None)
    except OSError as exc:
        raise SnapshotError(f"cannot list {folder} ({exc.strerror or exc}): give another folder") from exc
    if first is None:
        return folder
    found = snapshot_kind(folder)
    if found is None:
        raise SnapshotError(
            f"{folder} is not empty and is not a memllm snapshot (it holds {first.name}): "
            "give a new or empty folder, memllm will not overwrite it"
        )
    if found != kind:
        raise SnapshotError(
            f"{folder} holds a memllm {_kind_words(found)}, not a {_kind_words(kind)}: give another folder"
        )
    for rel in _files(folder):
        if not allowed(rel):
            raise SnapshotError(
                f"{folder} is a memllm {_kind_words(kind)} but also holds {rel}, which memllm did not "
                "write: move that file or give another folder"
            )
    return folder


@contextmanager
def replace_folder(path: str | Path) -> Iterator[Path]:
    """Yield an empty folder beside `path`; when the block succeeds it takes `path`'s place (the old
    folder, checked by `check_target` first, is removed only after the swap). On error the new
    folder is removed and `path` is left as it was."""
    folder = Path(path)
    folder.parent.mkdir(parents=True, exist_ok=True)
    new = Path(tempfile.mkdtemp(prefix=f".{folder.name[:60]}.", suffix=".new", dir=folder.parent))
    try:
        yield new
        os.chmod(new, 0o777 & ~_umask())
        if folder.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name[:60]}.", suffix=".old", dir=folder.parent))
            os.rmdir(old)
            os.rename(folder, old)
            os.rename(new, folder)
            shutil.rmtree(old)
        else:
            os.rename(new, folder)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_TEMP = re.compile(r"^memllm-(?P<tag>[a-z]+)-(?P<pid>[0-9]+)-")


def private_tempdir(tag: str) -> Path:
    """A new folder only this user can enter (mode 0700), named memllm-<tag>-<pid>-..."""
    remove_stale_tempdirs(tag)
    return Path(tempfile.mkdtemp(prefix=f"memllm-{tag}-{os.getpid()}-"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_tempdirs(tag: str, root: str | Path | None = None) -> list[Path]:
    """Remove memllm-<tag>-<pid>-* folders of this user whose process is gone; returns them."""
    base = Path(root or tempfile.gettempdir())
    removed = []
    try:
        entries = list(base.iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP.match(entry.name)
        if m is None or m.group("tag") != tag:
            continue
        try:
            st = entry.lstat()
        except OSError:
            continue
        if not entry.is_dir() or entry.is_symlink() or st.st_uid != os.getuid():
            continue
        if _alive(int(m.group("pid"))):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed
