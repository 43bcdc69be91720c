"""EngineThread (memllm.engine_thread): turns of many sessions, queued from other threads, are batched
in one thread's steps and each gives what Session.generate gives alone; a reader that stops early
takes its turn out; errors reach the readers; the model lock is held for every model call."""

from __future__ import annotations

import threading

import pytest
import torch

from memllm.engine import BatchEngine
from memllm.engine_thread import EngineThread
from memllm.errors import InputError
from memllm.generation import RepetitionGuard
from memllm.session import Session
from tests.context.helpers import CharTokenizer, FakeLLM, small_memory, tiny_model

TEXT = "".join(
    chr(33 + c) for c in torch.randint(0, 90, (400,), generator=torch.Generator().manual_seed(11)).tolist()
)
LENGTHS = [30, 120, 400]  # inside the window, past it, well past it (n_init + n_local = 52)
PROMPTS = ["abc?", "What is it", "zz"]
NEW = 10


@pytest.fixture(scope="module")
def llm():
    return FakeLLM(tiny_model("llama", layers=2), CharTokenizer())


def fed(llm, n: int, **mem) -> Session:
    s = Session(llm, small_memory(**mem))
    s.feed(TEXT[:n])
    return s


def alone(llm, guard=None, new=NEW) -> list[str]:
    out = []
    for n, p in zip(LENGTHS, PROMPTS, strict=True):
        s = fed(llm, n)
        out.append("".join(s.generate(s.encode(p), max_new_tokens=new, guard=guard, query=p)))
    return out


def test_turns_from_threads_are_batched_and_equal_each_alone(llm):
    want = alone(llm)
    lock = threading.RLock()
    worker = EngineThread(llm, lock)
    try:
        sessions = [fed(llm, n) for n in LENGTHS]
        with lock:  # the thread waits on the lock at its first join: every turn is queued before a step
            readers = [worker.generate(s, s.encode(p), NEW, query=p) for s, p in zip(sessions, PROMPTS, strict=True)]
        got = [None] * len(readers)

        def read(i):
            got[i] = "".join(readers[i])

        threads = [threading.Thread(target=read, args=(i,)) for i in range(len(readers))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert got == want
        stats = worker.stats()
        assert stats["turns"] == 3 and stats["prefill_calls"] >= 1
        assert stats["batch_rows"] >= 2 * stats["steps"] > 0  # the turns stepped together
        # each session holds what its turn generated, as after Session.generate: a next turn alone agrees
        ref = [fed(llm, n) for n in LENGTHS]
        for r, p in zip(ref, PROMPTS, strict=True):
            "".join(r.generate(r.encode(p), max_new_tokens=NEW, query=p))
        for s, r in zip(sessions, ref, strict=True):
            assert s.cache.seen_tokens == r.cache.seen_tokens
            assert torch.allclose(s.last_logits, r.last_logits, rtol=1e-4, atol=1e-4)
    finally:
        worker.close()


def test_guard_applies_per_turn_as_in_session_generate(llm):
    guard = RepetitionGuard(3.0, 1)
    want = alone(llm, guard, 40)
    assert want != alone(llm, None, 40)  # the guard changes these answers: the test sees it
    lock = threading.Lock()
    worker = EngineThread(llm, lock)
    try:
        sessions = [fed(llm, n) for n in LENGTHS]
        with lock:
            readers = [worker.generate(s, s.encode(p), 40, guard=guard, query=p)
                       for s, p in zip(sessions, PROMPTS, strict=True)]  # fmt: skip
        assert ["".join(r) for r in readers] == want
    finally:
        worker.close()


def test_a_reader_that_stops_early_takes_its_turn_out(llm):
    worker = EngineThread(llm, threading.Lock())
    try:
        s = fed(llm, 120)
        seen = s.cache.seen_tokens
        pieces = worker.generate(s, s.encode("abc"), 50)
        first = next(pieces)
        pieces.close()  # returns once the thread let go of the session
        assert first
        assert not any(e.active for e in worker.engines.values())
        assert seen + 3 < s.cache.seen_tokens < seen + 3 + 50  # the prompt and what was generated stay
        # the session is the caller's again, and the next turn runs
        assert "".join(worker.generate(s, s.encode("x"), 4))
    finally:
        worker.close()


def test_a_join_error_reaches_its_reader_only(llm):
    lock = threading.Lock()
    worker = EngineThread(llm, lock)
    try:
        s, t = fed(llm, 120), fed(llm, 30)
        with lock:
            ok = worker.generate(s, s.encode("abc"), 6)
            twice = worker.generate(s, s.encode("abc"), 6)  # the same session while it generates
            other = worker.generate(t, t.encode("q"), 6)
        with pytest.raises(InputError, match="already generating"):
            list(twice)
        assert "".join(ok) and "".join(other)
    finally:
        worker.close()


def test_a_failed_step_ends_every_turn_of_its_engine_with_the_error(llm, monkeypatch):
    lock = threading.Lock()
    worker = EngineThread(llm, lock)
    try:
        def boom(self):
            raise RuntimeError("the model failed")

        monkeypatch.setattr(BatchEngine, "step", boom)
        a, b = fed(llm, 120), fed(llm, 400)
        with lock:
            readers = [worker.generate(a, a.encode("x"), 5), worker.generate(b, b.encode("y"), 5)]
        for r in readers:
            with pytest.raises(RuntimeError, match="the model failed"):
                list(r)
        assert not any(e.active for e in worker.engines.values())
        monkeypatch.undo()
        assert "".join(worker.generate(a, a.encode("x"), 3))  # the thread goes on
    finally:
        worker.close()


def test_every_model_call_holds_the_lock(llm):
    class Counting:
        def __init__(self):
            self.lock, self.held = threading.Lock(), 0

        def __enter__(self):
            self.lock.acquire()
            self.held += 1

        def __exit__(self, *exc):
            self.held -= 1
            self.lock.release()

    lock = Counting()
    calls = []
    sessions = [fed(llm, n) for n in LENGTHS]
    hook = llm.model.register_forward_pre_hook(lambda m, a: calls.append(lock.held))
    worker = EngineThread(llm, lock)
    try:
        with lock:
            readers = [worker.generate(s, s.encode(p), 4) for s, p in zip(sessions, PROMPTS, strict=True)]
        for r in readers:
            "".join(r)
        assert calls and all(h == 1 for h in calls)
    finally:
        hook.remove()
        worker.close()


def test_sessions_of_other_settings_get_their_own_engine(llm):
    worker = EngineThread(llm, threading.Lock())
    try:
        a, b = fed(llm, 120), fed(llm, 120, topk=2)
        want_b = "".join(fed(llm, 120, topk=2).generate(b.encode("q"), max_new_tokens=5))
        got = [worker.generate(a, a.encode("q"), 5), worker.generate(b, b.encode("q"), 5)]
        assert "".join(got[0]) and "".join(got[1]) == want_b
        assert len(worker.engines) == 2
    finally:
        worker.close()


def test_a_closed_thread_refuses_new_turns(llm):
    from memllm.errors import ConfigError

    worker = EngineThread(llm, threading.Lock())
    worker.close()
    s = fed(llm, 30)
    with pytest.raises(ConfigError, match="closed"):
        worker.generate(s, s.encode("x"), 3)
