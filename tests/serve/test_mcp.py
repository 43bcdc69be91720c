"""`memllm serve mcp` (fast tier): the official mcp client SDK against the server over stdio and
streamable HTTP. Memory tools search/add/forget; a caller reaches only its own users. Fake embedder."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

mcp = pytest.importorskip("mcp")
from mcp import Client  # noqa: E402
from mcp.client.stdio import StdioServerParameters  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _env(home: Path) -> dict[str, str]:
    return {**os.environ, "MEMLLM_HOME": str(home), "PYTHONPATH": str(ROOT)}


def _data(result) -> object:
    assert not result.is_error, result.content
    return json.loads(result.content[0].text) if len(result.content) == 1 else [
        json.loads(c.text) for c in result.content]


async def _exercise(client: Client, other: str) -> None:
    names = sorted(t.name for t in (await client.list_tools()).tools)
    assert names == ["add", "forget", "search"]
    rid = _data(await client.call_tool("add", {"text": "Alice keeps bees in Lyon."}))["id"]
    again = _data(await client.call_tool("add", {"text": "Alice keeps bees in Lyon."}))["id"]
    assert again == rid  # an identical fact is stored once
    hits = _data(await client.call_tool("search", {"query": "bees", "k": 5}))
    hits = hits if isinstance(hits, list) else [hits]
    assert [h["id"] for h in hits] == [rid] and hits[0]["text"] == "Alice keeps bees in Lyon."
    # another user of this caller does not see alice's record; a user it does not have is refused
    assert not (await client.call_tool("search", {"query": "bees", "user": "bob"})).content or \
        _data(await client.call_tool("search", {"query": "bees", "user": "bob"})) == []
    refused = await client.call_tool("search", {"query": "bees", "user": other})
    assert refused.is_error and "not found" in refused.content[0].text
    gone = await client.call_tool("forget", {"record_id": rid, "user": "bob"})
    assert gone.is_error  # bob does not own it
    assert _data(await client.call_tool("forget", {"record_id": rid})) == {"deleted": 1}
    bad = await client.call_tool("add", {"text": "  "})
    assert bad.is_error


def test_mcp_stdio(tmp_path):
    params = StdioServerParameters(command=sys.executable, cwd=str(ROOT), env=_env(tmp_path),
                                   args=["-m", "tests.serve.serve_fake", "mcp", "--user", "alice", "--user", "bob"])

    async def main() -> None:
        async with Client(params, read_timeout_seconds=60) as client:
            await _exercise(client, other="mallory")

    asyncio.run(asyncio.wait_for(main(), 120))


def test_mcp_http_with_keys(tmp_path):
    keys = {}
    for name, users in (("ka", ["alice", "bob"]), ("kd", ["dave"])):
        out = subprocess.run([sys.executable, "-m", "tests.serve.serve_fake", "keys", "add", name,
                              *sum((["--user", u] for u in users), [])], env=_env(tmp_path), cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        keys[name] = out.stdout.strip()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "tests.serve.serve_fake", "mcp", "--transport", "http",
                             "--port", str(port)], env=_env(tmp_path), cwd=ROOT)
    url = f"http://127.0.0.1:{port}/mcp"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                assert httpx.post(url, json={}, timeout=1).status_code == 401  # no key: refused
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            pytest.fail("MCP server did not start")
        import httpx2

        async def main() -> None:
            async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {keys['ka']}"}, timeout=60) as hc:
                from mcp.client.streamable_http import streamable_http_client

                async with Client(streamable_http_client(url, http_client=hc)) as client:
                    await _exercise(client, other="dave")

        asyncio.run(asyncio.wait_for(main(), 120))
        assert httpx.post(url, json={}, headers={"Authorization": "Bearer mk-wrong"}, timeout=5).status_code == 401
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
