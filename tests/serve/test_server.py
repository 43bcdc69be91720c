"""`memllm serve` (fast tier): the real openai client against a server started here; isolation by key;
JSON errors with the right statuses. Fake LLM and embedder; the server runs in its own process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args: list[str], home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MEMLLM_HOME": str(home), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "tests.serve.serve_fake", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    keys = {}
    for name, users in (("ka", ["alice"]), ("kb", ["bob", "carol"]), ("kc", ["dave"]), ("kd", ["erin"])):
        out = _run(["keys", "add", name, *sum((["--user", u] for u in users), [])], home)
        assert out.returncode == 0, out.stderr
        keys[name] = (out.stdout.strip(), users)
    stored = (home / "serve" / "keys.json").read_text()
    assert all(tok not in stored for tok, _ in keys.values())  # only hashes on disk
    port = _free_port()
    env = {**os.environ, "MEMLLM_HOME": str(home), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "tests.serve.serve_fake", "--port", str(port),
                             "--max-body", "20000", "--max-tokens", "64"], env=env, cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    else:
        os.kill(proc.pid, signal.SIGKILL)
        pytest.fail("server did not start")
    yield base, keys
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)


def test_openai_client_chat_stream_models(server):
    openai = pytest.importorskip("openai")
    base, keys = server
    client = openai.OpenAI(base_url=base + "/v1", api_key=keys["ka"][0], timeout=30)
    assert [m.id for m in client.models.list().data] == ["smollm2-135m"]
    r = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi there"}],
                                       max_tokens=16, temperature=0.5, top_p=0.9)
    assert r.choices[0].message.content and r.usage.completion_tokens > 0
    assert r.choices[0].finish_reason == "stop"
    cut = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "a b c d e f"}], max_tokens=2)
    assert cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens == 2
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="x", messages=[{"role": "user", "content": "stream please"}], stream=True, max_tokens=16)]
    assert "".join(pieces)
    h = httpx.get(base + "/v1/memory/alice/history", headers={"Authorization": f"Bearer {keys['ka'][0]}"})
    texts = [t["text"] for t in h.json()["turns"]]
    assert "hi there" in texts and "stream please" in texts
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base + "/v1", api_key="wrong", timeout=10).models.list()
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="x", messages=[{"role": "user", "content": "x"}], max_tokens=10_000)


def test_errors_are_json_with_statuses(server):
    base, keys = server
    auth = {"Authorization": f"Bearer {keys['ka'][0]}"}
    cases = [
        (httpx.post(base + "/v1/chat/completions", json={"messages": []}, headers=auth), 422),
        (httpx.post(base + "/v1/chat/completions", content=b"{", headers={**auth, "content-type": "application/json"}), 422),
        (httpx.post(base + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x" * 30000}]}, headers=auth), 413),
        (httpx.get(base + "/v1/memory/alice/records/nope", headers=auth), 404),
        (httpx.get(base + "/v1/memory/bob/records", headers=auth), 404),
        (httpx.get(base + "/v1/models"), 401),
        (httpx.get(base + "/no/such/path-123"), 404),
        (httpx.post(base + "/v1/chat/completions", content=iter([b'{"messages": []}']), headers=auth), 411),
        (httpx.put(base + "/v1/models"), 405),
    ]
    for resp, status in cases:
        assert resp.status_code == status, resp.text
        assert resp.json()["error"]["code"] == status
    text = httpx.get(base + "/metrics").text
    assert 'path="other",status="404"' in text and "path-123" not in text  # labels stay bounded


ops = st.lists(st.tuples(st.sampled_from(["add", "list", "search", "get", "forget", "export"]),
                         st.sampled_from(["ka", "kb", "kc", "bad", "none"]),
                         st.sampled_from(["alice", "bob", "carol", "dave"]),
                         st.text("abcxyz ", min_size=1, max_size=12)), min_size=1, max_size=12)


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(ops)
def test_isolation_property(server, seq):
    base, keys = server
    owner: dict[str, str] = {}  # record id -> user
    with httpx.Client(base_url=base, timeout=30) as c:
        for op, key, user, text in seq:
            headers = {} if key == "none" else {"Authorization": f"Bearer {keys[key][0] if key in keys else 'mk-bad'}"}
            allowed = key in keys and user in keys[key][1]
            u = f"/v1/memory/{user}"
            if op == "add":
                r = c.post(u + "/records", json={"text": text + "!"}, headers=headers)
            elif op in ("list", "export"):
                r = c.get(u + ("/records?limit=1000" if op == "list" else "/export"), headers=headers)
            elif op == "search":
                r = c.get(u + "/search", params={"q": text, "k": 50}, headers=headers)
            else:
                rid = next(iter(owner), "none")
                r = (c.get if op == "get" else c.delete)(f"{u}/records/{rid}", headers=headers)
            if key not in keys:
                assert r.status_code == 401
                continue
            if not allowed:
                assert r.status_code == 404
                continue
            if op == "search" and not text.strip():  # a blank query is refused, whoever asks
                assert r.status_code == 400, r.text
                continue
            assert r.status_code in (200, 201, 404), r.text
            body = r.json()
            if op == "add":
                owner[body["id"]] = user
            recs = body.get("records") or [x["record"] for x in body.get("results", [])] or (
                [body] if op == "get" and r.status_code == 200 else [])
            for rec in recs:
                assert rec["namespace"] == f"user:{user}"
            if op in ("get", "forget") and next(iter(owner), None) is not None:
                rid = next(iter(owner))
                assert (r.status_code == 200) == (owner[rid] == user) or r.status_code == 404
                if op == "forget" and r.status_code == 200:
                    assert owner.pop(rid) == user


def test_openai_message_forms_and_recall_field(server):
    base, keys = server
    # erin: a user test_isolation_property never writes for (its random records would be recalled too)
    auth = {"Authorization": f"Bearer {keys['kd'][0]}"}
    body = {"messages": [{"role": "system", "content": None},
                         {"role": "user", "content": [{"type": "text", "text": "erin likes "},
                                                      {"type": "text", "text": "tea"}]}],
            "max_completion_tokens": 8}
    r = httpx.post(base + "/v1/chat/completions", json=body, headers=auth, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"].startswith("echo: erin likes tea")
    r = httpx.post(base + "/v1/chat/completions", headers=auth, timeout=30,
                   json={"messages": [{"role": "user", "content": "what do I like?"}], "max_tokens": 8})
    assert "erin likes tea" in [x["text"] for x in r.json()["memllm"]["recalled"]]
    usage = r.json()["usage"]
    assert usage["prompt_tokens"] > len("what do I like?".split()) + len("erin likes tea".split())  # memory counted
    assert r.json()["memllm"]["user"] == "erin"
    r = httpx.post(base + "/v1/chat/completions", headers=auth, timeout=30,
                   json={"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 10_000})
    assert r.status_code == 400 and r.json()["error"]["code"] == 400


def test_a_crash_is_a_json_500_without_traceback():
    from fastapi.testclient import TestClient

    from memllm.serve.app import create_app
    from tests.fakes import FakeLLM

    class BrokenStore:
        def search(self, *args, **kwargs):
            raise RuntimeError("disk on fire at /secret/path")

    client = TestClient(create_app(FakeLLM(), BrokenStore()), raise_server_exceptions=False)
    r = client.get("/v1/memory/alice/search", params={"q": "x"})
    assert r.status_code == 500
    assert r.json()["error"]["code"] == 500 and "secret" not in r.text and "Traceback" not in r.text


def test_chats_over_the_queue_bound_get_429_with_retry_after():
    import threading

    from fastapi.testclient import TestClient

    from memllm.memory_stores.embeddings import FakeEmbedder
    from memllm.memory_stores.faiss_store import FaissStore
    from memllm.serve.app import Limits, create_app
    from tests.fakes import FakeLLM

    release, started = threading.Event(), threading.Event()

    class SlowLLM(FakeLLM):
        def chat_stream(self, messages, **kwargs):
            started.set()
            release.wait(30)
            yield from super().chat_stream(messages, **kwargs)

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        store = FaissStore(tmp + "/memory", FakeEmbedder(dim=16))
        client = TestClient(create_app(SlowLLM(), store, limits=Limits(max_queue=1)))
        body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
        first: list = []
        t = threading.Thread(target=lambda: first.append(client.post("/v1/chat/completions", json=body)))
        t.start()
        assert started.wait(30)
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 429 and r.headers["retry-after"] == "5" and r.json()["error"]["code"] == 429
        assert client.post("/v1/memory/default/records", json={"text": "not queued"}).status_code == 201
        release.set()
        t.join(30)
        assert first[0].status_code == 200
        assert client.post("/v1/chat/completions", json=body).status_code == 200  # the slot is free again
        store.close()


def test_a_stream_runs_its_generation_in_one_context():
    """Context memory sets a context variable when a generation starts and resets it at the end; the
    response's pieces are read from several worker threads, so the generation must run in one of its own."""
    import contextvars
    import tempfile

    from fastapi.testclient import TestClient

    from memllm.memory_stores.embeddings import FakeEmbedder
    from memllm.memory_stores.faiss_store import FaissStore
    from memllm.serve.app import create_app
    from tests.fakes import FakeLLM

    active = contextvars.ContextVar("active", default=None)

    class ContextLLM(FakeLLM):
        def chat_stream(self, messages, **kwargs):
            token = active.set(object())
            try:
                yield from super().chat_stream(messages, **kwargs)
            finally:
                active.reset(token)  # ValueError when another context resumes the generator

    with tempfile.TemporaryDirectory() as tmp:
        store = FaissStore(tmp + "/memory", FakeEmbedder(dim=16))
        client = TestClient(create_app(ContextLLM(), store), raise_server_exceptions=False)
        body = {"messages": [{"role": "user", "content": "one two three four"}], "max_tokens": 16, "stream": True}
        with client.stream("POST", "/v1/chat/completions", json=body) as r:
            text = "".join(r.iter_text())
        assert r.status_code == 200 and text.rstrip().endswith("data: [DONE]") and '"error"' not in text
        assert "four" in text
        store.close()
