"""langchain-tests standard suite for MemllmVectorStore over a fresh FaissStore per test: once with the
suite's own embeddings (any LangChain Embeddings, wrapped), once with memllm's (used directly)."""

from __future__ import annotations

import pytest
from langchain_core.embeddings import Embeddings
from langchain_tests.integration_tests import VectorStoreIntegrationTests

from memllm.agents.langchain import MemllmEmbeddings, MemllmVectorStore
from memllm.memory_stores import FakeEmbedder


class TestMemllmVectorStore(VectorStoreIntegrationTests):
    @pytest.fixture
    def vectorstore(self, tmp_path):
        store = MemllmVectorStore(self.get_embeddings(), path=tmp_path / "store", namespace="suite")
        try:
            yield store
        finally:
            store.store.close()


class TestMemllmVectorStoreMemllmEmbeddings(TestMemllmVectorStore):
    @staticmethod
    def get_embeddings() -> Embeddings:
        return MemllmEmbeddings(embedder=FakeEmbedder(dim=64))
