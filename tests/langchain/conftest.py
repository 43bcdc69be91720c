"""Fixtures of the langchain adapter tests: one tiny random GGUF model for the whole session, loaded
once into the shared model cache, and asyncio marks for the standard suites' coroutine tests."""

from __future__ import annotations

import inspect
import os

import pytest

from tests.foundation.tiny_gguf import write_tiny_llama_gguf

# Filled by the session fixture below; the standard suites read it from properties (no fixtures there).
TINY: dict[str, str] = {}


@pytest.fixture(scope="session", autouse=True)
def tiny_model(tmp_path_factory):
    """Path of a tiny random Llama GGUF, converted and loaded once (shared by every ChatMemLLM)."""
    from memllm.agents.langchain.chat_model import load_model

    root = tmp_path_factory.mktemp("lc_tiny")
    path = write_tiny_llama_gguf(root / "tiny-llama.gguf")
    other = write_tiny_llama_gguf(root / "tiny-llama-other.gguf", seed=1)  # for per-call model=
    old = os.environ.get("MEMLLM_HOME")
    os.environ["MEMLLM_HOME"] = str(root / "home")
    try:
        load_model(str(path), "cpu", None)
        load_model(str(other), "cpu", None)
    finally:
        if old is None:
            os.environ.pop("MEMLLM_HOME", None)
        else:
            os.environ["MEMLLM_HOME"] = old
    TINY["path"] = str(path)
    TINY["other"] = str(other)
    return str(path)


def _mark_async_suite_tests() -> None:
    """The langchain-tests suites leave their coroutine tests unmarked (they expect asyncio_mode=auto,
    which pyproject does not set): mark them for pytest-asyncio's strict mode, once, at import."""
    from langchain_tests.integration_tests import (
        ChatModelIntegrationTests,
        EmbeddingsIntegrationTests,
        RetrieversIntegrationTests,
        VectorStoreIntegrationTests,
    )
    from langchain_tests.unit_tests import ChatModelUnitTests, EmbeddingsUnitTests

    suites = (
        ChatModelIntegrationTests,
        ChatModelUnitTests,
        EmbeddingsIntegrationTests,
        EmbeddingsUnitTests,
        RetrieversIntegrationTests,
        VectorStoreIntegrationTests,
    )
    for suite in suites:
        for cls in suite.__mro__:
            for name, fn in vars(cls).items():
                if name.startswith("test_") and inspect.iscoroutinefunction(fn):
                    marks = getattr(fn, "pytestmark", [])
                    if not any(m.name == "asyncio" for m in marks):
                        pytest.mark.asyncio(fn)


_mark_async_suite_tests()
