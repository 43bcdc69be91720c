"""MemoryController: budgets never exceeded (property), raw/summary/drop and time order on constructed
cases, the activation gate's decisions and counters, flash memory, summaries written at store time."""

from __future__ import annotations

import itertools
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memllm.agents.controller import ControllerConfig, MemoryController, render_record, whitespace_tokens
from memllm.errors import ConfigError
from memllm.memory_stores import FaissStore, FakeEmbedder, MemoryRecord, SearchResult

DAY = 86400.0


def plain(record: MemoryRecord, mode: str) -> str:
    """A renderer whose token cost is exactly the words of the text or summary."""
    return record.summary if mode == "summary" else record.text


def words(n: int, tag: str) -> str:
    return " ".join(f"{tag}{i}" for i in range(n))


def controller(store, ns="u", **cfg) -> MemoryController:
    return MemoryController(
        store,
        ns,
        count_tokens=whitespace_tokens,
        render=plain,
        config=ControllerConfig(**cfg),
        clock=lambda: 10 * DAY,
    )


def hit(
    text: str, score: float, created: float, summary: str | None = None, importance: float = 0.5
) -> SearchResult:
    return SearchResult(
        MemoryRecord(text, namespace="u", summary=summary, created_at=created, importance=importance), score
    )


def test_raw_summary_drop_and_time_order(store):
    c = controller(store, w_recency=0.0, w_importance=0.0, min_relevance=0.1)
    hits = [
        hit(words(10, "a"), 0.9, created=3 * DAY),  # best, no summary: raw (10)
        hit(words(40, "b"), 0.8, created=1 * DAY, summary=words(8, "bs")),  # raw does not fit: summary (8)
        hit(words(25, "c"), 0.7, created=2 * DAY),  # 12 left: dropped
        hit(words(5, "d"), 0.6, created=4 * DAY),  # fits raw (5)
        hit(words(3, "e"), 0.05, created=5 * DAY),  # below min_relevance
    ]
    items = c.assemble(c.rank(hits, now=10 * DAY), budget=30)
    modes = {it.record.text.split()[0][0]: (it.mode, it.tokens) for it in items}
    assert modes == {
        "a": ("raw", 10),
        "b": ("summary", 8),
        "c": ("dropped", 0),
        "d": ("raw", 5),
        "e": ("dropped", 0),
    }
    assert "needs 25 tokens, 12 left" in next(
        it.why for it in items if it.mode == "dropped" and "c0" in it.record.text
    )
    assert "min_relevance" in items[-1].why
    text = c._memory_text(items)  # noqa: SLF001
    assert text.split("\n") == [words(8, "bs"), words(10, "a"), words(5, "d")]  # time order: b, a, d
    assert whitespace_tokens(text) == 23 <= 30


def test_summary_upgraded_to_raw_when_room_is_left(store):
    c = controller(store, w_recency=0.0, w_importance=0.0)
    hits = [hit(words(12, "a"), 0.9, 1.0, summary=words(3, "as")), hit(words(4, "b"), 0.8, 2.0)]
    items = c.assemble(c.rank(hits, now=3.0), budget=16)
    assert [(it.mode, it.tokens) for it in items] == [("raw", 12), ("raw", 4)]
    items = c.assemble(c.rank(hits, now=3.0), budget=15)  # coverage first: both in, the first as summary
    assert [(it.mode, it.tokens) for it in items] == [("summary", 3), ("raw", 4)]
    assert "raw needs 9 more tokens" in items[0].why


def test_ranking_combines_relevance_recency_importance(store):
    c = controller(store, w_relevance=1.0, w_recency=0.5, w_importance=0.5, recency_half_life_s=DAY)
    now = 10 * DAY
    old_relevant = hit("old relevant", 0.8, created=now - 10 * DAY)
    fresh = hit("fresh", 0.6, created=now)
    important = hit("important", 0.6, created=now - 10 * DAY, importance=1.0)
    ranked = c.rank([old_relevant, fresh, important], now)
    assert [it.record.text for it in ranked] == ["fresh", "important", "old relevant"]
    assert ranked[0].score == pytest.approx(0.6 + 0.5 * 1.0 + 0.5 * 0.5)
    assert ranked[2].recency == pytest.approx(0.5**10)


def test_gate_decisions_and_counters(store):
    c = controller(store, flash_tokens=8, gate_similarity=0.5, min_relevance=0.0)
    d, _ = c.decide("what is my dog called?")
    assert not d.fire and d.reason == "nothing archived beyond the recent turns"
    for i, t in enumerate(
        ["my dog is called rex", "the weather in lyon is mild", "i play the piano on sundays"]
    ):
        c.remember(t, role="user", created_at=float(i))
    flash_ids = {r.id for r in c.flash()}
    assert [r.text for r in c.flash()] == ["i play the piano on sundays"]  # 8 tokens: one turn only
    d, _ = c.decide("Do you remember my dog?", flash_ids)
    assert d.fire and d.reason.startswith("cue") and d.top_similarity is None
    d, hits = c.decide("tell a joke about quantum chromodynamics", flash_ids)
    assert not d.fire and "<" in d.reason and hits is not None
    d, hits = c.decide("weather lyon mild", flash_ids)
    assert d.fire and d.reason.startswith("top similarity") and d.top_similarity >= 0.5
    assert hits[0].record.text == "the weather in lyon is mild"
    s = c.gate_stats
    assert (s.calls, s.fired, s.by_cue, s.by_similarity) == (4, 2, 1, 1)
    assert s.fire_rate == 0.5 and s.total_ms > 0 and s.mean_ms == s.total_ms / 4
    assert c.with_config(gate="never").decide("do you remember?", flash_ids)[0].fire is False
    assert c.with_config(gate="always").decide("hello", flash_ids)[0].fire is True
    custom = MemoryController(store, "u", count_tokens=whitespace_tokens, gate=lambda q: "!" in q)
    assert custom.decide("now!")[0].fire and not custom.decide("now")[0].fire


def test_recall_end_to_end_and_last_recall(store):
    clock = itertools.count(1000.0, 60.0)
    c = MemoryController(
        store,
        "u",
        count_tokens=whitespace_tokens,
        clock=lambda: next(clock),
        config=ControllerConfig(flash_tokens=20, memory_tokens=40, min_relevance=0.1),
    )
    c.remember("my cat is named Mochi", role="user", importance=0.9)
    c.remember("Nice, Mochi is a lovely name.", role="assistant")
    for i in range(6):
        c.remember(f"filler message {i} about football scores", role="user")
    assert c.last_recall() is None
    r = c.recall("what is my cat named?")
    assert r.gate.fire and r is c.last_recall()
    assert r.flash_tokens <= 20 and r.memory_tokens <= 40
    assert {it.record.text for it in r.used} >= {"my cat is named Mochi"}
    assert not {x.id for x in r.flash} & {
        it.record.id for it in r.items
    }  # flash turns are not recalled again
    assert r.used == sorted(r.used, key=lambda it: it.record.created_at)
    assert "my cat is named Mochi" in r.memory_text and r.to_dict()["used"]
    assert "gate: fired" in r.explain()


def test_summaries_written_when_stored_not_when_recalled(store):
    calls: list[str] = []

    def summarize(text: str) -> str:
        calls.append(text)
        return "short summary"

    c = MemoryController(
        store,
        "u",
        count_tokens=whitespace_tokens,
        summarize=summarize,
        config=ControllerConfig(summarize_min_tokens=10),
    )
    long_id = c.remember(words(30, "w"), kind="chunk")
    c.remember("short one", kind="chunk")
    assert store.get(long_id).summary == "short summary" and len(calls) == 1
    c.remember(words(30, "w"), kind="chunk")  # already stored: not summarised again
    c.recall("w1 w2 w3 remember")
    assert len(calls) == 1
    store.add(MemoryRecord(words(20, "z"), namespace="u", kind="chunk"))
    assert c.summarize_pending() == 1 and len(calls) == 2


def test_config_validation_names_the_field():
    with pytest.raises(ConfigError, match="memory_tokens must be an integer"):
        ControllerConfig(memory_tokens=-1)
    with pytest.raises(ConfigError, match="gate must be heuristic, always or never"):
        ControllerConfig(gate="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="cues is not a valid regular expression"):
        ControllerConfig(cues="(")


def chars_over_3(text: str) -> int:
    """A non-additive counter: joined lines cost more than the sum of their parts."""
    return (len(text) + 2) // 3


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory):
    s = FaissStore(tmp_path_factory.mktemp("ctl") / "s", FakeEmbedder(dim=64))
    yield s
    s.close()


record_st = st.tuples(
    st.integers(1, 60),  # words of text
    st.one_of(st.none(), st.integers(1, 20)),  # words of summary
    st.sampled_from(["turn", "chunk", "fact"]),
    st.floats(0, 1),
)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    records=st.lists(record_st, min_size=0, max_size=25),
    memory_budget=st.integers(0, 120),
    flash_budget=st.integers(0, 80),
    counter=st.sampled_from([whitespace_tokens, chars_over_3]),
    gate=st.sampled_from(["always", "heuristic"]),
)
def test_assembled_prompt_never_exceeds_budget(
    shared_store, records, memory_budget, flash_budget, counter, gate
):
    ns = uuid.uuid4().hex
    c = MemoryController(
        shared_store,
        ns,
        count_tokens=counter,
        config=ControllerConfig(gate=gate, min_relevance=0.0),
        render=render_record,
        clock=lambda: 1e6,
    )
    vocab = ["dog", "cat", "tea", "paris", "music", "rain", "code", "bike"]
    shared_store.add_many(
        [
            MemoryRecord(
                " ".join(vocab[(i + j) % 8] + str(j % 5) for j in range(n)),
                namespace=ns,
                kind=kind,
                summary=None if s is None else " ".join(vocab[j % 8] for j in range(s)),
                importance=imp,
                created_at=1000.0 + i,
            )
            for i, (n, s, kind, imp) in enumerate(records)
        ]
    )
    r = c.recall("remember dog cat tea music", memory_tokens=memory_budget, flash_tokens=flash_budget)
    assert counter(r.memory_text) <= memory_budget and r.memory_tokens <= memory_budget
    assert counter(r.flash_text) <= flash_budget
    used_times = [it.record.created_at for it in r.used]
    assert used_times == sorted(used_times)
    assert [ln for ln in r.memory_text.split("\n") if ln] == [
        render_record(it.record, it.mode) for it in r.used
    ]
    assert all(it.record.namespace == ns for it in r.items)


def test_flash_keeps_repeated_turns_in_order(store):
    clock = itertools.count(100.0, 1.0)
    c = MemoryController(store, "u", count_tokens=whitespace_tokens, clock=lambda: next(clock))
    for role, text in [("assistant", "Tea?"), ("user", "yes"), ("assistant", "More?"), ("user", "yes")]:
        c.remember(text, role=role)
    assert [(r.metadata["role"], r.text) for r in c.flash()] == [
        ("assistant", "Tea?"),
        ("user", "yes"),
        ("assistant", "More?"),
        ("user", "yes"),
    ]
    assert c.recall("and now?").flash_text == "assistant: Tea?\nuser: yes\nassistant: More?\nuser: yes"


def test_recall_only_the_configured_kinds(store):
    c = controller(store, flash_tokens=0, gate="always", min_relevance=0.0, kinds=("fact",))
    c.remember("the wifi password is tulip", kind="fact")
    c.remember("the wifi password is tulip, said in a chat", kind="turn")
    c.remember("wifi password chunk of a manual", kind="chunk")
    r = c.recall("wifi password")
    assert [it.record.kind for it in r.items] == ["fact"]


def test_max_records_keeps_only_the_best_ranked(store):
    c = controller(store, w_recency=0.0, w_importance=0.0, max_records=1)
    hits = [hit(words(3, "a"), 0.5, created=1 * DAY), hit(words(3, "b"), 0.9, created=2 * DAY)]
    items = c.assemble(c.rank(hits, now=10 * DAY), budget=100)  # both would fit the budget
    assert [(it.record.text[0], it.mode) for it in items] == [("b", "raw"), ("a", "dropped")]
    assert items[1].why == "beyond max_records (1)"


def test_flash_since_holds_only_turns_of_this_conversation(store):
    c = controller(store)
    store.add(MemoryRecord("earlier run", namespace="u", kind="turn", created_at=1 * DAY))
    store.add(MemoryRecord("this run", namespace="u", kind="turn", created_at=5 * DAY))
    assert [r.text for r in c.flash()] == ["earlier run", "this run"]
    c.since = 5 * DAY
    assert [r.text for r in c.flash()] == ["this run"]


def test_fact_lines_are_told_back_in_the_second_person():
    from memllm.agents.facts import second_person

    fact = MemoryRecord("My locker code is 4417.", namespace="u", kind="fact", created_at=0.0)
    assert render_record(fact, "raw") == "- Your locker code is 4417. (told on 1970-01-01)"
    assert second_person("I am allergic to peanuts and my mum knows me.") == (
        "You are allergic to peanuts and your mum knows you."
    )
    assert second_person("I'm vegan; I live in Lisbon.") == "You're vegan; you live in Lisbon."


def test_flash_left_out_when_memory_is_recalled_if_configured(store):
    clock = itertools.count(1000.0, 60.0)
    cfg = ControllerConfig(flash_tokens=20, memory_tokens=40, min_relevance=0.1, flash_with_memory=False)
    c = MemoryController(store, "u", count_tokens=whitespace_tokens, clock=lambda: next(clock), config=cfg)
    c.remember("my cat is named Mochi", role="user")
    for i in range(6):
        c.remember(f"filler message {i} about football scores", role="user")
    r = c.recall("what is my cat named?")
    assert "Mochi" in r.memory_text and r.flash == [] and r.flash_text == ""
    quiet = c.recall("hello there")  # the gate stays shut: the recent turns are kept
    assert quiet.memory_text == "" and quiet.flash
    with pytest.raises(ConfigError, match="flash_with_memory"):
        ControllerConfig(flash_with_memory="no")


def test_gate_on_fact_records_ignores_chitchat_like_old_turns_and_falls_back_without_facts(store):
    c = controller(store, flash_tokens=4, gate_similarity=0.5, min_relevance=0.0, gate_kinds=("fact",))
    for i, t in enumerate(["the weather in lyon is mild", "i play the piano on sundays", "ok"]):
        c.remember(t, role="user", created_at=float(i))
    flash_ids = {r.id for r in c.flash()}
    # No fact archived yet: the gate compares with every record, as without gate_kinds.
    d, _ = c.decide("weather lyon mild", flash_ids)
    assert d.fire and d.reason.startswith("top similarity")
    c.remember("your dog is called rex", kind="fact", created_at=3.0)
    d, _ = c.decide("weather lyon mild", flash_ids)  # like an old turn, unlike any fact: ordinary chat
    assert not d.fire and d.reason.startswith("top fact similarity")
    d, _ = c.decide("dog called rex", flash_ids)
    assert d.fire and d.reason.startswith("top fact similarity")


def test_the_users_own_questions_are_not_recalled(store):
    # Issue 18: the question asked again is its own nearest record and took the one recalled place
    # from the fact ("What is my dog called?" recalled, 'My dog is called Biscuit.' dropped).
    c = controller(store, flash_tokens=0, gate="always", min_relevance=0.0, w_recency=0.0, max_records=1)
    c.remember("my dog is called Biscuit", kind="fact")
    c.remember("what is my dog called?", role="user")
    c.remember("what is my dog called? he asked me", role="assistant")  # another's question: kept
    r = c.recall("what is my dog called?")
    assert [it.record.text for it in r.used] == ["my dog is called Biscuit"]
    why = {it.record.text: it.why for it in r.items}
    assert why["what is my dog called?"] == "the user's question: it tells no fact"
    assert why["what is my dog called? he asked me"] == "beyond max_records (1)"
    keep = controller(store, flash_tokens=0, gate="always", min_relevance=0.0, w_recency=0.0, user_questions=True)
    assert "what is my dog called?" in [it.record.text for it in keep.recall("what is my dog called?").used]
    with pytest.raises(ConfigError, match="user_questions"):
        ControllerConfig(user_questions="no")
