"""HostBudget: how many bytes of host memory the context memories of a process's sessions may hold together.

Each session's memory units live in host memory (pinned on a GPU: page-locked, so the operating
system cannot swap them out, and allocating past the machine's memory takes it down). One session's
growth is checked against the process's memory (memllm.limits); many sessions of one server each
fit alone and not together. A HostBudget counts the host bytes of every live session registered
with it (their unit segments, all their capacity, and segments allocated ahead) and refuses, with a
HostBudgetError, a new session or a feed that would take the total past the limit: before the memory
is allocated, never an out-of-memory crash. Refusing is the library's choice; spilling is the
caller's (`memllm serve` closes idle sessions, whose snapshots are already on disk, and tries again).

Sessions are held weakly (a session dropped leaves the count when it is collected) and leave at once
with `release` (Session.close). A session counts against the budget its model had when it was made:
sessions made before `MemLLM.host_budget` was set are not counted. Thread-safe. Knows nothing of models or of what a session is beyond `host_bytes()`.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, Protocol

from memllm.errors import ConfigError, HostBudgetError
from memllm.limits import human_bytes, parse_bytes

OPTION = "--host-budget"


class HoldsHostMemory(Protocol):
    def host_bytes(self) -> int: ...


class HostBudget:
    """At most `limit` bytes of host memory over the sessions registered here (an int, or a size such
    as '2GiB'); validated here, once."""

    def __init__(self, limit: int | str) -> None:
        value = parse_bytes(limit, OPTION) if isinstance(limit, str) else limit
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"host memory budget ({OPTION}) must be a positive number of bytes, got {limit!r}")
        self.limit = value
        self._sessions: weakref.WeakSet[Any] = weakref.WeakSet()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._sessions)

    def used(self) -> int:
        """Host bytes the live sessions registered here hold now."""
        with self._lock:
            live = list(self._sessions)
        return sum(s.host_bytes() for s in live)

    def require(self, session: HoldsHostMemory, more: int, what: str) -> None:
        """HostBudgetError unless `more` bytes for `session` (registered or about to be) fit with what
        every live session holds; registers `session` when they do."""
        with self._lock:
            live = list(self._sessions)
            held = sum(s.host_bytes() for s in live)
            if held + more > self.limit:
                others = len([s for s in live if s is not session])
                raise HostBudgetError(
                    f"{what} needs about {human_bytes(more)} of host memory, but {len(live)} live "
                    f"session(s) hold {human_bytes(held)} of the {human_bytes(self.limit)} budget "
                    f"({OPTION}): close or save and drop idle sessions ({others} other), feed less, "
                    "or raise the budget"
                )
            self._sessions.add(session)

    def release(self, session: HoldsHostMemory) -> None:
        """`session` no longer counts (it was closed)."""
        with self._lock:
            self._sessions.discard(session)
