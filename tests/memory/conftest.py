"""Fixtures of the text-memory tests: a fake embedder, a fresh store, and a child-process runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from memllm.memory_stores import FaissStore, FakeEmbedder

CHILD = Path(__file__).with_name("store_child.py")


@pytest.fixture
def embedder() -> FakeEmbedder:
    return FakeEmbedder(dim=64)


@pytest.fixture
def store(tmp_path, embedder):
    s = FaissStore(tmp_path / "store", embedder)
    yield s
    s.close()


def child(*args: str, **popen) -> subprocess.Popen:
    """Start store_child.py with the test's environment (MEMLLM_HOME included)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, str(CHILD), *args], env=env, text=True, **popen)
