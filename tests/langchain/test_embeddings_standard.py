"""langchain-tests standard suites for MemllmEmbeddings (fast tier: the fake embedder)."""

from __future__ import annotations

import pytest
from langchain_tests.integration_tests import EmbeddingsIntegrationTests
from langchain_tests.unit_tests import EmbeddingsUnitTests

from memllm.agents.langchain import MemllmEmbeddings
from memllm.memory_stores import FakeEmbedder


class FakeEmbedderParams:
    """Both suites: MemllmEmbeddings over memllm's deterministic fake embedder."""

    @property
    def embeddings_class(self) -> type[MemllmEmbeddings]:
        return MemllmEmbeddings

    @property
    def embedding_model_params(self) -> dict:
        return {"embedder": FakeEmbedder(dim=64)}


class TestMemllmEmbeddingsUnit(FakeEmbedderParams, EmbeddingsUnitTests):
    pass


class TestMemllmEmbeddingsIntegration(FakeEmbedderParams, EmbeddingsIntegrationTests):
    pass


@pytest.mark.slow
class TestMemllmEmbeddingsMiniLM(EmbeddingsIntegrationTests):
    """The packaged all-MiniLM-L6-v2 (offline, from its PyPI package)."""

    @property
    def embeddings_class(self) -> type[MemllmEmbeddings]:
        return MemllmEmbeddings
