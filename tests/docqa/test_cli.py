"""`memllm ask` and `memllm bench qa` transcripts on the tiny random Llama and the fake embedder.

The commands are mounted on a local typer app here (the lead registers them on memllm's app). Time is
a fake clock, so the printed seconds are exact.
"""

from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

from memllm.agents import docqa as docqa_mod
from memllm.agents.docqa import DocumentQA
from memllm.cli.ask import ask, qa_command, render_answer
from memllm.memory_stores.embeddings import FakeEmbedder
from tests.docqa.conftest import boxes_text, library_answers

app = typer.Typer()
app.command("ask")(ask)
app.command("qa")(qa_command)
runner = CliRunner()




def test_ask_text_transcript(cli, tiny_llm, tmp_path):
    doc = tmp_path / "boxes.txt"
    doc.write_text(boxes_text())
    result = runner.invoke(app, ["ask", str(doc), "-q", "What color is box 7?", "--mode", "text"])
    assert result.exit_code == 0, result.output
    (answer,) = library_answers(tiny_llm, "text", str(doc), ["What color is box 7?"])
    best = answer.evidence[0]
    lines = result.stdout.splitlines()
    assert lines[0] == "Q: What color is box 7?"
    assert lines[1] == f"A: {answer.text}"
    assert lines[2] == "evidence:"
    a, b = best.lines
    flat = " ".join(best.text.split())
    shown = json.dumps(flat if len(flat) <= 60 else flat[:57] + "...")
    assert (
        lines[3] == f"  [chunk {best.score:.3f}] {doc}:lines {a}-{b} (chars {best.start}-{best.end}) {shown}"
    )
    assert len(lines) == 3 + len(answer.evidence) + 1
    assert lines[-1] == "(0.25 s)"
    assert result.stdout == render_answer(answer)
    assert f"memllm: read {len(tiny_llm.tokenizer(boxes_text())['input_ids'])} tokens from 1 document(s)" in (
        result.stderr
    )
    assert cli == [("smollm2-135m", "auto")]


def test_ask_json_kv_many_questions(cli, tiny_llm, tmp_path):
    doc = tmp_path / "boxes.txt"
    doc.write_text(boxes_text())
    qfile = tmp_path / "q.txt"
    qfile.write_text("# questions\nWhere is box 3?\n\nWhich box is blue?\n")
    result = runner.invoke(
        app,
        [
            "ask",
            str(doc),
            "-q",
            "What color is box 7?",
            "--questions",
            str(qfile),
            "--json",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    questions = ["What color is box 7?", "Where is box 3?", "Which box is blue?"]
    expected = library_answers(tiny_llm, "kv", str(doc), questions)
    assert [r["question"] for r in records] == questions
    for rec, ans in zip(records, expected, strict=True):
        want = ans.to_dict()
        assert rec["seconds"] == 0.25
        rec.pop("seconds"), want.pop("seconds")
        assert rec == want
        assert rec["mode"] == "kv" and {e["kind"] for e in rec["evidence"]} == {"unit"}


def test_save_memory_then_answer_without_the_document(cli, tiny_llm, tmp_path):
    doc = tmp_path / "boxes.txt"
    doc.write_text(boxes_text())
    mem = tmp_path / "mem"
    first = runner.invoke(app, ["ask", str(doc), "--mode", "hybrid", "--save-memory", str(mem), "-q", "Where is box 3?",
                                "--json"])  # fmt: skip
    assert first.exit_code == 0, first.output
    assert f"memllm: memory saved to {mem} (answer later with --memory {mem})" in first.stderr
    doc.unlink()  # the later run must not need it
    later = runner.invoke(app, ["ask", "--memory", str(mem), "-q", "Where is box 3?", "--json"])
    assert later.exit_code == 0, later.output
    assert "memllm: restored 1 document(s) from" in later.stderr and "read " not in later.stderr
    a, b = json.loads(first.stdout), json.loads(later.stdout)
    assert a == b
    mismatch = runner.invoke(app, ["ask", "--memory", str(mem), "--mode", "kv", "-q", "x?"])
    assert mismatch.exit_code == 2
    assert mismatch.stderr == (
        f"error: the memory at {mem} was saved in mode hybrid: drop --mode or use --mode hybrid\n"
    )


@pytest.fixture
def qa_memories(monkeypatch):
    """The `memory` argument of every DocumentQA built while the test runs, in order."""
    used = []
    init = DocumentQA.__init__

    def spy(self, *args, **kwargs):
        used.append(kwargs.get("memory"))
        init(self, *args, **kwargs)

    monkeypatch.setattr(DocumentQA, "__init__", spy)
    return used


@pytest.mark.parametrize("window", [False, True])  # --selector alone; with --n-local and --topk too
def test_memory_options_answer_as_the_library_does_with_those_settings(cli, tiny_llm, tmp_path, qa_memories, window):
    from dataclasses import replace

    doc = tmp_path / "boxes.txt"
    doc.write_text(boxes_text())
    default = docqa_mod.default_memory(tiny_llm.trained_len)
    changes = {"selector": "hybrid", **({"n_local": default.n_local // 2, "topk": 2} if window else {})}
    flags = [x for k, v in changes.items() for x in ("--" + k.replace("_", "-"), str(v))]
    used = qa_memories
    result = runner.invoke(app, ["ask", str(doc), "-q", "What color is box 7?", *flags, "--json"])
    assert result.exit_code == 0, result.output
    memory = replace(default, **changes)
    assert used == [memory]  # the model's settings with the flags' changes, nothing else
    qa = DocumentQA(tiny_llm, "kv", memory=memory, embedder=FakeEmbedder())
    qa.read(str(doc))
    try:
        assert qa.session.text_index is not None
        assert qa.session.config.n_local == changes.get("n_local", default.n_local)
        assert qa.session.config.topk == changes.get("topk", default.topk)
        want = qa.ask("What color is box 7?").to_dict()
    finally:
        qa.close()
    got = json.loads(result.stdout)
    got.pop("seconds"), want.pop("seconds")
    assert got == want


def test_stdin_document(cli, tiny_llm):
    result = runner.invoke(app, ["ask", "-", "-q", "What color is box 1?", "--mode", "text", "--no-evidence"],
                           input=boxes_text(6))  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "Q: What color is box 1?" and lines[1].startswith("A: ") and lines[2] == "(0.25 s)"
    assert len(lines) == 3


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["ask", "-q", "why?"], 2, "give documents to read (FILE..., '-' for stdin) or --memory PATH saved earlier"),
        (["ask", "DOC"], 2, "give questions with -q/--questions (or --save-memory PATH to only read)"),
        (["ask", "DOC", "-q", "why?", "--mode", "full"], 2, "--mode must be kv, text or hybrid, got 'full'"),
        (["ask", "DOC", "-q", "why?", "--selector", "best"], 2, "--selector must be one of question, hybrid, text, infllm, lexical, got 'best'"),
        (["ask", "DOC", "-q", "why?", "--mode", "text", "--selector", "hybrid"], 2,
         "--selector applies to --mode kv or hybrid (text mode reads no memory units)"),
        (["ask", "--memory", "NOWHERE", "-q", "why?", "--selector", "hybrid"], 2,
         "--selector applies when documents are read: a saved --memory keeps its own"),
        (["ask", "DOC", "-q", "why?", "--mode", "text", "--n-local", "64"], 2,
         "--n-local applies to --mode kv or hybrid (text mode reads no memory units)"),
        (["ask", "--memory", "NOWHERE", "-q", "why?", "--topk", "4"], 2,
         "--topk applies when documents are read: a saved --memory keeps its own"),
        (["ask", "--memory", "NOWHERE", "-q", "why?"], 7,
         "no document memory at NOWHERE: expected docqa.json (written by --save-memory)"),
        (["ask", "EMPTY", "-q", "why?"], 7, "EMPTY is empty: nothing to read"),
        (["ask", "MISSING", "-q", "why?"], 7, "MISSING: no such file"),
        (["ask", "DOC", "--questions", "MISSING"], 7, "questions file MISSING: no such file"),
    ],
)  # fmt: skip
def test_errors_are_one_line(cli, tmp_path, args, code, message):
    paths = {"DOC": tmp_path / "d.txt", "EMPTY": tmp_path / "e.txt", "MISSING": tmp_path / "m.txt",
             "NOWHERE": tmp_path / "nowhere"}  # fmt: skip
    paths["DOC"].write_text("Some text.")
    paths["EMPTY"].write_text("")
    args = [str(paths.get(a, a)) for a in args]
    for key, value in paths.items():
        message = message.replace(key, str(value))
    result = runner.invoke(app, args)
    assert result.exit_code == code
    assert result.stdout == ""
    assert result.stderr == f"error: {message}\n"


def test_bench_qa_command(cli, tmp_path):
    out = tmp_path / "qa.json"
    result = runner.invoke(app, ["qa", "--lengths", "1k", "--modes", "kv,text,full", "--datasets", "squad", "-n", "2",
                                 "--out", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "| dataset | length | mode | n | EM | F1 | read s | s/answer |"
    assert [line.split(" | ")[:4] for line in lines[2:]] == [
        ["| squad", "1K", m, "2"] for m in ("kv", "text", "full")
    ]
    data = json.loads(out.read_text())
    assert [r["mode"] for r in data["rows"]] == ["kv", "text", "full"]
    assert len(data["answers"]) == 6 and data["meta"]["reading_mode"] == "hybrid"
    bad = runner.invoke(app, ["qa", "--lengths", "8q"])
    assert bad.exit_code == 2
    assert bad.stderr == "error: cannot read length '8q': use numbers like 8k, 32k, 128k, 512k, 1m\n"


def test_an_evidence_excerpt_shows_where_the_question_matched():
    """A unit holds ~100 words; the excerpt `ask` prints is the stretch holding most of the question's
    words (from its sentence's start when that is near), else the unit's start."""
    from memllm.cli.ask import excerpt

    unit = ("them.  So I inverted the 5 regrets,\nyielding a list of 5 commands\n\nThe lighthouse on Skerry "
            "Island was rebuilt in 1911 by a keeper named Marta Velde. Then more text follows.")  # fmt: skip
    assert excerpt(unit) == '"them. So I inverted the 5 regrets, yielding a list of 5 c..."'
    shown = json.loads(excerpt(unit, near="Who rebuilt the lighthouse on Skerry Island?"))
    assert shown.startswith("...lighthouse on Skerry Island was rebuilt") and shown.endswith("...")
    assert len(shown) <= 60
    assert json.loads(excerpt(unit, near="Who was the keeper?")).startswith("...keeper named Marta Velde.")
    assert json.loads(excerpt(unit, near="What follows then?")).startswith("...Then more text follows.")
    assert excerpt(unit, near="What is the meaning of life?") == excerpt(unit)  # no word of it: the start
    assert excerpt("short text", near="text") == '"short text"'


def test_a_window_the_model_cannot_hold_is_refused_before_reading(cli, tiny_llm, tmp_path):
    doc = tmp_path / "boxes.txt"
    doc.write_text(boxes_text())
    result = runner.invoke(app, ["ask", str(doc), "-q", "Where?", "--n-local", str(tiny_llm.trained_len)])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"error: MemoryConfig.n_local ({tiny_llm.trained_len}) leaves no room in the model's")
    assert len(result.stderr.splitlines()) == 1 and "read " not in result.stderr


@pytest.fixture
def long_read_alias(tiny_llm, monkeypatch):
    """The tiny model named as the default alias, whose long-read window is made one the tiny model holds:
    the long-read settings it gets."""
    from dataclasses import replace

    from memllm import models

    window = (("n_local", 32), ("topk", 2))
    monkeypatch.setattr(tiny_llm, "name", models.DEFAULT_MODEL)
    monkeypatch.setitem(models.ALIASES, models.DEFAULT_MODEL,
                        replace(models.ALIASES[models.DEFAULT_MODEL], long_read=window, long_mode=""))  # fmt: skip
    return dict(window)


@pytest.mark.parametrize("boxes", [1, 24])  # fits the default window whole; does not
def test_ask_reads_a_long_document_at_the_models_long_read_window(cli, tiny_llm, tmp_path, qa_memories,
                                                                   long_read_alias, boxes):  # fmt: skip
    from dataclasses import replace

    doc = tmp_path / "boxes.txt"
    doc.write_text(boxes_text(boxes))
    used = qa_memories
    result = runner.invoke(app, ["ask", str(doc), "-q", "What color is box 0?", "--json"])
    assert result.exit_code == 0, result.output
    note = (f"memllm: note: the documents are longer than {tiny_llm.name}'s default window: read with --n-local 32 "
            "--topk 2 (the window it reads from memory with)")  # fmt: skip
    if boxes == 1:  # the default window, every token attended
        assert used == [None] and "--n-local" not in result.stderr
    else:
        assert used == [replace(docqa_mod.default_memory(tiny_llm.trained_len), **long_read_alias)]
        assert note in result.stderr.splitlines()
        # the library's answer at that window; a saved memory keeps the window it was read at
        (want,) = library_answers(tiny_llm, "kv", doc, ["What color is box 0?"], memory=used[0])
        mem = tmp_path / "mem"
        saved = runner.invoke(app, ["ask", str(doc), "--save-memory", str(mem), "-q", "What color is box 0?", "--json"])
        again = runner.invoke(app, ["ask", "--memory", str(mem), "-q", "What color is box 0?", "--json"])
        answers = [json.loads(r.stdout) for r in (result, saved, again)] + [want.to_dict()]
        assert all(a.pop("seconds") is not None for a in answers)
        assert answers[1:] == answers[:-1]
        assert json.loads((mem / "kv" / "manifest.json").read_text())["memory"]["n_local"] == 32
    # a window the user chose, or a text-mode read, is left alone
    for flags in (["--topk", "3"], ["--mode", "text"], ["--mode", "hybrid"]):
        used.clear()
        result = runner.invoke(app, ["ask", str(doc), "-q", "What color is box 0?", "--json", *flags])
        assert result.exit_code == 0, result.output
        assert "default window" not in result.stderr
        assert used[0] is None or used[0].n_local == docqa_mod.default_memory(tiny_llm.trained_len).n_local


def test_each_document_gets_the_window_its_length_needs(cli, tiny_llm, tmp_path, long_read_alias):
    short, long = tmp_path / "short.txt", tmp_path / "long.txt"
    short.write_text(boxes_text(1))
    long.write_text(boxes_text(24))
    result = runner.invoke(app, ["ask", str(short), str(long), "-q", "What color is box 0?", "--each", "--json"])
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stderr.splitlines() if "default window" in line]
    assert notes == [f"memllm: note: {long}: longer than {tiny_llm.name}'s default window: read with --n-local 32 "
                     "--topk 2 (the window it reads from memory with)"]  # fmt: skip


@pytest.fixture
def long_mode_alias(long_read_alias, monkeypatch):
    """long_read_alias whose mode for long documents (models.PackagedModel.long_mode) is text (retrieved chunks)."""
    from dataclasses import replace

    from memllm import models

    spec = models.ALIASES[models.DEFAULT_MODEL]
    monkeypatch.setitem(models.ALIASES, models.DEFAULT_MODEL, replace(spec, long_mode="text"))
    return long_read_alias


@pytest.fixture
def qa_modes(monkeypatch):
    """(mode, memory) of every DocumentQA built while the test runs, in order."""
    built = []
    init = DocumentQA.__init__

    def spy(self, llm, mode="kv", *args, **kwargs):
        built.append((mode, kwargs.get("memory")))
        init(self, llm, mode, *args, **kwargs)

    monkeypatch.setattr(DocumentQA, "__init__", spy)
    return built


def test_a_long_document_is_read_in_the_models_long_mode_where_no_mode_is_given(cli, tiny_llm, tmp_path, qa_modes,
                                                                                long_mode_alias):  # fmt: skip
    from dataclasses import replace

    short, long = tmp_path / "short.txt", tmp_path / "long.txt"
    short.write_text(boxes_text(1))
    long.write_text(boxes_text(24))
    note = (f"memllm: note: the documents are longer than {tiny_llm.name}'s default window: read with --mode text "
            "(the mode it answers long documents in best)")  # fmt: skip

    def run(*args):
        qa_modes.clear()
        result = runner.invoke(app, ["ask", *args, "-q", "What color is box 0?", "--json"])
        assert result.exit_code == 0, result.output
        return result

    result = run(str(long))
    assert qa_modes == [("text", None)]  # chunks alone, no window
    assert note in result.stderr.splitlines()
    (want,) = library_answers(tiny_llm, "text", long, ["What color is box 0?"])
    got = json.loads(result.stdout)
    assert got.pop("seconds") is not None and want.to_dict().pop("seconds") is not None
    assert {k: v for k, v in got.items() if k != "seconds"} == {k: v for k, v in want.to_dict().items() if k != "seconds"}
    # a memory saved from that read answers the same, in the mode it was read in
    mem = tmp_path / "mem"
    run(str(long), "--save-memory", str(mem))
    again = json.loads(run("--memory", str(mem)).stdout)
    assert {**again, "seconds": 0} == {**json.loads(result.stdout), "seconds": 0} and again["mode"] == "text"
    # a document that fits, a mode or a window the user gave: kv (at the long-read window where it is kv's)
    run(str(short))
    assert qa_modes == [("kv", None)]
    result = run(str(long), "--mode", "kv")
    assert qa_modes == [("kv", replace(docqa_mod.default_memory(tiny_llm.trained_len), **long_mode_alias))]
    assert "--mode text" not in result.stderr and "--n-local 32" in result.stderr
    result = run(str(long), "--topk", "3")
    assert [m for m, _ in qa_modes] == ["kv"] and "default window" not in result.stderr
    # --each decides per document, and says so on the long one only
    result = run(str(short), str(long), "--each")
    assert [m for m, _ in qa_modes] == ["kv", "text"]
    assert [line for line in result.stderr.splitlines() if "default window" in line] == [
        f"memllm: note: {long}: longer than {tiny_llm.name}'s default window: read with --mode text "
        "(the mode it answers long documents in best)"
    ]


def test_long_read_settings_leave_a_loaded_models_own_memory_and_other_models_alone(tiny_llm, monkeypatch,
                                                                                    long_read_alias):  # fmt: skip
    from memllm.agents.batch_docs import long_read_settings
    from memllm.config import MemoryConfig
    from memllm.documents import read_text

    long = [read_text(boxes_text(24), "long")]
    assert long_read_settings(tiny_llm, long, "kv", {"selector": "hybrid"}) == {"selector": "hybrid", **long_read_alias}
    assert long_read_settings(tiny_llm, long, "hybrid", None) == {}  # its passages need the default window
    monkeypatch.setattr(tiny_llm, "memory", MemoryConfig(n_init=16, n_local=64, block_size=16, repr_topk=4))
    assert long_read_settings(tiny_llm, long, "kv", None) == {}
    monkeypatch.setattr(tiny_llm, "memory", None)
    monkeypatch.setattr(tiny_llm, "name", "some/other-model")
    assert long_read_settings(tiny_llm, long, "kv", None) == {}


def test_long_read_mode_leaves_a_given_mode_a_loaded_models_memory_and_other_models_alone(tiny_llm, monkeypatch,
                                                                                         long_mode_alias):  # fmt: skip
    from memllm.agents.batch_docs import long_read_mode
    from memllm.config import MemoryConfig
    from memllm.documents import read_text

    long, short = [read_text(boxes_text(24), "long")], [read_text(boxes_text(1), "short")]
    assert long_read_mode(tiny_llm, long, None) == "text"
    assert long_read_mode(tiny_llm, short, None) == "kv"
    for settings in ({"selector": "question"}, {"n_local": 64}, {"topk": 4}):  # memory settings: kv's
        assert long_read_mode(tiny_llm, long, None, settings) == "kv"
    assert [long_read_mode(tiny_llm, long, m) for m in ("kv", "text", "hybrid")] == ["kv", "text", "hybrid"]
    monkeypatch.setattr(tiny_llm, "memory", MemoryConfig(n_init=16, n_local=64, block_size=16, repr_topk=4))
    assert long_read_mode(tiny_llm, long, None) == "kv"
    monkeypatch.setattr(tiny_llm, "memory", None)
    monkeypatch.setattr(tiny_llm, "name", "some/other-model")
    assert long_read_mode(tiny_llm, long, None) == "kv"


def test_long_read_choice_tokenizes_the_documents_once(tiny_llm, monkeypatch, long_mode_alias):
    from memllm.agents import batch_docs
    from memllm.documents import read_text

    counted = []
    estimate = batch_docs.estimate_tokens
    monkeypatch.setattr(batch_docs, "estimate_tokens", lambda text, tok: counted.append(text) or estimate(text, tok))
    short, long = [read_text(boxes_text(1), "short")], [read_text(boxes_text(24), "long")]
    assert batch_docs.long_read_choice(tiny_llm, short, None, None)[:2] == ("kv", {})  # fits: kv, default window
    assert batch_docs.long_read_choice(tiny_llm, long, "kv", None)[:2] == ("kv", long_mode_alias)
    assert batch_docs.long_read_choice(tiny_llm, long, None, None)[:2] == ("text", {})
    assert len(counted) == 3  # once a choice, though the mode and the window both ask whether they fit


def test_an_embedder_is_loaded_only_where_the_mode_or_the_selector_may_need_one(tiny_llm, monkeypatch, long_mode_alias):
    from memllm.cli import common
    from memllm.config import MemoryConfig

    loads = []
    monkeypatch.setattr(common, "load_embedder", lambda: loads.append(1) or "embedder")
    assert common.embedder_before_reading(tiny_llm, None, None) == "embedder"  # a long document may be read as text
    assert common.embedder_before_reading(tiny_llm, "text", None) == "embedder"
    assert common.embedder_before_reading(tiny_llm, None, {"selector": "lexical"}) == "embedder"  # its text index
    assert len(loads) == 3
    # kv whatever the documents are: --mode kv, or a memory setting; a selector that reads no text index
    assert common.embedder_before_reading(tiny_llm, "kv", {"selector": "question"}) is None
    assert common.embedder_before_reading(tiny_llm, None, {"selector": "question"}) is None
    assert common.embedder_before_reading(tiny_llm, None, {"selector": "infllm", "topk": 4}) is None
    # a model loaded with a memory of its own reads in kv, with its own selector: none where that reads no text index
    monkeypatch.setattr(tiny_llm, "memory", MemoryConfig(n_init=16, n_local=64, block_size=16, repr_topk=4,
                                                         selector="question"))  # fmt: skip
    assert common.embedder_before_reading(tiny_llm, None, None) is None
    assert len(loads) == 3


def test_the_library_reads_documents_as_ask_chooses(tiny_llm, tmp_path, long_mode_alias):
    """batch_docs.read_documents (the library's `memllm ask`): a long document in the model's long mode, a short
    one in kv at the default window, the user's mode as given; the choice's note first in the read's notes;
    paths and Documents alike; the same answers as `ask` gives on the CLI's path (document_qa)."""
    from memllm.agents.batch_docs import document_qa, read_documents
    from memllm.documents import read_text
    from memllm.memory_stores.embeddings import FakeEmbedder

    long_path = tmp_path / "long.txt"
    long_path.write_text(boxes_text(24))
    short = read_text(boxes_text(1), "short")
    qa, report = read_documents(tiny_llm, [long_path], embedder=FakeEmbedder())
    with qa:
        assert qa.mode == "text" and report.documents == [str(long_path)] and report.tokens > 0
        assert "--mode text" in report.notes[0]
        answer = qa.ask("Which shelf is box 3 on?", max_new_tokens=4)
    qa, report = read_documents(tiny_llm, [short], embedder=FakeEmbedder())
    with qa:
        assert (qa.mode, report.notes) == ("kv", [])
    qa, report = read_documents(tiny_llm, [long_path], "kv", embedder=FakeEmbedder())
    with qa:
        assert qa.mode == "kv" and qa.memory.n_local == long_mode_alias["n_local"]
        assert "--n-local" in report.notes[0]
    qa, note = document_qa(tiny_llm, [read_text(boxes_text(24), str(long_path))], embedder=FakeEmbedder())
    with qa:
        assert qa.mode == "text" and note is not None
        qa.read(long_path)
        assert qa.ask("Which shelf is box 3 on?", max_new_tokens=4).text == answer.text
