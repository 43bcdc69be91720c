"""langchain-tests standard suite for MemllmVectorStore over a fresh FaissStore per test."""

from __future__ import annotations

import pytest
from langchain_tests.integration_tests import VectorStoreIntegrationTests

from memllm.agents.langchain import MemllmVectorStore


class TestMemllmVectorStore(VectorStoreIntegrationTests):
    @pytest.fixture
    def vectorstore(self, tmp_path):
        store = MemllmVectorStore(self.get_embeddings(), path=tmp_path / "store", namespace="suite")
        try:
            yield store
        finally:
            store.store.close()
