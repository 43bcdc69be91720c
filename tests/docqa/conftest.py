"""Fixtures for document QA tests: the tiny random Llama (GGUF, byte-level tokenizer) loaded once."""

from __future__ import annotations

import pytest

from tests.foundation.tiny_gguf import write_tiny_llama_gguf


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory):
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("docqa_gguf") / "tiny-llama.gguf")


@pytest.fixture(scope="session")
def tiny_llm(tiny_path):
    from memllm import MemLLM

    # converted into the session's home (tests/conftest.py)

    return MemLLM.from_pretrained(str(tiny_path), device="cpu")


@pytest.fixture
def cli(tiny_llm, monkeypatch):
    """The CLI on the tiny model and the fake embedder, with a fake clock (0.25 s a tick): the
    (model, device) pairs the commands asked to load."""
    import itertools

    from memllm.agents import docqa as docqa_mod
    from memllm.memory_stores.embeddings import FakeEmbedder

    loaded = []

    def load(model, device, dtype=None):
        loaded.append((model, device))
        return tiny_llm

    monkeypatch.setattr("memllm.cli.common.load_llm", load)
    monkeypatch.setattr("memllm.cli.common.load_embedder", lambda: FakeEmbedder())
    ticks = itertools.count()
    monkeypatch.setattr(docqa_mod, "_clock", lambda: next(ticks) * 0.25)
    return loaded


def boxes_text(n: int = 24) -> str:
    """A small document of numbered paragraphs, a few lines each."""
    return "\n\n".join(
        f"Box {i} is {'red' if i % 2 else 'blue'}.\nIt sits on shelf {i * 3}." for i in range(n)
    )


def library_answers(llm, mode, path, questions, memory=None):
    """The answers of `path` read into a DocumentQA of its own (the library, no CLI; fake embedder;
    memory: its MemoryConfig, None for the model's)."""
    from memllm.agents.docqa import DocumentQA
    from memllm.memory_stores.embeddings import FakeEmbedder

    qa = DocumentQA(llm, mode, memory=memory, embedder=FakeEmbedder())
    qa.read(path)
    try:
        return [qa.ask(q) for q in questions]
    finally:
        qa.close()
