"""Fixtures for foundation tests: a tiny GGUF written once per session, and a fake LLM for the CLI."""

from __future__ import annotations

import pytest

from tests.fakes import FakeLLM
from tests.foundation.tiny_gguf import write_tiny_llama_gguf


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory):
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf")


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
