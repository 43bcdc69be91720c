"""Fixtures for the agents' tests: the tiny random Llama (GGUF, context 1,024) loaded once per module."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    from memllm.llm import MemLLM
    from tests.foundation.tiny_gguf import write_tiny_llama_gguf

    path = write_tiny_llama_gguf(tmp_path_factory.mktemp("g") / "t.gguf", context=1024)
    # converted into the session's home (tests/conftest.py)
    return MemLLM.from_pretrained(str(path), device="cpu")
