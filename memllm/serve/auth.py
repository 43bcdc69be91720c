"""API keys for `memllm serve`: bearer tokens bound to users, stored as SHA-256 hashes in JSON.

The token is shown once when created; only its hash is kept (JSON, never pickle). Knows nothing of HTTP.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from pathlib import Path

from memllm.atomic import write_text
from memllm.errors import ConfigError


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class KeyStore:
    """name -> {hash, users}. A key reaches its own users' memory and nothing else."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.keys: dict[str, dict] = {}
        if self.path.exists():
            data = json.loads(self.path.read_text())
            if not isinstance(data, dict) or data.get("version") != 1:
                raise ConfigError(f"{self.path} is not a memllm keys file (version 1)")
            self.keys = data["keys"]

    def __len__(self) -> int:
        return len(self.keys)

    def add(self, name: str, users: list[str]) -> str:
        if not name.strip() or not users or not all(u.strip() for u in users):
            raise ConfigError("a key needs a name and at least one --user")
        token = "mk-" + secrets.token_urlsafe(32)
        self.keys[name] = {"hash": _hash(token), "users": [u.strip() for u in users]}
        self._save()
        return token

    def remove(self, name: str) -> bool:
        found = self.keys.pop(name, None) is not None
        self._save()
        return found

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_text(self.path, json.dumps({"version": 1, "keys": self.keys}, indent=1))

    def users_for(self, token: str) -> list[str] | None:
        """The users this token may act for, or None when it matches no key."""
        h = _hash(token)
        for entry in self.keys.values():
            if hmac.compare_digest(entry["hash"], h):
                return list(entry["users"])
        return None
