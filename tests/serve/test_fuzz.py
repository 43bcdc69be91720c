"""Fuzzed requests (fast tier): schemathesis generates requests from the server's own OpenAPI spec, for
every operation, bounded in examples; no answer is a 5xx, and every error is the JSON error object with its
status. The app runs in-process (ASGI) over a fake LLM and a real store with a fake embedder."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable

schemathesis = pytest.importorskip("schemathesis")
from schemathesis import GenerationMode  # noqa: E402

EXAMPLES = 10  # per operation and mode (chat: 5x, few random chats pass its checks); ~340 requests in all


@pytest.fixture(scope="module")
def schema(tmp_path_factory):
    from memllm.memory_stores.embeddings import FakeEmbedder
    from memllm.memory_stores.faiss_store import FaissStore
    from memllm.serve.app import Limits, create_app
    from tests.fakes import FakeLLM

    store = FaissStore(tmp_path_factory.mktemp("fuzz") / "memory", FakeEmbedder(dim=64))
    app = create_app(FakeLLM(), store, model_name="fake", limits=Limits(max_tokens=64, max_body_bytes=20_000))
    yield schemathesis.openapi.from_asgi("/openapi.json", app)
    store.close()


def test_no_server_error_on_fuzzed_requests(schema):
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 12  # chat, models, the memory API, health, metrics
    seen: dict[str, set[int]] = {}
    unbreakable: list[str] = []
    def fuzz(op, mode) -> None:
        @settings(max_examples=EXAMPLES * (5 if op.label == "POST /v1/chat/completions" else 1), deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy(generation_mode=mode))
        def run(case) -> None:
            resp = case.call()
            seen.setdefault(f"{mode} {op.label}", set()).add(resp.status_code)
            assert resp.status_code < 500, f"{op.label}: {resp.status_code} {resp.text[:500]}"
            if resp.status_code >= 400:
                err = resp.json().get("error") or pytest.fail(f"{op.label} {case.method} {case.path} {case.body!r}: {resp.status_code} {resp.text[:300]}")
                assert err["code"] == resp.status_code and err["message"], resp.text[:500]
                assert "Traceback" not in resp.text

        run()

    for op in operations:
        fuzz(op, GenerationMode.POSITIVE)  # requests that fit the spec
        try:
            fuzz(op, GenerationMode.NEGATIVE)  # requests that do not
        except Unsatisfiable:
            unbreakable.append(op.label)  # every input fits (no body or query; string path parameters)
    print(sorted((k, sorted(v)) for k, v in seen.items()))
    assert not any(label.startswith("POST") for label in unbreakable)
    # Random chats that pass every check (a non-empty last user message, max_tokens <= 64) are luck: which
    # examples come depends on hypothesis's seed, so the accepted path is checked with one valid request.
    (chat,) = [op for op in operations if op.label == "POST /v1/chat/completions"]
    body = {"model": "fake", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}
    ok = chat.Case(body=body, media_type="application/json").call()
    assert ok.status_code == 200, ok.text[:500]
    assert ok.json()["choices"][0]["message"]["role"] == "assistant"
