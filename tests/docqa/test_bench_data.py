"""QA benchmark data: SQuAD metrics, haystacks (gold hidden at the intended depths, distractors from
elsewhere, length reached), packs, the cached embedder and the in-memory chunk store."""

from __future__ import annotations

import numpy as np
import pytest

from memllm.agents.doc_store import InMemoryChunkStore
from memllm.bench import qa as bench
from memllm.bench import qa_data
from memllm.errors import ConfigError
from memllm.memory_stores.embeddings import FakeEmbedder
from memllm.memory_stores.faiss_store import FaissStore
from memllm.memory_stores.records import MemoryRecord


def words(text: str) -> int:
    return len(text.split())


def test_squad_metrics():
    assert qa_data.exact_match("The Normans.", ["Normans"]) == 1.0
    assert qa_data.exact_match("Normans of France", ["Normans", "France"]) == 0.0
    assert qa_data.f1_score("Normans of France", ["Normans"]) == pytest.approx(2 * (1 / 3) * 1 / (1 / 3 + 1))
    assert qa_data.f1_score("", ["x"]) == 0.0 and qa_data.f1_score("a", ["the"]) == 1.0
    assert qa_data.normalize_answer("  An  Apple, the PIE! ") == "apple pie"


def test_squad_haystack_hides_each_gold_paragraph_among_other_articles():
    chosen = qa_data.pick_cases("squad", 4, seed=0)
    assert len({c.group for c in chosen}) == 4
    (hay,) = qa_data.build_haystacks("squad", 4096, chosen, words, seed=0, reserve=0)
    assert 0.9 * 4096 <= hay.tokens <= 4096
    paras = hay.text.split("\n\n")
    positions = [paras.index(c.gold[0]) for c in chosen]
    assert positions == sorted(positions)  # depths (i + 0.5) / k in order
    assert [hay.depths[c.id] for c in chosen] == [[0.125], [0.375], [0.625], [0.875]]
    others = {p for t, p in qa_data.squad_paragraphs() if t in {c.group for c in chosen}} - {
        c.gold[0] for c in chosen
    }
    assert not others & set(paras)  # no distractor from a gold article


def test_hotpot_haystack_puts_the_two_paragraphs_half_a_document_apart():
    chosen = qa_data.pick_cases("hotpotqa", 2, seed=0)
    (hay,) = qa_data.build_haystacks("hotpotqa", 8192, chosen, words, seed=0, reserve=0)
    paras = hay.text.split("\n\n")
    for c in chosen:
        a, b = (paras.index(g) for g in c.gold)
        assert b - a >= len(paras) // 2 - 2
        assert hay.depths[c.id][1] - hay.depths[c.id][0] == pytest.approx(0.5)


def test_many_questions_split_into_several_haystacks():
    chosen = qa_data.pick_cases("squad", 12, seed=0)
    hays = qa_data.build_haystacks("squad", 1024, chosen, words, seed=0, reserve=0)
    assert len(hays) > 1 and sum(len(h.cases) for h in hays) == 12
    for h in hays:
        assert sum(words(c.gold[0]) for c in h.cases) <= qa_data.GOLD_SHARE * 1024 or len(h.cases) == 1


def test_pack_round_trip_and_cached_embedder(tmp_path):
    chosen = qa_data.pick_cases("squad", 2, seed=0)
    hays = qa_data.build_haystacks("squad", 2048, chosen, words, seed=0)
    fake = FakeEmbedder()
    vec = {bench.text_key("hello"): fake.embed(["hello"])[0]}
    qa_data.save_pack(tmp_path / "p.json.gz", hays, vec)
    back, table = qa_data.load_pack(tmp_path / "p.json.gz")
    assert [h.text for h in back] == [h.text for h in hays] and back[0].cases[0].answers == chosen[0].answers
    cached = bench.CachedEmbedder(table)
    np.testing.assert_allclose(cached.embed(["hello"]), fake.embed(["hello"]), atol=1e-3)  # fp16 in the pack
    with pytest.raises(ConfigError, match="1 of 2 texts have no cached embedding"):
        cached.embed(["hello", "other"])
    filled = bench.CachedEmbedder(table, base=fake)
    filled.embed(["hello", "other"])
    assert filled.misses == 1


def test_parse_lengths():
    assert bench.parse_lengths("8k, 32k,1m") == [8192, 32768, 1048576]
    assert [bench.label(n) for n in (8192, 524288, 1048576)] == ["8K", "512K", "1M"]
    with pytest.raises(ConfigError, match="too short"):
        bench.parse_lengths("100")


def test_in_memory_store_ranks_like_the_faiss_store(tmp_path):
    texts = [f"record {i} about {'cats' if i % 3 else 'dogs'} and {'red' if i % 2 else 'blue'} things {i * 7}"
             for i in range(60)]  # fmt: skip
    recs = [MemoryRecord(t, namespace="doc", kind="chunk") for t in texts]
    mem = InMemoryChunkStore(FakeEmbedder())
    mem.add_many(recs)
    mem.add_many([MemoryRecord("other namespace dogs", namespace="x", kind="chunk")])
    with FaissStore(tmp_path / "s", FakeEmbedder()) as faiss_store:
        faiss_store.add_many([MemoryRecord(t, namespace="doc", kind="chunk") for t in texts])
        for q in ("blue dogs", "red cats 14", "record 3"):
            a = [(r.record.text, round(r.score, 5)) for r in mem.search(q, 8, namespace="doc")]
            b = [(r.record.text, round(r.score, 5)) for r in faiss_store.search(q, 8, namespace="doc")]
            assert [x[1] for x in a] == [x[1] for x in b]
            assert {x[0] for x in a if x[1] > b[-1][1]} == {x[0] for x in b if x[1] > b[-1][1]}
    assert all(r.record.namespace == "doc" for r in mem.search("dogs", 100, namespace="doc"))
    assert mem.count("doc") == 60 and mem.count() == 61
    assert mem.add_many([MemoryRecord(texts[0], namespace="doc", kind="chunk")]) == [recs[0].id]
    assert mem.delete([recs[0].id]) == 1 and mem.count("doc") == 59
    assert [r.text for r in mem.list("doc", limit=2)] == texts[1:3]


def test_squad_past_its_articles_takes_other_paragraphs_of_them():
    first = qa_data.pick_cases("squad", 35, seed=3)
    more = qa_data.pick_cases("squad", 50, seed=3)
    assert len({c.group for c in first}) == 35  # SQuAD v2 dev's articles: one question each first
    assert [c.id for c in more[:35]] == [c.id for c in first]  # the first round unchanged
    assert len(more) == 50 and len({c.gold[0] for c in more}) == 50  # no paragraph twice in a haystack
    assert {c.group for c in more[35:]} <= {c.group for c in first}
