"""The RULER-style suite (memllm.bench.ruler, ruler_run) on the tiny random Llama: haystacks are seeded
and their evidence spans hold the needles; one read answers every question under every system, and the
diagnostics say which layers read the gold units (the oracle: all of them)."""

from __future__ import annotations

import json

import typer
from typer.testing import CliRunner

from memllm.bench import ruler, ruler_run
from memllm.cli.bench import ruler as ruler_command
from memllm.config import MemoryConfig

app = typer.Typer()
app.command("ruler")(ruler_command)
app.command("other")(lambda: None)
runner = CliRunner()


def test_haystacks_are_seeded_and_spans_hold_the_evidence(tiny_llm):
    tok = tiny_llm.tokenizer
    a = ruler.build_suite(tok, 8192, ["single", "multikey", "multivalue", "multiquery"], 1, seed=3)
    b = ruler.build_suite(tok, 8192, ["single", "multikey", "multivalue", "multiquery"], 1, seed=3)
    assert [h.to_dict() for h in a] == [h.to_dict() for h in b]
    qs = [q for h in a for q in h.questions]
    assert {q.family for q in qs} == {"single", "multikey", "multivalue", "multiquery"}
    for h in a:
        assert len(h.ids) <= 8192 - 160
        for q in h.questions:
            evidence = " ".join(tok.decode(h.ids[s:e]) for s, e in q.spans)
            assert all(v in evidence for v in q.answers)  # every expected value sits in its spans
            assert q.score(" ".join(q.answers)) == 1.0 and q.score("nothing") == 0.0
            assert (
                q.query and q.query in q.prompt and not q.prompt.rstrip().endswith(q.query)
            )  # no answer prefix
    restored = ruler.Haystack.from_dict(json.loads(json.dumps(a[0].to_dict())))
    assert restored.to_dict() == a[0].to_dict()


def test_one_read_answers_under_every_system_with_diagnostics(tiny_llm, monkeypatch):
    hays = ruler.build_suite(tiny_llm.tokenizer, 1536, ["single", "multikey"], 1, seed=0)
    for q in (q for h in hays for q in h.questions):
        q.max_new_tokens = 3  # random weights: the answers are noise; the diagnostics are what is checked
    # Byte-level tokens: a needle is ~80 tokens, three units of 32; the window fits the 256-token model.
    memory = MemoryConfig(n_init=8, n_local=32, block_size=32, repr_topk=2, topk=5, exc_block_size=16,
                          chunk_size=64, offload_dtype="fp32")  # fmt: skip
    said: list[str] = []
    monkeypatch.setattr(ruler_run, "READ_EVERY_S", 0.0)  # every chunk of the read is told
    rows = ruler_run.run(tiny_llm, hays, ["infllm", "question", "oracle"], memory, progress=said.append)
    assert any(": read " in m and "tokens/s" in m for m in said)  # a long read shows its progress
    assert len(rows) == 3 * sum(len(h.questions) for h in hays)
    # variants: the cache under another memory distance while it answers (ContextMemoryCache.configured)
    from memllm.memory_stores.embeddings import FakeEmbedder

    near = MemoryConfig(**{**memory.to_dict(), "memory_distance": 16})  # so that "far" (the window's 32) differs
    mine = ruler_run.run(tiny_llm, hays[:1], ["lexical_far", "oracle_far"], near, embedder=FakeEmbedder())
    assert {r["system"] for r in mine} == {"lexical_far", "oracle_far"}
    assert all(r["all_layers_read"] for r in mine if r["system"] == "oracle_far" and not r["in_window"])
    assert ruler_run.VARIANTS["lexical_far"][1](near.resolved(256)) == {"memory_distance": 32}
    oracle = [r for r in rows if r["system"] == "oracle" and not r["in_window"]]
    assert oracle and all(r["all_layers_read"] for r in oracle)
    assert all(r["recall_by_layer"] == [1.0, 1.0] for r in oracle)
    question = [r for r in rows if r["system"] == "question" and not r["in_window"]]
    assert all(
        len(r["chosen"]) == memory.topk and len(r["gold_rank"]) == len(r["gold_units"]) for r in question
    )
    items = ruler_run.summary(rows)
    assert {(i["family"], i["system"]) for i in items} == {
        (f, s) for f in ("single", "multikey") for s in ("infllm", "question", "oracle")
    }
    assert "all layers read" in ruler_run.table(items)
    # each memllm row's confidence: the mean log-probability of its answer's tokens
    assert all(r["logprob"] is None or r["logprob"] <= 0.0 for r in rows)
    assert any(r["logprob"] is not None for r in rows)


def test_an_answers_log_probability_leaves_out_the_line_ending():
    assert ruler_run.answer_logprob([5, 6, 10], [-1.0, -2.0, -9.0], {10}) == -1.5
    assert ruler_run.answer_logprob([5, 6], [-1.0, -3.0], {10}) == -2.0
    assert ruler_run.answer_logprob([10], [-0.5], {10}) is None
    assert ruler_run.answer_logprob([], [], {10}) is None


def test_gap_splits_the_reference_only_answers_by_whether_the_gold_units_were_read():
    def row(system, qid, score, read, family="squad", text_rank=(3, 0)):
        return {"system": system, "family": family, "id": qid, "length": 1000, "score": score,
                "all_layers_read": read, "text_rank": list(text_rank)}  # fmt: skip

    rows = [
        row("oracle", "a", 1.0, True), row("lexical", "a", 0.0, False),  # selection missed the text's best
        row("oracle", "f", 1.0, True), row("lexical", "f", 0.0, False, text_rank=(5,)),  # ... a gold unit
        row("oracle", "b", 1.0, True), row("lexical", "b", 0.0, True),  # read, still wrong
        row("oracle", "c", 0.0, True), row("lexical", "c", 0.5, True),  # only lexical
        row("oracle", "d", 1.0, True), row("lexical", "d", 1.0, True),  # both
        row("oracle", "e", 1.0, True),  # lexical lacks it: skipped
        row("hybrid", "a", 1.0, True),  # another system: ignored
    ]  # fmt: skip
    (item,) = ruler_run.gap(rows, "lexical")
    assert item == {"length": 1000, "family": "squad", "system": "lexical", "reference": "oracle",
                    "questions": 5, "read": 1, "not_read": 2, "text_best": 1, "only_system": 1}  # fmt: skip


def test_cli_refuses_unknown_tasks_and_systems():
    bad = runner.invoke(app, ["ruler", "--families", "niah"])
    assert bad.exit_code == 2
    assert bad.stderr.startswith("error: tasks must be among single, multikey")
    bad = runner.invoke(app, ["ruler", "--systems", "bm25"])
    assert (
        bad.exit_code == 2
        and "systems must be among full, infllm, question, hybrid, text, oracle" in bad.stderr
    )
