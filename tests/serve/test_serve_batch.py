"""`memllm serve` with kv memory decodes the users' answers together (issue 19: memllm.engine_thread):
concurrent chats of several users are stepped in shared model calls and answer exactly as the same
chats served one at a time (`Limits(batch=False)`); each user's kv memory ends the same; /metrics
counts the batched steps; a user's second request waits for their first, never joins beside it."""

from __future__ import annotations

import threading
import time

import pytest

from memllm.config import MemoryConfig

SMALL = MemoryConfig(n_init=4, n_local=64, block_size=16, repr_topk=2, topk=2, exc_block_size=16, chunk_size=32,
                     selector="question")  # fmt: skip
USERS = ["ann", "bob", "cy", "dee"]
SAID = {  # statements stay in the kv stream: every user's memory differs before the question
    "ann": "I keep my bike in the red shed behind the school.",
    "bob": "My sister Nora moved to Bergen last spring, and the weather there is wet. " * 4,
    "cy": "The locker code is 4417.",
    "dee": "We planted tomatoes, beans and three rows of onions in May. " * 9,
}
ASK = "What did I tell you?"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from memllm.llm import MemLLM
    from tests.foundation.tiny_gguf import write_tiny_llama_gguf

    llm = MemLLM.from_pretrained(str(write_tiny_llama_gguf(tmp_path_factory.mktemp("g") / "t.gguf", context=1024)),
                                 device="cpu")  # fmt: skip
    llm.memory = SMALL
    return llm


def serve(tiny, path, batch: bool, memory: str = "kv"):
    from fastapi.testclient import TestClient

    from memllm.memory_stores.embeddings import FakeEmbedder
    from memllm.memory_stores.faiss_store import FaissStore
    from memllm.serve.app import Limits, create_app

    store = FaissStore(path, FakeEmbedder(dim=16))
    app = create_app(tiny, store, memory=memory, limits=Limits(max_tokens=12, batch=batch))
    return TestClient(app), app, store


def chat(client, user: str, text: str) -> dict:
    r = client.post("/v1/chat/completions", json={
        "user": user, "max_tokens": 12, "messages": [{"role": "user", "content": text}]})  # fmt: skip
    assert r.status_code == 200, r.text
    return r.json()


def answers(body: dict) -> tuple[str, dict]:
    return body["choices"][0]["message"]["content"], body["memllm"]["kv"]


def test_concurrent_kv_chats_are_batched_and_answer_as_one_at_a_time(tiny, tmp_path):
    client, app, store = serve(tiny, tmp_path / "one", batch=False)
    try:
        assert app.state.engine is None
        for u in USERS:
            chat(client, u, SAID[u])
        want = {u: answers(chat(client, u, ASK)) for u in USERS}
    finally:
        store.close()

    client, app, store = serve(tiny, tmp_path / "many", batch=True)
    engine = app.state.engine
    try:
        for u in USERS:
            chat(client, u, SAID[u])
        before = engine.stats()
        got: dict[str, tuple] = {}

        def ask(u: str) -> None:
            got[u] = answers(chat(client, u, ASK))

        threads = [threading.Thread(target=ask, args=(u,)) for u in USERS]
        with app.state.model_lock:  # no step until every user's turn is queued: they join one batch
            for t in threads:
                t.start()
            end = time.monotonic() + 60
            while engine.submitted < before["turns"] + len(USERS) and time.monotonic() < end:
                time.sleep(0.01)
        for t in threads:
            t.join(120)
        assert got == want and sum(bool(a) for a, _ in want.values()) >= 3, want
        after = engine.stats()
        steps, rows = after["steps"] - before["steps"], after["batch_rows"] - before["batch_rows"]
        assert steps > 0 and rows >= 2 * steps  # several users' tokens in each batched model call
        assert after["prefill_calls"] > before["prefill_calls"]  # their prompts fed together
        text = client.get("/metrics").text
        assert f"memllm_engine_batch_rows_total {after['batch_rows']}" in text
    finally:
        store.close()


def test_a_users_second_request_waits_for_the_first(tiny, tmp_path):
    client, app, store = serve(tiny, tmp_path / "m", batch=True)
    try:
        chat(client, "ann", SAID["ann"])
        out: list[dict] = []
        threads = [threading.Thread(target=lambda: out.append(chat(client, "ann", ASK))) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert len(out) == 2  # neither refused ("already generating"): the second ran after the first
        assert sorted(o["memllm"]["kv"]["turns"] for o in out) == [2, 3]
        assert app.state.busy_users() == []  # a user's lock lives only while a request holds or waits for it
    finally:
        store.close()


def test_a_user_is_busy_while_answering_and_forgotten_after(tiny, tmp_path):
    client, app, store = serve(tiny, tmp_path / "b", batch=True)
    try:
        seen: list[list[str]] = []
        t = threading.Thread(target=lambda: chat(client, "bob", SAID["bob"]))
        with app.state.model_lock:  # bob's answer waits for the model: he is busy until it ends
            t.start()
            end = time.monotonic() + 60
            while not app.state.busy_users() and time.monotonic() < end:
                time.sleep(0.01)
            seen.append(app.state.busy_users())
        t.join(120)
        for i in range(30):  # many users come and go: nothing is kept per user once they are answered
            chat(client, f"u{i}", "hello")
        assert seen == [["bob"]]
        assert app.state.busy_users() == []
    finally:
        store.close()


def test_streamed_kv_answers_batch_too_and_equal_the_plain_ones(tiny, tmp_path):
    import json

    client, app, store = serve(tiny, tmp_path / "s", batch=True)
    try:
        for u in USERS[:2]:
            chat(client, u, SAID[u])
        want = {}
        for u in USERS[:2]:  # the same question twice: a question leaves nothing in the kv stream
            want[u] = answers(chat(client, u, ASK))[0]
        got: dict[str, str] = {}

        def stream(u: str) -> None:
            r = client.post("/v1/chat/completions", json={
                "user": u, "max_tokens": 12, "stream": True, "messages": [{"role": "user", "content": ASK}]})  # fmt: skip
            events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
            got[u] = "".join(e["choices"][0]["delta"].get("content", "") for e in events)

        before = app.state.engine.stats()
        threads = [threading.Thread(target=stream, args=(u,)) for u in USERS[:2]]
        with app.state.model_lock:
            for t in threads:
                t.start()
            end = time.monotonic() + 60
            while app.state.engine.submitted < before["turns"] + 2 and time.monotonic() < end:
                time.sleep(0.01)
        for t in threads:
            t.join(120)
        assert got == want
        assert app.state.engine.stats()["batch_rows"] > before["batch_rows"]
    finally:
        store.close()


def test_text_mode_answers_batch_and_equal_the_models_own(tiny, tmp_path):
    """Text memory (the default): the users' greedy answers from their prompts decode together, each
    through a session whose window holds the whole context (EngineThread.generate_text), and they are
    the answers llm.chat_stream gives one at a time (`Limits(batch=False)`). The first of them, with
    nothing to batch with, is the model's own; every session made for an answer is closed after it."""
    users = USERS[:3]
    questions = {u: SAID[u] + " Where is it?" for u in users}
    client, app, store = serve(tiny, tmp_path / "one", batch=False, memory="text")
    try:
        assert app.state.engine is None
        want = {u: answers_text(chat(client, u, questions[u])) for u in users}
    finally:
        store.close()

    client, app, store = serve(tiny, tmp_path / "many", batch=True, memory="text")
    engine = app.state.engine
    try:
        got: dict[str, str] = {}

        def ask(u: str) -> None:
            got[u] = answers_text(chat(client, u, questions[u]))

        threads = [threading.Thread(target=ask, args=(u,)) for u in users]
        with app.state.model_lock:  # nothing generates until every user's answer has started
            for t in threads:
                t.start()
            end = time.monotonic() + 60
            while engine.outstanding < len(users) and time.monotonic() < end:
                time.sleep(0.01)
        for t in threads:
            t.join(120)
        assert got == want and sum(bool(a) for a in want.values()) >= 2, want
        stats = engine.stats()
        assert stats["text_replies"] == len(users) and stats["text_alone"] == 1 and stats["turns"] == len(users) - 1
        assert stats["batch_rows"] >= 2 * stats["steps"] > 0  # the other two decoded together
        assert engine.outstanding == 0 and all(not e.active for e in engine.engines.values())
    finally:
        store.close()


def answers_text(body: dict) -> str:
    return body["choices"][0]["message"]["content"]


def test_a_text_reply_alone_or_too_long_is_the_models_own(tiny):
    """generate_text with nothing else outstanding, or with prompt and reply longer than its sessions'
    window: llm.reply_stream's reply, no engine step."""
    from memllm.engine_thread import EngineThread, text_memory

    cfg = text_memory(tiny)
    assert cfg.topk == 0 and cfg.exact_tokens() == tiny.trained_len - cfg.exc_block_size - 1
    engine = EngineThread(tiny, threading.RLock())
    try:
        ids = tiny.chat_ids([{"role": "user", "content": SAID["cy"]}], 12)
        want = "".join(tiny.reply_stream(ids, max_new_tokens=12))
        assert want and "".join(engine.generate_text(ids, 12)) == want
        long = (ids * (cfg.exact_tokens() // len(ids) + 1))[: cfg.exact_tokens()]
        engine.outstanding += 1  # as if another user's reply were generating
        assert "".join(engine.generate_text(long, 12)) == "".join(tiny.reply_stream(long, max_new_tokens=12))
        engine.outstanding -= 1
        stats = engine.stats()
        assert stats["text_replies"] == stats["text_alone"] == 2 and stats["steps"] == stats["turns"] == 0
    finally:
        engine.close()


def test_a_batched_text_reply_starts_from_the_recalled_fact_as_chat_stream_does(tiny, tmp_path):
    """A question a recalled fact answers: the reply through the engine (another reply outstanding, so
    it is decoded in a session of its own) starts with the same answer_prefix and goes on as
    chat_stream's does."""
    from memllm.agents.chat import ChatAgent
    from memllm.engine_thread import EngineThread
    from memllm.memory_stores.embeddings import FakeEmbedder
    from memllm.memory_stores.faiss_store import FaissStore

    lock = threading.RLock()
    engine = EngineThread(tiny, lock)
    got = []
    try:
        for name, gen in (("own", None), ("engine", engine.generate_text)):
            store = FaissStore(tmp_path / name, FakeEmbedder(dim=16))
            try:
                ChatAgent(tiny, store, user="ann", max_new_tokens=8, summarize=False).chat("My locker code is 4417.")
                later = ChatAgent(tiny, store, user="ann", max_new_tokens=8, summarize=False, model_lock=lock,
                                  text_generate=gen)  # fmt: skip
                if gen is not None:
                    engine.outstanding += 1  # as if another user's reply were generating
                got.append((later.chat("What is my locker code?"), later.answer_fact is not None))
                if gen is not None:
                    engine.outstanding -= 1
            finally:
                store.close()
        stats = engine.stats()
    finally:
        engine.close()
    assert got[0] == got[1] and got[0][1] and got[0][0].startswith("Your locker code is 4417"), got
    assert stats["text_replies"] == 1 and stats["text_alone"] == 0 and stats["turns"] == 1  # through the engine
