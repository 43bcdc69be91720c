"""Run one buffered HTTP request through an ASGI app in this process and stream its response back.

For a server that receives requests as data rather than on a socket (a Ray Serve replica behind a
router: memllm.distributed.serve_ray), so the same FastAPI app (memllm.serve.app) answers there as under
uvicorn. `RawRequest` is plain data (picklable); `call(app, request)` yields the response start
(`{"status": int, "headers": [(bytes, bytes), ...]}`) and then each body chunk (bytes) as the app
sends it, so a streamed answer (server-sent events) arrives piece by piece. Knows nothing of memllm.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("memllm.serve")
_DONE = object()


@dataclass(frozen=True)
class RawRequest:
    method: str
    path: str  # percent-decoded, as ASGI's scope["path"]
    query: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    client: tuple[str, int] | None = None
    server: tuple[str, int] | None = None
    scheme: str = "http"
    raw_path: bytes | None = None


def _scope(req: RawRequest) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": req.method,
        "scheme": req.scheme,
        "path": req.path,
        "raw_path": req.raw_path if req.raw_path is not None else req.path.encode(),
        "query_string": req.query,
        "root_path": "",
        "headers": list(req.headers),
        "client": req.client,
        "server": req.server,
    }


async def call(app: Any, req: RawRequest) -> AsyncIterator[dict[str, Any] | bytes]:
    """The response of `app` to `req`: first its start, then its body chunks. An error the app raises
    after it answered (Starlette re-raises a crash after sending the 500) is logged, not raised."""
    queue: asyncio.Queue[Any] = asyncio.Queue()
    gone = asyncio.Event()  # the caller stopped reading: the app sees a disconnect
    body_sent = False

    async def receive() -> dict[str, Any]:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": req.body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        await queue.put(message)

    task = asyncio.ensure_future(app(_scope(req), receive, send))
    task.add_done_callback(lambda _: queue.put_nowait(_DONE))
    started = finished = False
    try:
        while True:
            message = await queue.get()
            if message is _DONE:
                break
            if message["type"] == "http.response.start":
                started = True
                yield {"status": int(message["status"]), "headers": list(message.get("headers", []))}
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield bytes(message["body"])
                if not message.get("more_body", False):
                    finished = True
        exc = task.exception()
        if exc is not None and not (started and finished):
            raise exc
        if exc is not None:
            log.error("%s %s failed after its response was sent", req.method, req.path, exc_info=exc)
    finally:
        gone.set()
        if not task.done():
            task.cancel()
