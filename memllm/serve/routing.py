"""Whose session a request of `memllm serve` touches, read from the request alone (for a router in front
of several servers: `memllm serve --ray`).

`session_user` resolves the user as the app does (memllm.serve.app: the memory routes name the user
in the path; a chat names it in the body's `user`, else the API key's first user, else "default"
when no keys are configured), without the model or the store. None where the request touches no
session (health, models, metrics) or where the app will refuse it (a bad body, an unknown key): any
server may answer those. Knows nothing of Ray or HTTP frameworks.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping

from memllm.serve.auth import KeyStore

MEMORY_PATH = re.compile(r"/v1/memory/([^/]+)(?:/.*)?")
CHAT_PATH = "/v1/chat/completions"


def _allowed(headers: Mapping[str, str], keys: KeyStore | None) -> list[str] | None:
    """The users the caller's key reaches; None for any (no keys configured); [] for no valid key."""
    if keys is None or len(keys) == 0:
        return None
    auth = headers.get("authorization", "")
    if not auth.lower().startswith("bearer "):
        return []
    return keys.users_for(auth[7:].strip()) or []


def session_user(path: str, headers: Mapping[str, str], body: bytes, keys: KeyStore | None) -> str | None:
    """The user whose session the request to `path` (percent-decoded, as the app matches it; headers
    with lower-case names; the body) acts on; None where the caller may not act for that user (so a
    caller cannot make a replica hold sessions it will refuse anyway)."""
    m = MEMORY_PATH.fullmatch(path)
    if m is not None:
        user: object = m.group(1).strip()
    elif path == CHAT_PATH:
        try:
            data = json.loads(body or b"null")
        except (ValueError, UnicodeDecodeError):
            return None
        user = data.get("user") if isinstance(data, dict) else None
    else:
        return None
    allowed = _allowed(headers, keys)
    if user is None:  # a chat that names no user: the key's first, else "default"
        return "default" if allowed is None else allowed[0] if allowed else None
    if not isinstance(user, str) or not user.strip():
        return None
    user = user.strip()
    return user if allowed is None or user in allowed else None
