"""`slow` tier: the real `openai` client and LangChain's `ChatOpenAI` against `memllm serve` on the default
model (CPU). Chat, streaming, and a fact told in one request recalled in a later one for the same user,
after the server restarts on the same store; another user of the same key does not get it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.serve.server_proc import ROOT, start, stop

pytestmark = pytest.mark.slow

FACT = "My cat is called Pixel."
QUESTION = "What is the name of my cat?"


def _recalled(resp) -> list[str]:
    return [r["text"] for r in resp.model_extra["memllm"]["recalled"]]


def test_openai_and_langchain_clients(tmp_path):
    openai = pytest.importorskip("openai")
    lc_openai = pytest.importorskip("langchain_openai")
    keys = tmp_path / "keys.json"
    out = subprocess.run([sys.executable, "-m", "memllm.cli.app", "serve", "keys", "add", "laptop", "--user", "yan",
                          "--user", "xavier", "--keys", str(keys)], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    key = out.stdout.strip()
    args = ["--store", str(tmp_path / "memory"), "--keys", str(keys), "--max-tokens", "32"]

    proc, base = start(args, fake=False, timeout=240)
    try:
        client = openai.OpenAI(base_url=base + "/v1", api_key=key, timeout=120, max_retries=0)
        assert [m.id for m in client.models.list().data] == ["smollm2-135m"]
        r = client.chat.completions.create(model="smollm2-135m", user="yan", max_tokens=24,
                                           messages=[{"role": "user", "content": FACT}])
        assert r.choices[0].message.content.strip()
        assert r.usage.completion_tokens > 0 and r.usage.prompt_tokens > 0
        pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="smollm2-135m", user="xavier", max_tokens=16, stream=True,
            messages=[{"role": "user", "content": "Say hello."}])]
        assert len([p for p in pieces if p]) > 1 and "".join(pieces).strip()
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base + "/v1", api_key="mk-wrong", max_retries=0).models.list()
    finally:
        stop(proc)

    proc, base = start(args, fake=False, timeout=240)  # the same store, a new process
    try:
        client = openai.OpenAI(base_url=base + "/v1", api_key=key, timeout=120, max_retries=0)
        r = client.chat.completions.create(model="smollm2-135m", user="yan", max_tokens=24,
                                           messages=[{"role": "user", "content": QUESTION}])
        assert FACT in _recalled(r)  # the fact is in the prompt of the later request
        other = client.chat.completions.create(model="smollm2-135m", user="xavier", max_tokens=24,
                                               messages=[{"role": "user", "content": QUESTION}])
        assert not any("Pixel" in t for t in _recalled(other)) and "Pixel" not in other.choices[0].message.content

        chat = lc_openai.ChatOpenAI(base_url=base + "/v1", api_key=key, model="smollm2-135m", max_tokens=24,
                                    temperature=0, timeout=120, max_retries=0, model_kwargs={"user": "yan"})
        answer = chat.invoke(QUESTION)
        assert "Pixel" in answer.content  # greedy decoding of the default model, fact recalled from memory
        assert answer.response_metadata["token_usage"]["completion_tokens"] > 0
        chunks = [c.content for c in chat.stream("Say hello in one word.")]
        assert len([c for c in chunks if c]) > 1 and "".join(chunks).strip()
    finally:
        stop(proc)
