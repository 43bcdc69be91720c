"""Memory limits, checked before the memory is spent.

`memory_budget()` says how many bytes this process may still allocate and which limit binds: the
host's available memory (/proc/meminfo), the container's limit (cgroup v2 `memory.max` or cgroup v1
`memory.limit_in_bytes`, of this process's cgroup and its ancestors, minus what the cgroup already
uses), RLIMIT_AS (`prlimit`, `ulimit -v`) and MEMLLM_MEMORY_LIMIT (a cap set by the user, e.g. `2GiB`).
`require(need, what, fix)` raises MemoryLimitError naming the limit and what to do instead.
`read_limited` reads a stream (stdin, a device, a pipe) without ever holding more than a bound.
Estimates used by callers: READ_BYTES_PER_BYTE (tokenising a document costs about 170 bytes of host
memory per byte of text with SmolLM2's fast tokenizer: 10 MB peaked at 1.6 GB) and
`kv_bytes_per_token`. Knows nothing of models, documents or the CLI.
"""

from __future__ import annotations

import os
import re
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from memllm.errors import ConfigError, MemoryLimitError

GIB = 1024**3
READ_BYTES_PER_BYTE = 200  # host bytes to decode + tokenise one byte of document text (measured ~170)
MAX_DOCUMENT_BYTES = 512 * 1024**2  # one document, whatever the memory: split bigger ones
MAX_LINE_CHARS = 65536  # one chat message read from a pipe (at most 256 KiB of UTF-8: one record)
RESERVE_BYTES = 256 * 1024**2  # kept free for the interpreter, the model's activations and the OS
_UNLIMITED = 1 << 60
_CGROUP_ROOT = Path("/sys/fs/cgroup")
ENV_LIMIT = "MEMLLM_MEMORY_LIMIT"


def human_bytes(n: float) -> str:
    """Bytes for messages: '1.50 GiB', '12.0 MiB', '3.2 KiB', '100 bytes'."""
    if n >= GIB:
        return f"{n / GIB:.2f} GiB"
    if n >= 1024**2:
        return f"{n / 1024**2:.1f} MiB"
    if n >= 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{int(n)} bytes"


def parse_bytes(text: str, name: str = ENV_LIMIT) -> int:
    """'4GiB', '512M', '1.5g', '1000000' -> bytes (binary units); `name` is what the error calls it."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
    if not m:
        raise ConfigError(f"{name}={text!r} is not a size: use e.g. 2GiB, 512MiB or a number of bytes")
    scale = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}[m.group(2)]
    return int(float(m.group(1)) * scale)


@dataclass(frozen=True)
class MemoryBudget:
    """available: bytes this process may still allocate; limit: the binding limit's total (None for
    the host's memory); source: which limit binds, in words."""

    available: int
    limit: int | None
    source: str

    def describe(self) -> str:
        free = human_bytes(max(0, self.available))
        if self.limit is None:
            return f"only {free} of host memory is available"
        return f"only {free} is free under the {self.source} of {human_bytes(self.limit)}"


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text in ("", "max"):
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return None if value >= _UNLIMITED else value


def _inactive_file(stat: Path, key: str) -> int:
    try:
        for line in stat.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _host_available() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return _UNLIMITED


def _own_cgroups() -> list[tuple[str, str]]:
    """(controllers, path) of each line of /proc/self/cgroup."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) == 3:
            out.append((parts[1], parts[2]))
    return out


def _cgroup_dirs(mount: Path, path: str) -> list[Path]:
    """The folder of cgroup `path` under `mount` and its ancestors up to the mount. Inside a
    container the mount often shows only the container's own subtree, so leading parts of the path
    that do not exist under the mount are dropped."""
    parts = [p for p in path.split("/") if p]
    for skip in range(len(parts) + 1):
        here = mount.joinpath(*parts[skip:])
        if here.is_dir():
            out = [here]
            while here != mount and mount in here.parents:
                here = here.parent
                out.append(here)
            return out
    return [mount] if mount.is_dir() else []


def _cgroup_budgets(root: Path = _CGROUP_ROOT) -> list[MemoryBudget]:
    out = []
    for controllers, path in _own_cgroups():
        if controllers == "":  # cgroup v2 (unified)
            mount = root if (root / "cgroup.controllers").exists() else root / "unified"
            files, version = ("memory.max", "memory.current", "inactive_file"), "v2"
        elif "memory" in controllers.split(","):
            mount, version = root / "memory", "v1"
            files = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
        else:
            continue
        for folder in _cgroup_dirs(mount, path):
            limit = _read_int(folder / files[0])
            if limit is None:
                continue
            usage = _read_int(folder / files[1]) or 0
            usage -= _inactive_file(folder / "memory.stat", files[2])  # page cache the kernel can drop
            out.append(
                MemoryBudget(limit - max(0, usage), limit, f"container memory limit (cgroup {version})")
            )
    return out


def _status_bytes(key: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def memory_budget() -> MemoryBudget:
    """The tightest of: host memory available, the cgroup limits, RLIMIT_AS and MEMLLM_MEMORY_LIMIT."""
    budgets = [MemoryBudget(_host_available(), None, "host memory")]
    budgets.extend(_cgroup_budgets())
    soft, _hard = resource.getrlimit(resource.RLIMIT_AS)
    if soft not in (resource.RLIM_INFINITY, -1) and soft < _UNLIMITED:
        budgets.append(MemoryBudget(soft - _status_bytes("VmSize"), soft, "address-space limit (RLIMIT_AS)"))
    env = os.environ.get(ENV_LIMIT)
    if env:
        cap = parse_bytes(env)
        budgets.append(MemoryBudget(cap - _status_bytes("VmRSS"), cap, f"limit set by {ENV_LIMIT}"))
    return min(budgets, key=lambda b: b.available)


def available_memory() -> int:
    """Bytes this process may still allocate (see memory_budget)."""
    return max(0, memory_budget().available)


def require(need: int, what: str, fix: str, budget: MemoryBudget | None = None) -> None:
    """MemoryLimitError unless `need` bytes (plus a reserve) fit the budget: '{what} needs about N,
    but only M is free under the ... limit of L: {fix}'."""
    budget = budget or memory_budget()
    if need + RESERVE_BYTES > budget.available:
        raise MemoryLimitError(
            f"{what} needs about {human_bytes(need)} (and {human_bytes(RESERVE_BYTES)} kept free for the "
            f"interpreter and the system), but {budget.describe()}: {fix}"
        )


def document_bytes_allowed(budget: MemoryBudget | None = None) -> int:
    """The largest document (in bytes) that can be read and tokenised within the budget."""
    budget = budget or memory_budget()
    return max(0, min(MAX_DOCUMENT_BYTES, (budget.available - RESERVE_BYTES) // READ_BYTES_PER_BYTE))


def read_limited(stream: IO[bytes], limit: int, chunk: int = 1 << 20) -> tuple[bytes, bool]:
    """Read at most `limit` bytes; (data, more) where `more` says the stream had more than `limit`.
    Never holds more than limit + chunk bytes, whatever the stream (a device, an endless pipe)."""
    parts: list[bytes] = []
    total = 0
    while total <= limit:
        piece = stream.read(min(chunk, limit + 1 - total))
        if not piece:
            return b"".join(parts), False
        parts.append(piece)
        total += len(piece)
    return b"".join(parts)[:limit], True


def kv_bytes_per_token(layers: int, kv_heads: int, head_dim: int, offload_dtype: str) -> int:
    """Host bytes one token takes in context memory: keys and values of every layer."""
    per = {"int8": 1.0 + 4.0 / head_dim, "fp32": 4.0}.get(offload_dtype, 2.0)
    return int(layers * 2 * kv_heads * head_dim * per)
