"""The FastAPI app of `memllm serve`: OpenAI-compatible chat, models, a per-user memory API, health, metrics.

Every model call holds one lock (the model is never called from two threads at once); one answer at a
time per user. With `Limits.batch` (the default) the users' answers decode together: an EngineThread
(memllm.engine_thread) steps them all in one model call per step, taking the lock per step, so a turn
being closed runs between steps: kv turns from the users' streams, and greedy answers from the prompt
(text mode; a turn a recalled fact answers) through sessions made for them whose window holds the
whole context (exact attention). A sampled answer (temperature > 0), or any answer of a model that is
not a MemLLM, holds the lock while it generates. A ChatAgent per user kept in an LRU (its memory
lives in the store, so evicting loses nothing; a user answering is never evicted). Store writes are committed (SQLite)
before the response is sent. Keys, errors and chat are here; the memory routes are memory_api's, the
counters metrics'. Knows nothing of the command line; the model and store are given to it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Literal

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from memllm.agents.chat import ChatAgent, user_namespace
from memllm.engine_thread import EngineThread
from memllm.errors import BusyError, HostBudgetError, MemllmError, MemoryLimitError
from memllm.llm import MemLLM
from memllm.serve.auth import KeyStore
from memllm.serve.memory_api import memory_router
from memllm.serve.metrics import Metrics, route_label
from memllm.serve.streaming import GenerationFailed, pieces_from_thread

log = logging.getLogger("memllm.serve")
LOOPBACK = {"127.0.0.1", "::1", "localhost", "testclient"}


@dataclass
class Limits:
    max_body_bytes: int = 1_000_000
    max_tokens: int = 512
    max_concurrent: int = 64
    max_sessions: int = 64
    max_queue: int = 64  # chats waiting for or holding the model before a 429
    memory_tokens: int | None = None  # budget for recalled memory in a prompt (None: a quarter of the window)
    flash_tokens: int | None = None  # budget for recent turns in a prompt (None: half of the window)
    lock_timeout: float | None = None  # seconds to wait for another process holding a user's kv memory (None: no end)
    batch: bool = True  # users' greedy answers decode together (memllm.engine_thread); False: one at a time


class TextPart(BaseModel):
    type: str
    text: str | None = None


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        """The message's text (the text parts of a list content joined; other parts ignored)."""
        if isinstance(self.content, list):
            return "".join(p.text or "" for p in self.content if p.type == "text")
        return self.content or ""


class ChatRequest(BaseModel):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # the newer name of max_tokens
    n: int = Field(default=1, ge=1, le=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    user: str | None = None


def _error(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


class Queue:
    """How many chats wait for or hold the model; over `size`, a new one is refused (429, retry later)."""

    def __init__(self, size: int) -> None:
        self.size, self.n, self.lock = size, 0, threading.Lock()

    def check(self) -> None:
        if self.n >= self.size:
            raise HTTPException(429, f"{self.n} chats queued for the model (--max-queue {self.size}): retry later",
                                headers={"Retry-After": "5"})

    def __enter__(self) -> Queue:
        with self.lock:
            self.n += 1
        return self

    def __exit__(self, *exc: object) -> None:
        with self.lock:
            self.n -= 1


def create_app(llm: Any, store: Any, *, model_name: str = "memllm", keys: KeyStore | None = None,
               limits: Limits | None = None, memory: str = "text") -> FastAPI:
    limits = limits or Limits()
    app = FastAPI(title="memllm", version="1")
    model_lock = threading.RLock()  # held around every model call (ChatAgent's own; the engine's per step)
    queue = Queue(limits.max_queue)
    agents: OrderedDict[str, ChatAgent] = OrderedDict()
    agents_lock = threading.Lock()
    # One answer at a time per user: user -> [its lock, requests holding or waiting for it]. A user is
    # in the map only while a request holds or waits for the lock (busy); the last one out removes it,
    # so the map never grows with the users a server has seen.
    user_locks: dict[str, list[Any]] = {}
    app.state.busy_users = lambda: sorted(user_locks)
    # Users' answers decode together: kv turns from their streams, and (a MemLLM's: sessions of its
    # own) greedy answers from the prompt, through sessions whose window holds the whole context.
    sessions = isinstance(llm, MemLLM)
    engine = EngineThread(llm, model_lock) if limits.batch and (memory != "text" or sessions) else None
    app.state.engine = engine
    app.state.model_lock = model_lock
    metrics = Metrics()
    app.state.metrics = metrics

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Any:
        path = request.url.path
        size = request.headers.get("content-length")
        if size is None and request.method in ("POST", "PUT", "PATCH"):
            # a chunked body would slip past the size limit: ask for its length up front
            resp = _error(411, "send the body with a content-length header (chunked bodies are refused)",
                          "length_required")
        elif size is not None and (not size.isdigit() or int(size) > limits.max_body_bytes):
            resp = _error(413, f"request body over {limits.max_body_bytes} bytes (--max-body)", "too_large")
        elif metrics.in_flight >= limits.max_concurrent:
            resp = _error(429, f"more than {limits.max_concurrent} requests at once: retry", "rate_limited")
        else:
            metrics.in_flight += 1
            try:
                resp = await call_next(request)
            finally:
                metrics.in_flight -= 1
        metrics.count(route_label(path), resp.status_code)
        return resp

    @app.exception_handler(StarletteHTTPException)  # also FastAPI's own (bad body, unknown path, method)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        resp = _error(exc.status_code, str(exc.detail), "rate_limited" if exc.status_code == 429 else
                      "invalid_request_error")
        resp.headers.update(exc.headers or {})
        return resp

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, json.dumps(exc.errors(), default=str)[:2000], "invalid_request_error")

    def status_of(exc: MemllmError) -> int:
        # HostBudgetError: the sessions of others fill the budget (503, retry), not this request's size
        if isinstance(exc, HostBudgetError):
            return 503
        return 429 if isinstance(exc, BusyError) else 413 if isinstance(exc, MemoryLimitError) else 400

    @app.exception_handler(MemllmError)
    async def memllm_error(_: Request, exc: MemllmError) -> JSONResponse:
        resp = _error(status_of(exc), str(exc), type(exc).__name__)
        if isinstance(exc, HostBudgetError):
            resp.headers["Retry-After"] = "5"
        return resp

    @app.exception_handler(Exception)
    async def crash(request: Request, exc: Exception) -> JSONResponse:
        # a bug: logged here with its traceback, never sent to the client
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return _error(500, f"internal error ({type(exc).__name__}); see the server log", "server_error")

    def caller(request: Request) -> list[str] | None:
        """The users this caller may act for; None means any (no keys configured, loopback only)."""
        if keys is None or len(keys) == 0:
            host = request.client.host if request.client else ""
            if host not in LOOPBACK:
                raise HTTPException(401, "no API keys configured: only loopback clients are served")
            return None
        auth = request.headers.get("authorization", "")
        if not auth.lower().startswith("bearer "):
            raise HTTPException(401, "missing API key: send 'Authorization: Bearer <key>'")
        users = keys.users_for(auth[7:].strip())
        if users is None:
            raise HTTPException(401, "invalid API key")
        return users

    def pick_user(allowed: list[str] | None, user: str | None) -> str:
        if user is not None and not user.strip():
            raise HTTPException(400, "user must be non-empty")
        if allowed is None:
            return (user or "default").strip()
        if user is None:
            return allowed[0]
        if user.strip() not in allowed:
            raise HTTPException(404, f"user {user!r} not found for this key")
        return user.strip()

    @contextmanager
    def user_lock(user: str) -> Iterator[None]:
        with agents_lock:
            entry = user_locks.setdefault(user, [threading.Lock(), 0])
            entry[1] += 1
        try:
            with entry[0]:
                yield
        finally:
            with agents_lock:
                entry[1] -= 1
                if entry[1] == 0:
                    del user_locks[user]

    def pop_idle(keep: str | None) -> tuple[str, ChatAgent] | None:
        """Take the least recently used agent other than `keep`'s whose user is not answering out of
        the LRU (called holding agents_lock); None when every other one is busy."""
        for user in agents:
            if user != keep and user not in user_locks:
                return user, agents.pop(user)
        return None

    def spill(keep: str) -> bool:
        """Close the least recently used idle session other than `keep`'s, to make room under the
        host-memory budget: its kv memory is on disk already (saved after every answer) and comes back
        from there on the user's next request. False when there is none to close."""
        with agents_lock:
            idle = pop_idle(keep)
        if idle is None:
            return False
        log.info("closed the session of %s to make room under the host-memory budget", idle[0])
        idle[1].close()
        return True

    def agent_for(user: str) -> ChatAgent:
        """The user's agent (opened if need be); called holding the user's lock."""
        while True:
            try:
                return open_agent(user)
            except HostBudgetError:
                if not spill(user):
                    raise

    def answer(agent: ChatAgent, message: str, kwargs: dict[str, Any]) -> Iterator[str]:
        """agent.stream, whose room check (before anything is fed) may close idle sessions and try again.
        Called holding the user's lock."""
        while True:
            pieces = agent.stream(message, **kwargs)
            try:
                first = next(pieces)
            except StopIteration:
                return
            except HostBudgetError:
                if not spill(agent.user):
                    raise
                continue
            yield first
            yield from pieces
            return

    def open_agent(user: str) -> ChatAgent:
        with agents_lock:
            if user in agents:
                agents.move_to_end(user)
                return agents[user]
            budgets = ChatAgent.default_controller_config(llm.trained_len, limits.max_tokens)
            if limits.memory_tokens is not None:
                budgets = replace(budgets, memory_tokens=limits.memory_tokens)
            if limits.flash_tokens is not None:
                budgets = replace(budgets, flash_tokens=limits.flash_tokens)
            agent = ChatAgent(llm, store, user=user, memory=memory, max_new_tokens=limits.max_tokens,
                              controller=budgets, lock_timeout=limits.lock_timeout, model_lock=model_lock,
                              kv_generate=engine.generate if engine is not None else None,
                              text_generate=engine.generate_text if engine is not None and sessions else None)  # fmt: skip
            agents[user] = agent
            while len(agents) > limits.max_sessions:
                idle = pop_idle(user)
                if idle is None:  # the others are answering: over the limit until one ends
                    break
                idle[1].close()
            return agent

    def recalled(agent: ChatAgent) -> list[dict[str, str]]:
        """The memory records placed in the prompt of the agent's latest answer (recent turns first)."""
        recall = agent.last_recall()
        if recall is None:
            return []
        recs = [(r, "recent") for r in recall.flash] + [(it.record, it.mode) for it in recall.used]
        return [{"id": r.id, "kind": r.kind, "text": r.text, "as": mode} for r, mode in recs]

    def prompt_size(agent: ChatAgent, message: str) -> int:
        """Tokens of the messages the model read for the latest answer (system, memory, recent turns,
        the message), without the chat template's own; the message alone where no recall was made."""
        recall = agent.last_recall()
        if recall is None or agent.session is not None:
            return llm.count_tokens(message)
        return sum(llm.count_tokens(m["content"]) for m in agent.build_messages(message, recall))

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics", response_class=PlainTextResponse)
    def get_metrics() -> str:
        return metrics.text(engine.stats() if engine is not None else None)

    @app.get("/v1/models")
    def models(request: Request) -> dict[str, Any]:
        caller(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "memllm"}]}

    @app.post("/v1/chat/completions", response_model=None)
    def chat(body: ChatRequest, request: Request) -> Any:
        user = pick_user(caller(request), body.user)
        max_tokens = body.max_tokens if body.max_tokens is not None else body.max_completion_tokens
        if max_tokens is not None and max_tokens > limits.max_tokens:
            raise HTTPException(400, f"max_tokens over the server's limit {limits.max_tokens} (--max-tokens)")
        message = next((m.text() for m in reversed(body.messages) if m.role == "user"), "")
        if not message.strip():
            raise HTTPException(400, "the last user message must be non-empty")
        stop = [body.stop] if isinstance(body.stop, str) else body.stop
        queue.check()
        cid, created = "chatcmpl-" + uuid.uuid4().hex, int(time.time())
        kwargs = {"stop": stop, "max_new_tokens": max_tokens, "temperature": body.temperature}
        prompt_tokens = llm.count_tokens(message)
        budget = max_tokens if max_tokens is not None else limits.max_tokens

        def finish(n: int) -> str:
            return "length" if n >= budget else "stop"

        if not body.stream:
            with queue, user_lock(user):
                agent = agent_for(user)  # the same one, unless it was closed since to make room
                text = "".join(answer(agent, message, kwargs))
                used = recalled(agent)
                prompt_tokens = prompt_size(agent, message)
                kv = agent.kv_status()
            n = llm.count_tokens(text) if text else 0
            metrics.tokens += n
            return {"id": cid, "object": "chat.completion", "created": created, "model": model_name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": finish(n)}],
                    "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": n,
                              "total_tokens": prompt_tokens + n},
                    "memllm": {"user": user, "recalled": used, **({"kv": kv} if kv is not None else {})}}

        with user_lock(user):  # opened before the stream starts: a refusal (budget, a busy user) is its status
            agent_for(user)

        def events() -> Iterator[str]:
            def chunk(delta: dict, finish: str | None) -> str:
                return "data: " + json.dumps({"id": cid, "object": "chat.completion.chunk", "created": created,
                                              "model": model_name, "choices": [
                                                  {"index": 0, "delta": delta, "finish_reason": finish}]}) + "\n\n"
            def produce() -> Iterator[str]:
                with queue, user_lock(user):  # counted from the first read: a stream never read holds nothing
                    yield from answer(agent_for(user), message, kwargs)

            pieces = []
            yield chunk({"role": "assistant", "content": ""}, None)
            try:
                for piece in pieces_from_thread(produce, passthrough=(MemllmError,)):  # one thread throughout
                    pieces.append(piece)
                    yield chunk({"content": piece}, None)
            except MemllmError as exc:  # refused (memory, budget, a busy user): said as the JSON error would
                yield "data: " + json.dumps({"error": {"message": str(exc), "type": type(exc).__name__,
                                                       "code": status_of(exc)}}) + "\n\n"
                return
            except GenerationFailed:
                yield "data: " + json.dumps({"error": {"message": "generation failed: see the server log",
                                                       "type": "server_error", "code": 500}}) + "\n\n"
                return
            n = llm.count_tokens("".join(pieces)) if pieces else 0
            metrics.tokens += n
            yield chunk({}, finish(n))
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    # ---------------------------------------------------------------- memory API
    def namespace_for(request: Request, user: str) -> str:
        return user_namespace(pick_user(caller(request), user))

    def drop_session(user: str) -> None:
        with agents_lock:
            agent = agents.pop(user.strip(), None)
        if agent is not None:
            agent.close()

    def close_session(user: str) -> None:
        """Close `user`'s session once their answer (if any) ends (its kv memory is saved, its lock let
        go): for a host that moves users between servers (memllm.distributed.serve_ray), and for the
        memory API's deletes."""
        with user_lock(user.strip()):
            drop_session(user)

    app.state.close_session = close_session
    app.include_router(memory_router(store, namespace_for, close_session))
    return app
