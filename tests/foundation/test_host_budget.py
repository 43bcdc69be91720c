"""The host-memory budget across sessions (issue 19): a feed, a new session or a restore that would take
the sessions' host memory past the budget is refused with HostBudgetError before anything is
allocated; the server closes idle sessions (saved on disk) to make room, else answers 503."""

from __future__ import annotations

import json

import pytest

from memllm.config import MemoryConfig
from memllm.errors import ConfigError, HostBudgetError, MemoryLimitError
from memllm.host_budget import HostBudget

SMALL = MemoryConfig(n_init=4, n_local=64, block_size=16, repr_topk=2, topk=2, exc_block_size=16, chunk_size=32,
                     selector="question")  # fmt: skip
TEXT = "the quick brown fox jumps over the lazy dog. " * 40  # ~1.8K byte-level tokens: several segments


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from memllm.llm import MemLLM
    from tests.foundation.tiny_gguf import write_tiny_llama_gguf

    return MemLLM.from_pretrained(str(write_tiny_llama_gguf(tmp_path_factory.mktemp("g") / "t.gguf", context=1024)),
                                  device="cpu")  # fmt: skip


def test_budget_is_validated_once():
    assert HostBudget("2MiB").limit == 2 << 20
    for bad in (0, -1, "lots", True):
        with pytest.raises(ConfigError, match="--host-budget"):
            HostBudget(bad)


def test_feeds_and_sessions_past_the_budget_are_refused_before_allocating(tiny, tmp_path):
    one = tiny.session(SMALL)
    per_segment = sum(lay.store.segment_bytes() for lay in one.cache.layers)  # one segment in each layer
    tiny.host_budget = budget = HostBudget(3 * per_segment)
    try:
        a = tiny.session(SMALL)
        a.feed(TEXT)
        held = a.host_bytes()
        assert held > 0 and budget.used() == held and len(budget) == 1
        b = tiny.session(SMALL)
        with pytest.raises(HostBudgetError) as err:
            b.feed(TEXT)  # a holds 2 of the 3 segments' worth; b would need 2 more
        assert isinstance(err.value, MemoryLimitError) and err.value.exit_code == 8
        assert "live session(s) hold" in str(err.value) and "--host-budget" in str(err.value)
        assert b.cache.seen_tokens == 0 and b.host_bytes() == 0  # nothing read, nothing allocated
        assert budget.used() == held
        a.save(tmp_path / "a")
        with pytest.raises(HostBudgetError, match="restoring"):
            tiny.restore(str(tmp_path / "a"))  # a's units again, on top of a's own
        a.close()  # a no longer counts: b fits now
        b.feed(TEXT)
        assert b.cache.seen_tokens > 0 and budget.used() == b.host_bytes()
        tiny.host_budget = full = HostBudget(b.host_bytes())  # b fills it: no room for a new session
        full.require(b, 0, "b")
        with pytest.raises(HostBudgetError, match="a new session"):
            tiny.session(SMALL)
    finally:
        tiny.host_budget = None
    # without a budget, the same feeds pass (each session checked against the process's memory only)
    c, d = tiny.session(SMALL), tiny.session(SMALL)
    c.feed(TEXT)
    d.feed(TEXT)


def test_server_closes_idle_sessions_to_make_room_else_503(tiny, tmp_path):
    from fastapi.testclient import TestClient

    from memllm.memory_stores.embeddings import FakeEmbedder
    from memllm.memory_stores.faiss_store import FaissStore
    from memllm.serve.app import Limits, create_app

    tiny.memory = SMALL
    probe = tiny.session(SMALL)
    per_segment = sum(lay.store.segment_bytes() for lay in probe.cache.layers)
    store = FaissStore(tmp_path / "memory", FakeEmbedder(dim=16))
    try:
        tiny.host_budget = HostBudget(per_segment * 3 // 2)  # room for one user's kv memory (a segment), not two
        client = TestClient(create_app(tiny, store, memory="kv", limits=Limits(max_tokens=4)))

        def chat(user: str, text: str):
            return client.post("/v1/chat/completions", json={
                "user": user, "max_tokens": 4, "messages": [{"role": "user", "content": text}]})  # fmt: skip

        first = chat("ann", TEXT[:400])
        assert first.status_code == 200, first.text
        ann_tokens = first.json()["memllm"]["kv"]["tokens"]
        second = chat("bob", TEXT[:400])  # ann's session is closed (saved on disk) to make room for bob's
        assert second.status_code == 200, second.text
        assert len(tiny.host_budget) == 1
        again = chat("ann", "Then I went home.")  # a statement (a question leaves nothing in the kv stream); ann comes back from her snapshot (bob's session closed in turn)
        assert again.status_code == 200, again.text
        assert again.json()["memllm"]["kv"]["tokens"] > ann_tokens and again.json()["memllm"]["kv"]["turns"] == 2
        tiny.host_budget.limit = tiny.host_budget.used()  # lowered to what ann holds: her next turn does not fit
        streamed = client.post("/v1/chat/completions", json={
            "user": "ann", "max_tokens": 4, "stream": True, "messages": [{"role": "user", "content": TEXT[:900]}]})  # fmt: skip
        events = [json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: {")]
        assert streamed.status_code == 200 and events[-1]["error"]["type"] == "HostBudgetError"
        assert events[-1]["error"]["code"] == 503 and "--host-budget" in events[-1]["error"]["message"]
        # the refused turn left nothing in her memory: a short one that fits is her third
        assert chat("ann", "still there?").json()["memllm"]["kv"]["turns"] == 3
        tiny.host_budget = HostBudget(per_segment // 2)  # not even one user's memory fits
        refused = chat("cy", TEXT[:400])
        assert refused.status_code == 503 and refused.headers["retry-after"] == "5"
        assert refused.json()["error"]["type"] == "HostBudgetError"
        assert "--host-budget" in refused.json()["error"]["message"]
    finally:
        tiny.host_budget = None
        tiny.memory = None
        store.close()


def test_serve_refuses_a_bad_budget_before_loading_the_model(fake_llm):
    from typer.testing import CliRunner

    from memllm.cli.app import app

    result = CliRunner().invoke(app, ["serve", "--host-budget", "lots"])
    assert result.exit_code == 2
    assert result.stderr == ("error: --host-budget='lots' is not a size: use e.g. 2GiB, 512MiB or a number of "
                             "bytes\n")  # fmt: skip
    assert fake_llm.loaded == []
