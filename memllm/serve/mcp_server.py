"""The MCP server of `memllm serve mcp`: the memory tools search, add and forget for agent hosts.

Built on the official `mcp` SDK (MCPServer), served over stdio or streamable HTTP. A caller acts for a
fixed set of users: over HTTP with API keys, the users bound to its bearer key (the same keys as the HTTP
API); over stdio, or over loopback HTTP without keys, the users given at start (`--user`). Writes are
committed to the store before a tool returns. Knows nothing of the command line or of the model.
"""

from __future__ import annotations

from typing import Any

from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

from memllm.agents.chat import user_namespace
from memllm.memory_stores.records import MemoryRecord
from memllm.serve.auth import KeyStore

INSTRUCTIONS = ("Long-term memory of the user: `search` it before answering about the user, `add` facts "
                "worth keeping (one fact per call), `forget` a record by the id that search or add gave.")


class KeyVerifier:
    """Bearer tokens checked against the hashed keys of `memllm serve keys`; a key's users are its scopes."""

    def __init__(self, keys: KeyStore) -> None:
        self.keys = keys

    async def verify_token(self, token: str) -> AccessToken | None:
        users = self.keys.users_for(token)
        if users is None:
            return None
        return AccessToken(token=token, client_id="memllm-key", scopes=[], claims={"users": users})


def create_mcp(store: Any, *, users: list[str], keys: KeyStore | None = None,
               base_url: str = "http://127.0.0.1:8001") -> MCPServer:
    """An MCPServer with the memory tools over `store`. `users`: who a caller without a key acts for
    (the first is the default); `keys`: when given and not empty, HTTP callers need one (stdio ignores it)."""
    if not users or not all(u.strip() for u in users):
        raise ValueError("the MCP server needs at least one non-empty user")
    auth = verifier = None
    if keys is not None and len(keys) > 0:
        auth = AuthSettings(issuer_url=base_url, resource_server_url=base_url + "/mcp")
        verifier = KeyVerifier(keys)
    server = MCPServer("memllm", instructions=INSTRUCTIONS, token_verifier=verifier, auth=auth,
                       log_level="WARNING")

    def namespace(user: str | None) -> str:
        token = get_access_token()
        allowed = list(token.claims["users"]) if token is not None and token.claims else users
        if user is None or not user.strip():
            return user_namespace(allowed[0])
        if user.strip() not in allowed:
            raise ToolError(f"user {user!r} not found for this caller")
        return user_namespace(user.strip())

    @server.tool()
    def search(query: str, k: int = 5, user: str | None = None) -> list[dict[str, Any]]:
        """The user's memory records most relevant to `query` (best first): id, text, kind, score."""
        if not query.strip() or not 1 <= k <= 100:
            raise ToolError("query must be non-empty and k in 1..100")
        hits = store.search(query, k, namespace=namespace(user))
        return [{"id": h.record.id, "text": h.record.text, "kind": h.record.kind, "score": round(float(h.score), 4)}
                for h in hits]

    @server.tool()
    def add(text: str, importance: float = 0.5, user: str | None = None) -> dict[str, str]:
        """Remember one fact about the user; returns its id (the same id when the fact was already stored)."""
        if not text.strip() or len(text) > 100_000 or not 0.0 <= importance <= 1.0:
            raise ToolError("text must be non-empty (at most 100000 characters), importance in 0..1")
        rec = MemoryRecord(text=text, namespace=namespace(user), kind="fact", importance=importance)
        return {"id": store.add(rec)}  # committed before we answer

    @server.tool()
    def forget(record_id: str, user: str | None = None) -> dict[str, int]:
        """Forget one of the user's records by id (from search or add)."""
        ns = namespace(user)
        rec = store.get(record_id)
        if rec is None or rec.namespace != ns:
            raise ToolError(f"record {record_id!r} not found")
        return {"deleted": store.delete([record_id])}

    return server
