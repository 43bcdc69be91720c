"""Fixtures for foundation tests: a tiny GGUF written once per session, and a fake LLM for the CLI."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.foundation.tiny_gguf import write_tiny_llama_gguf


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory):
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf")


class FakeLLM:
    """Echoes the last user message and the number of messages it saw, streamed word by word."""

    def __init__(self) -> None:
        self.calls: list[list[dict[str, str]]] = []

    def chat_stream(self, messages, *, max_new_tokens=256, temperature=0.0, seed=None) -> Iterator[str]:
        self.calls.append([dict(m) for m in messages])
        words = f"echo: {messages[-1]['content']} ({len(messages)} msgs)".split(" ")
        for i, word in enumerate(words[:max_new_tokens]):
            yield word if i == 0 else " " + word


@pytest.fixture
def fake_llm(monkeypatch):
    fake = FakeLLM()
    loaded: list[tuple[str, str]] = []

    def load(model: str, device: str, dtype=None):
        loaded.append((model, device))
        return fake

    monkeypatch.setattr("memllm.cli.common.load_llm", load)
    fake.loaded = loaded
    return fake
