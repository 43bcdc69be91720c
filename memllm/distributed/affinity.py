"""Which replica holds a user's session: rendezvous (highest random weight) hashing, sticky to a holder.

`owner(key, replicas, holding)`: among the live replicas, one that already holds the key's session
(reported by the replica itself), else the one with the highest hash of (key, replica). Every router
computes the same answer from the same replica set, so a user's first request lands on the same
replica whichever router sees it; a replica that goes away moves only its own users (to their next
highest), and a replica that joins takes no user who is held elsewhere. Knows nothing of Ray.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Sequence


def weight(key: str, replica: str) -> bytes:
    """The rendezvous weight of `replica` for `key` (a stable hash: the same in every process)."""
    return hashlib.blake2b(f"{key}\0{replica}".encode(), digest_size=8).digest()


def owner(key: str, replicas: Sequence[str], holding: Collection[str] = ()) -> str:
    """The replica (by id) that serves `key`: the highest-weight one among those holding it, else
    among all. `replicas` must be non-empty."""
    if not replicas:
        raise ValueError("no replica to route to")
    pool = [r for r in replicas if r in holding] or list(replicas)
    return max(pool, key=lambda r: weight(key, r))
