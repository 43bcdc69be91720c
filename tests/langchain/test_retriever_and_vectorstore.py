"""MemllmRetriever (controller selection, budget, metadata, order) and MemllmVectorStore (persistence,
filters, MMR, relevance scores, upserts and dedup, namespaces) beyond the standard suites."""

from __future__ import annotations

import pytest
from langchain_core.documents import Document

from memllm.agents.controller import ControllerConfig, whitespace_tokens
from memllm.agents.langchain import MemllmEmbeddings, MemllmRetriever, MemllmVectorStore
from memllm.errors import StoreError
from memllm.memory_stores import FaissStore, FakeEmbedder, MemoryRecord


@pytest.fixture
def store(tmp_path):
    s = FaissStore(tmp_path / "s", FakeEmbedder(dim=64))
    yield s
    s.close()


def add(store, text, *, at, ns="user:ann", summary=None, **kw):
    return store.add(MemoryRecord(text, namespace=ns, kind="fact", created_at=at, summary=summary, **kw))


# ---------------------------------------------------------------------------- retriever


def test_retriever_returns_controller_choice_with_metadata(store):
    old = add(store, "my dog Rex likes the park", at=1000.0, source="chat-1", span=(0, 25))
    new = add(store, "the park closes at dusk for dogs", at=2000.0)
    add(store, "I bought new shoes", at=3000.0)
    add(store, "my dog likes the park", at=1500.0, ns="user:bob")  # another user: never returned
    retriever = MemllmRetriever(store=store, user="ann", k=3, count_tokens=whitespace_tokens)
    docs = retriever.invoke("does my dog like the park")
    recall = retriever.last_recall()
    assert [d.id for d in docs] == [it.record.id for it in recall.used] == [old, new]  # time order
    first = docs[0].metadata
    assert first["namespace"] == "user:ann" and first["kind"] == "fact"
    assert first["source"] == "chat-1" and first["span"] == [0, 25]
    assert first["created_at"] == 1000.0 and first["mode"] == "raw"
    scores = {d.id: d.metadata["score"] for d in docs}
    assert scores == {it.record.id: it.score for it in recall.used}
    by_score = MemllmRetriever(store=store, user="ann", k=3, order="score").invoke(
        "does my dog like the park"
    )
    assert [d.metadata["rank"] for d in by_score] == [1, 2]
    assert by_score[0].metadata["score"] >= by_score[1].metadata["score"]


def test_retriever_respects_the_token_budget_and_uses_summaries(store):
    long_text = "my dog Rex " + " ".join(f"word{i}" for i in range(60)) + " park"
    add(store, long_text, at=1000.0, summary="Rex is my dog")
    add(store, "my dog likes the park", at=2000.0)
    retriever = MemllmRetriever(
        store=store, user="ann", k=5, memory_tokens=20, count_tokens=whitespace_tokens
    )
    docs = retriever.invoke("my dog park")
    recall = retriever.last_recall()
    assert recall.memory_tokens <= 20
    assert {d.page_content for d in docs} == {"Rex is my dog", "my dog likes the park"}
    assert {d.metadata["mode"] for d in docs} == {"summary", "raw"}
    assert len(retriever.invoke("my dog park", k=1)) == 1
    wide = retriever.invoke("my dog park", memory_tokens=500)
    assert long_text in [d.page_content for d in wide]


def test_retriever_configuration_errors(store):
    with pytest.raises(ValueError, match="exactly one"):
        MemllmRetriever(store=store)
    quiet = MemllmRetriever(
        store=store, namespace="user:ann", config=ControllerConfig(min_relevance=0.99), count_tokens=len
    )
    add(store, "apples are red", at=1.0)
    assert quiet.invoke("apples are green") == []  # below min_relevance: dropped, with a reason
    assert quiet.last_recall().items[0].why.startswith("relevance")


# ---------------------------------------------------------------------------- vector store


def embeddings():
    return MemllmEmbeddings(embedder=FakeEmbedder(dim=64))


def test_vectorstore_persists_and_searches_with_filters_and_scores(tmp_path):
    texts = ["red apples in the basket", "green apples on the tree", "the sky is blue"]
    metas = [{"color": "red"}, {"color": "green"}, {"color": "blue", "source": "sky.txt"}]
    vs = MemllmVectorStore.from_texts(texts, embeddings(), metas, path=tmp_path / "vs", namespace="fruit")
    vs.store.close()
    again = MemllmVectorStore(embeddings(), path=tmp_path / "vs", namespace="fruit")
    hits = again.similarity_search_with_score("apples", k=3)
    assert {d.page_content for d, _ in hits[:2]} == set(texts[:2]) and hits[2][0].page_content == texts[2]
    assert hits[0][1] >= hits[1][1] >= hits[2][1]
    green = again.similarity_search("apples", k=3, filter={"color": "green"})
    assert [(d.page_content, d.metadata) for d in green] == [(texts[1], {"color": "green"})]
    assert again.get_by_ids([green[0].id]) == green
    assert again.store.list("fruit")[2].source == "sky.txt"
    relevance = again.similarity_search_with_relevance_scores("apples", k=3)
    assert all(0.0 <= score <= 1.0 for _, score in relevance)
    retriever = again.as_retriever(search_kwargs={"k": 1})
    assert len(retriever.invoke("blue sky")) == 1
    assert retriever.invoke("blue sky")[0].page_content == texts[2]


def test_mmr_prefers_diverse_documents(tmp_path):
    texts = ["apple pie recipe", "apple pie recipe easy", "apple pie recipe quick", "banana bread apple"]
    vs = MemllmVectorStore.from_texts(texts, embeddings(), path=tmp_path / "vs")
    plain = [d.page_content for d in vs.similarity_search("apple pie recipe", k=2)]
    mmr = [
        d.page_content
        for d in vs.max_marginal_relevance_search("apple pie recipe", k=2, fetch_k=4, lambda_mult=0.3)
    ]
    assert plain[0] == mmr[0] == "apple pie recipe"
    assert plain[1].startswith("apple pie recipe")
    assert mmr[1] == "banana bread apple"  # less similar to the first pick


def test_upsert_dedup_and_namespaces(tmp_path):
    vs = MemllmVectorStore(embeddings(), path=tmp_path / "vs", namespace="a")
    assert vs.add_texts(["hello world"], ids=["x"]) == ["x"]
    assert vs.add_texts(["hello world"]) == ["x"]  # one copy of a text per namespace
    assert vs.add_texts(["hello world"], [{"v": 2}], ids=["y"]) == ["y"]  # a given id wins
    assert vs.get_by_ids(["x", "y"]) == [Document(id="y", page_content="hello world", metadata={"v": 2})]
    other = MemllmVectorStore(embeddings(), store=vs.store, namespace="b")
    assert other.similarity_search("hello world", k=4) == []
    assert other.get_by_ids(["y"]) == []
    other.delete(["y"])  # not its record: left alone
    assert vs.get_by_ids(["y"]) != []
    with pytest.raises(StoreError, match="namespace 'a'"):
        other.add_texts(["hi"], ids=["y"])
    other.add_texts(["hi there"])
    vs.delete()
    assert vs.similarity_search("hello", k=4) == [] and len(other.similarity_search("hi", k=4)) == 1
