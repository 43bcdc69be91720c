"""langchain-tests standard suite for MemllmRetriever over a FaissStore with the fake embedder."""

from __future__ import annotations

import pytest
from langchain_tests.integration_tests import RetrieversIntegrationTests

from memllm.agents.langchain import MemllmRetriever
from memllm.memory_stores import FaissStore, FakeEmbedder, MemoryRecord

FACTS = [
    "my dog is called Biscuit and he loves the park",
    "my sister lives in Lyon near the park",
    "the dog park opens at seven",
    "I walk the dog every morning before work",
    "Biscuit the dog is afraid of thunder",
    "I work as a nurse at the city hospital",
]
_STORE: dict[str, FaissStore] = {}


@pytest.fixture(scope="module", autouse=True)
def suite_store(tmp_path_factory):
    """One filled store for the suite (its retriever is built from plain parameters, not fixtures)."""
    store = FaissStore(tmp_path_factory.mktemp("retriever_suite"), FakeEmbedder(dim=64))
    store.add_many([MemoryRecord(t, namespace="user:suite", kind="fact") for t in FACTS])
    _STORE["store"] = store
    yield store
    store.close()


class TestMemllmRetriever(RetrieversIntegrationTests):
    @property
    def retriever_constructor(self) -> type[MemllmRetriever]:
        return MemllmRetriever

    @property
    def retriever_constructor_params(self) -> dict:
        return {"store": _STORE["store"], "user": "suite", "memory_tokens": 200}

    @property
    def retriever_query_example(self) -> str:
        return "where does my dog like to go, the park?"
