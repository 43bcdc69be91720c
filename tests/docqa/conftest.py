"""Fixtures for document QA tests: the tiny random Llama (GGUF, byte-level tokenizer) loaded once."""

from __future__ import annotations

import pytest

from tests.foundation.tiny_gguf import write_tiny_llama_gguf


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory):
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("docqa_gguf") / "tiny-llama.gguf")


@pytest.fixture(scope="session")
def tiny_llm(tiny_path, tmp_path_factory):
    import os

    from memllm import MemLLM

    old = os.environ.get("MEMLLM_HOME")
    os.environ["MEMLLM_HOME"] = str(tmp_path_factory.mktemp("docqa_home"))
    try:
        return MemLLM.from_pretrained(str(tiny_path), device="cpu")
    finally:
        if old is None:
            os.environ.pop("MEMLLM_HOME", None)
        else:
            os.environ["MEMLLM_HOME"] = old


def boxes_text(n: int = 24) -> str:
    """A small document of numbered paragraphs, a few lines each."""
    return "\n\n".join(
        f"Box {i} is {'red' if i % 2 else 'blue'}.\nIt sits on shelf {i * 3}." for i in range(n)
    )
