"""EngineThread: one thread steps BatchEngines for callers in other threads (memllm serve's chats).

`worker = EngineThread(llm, lock)`; `pieces = worker.generate(session, ids, max_new_tokens, guard=,
query=)` queues the session's turn at once and returns an iterator of its text pieces, filled as the
thread's steps make them (`generate_text(ids, ...)`: the same for a prompt with no session of its own,
a text-mode chat's, through a session made for it whose window holds the whole context, when there are
other turns to decode it with): every turn waiting or generating joins the same steps (continuous
batching, memllm.engine), one BatchEngine per MemoryConfig (sessions of one engine share one). Every model call
the thread makes holds `lock`, one step at a time, so whoever else uses the model (a text-mode answer,
a turn being closed) takes the lock between steps: the model is never called from two threads at
once (attach switches the model's attention implementation for as long as a call lasts).

A reader that stops early (closes the iterator, or is garbage-collected) takes its turn out before
the next step and waits until it is out: the session is then the caller's again, as after
Session.generate. An error of one turn's join (InputError, HostBudgetError...) is raised to that
turn's reader; an error inside a step ends every turn of that engine and is raised to each reader
(each caller rolls its own session back). Knows nothing of HTTP or chat.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from typing import Any

from memllm.config import MemoryConfig
from memllm.engine import BatchEngine, Request
from memllm.errors import ConfigError
from memllm.generation import RepetitionGuard

log = logging.getLogger("memllm.engine")
_END = object()  # a turn's last item: its request ended


def text_memory(llm: Any) -> MemoryConfig:
    """The MemoryConfig of generate_text's sessions: the model's own settings with the longest window
    its context allows beside one execution block (fed in chunks of at most exc_block_size tokens), no
    units read (topk 0: nothing is cut) and no text selector."""
    cfg = (llm.memory or MemoryConfig()).resolved(llm.trained_len)
    n_local = llm.trained_len - cfg.n_init - cfg.block_size - cfg.exc_block_size
    chunk = min(cfg.chunk_size, cfg.exc_block_size)
    return replace(cfg, n_local=n_local, chunk_size=chunk, topk=0, selector="infllm")


@dataclass(eq=False)
class _Turn:
    session: Any
    ids: list[int]
    max_new_tokens: int
    guard: RepetitionGuard | None
    query: str | None
    out: queue.Queue = field(default_factory=queue.Queue)  # text pieces, then _END or an exception
    request: Request | None = None
    engine: BatchEngine | None = None
    ended: bool = False
    left: threading.Event = field(default_factory=threading.Event)  # set once the thread let go of it


@dataclass(eq=False)
class _Leave:
    turn: _Turn


class EngineThread:
    """Continuous batching of memory sessions for callers in many threads (one daemon thread)."""

    def __init__(self, llm: Any, lock: AbstractContextManager, impl: str = "fast") -> None:
        BatchEngine(llm, impl)  # checks impl now, not in the thread
        self.llm, self.lock, self.impl = llm, lock, impl
        self.engines: dict[Any, BatchEngine] = {}  # MemoryConfig -> its engine
        self.submitted = 0  # turns queued so far (callers' threads count them: _count)
        self.outstanding = 0  # generate_text's replies being read (kv turns: the inbox and _turns)
        self.text_replies = 0  # generate_text's replies, and those of them the model made alone
        self.text_alone = 0
        self._count = threading.Lock()
        self._inbox: queue.Queue = queue.Queue()
        self._turns: dict[int, _Turn] = {}  # id(request) -> its turn, while it generates
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="memllm-engine", daemon=True)
        self._thread.start()

    # ---- callers' side ---------------------------------------------------------------------------
    def generate(
        self,
        session: Any,
        ids: list[int],
        max_new_tokens: int,
        guard: RepetitionGuard | None = None,
        query: str | None = None,
    ) -> Iterator[str]:
        """Queue `session`'s turn (prompt `ids`, greedy, up to max_new_tokens; as
        Session.generate(ids, max_new_tokens, guard=, query=)) now; iterate for its text pieces."""
        return self._read(self._queue(session, ids, max_new_tokens, guard, query))

    def _queue(self, session: Any, ids: list[int], max_new_tokens: int, guard: Any, query: str | None) -> _Turn:
        if self._closed or not self._thread.is_alive():
            raise ConfigError("the engine thread is closed: make a new EngineThread")
        turn = _Turn(session, list(ids), max_new_tokens, guard, query)
        with self._count:
            self.submitted += 1
        self._inbox.put(turn)
        return turn

    def generate_text(
        self, ids: list[int], max_new_tokens: int, guard: RepetitionGuard | None = None
    ) -> Iterator[str]:
        """The greedy reply to a rendered prompt `ids` that has no memory stream of its own (a text-mode
        chat's): its text pieces. With other turns queued or generating, it is decoded with them through
        a session made for it whose window holds prompt and reply (`text_memory`: nothing is cut into
        units, so it attends to every token as the model itself does), closed when the reply ends or its
        reader stops. Alone, or too long for that window, it is the model's own (llm.reply_stream,
        holding the lock for the whole reply): batching a reply with nothing buys nothing."""
        cfg = text_memory(self.llm)
        with self._count:
            company = self.outstanding > 0 or bool(self._turns) or not self._inbox.empty()
            alone = not company or len(ids) + max_new_tokens > cfg.exact_tokens()
            self.outstanding += 1
            self.text_replies += 1
            self.text_alone += alone
        try:
            if alone:
                with self.lock:
                    yield from self.llm.reply_stream(ids, max_new_tokens=max_new_tokens, guard=guard)
                return
            session = self.llm.session(cfg)
            try:
                yield from self._read(self._queue(session, ids, max_new_tokens, guard, None))
            finally:
                session.close()
        finally:
            with self._count:
                self.outstanding -= 1

    def _read(self, turn: _Turn) -> Iterator[str]:
        try:
            while True:
                try:
                    item = turn.out.get(timeout=1.0)
                except queue.Empty:
                    if not self._thread.is_alive():
                        raise RuntimeError("the engine thread stopped") from None
                    continue
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            if not turn.ended and self._thread.is_alive():
                self._inbox.put(_Leave(turn))  # stopped reading early: out before the next step
                while not turn.left.wait(1.0) and self._thread.is_alive():
                    pass

    def close(self, timeout: float = 10.0) -> None:
        """Stop the thread once no turn is left (turns still generating end as "left")."""
        self._closed = True
        self._inbox.put(None)
        self._thread.join(timeout)

    def stats(self) -> dict[str, int]:
        """Batched model calls, session-steps in them, and prompts fed together, over all engines."""
        engines = list(self.engines.values())
        return {
            "turns": self.submitted,
            "steps": sum(e.steps for e in engines),
            "batch_rows": sum(e.batch_rows for e in engines),
            "prefill_calls": sum(e.prefill_calls for e in engines),
            "text_replies": self.text_replies,
            "text_alone": self.text_alone,
        }

    # ---- the thread ------------------------------------------------------------------------------
    def _active(self) -> bool:
        return any(e.active for e in self.engines.values())

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # a bug here: every reader is told, none waits for ever
            log.error("the engine thread failed", exc_info=exc)
            for turn in list(self._turns.values()):
                self._end(turn, exc)
            raise

    def _loop(self) -> None:
        while True:
            item = self._inbox.get() if not self._active() else None
            items = [item] if item is not None else []
            while True:  # everything queued since: they join this step
                try:
                    items.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            if self._closed and not self._active() and all(i is None for i in items):
                return
            for it in items:
                if isinstance(it, _Leave):
                    self._leave(it.turn)
                elif isinstance(it, _Turn):
                    self._join(it)
            if self._closed:
                for turn in list(self._turns.values()):
                    self._leave(turn)
                return
            for engine in list(self.engines.values()):
                if engine.active:
                    self._step(engine)

    def _engine_of(self, session: Any) -> BatchEngine:
        cfg = session.cache.config
        if cfg not in self.engines:
            self.engines[cfg] = BatchEngine(self.llm, self.impl)
        return self.engines[cfg]

    def _join(self, turn: _Turn) -> None:
        try:
            engine = self._engine_of(turn.session)
            with self.lock:  # the "question" selector's probe is a model call
                req = engine.join(turn.session, turn.ids, turn.max_new_tokens, query=turn.query, guard=turn.guard)
        except Exception as exc:  # noqa: BLE001 -- raised to the caller, where it reads (its session, its budget)
            self._end(turn, exc)
            return
        turn.request, turn.engine = req, engine
        self._turns[id(req)] = turn

    def _leave(self, turn: _Turn) -> None:
        if turn.request is not None and turn.engine is not None and not turn.request.done:
            with self.lock:
                turn.engine.leave(turn.request)
        self._end(turn, _END)

    def _end(self, turn: _Turn, last: object) -> None:
        if turn.request is not None:
            self._turns.pop(id(turn.request), None)
        if not turn.ended:
            turn.ended = True
            turn.out.put(last)
        turn.left.set()

    def _step(self, engine: BatchEngine) -> None:
        try:
            with self.lock:
                events = engine.step()
        except Exception as exc:  # inside the model: every turn of this engine ends with it
            log.error("a batched step failed; its %d turns end", len(engine.active), exc_info=exc)
            for req in list(engine.active):
                with self.lock:
                    engine.leave(req)
            for turn in [t for t in self._turns.values() if t.engine is engine]:
                self._end(turn, exc)
            return
        for ev in events:
            turn = self._turns.get(id(ev.request))
            if turn is not None and ev.piece:
                turn.out.put(ev.piece)
        for turn in [t for t in self._turns.values() if t.engine is engine and t.request.done]:
            self._end(turn, _END)
