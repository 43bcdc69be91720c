"""One mapping from a name (a user, a namespace, a store) to a folder or file name on disk.

`disk_key(name)` is the only way memllm turns a name into part of a path: a hash of the exact name
(sha256 of its UTF-8 bytes), so two different names never share a folder ('a b', 'a_b', 'a/b', 张三,
李四, José and Josè all differ), the length is fixed (no 'File name too long' for a 300-character
name) and nothing in the name can climb out of the folder. The readable name is kept beside it in a
small JSON label (`label_folder`), checked when the folder is opened again. Knows nothing of models,
stores or sessions.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from memllm.errors import ConfigError

KEY_CHARS = 32  # hex characters of sha256 kept: 128 bits
LABEL = "name.json"


def disk_key(name: str) -> str:
    """The fixed-length key of `name` on disk: 32 hex characters of sha256(name in UTF-8)."""
    if not isinstance(name, str) or not name:
        raise ConfigError("a name stored on disk must be a non-empty string")
    return hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:KEY_CHARS]


def keyed(root: str | Path, name: str, prefix: str = "") -> Path:
    """`root / (prefix + disk_key(name))`: the folder (or file stem) that belongs to `name`."""
    return Path(root) / f"{prefix}{disk_key(name)}"


def label_folder(folder: Path, name: str, kind: str) -> None:
    """Create `folder` if needed and record which name (and kind of thing) it belongs to; a folder
    labelled for another name is refused (a hash collision, or a folder copied by hand)."""
    from memllm.atomic import write_text

    folder.mkdir(parents=True, exist_ok=True)
    owner = read_label(folder)
    if owner is None:
        write_text(folder / LABEL, json.dumps({"kind": kind, "name": name}, ensure_ascii=False))
    elif owner != (kind, name):
        raise ConfigError(
            f"folder {folder} belongs to {owner[0]} {owner[1]!r}, not {kind} {name!r}: remove or move it"
        )


def read_label(folder: Path) -> tuple[str, str] | None:
    """(kind, name) recorded in `folder`, or None when it has no readable label."""
    path = folder / LABEL
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > 1 << 16:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
        return str(data["kind"]), str(data["name"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
