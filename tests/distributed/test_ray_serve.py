"""`memllm serve --ray`: users routed to the replica holding their session, and their memory intact when
that replica is killed.

Fast tests: the routing rule (rendezvous hashing, sticky to a holder), the router's reading of whose
session a request touches (the same user the app serves), the in-process ASGI call (the same
responses as the app's own), the CLI's refusals. The cluster test starts a local Ray head node on
127.0.0.1 (tests/distributed/conftest.py), runs `memllm serve --ray` with 2 replicas of the tiny
random Llama in kv memory (tests/distributed/serve_ray_fake.py) in a subprocess, kills one replica's
actor with ray.kill, and stops everything by pid.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from memllm.cli.app import app
from memllm.distributed.affinity import owner
from tests.distributed.conftest import ROOT, free_port, stop_group

SERVE_START_S = 120
TURNS = ["My name is Ann and my cat is called Biscuit.", "I live in Lyon.", "What is my cat called?",
         "Where do I live?"]  # fmt: skip
runner = CliRunner()


# ----------------------------------------------------------------------------------- routing rule
def test_owner_is_sticky_to_a_holder_and_moves_only_a_lost_replicas_users():
    users = [f"user{i}" for i in range(200)]
    three = ["r1", "r2", "r3"]
    first = {u: owner(u, three) for u in users}
    assert first == {u: owner(u, list(reversed(three))) for u in users}  # the order of replicas is irrelevant
    assert set(first.values()) == set(three)  # spread over all replicas
    two = ["r1", "r3"]  # r2 went away: only its users move
    moved = {u for u in users if owner(u, two) != first[u]}
    assert moved == {u for u in users if first[u] == "r2"}
    # a new replica r4 joins: users held where they are stay there; unheld users may go to r4
    four = [*three, "r4"]
    assert all(owner(u, four, holding={first[u]}) == first[u] for u in users)
    assert any(owner(u, four) == "r4" for u in users)
    with pytest.raises(ValueError):
        owner("x", [])


def test_the_ray_router_sends_a_user_to_the_owner_only():
    import asyncio
    from types import SimpleNamespace

    pytest.importorskip("ray.serve")
    from ray.serve.request_router import ReplicaID

    from memllm.distributed.serve_router import SessionAffinityRouter

    def replica(name: str) -> SimpleNamespace:
        return SimpleNamespace(replica_id=ReplicaID(unique_id=name, deployment_id=None))

    replicas = [replica("r1"), replica("r2"), replica("r3")]
    router = SimpleNamespace(_multiplexed_model_id_to_replica_ids={"kim": {replicas[2].replica_id}})

    def choose(user: str) -> list[list[str]]:
        pending = SimpleNamespace(metadata=SimpleNamespace(multiplexed_model_id=user),
                                  routing_context=SimpleNamespace(should_backoff=False))  # fmt: skip
        ranks = asyncio.run(SessionAffinityRouter.choose_replicas(router, replicas, pending))
        assert pending.routing_context.should_backoff  # a busy owner is waited for, with backoff
        return [[r.replica_id.unique_id for r in rank] for rank in ranks]

    assert choose("kim") == [["r3"]]  # the replica that holds kim, whatever the hash says
    assert choose("lee") == [[owner("lee", ["r1", "r2", "r3"])]]  # nobody holds lee: the hash's winner alone
    assert choose("") == [["r1", "r2", "r3"]]  # no user (health, models): any replica, the least loaded


@pytest.fixture
def fake_app(tmp_path):
    from memllm.memory_stores.embeddings import FakeEmbedder
    from memllm.memory_stores.faiss_store import FaissStore
    from memllm.serve.app import create_app
    from memllm.serve.auth import KeyStore
    from tests.fakes import FakeLLM

    store = FaissStore(tmp_path / "memory", FakeEmbedder(dim=16))
    keys = KeyStore(tmp_path / "keys.json")
    token = keys.add("k", ["kim", "lee"])
    yield create_app(FakeLLM(), store, keys=keys), keys, token
    store.close()


def test_the_router_reads_the_user_the_app_serves(fake_app):
    from fastapi.testclient import TestClient

    from memllm.serve.routing import session_user

    application, keys, token = fake_app
    client = TestClient(application)
    auth = {"authorization": f"Bearer {token}"}
    msg = [{"role": "user", "content": "hi"}]
    for body, want in [({"messages": msg, "user": " lee "}, "lee"), ({"messages": msg}, "kim")]:
        raw = json.dumps(body).encode()
        r = client.post("/v1/chat/completions", content=raw, headers={**auth, "content-type": "application/json"})
        assert r.status_code == 200 and r.json()["memllm"]["user"] == want
        assert session_user("/v1/chat/completions", auth, raw, keys) == want
    assert session_user("/v1/memory/lee/history", auth, b"", keys) == "lee"
    assert client.get("/v1/memory/lee/history", headers=auth).status_code == 200
    # a user the key does not reach: the app refuses, the router holds no session for it
    assert client.get("/v1/memory/zoe/history", headers=auth).status_code == 404
    assert session_user("/v1/memory/zoe/history", auth, b"", keys) is None
    other = json.dumps({"messages": msg, "user": "zoe"}).encode()
    assert client.post("/v1/chat/completions", content=other, headers={**auth, "content-type": "application/json"}
                       ).status_code == 404  # fmt: skip
    assert session_user("/v1/chat/completions", auth, other, keys) is None
    refused = json.dumps({"messages": msg}).encode()
    assert session_user("/v1/chat/completions", {"authorization": "Bearer nope"}, refused, keys) is None
    bad_key = {"authorization": "Bearer nope", "content-type": "application/json"}
    assert client.post("/v1/chat/completions", content=refused, headers=bad_key).status_code == 401
    assert session_user("/v1/chat/completions", {}, b"{not json", keys) is None
    assert session_user("/healthz", {}, b"", keys) is None and session_user("/v1/models", auth, b"", keys) is None
    assert session_user("/v1/chat/completions", {}, json.dumps({"messages": msg}).encode(), None) == "default"


@pytest.mark.parametrize("stream", [False, True])
def test_the_in_process_asgi_call_gives_the_apps_response(fake_app, stream):
    import asyncio

    from fastapi.testclient import TestClient

    from memllm.serve.asgi_call import RawRequest, call

    application, _, token = fake_app
    def body_of(user: str) -> bytes:  # each user's first turn: the same answer
        return json.dumps({"messages": [{"role": "user", "content": "hello there"}], "stream": stream, "user": user}).encode()

    body = body_of("lee")
    headers = {"authorization": f"Bearer {token}", "content-type": "application/json", "content-length": str(len(body))}
    expected = TestClient(application).post("/v1/chat/completions", content=body_of("kim"), headers=headers)

    async def collect() -> list:
        req = RawRequest("POST", "/v1/chat/completions", headers=[(k.encode(), v.encode()) for k, v in headers.items()],
                         body=body, client=("127.0.0.1", 5000))  # fmt: skip
        return [part async for part in call(application, req)]

    start, *chunks = asyncio.run(collect())
    assert start["status"] == expected.status_code == 200
    assert dict(start["headers"])[b"content-type"].decode() == expected.headers["content-type"]
    if stream:
        assert len(chunks) > 2  # the events came piece by piece, not as one body

    def content(text: str) -> list:  # the response without its random id and time
        docs = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")] if stream else [
            json.loads(text)]  # fmt: skip
        return [{k: v for k, v in d.items() if k not in ("id", "created", "memllm")} for d in docs]

    assert content(b"".join(chunks).decode()) == content(expected.text)


def test_replicas_without_ray_and_a_missing_cluster_are_one_line(fake_llm, tmp_path):
    result = runner.invoke(app, ["serve", "--replicas", "2"])
    assert result.exit_code == 2 and result.stderr == "error: --replicas applies with --ray ADDRESS\n"
    pytest.importorskip("ray.serve")
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    result = runner.invoke(app, ["serve", "--ray", address, "--store", str(tmp_path / "s")])
    assert result.exit_code == 11 and result.stderr.startswith(f"error: no Ray cluster at {address} (")
    assert result.stderr.count("\n") == 1 and fake_llm.loaded == []


def test_serve_ray_without_ray_serve_names_the_extra(fake_llm, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray.serve", None)  # `import ray.serve` raises ImportError
    result = runner.invoke(app, ["serve", "--ray", "auto"])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: --ray needs Ray Serve with request routers (tested with ray 2.60): "
                                    "pip install -U 'memllm[ray]' (")  # fmt: skip
    assert result.stderr.count("\n") == 1 and fake_llm.loaded == []


# ----------------------------------------------------------------------------------- a real cluster
def _kill_actor(address: str, name: str, env: dict[str, str]) -> None:
    code = ("import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False, logging_level='ERROR'); "
            "ray.kill(ray.get_actor(sys.argv[2], namespace='serve'), no_restart=True)")  # fmt: skip
    subprocess.run([sys.executable, "-c", code, address, name], env=env, check=True, timeout=60, capture_output=True)


@pytest.mark.ray
def test_serve_on_ray_keeps_users_on_their_replica_and_their_memory_when_one_dies(ray_cluster, tmp_path,
                                                                                   isolated_home):  # fmt: skip
    import httpx

    pytest.importorskip("ray.serve")
    from tests.foundation.tiny_gguf import write_tiny_llama_gguf

    model = write_tiny_llama_gguf(tmp_path / "tiny.gguf", context=1024)
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), MEMLLM_HOME=str(isolated_home), RAY_USAGE_STATS_ENABLED="0")
    log_path = tmp_path / "serve.log"
    log = open(log_path, "wb")  # closed in the finally below
    server = subprocess.Popen(
        [sys.executable, "-m", "tests.distributed.serve_ray_fake", "--ray", ray_cluster, "--replicas", "2",
         "--port", str(port), "--model", str(model), "--memory", "kv", "--store", str(tmp_path / "store"),
         "--max-tokens", "6"],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVE_START_S
        while b"memllm: serving on" not in log_path.read_bytes():
            assert server.poll() is None and time.monotonic() < deadline, log_path.read_text(errors="replace")[-3000:]
            time.sleep(0.5)
        assert b"warning" not in log_path.read_bytes()  # Serve's proxy routes to memllm at the port asked
        http = httpx.Client(base_url=base, timeout=60)

        def chat(user: str, turn: int) -> tuple[str, dict]:
            """(replica, response) of the user's turn; a 503 (the user's replica just died) is retried."""
            body = {"user": user, "max_tokens": 6, "messages": [{"role": "user", "content": TURNS[turn]}]}
            for _ in range(60):
                r = http.post("/v1/chat/completions", json=body)
                if r.status_code != 503:
                    break
                time.sleep(1)
            assert r.status_code == 200, r.text
            return r.headers["x-memllm-replica"], r.json()

        # users until both replicas hold some; every user says the same, so any two can be compared
        placed: dict[str, str] = {}
        first: dict[str, dict] = {}
        for i in range(24):
            user = f"user{i}"
            placed[user], first[user] = chat(user, 0)
            if i >= 3 and len(set(placed.values())) == 2:
                break
        assert len(set(placed.values())) == 2, placed
        ids = sorted({r.rsplit("#", 1)[1] for r in placed.values()})  # the replicas' unique ids
        assert all(placed[u].endswith("#" + owner(u, ids)) for u in placed)  # memllm's router placed them
        for user in placed:  # a second turn: each user on the replica of their first
            assert chat(user, 1)[0] == placed[user]
        ann = next(iter(placed))
        killed = placed[ann]
        twin = next(u for u in placed if placed[u] != killed)  # the same conversation, on the other replica
        third = next(u for u in placed if u not in (ann, twin))  # streamed: piece by piece, from its replica
        body = {"user": third, "max_tokens": 6, "stream": True, "messages": [{"role": "user", "content": TURNS[2]}]}
        with http.stream("POST", "/v1/chat/completions", json=body) as streamed:
            assert streamed.status_code == 200 and streamed.headers["x-memllm-replica"] == placed[third]
            events = [line for line in streamed.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]" and len(events) >= 3
        assert "".join(json.loads(e[6:])["choices"][0]["delta"].get("content", "") for e in events[:-1])
        survivor = placed[twin]

        _kill_actor(ray_cluster, killed, env)
        after, answer = chat(ann, 2)
        assert after != killed
        _, reference = chat(twin, 2)  # twin's session never left its replica
        assert answer["choices"] == reference["choices"]  # ann's restored memory answers as twin's live one
        assert answer["usage"]["completion_tokens"] > 0 and answer["choices"][0]["message"]["content"]
        assert answer["memllm"]["kv"] == reference["memllm"]["kv"] and answer["memllm"]["kv"]["turns"] == 3
        again, answer = chat(ann, 3)
        assert again == after  # ann stays on the replica that took her over
        assert answer["choices"] == chat(twin, 3)[1]["choices"]

        def turns(user: str) -> list[tuple[str, str]]:
            r = http.get(f"/v1/memory/{user}/history")
            assert r.status_code == 200
            return [(t["metadata"].get("role"), t["text"]) for t in r.json()["turns"]]

        assert turns(ann) == turns(twin) and len(turns(ann)) >= 4  # text memory: every turn kept
        for user, replica in placed.items():  # the replicas that survived kept their users
            if replica == survivor:
                assert http.get(f"/v1/memory/{user}/history").headers["x-memllm-replica"] == survivor
        http.close()
        server.send_signal(15)
        assert server.wait(timeout=60) == 143  # SIGTERM: the app is deleted from Ray Serve, then it exits
    finally:
        stop_group(server, grace_s=5)
        log.close()
