"""Fixtures for the security tests: a tiny random Llama (GGUF, ChatML template, 8K trained context so
that kv chat runs with memllm's default memory settings) and CLI runners in and out of process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.foundation.tiny_gguf import write_tiny_llama_gguf

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("sec_gguf") / "tiny.gguf", context=8192)


@pytest.fixture(scope="session")
def other_gguf(tmp_path_factory) -> Path:
    """Same shapes, other weights (a snapshot written with tiny_gguf is foreign to it)."""
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("sec_gguf2") / "other.gguf", context=8192, seed=1)


def _load(path: Path):
    from memllm.llm import MemLLM

    # converted into the session's home (tests/conftest.py)

    return MemLLM.from_pretrained(str(path), device="cpu")


@pytest.fixture(scope="session")
def tiny_llm(tiny_gguf):
    return _load(tiny_gguf)


@pytest.fixture(scope="session")
def other_llm(other_gguf):
    return _load(other_gguf)


@pytest.fixture
def cli(monkeypatch, tiny_llm, other_llm, tiny_gguf, other_gguf):
    """In-process `memllm` with the tiny models (by path) and the fake embedder."""
    from memllm.memory_stores.embeddings import FakeEmbedder

    models = {str(tiny_gguf): tiny_llm, str(other_gguf): other_llm}
    monkeypatch.setattr("memllm.cli.common.load_llm", lambda model, device, dtype=None: models.get(model, tiny_llm))
    monkeypatch.setattr("memllm.cli.common.load_embedder", lambda: FakeEmbedder(dim=64))
    return models


def child_env(home: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ, MEMLLM_HOME=str(home), PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore")
    env.update(extra)
    return env


def child(args: list[str], home: Path, **kw) -> subprocess.Popen:
    """`memllm ARGS` in a child process (fake embedder), pipes for stdin/stdout/stderr."""
    env = child_env(home, **kw.pop("env", {}))
    return subprocess.Popen(
        [sys.executable, "-m", "tests.security.cli_child", *args],
        cwd=ROOT, env=env, stdin=kw.pop("stdin", subprocess.PIPE), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, **kw,
    )  # fmt: skip
