"""`memllm ask FILE... -q QUESTION`: read documents once, answer many questions, show the evidence.

Reading shows a progress bar (tokens, tokens/s, ETA) on stderr; answers go to stdout, as text or one
JSON object per answer (--json). `--save-memory PATH` keeps what was read so that `--memory PATH`
answers later without reading again. Also `qa_command`, the `memllm bench qa` command (registered by
the lead on bench_app). Parsing and rendering only: the logic lives in memllm.agents.docqa,
memllm.documents and memllm.bench.qa.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import typer

from memllm import models
from memllm.cli import common
from memllm.config import SELECTORS, MemoryConfig
from memllm.errors import ConfigError, InputError

EXCERPT = 60
WORD = re.compile(r"\w+")


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _note(text: str) -> None:
    print(f"memllm: {text}", file=sys.stderr, flush=True)


def excerpt(text: str, width: int = EXCERPT, near: str | None = None) -> str:
    """One line of at most `width` characters, whitespace collapsed, quoted: the text's start, or with
    `near` (the question) the stretch holding most of its words of 4 or more characters (numbers of any
    length), "..." marking what is left out (a unit holds ~100 words; its start is seldom what matched)."""
    flat = " ".join(text.split())
    if len(flat) <= width:
        return json.dumps(flat, ensure_ascii=False)
    start = _best_start(flat, width - 6, near) if near else 0
    piece = flat[start : start + width - (6 if start else 3)]
    return json.dumps(("..." if start else "") + piece + "...", ensure_ascii=False)


def _best_start(flat: str, span: int, question: str) -> int:
    """Where in `flat` a stretch of `span` characters, starting at a word, holds most distinct words of
    `question` (0 when none holds any; ties: the earliest)."""
    wanted = {w for w in WORD.findall(question.lower()) if len(w) >= 4 or w.isdigit()}
    if not wanted:
        return 0
    found = [(m.start(), m.group().lower()) for m in WORD.finditer(flat) if m.group().lower() in wanted]
    best, best_n = 0, 0
    for i, (at, _) in enumerate(found):
        n = len({w for pos, w in found[i:] if pos + len(w) <= at + span})
        if n > best_n:
            best, best_n = at, n
    # from the start of the sentence the first match is in, when that is only a few words before it
    stop = flat.rfind(". ", 0, best)
    return stop + 2 if stop >= 0 and best - stop <= span // 4 else best


def render_answer(answer: Any, evidence: bool = True) -> str:
    """The text block for one answer (what `memllm ask` prints)."""
    lines = [f"Q: {answer.question}", f"A: {answer.text}"]
    if evidence:
        if answer.evidence:
            lines.append("evidence:")
        for ev in answer.evidence:
            tag = f"chunk {ev.score:.3f}" if ev.kind == "chunk" else f"{ev.group} {ev.score:.0%}"
            lines.append(f"  [{tag}] {ev.location()} {excerpt(ev.text, near=answer.question)}")
        lines.extend(f"note: {n}" for n in answer.notes)
    lines.append(f"({answer.seconds:.2f} s)")
    return "\n".join(lines) + "\n"


def read_questions(questions: list[str], questions_file: str | None) -> list[str]:
    out = [q for q in (" ".join(q.split()) for q in questions) if q]
    if questions_file is not None:
        path = Path(questions_file)
        if not path.is_file():
            raise InputError(f"questions file {questions_file}: no such file")
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                out.append(line)
    return out


class _Progress:
    """A rich progress bar on stderr: tokens read, tokens/s, ETA. Created lazily on the first call."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.bar: Any = None
        self.task: Any = None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                ProgressColumn,
                TextColumn,
                TimeRemainingColumn,
            )
            from rich.text import Text

            class Speed(ProgressColumn):
                def render(self, task: Any) -> Text:
                    speed = task.finished_speed or task.speed
                    return Text(f"{speed:,.0f} tok/s" if speed else "- tok/s")

            self.bar = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"),
                Speed(), TimeRemainingColumn(), console=Console(stderr=True), transient=False,
            )  # fmt: skip
            self.bar.start()
            self.task = self.bar.add_task(self.label, total=total)
        self.bar.update(self.task, completed=done, total=total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


@common.fail_on_error
def ask(
    files: list[str] = typer.Argument(None, help="Documents (.txt, .md, .html, .pdf; '-' for stdin)."),
    question: list[str] = typer.Option([], "--question", "-q", help="A question (repeat for more)."),
    questions_file: str | None = typer.Option(None, "--questions", help="A file of questions, one per line."),
    mode: str | None = typer.Option(
        None, "--mode", help="kv (context memory; the default), text or hybrid. Without it (and without --selector, "
        "--n-local, --topk), a model may read documents longer than its window in a mode of its own (`memllm models`).",
    ),
    selector: str | None = typer.Option(
        None, "--selector", metavar="|".join(SELECTORS),
        help="Which units a question reads (kv, hybrid modes): lexical (the default: the units holding the "
        "question's rare words first, then hybrid's), hybrid (its attention and a text index over the units, see "
        "the README), question (its attention alone, no embedder), text (the text index alone) or infllm (each "
        "layer's own lookup).",
    ),  # fmt: skip
    n_local: int | None = typer.Option(
        None, "--n-local", min=1, metavar="N", help="The local window in tokens (kv, hybrid modes; default: the "
        "model's, 4,096 from an 8K model up; in kv mode, documents longer than that are read at the window the model "
        "reads from memory with where it has one: SmolLM2-135M 512 and --topk 8, see the README).",
    ),  # fmt: skip
    topk: int | None = typer.Option(
        None, "--topk", min=1, metavar="N", help="Memory units a lookup reads (kv, hybrid modes; default 16, or the model's for long documents as --n-local).",
    ),  # fmt: skip
    save_memory: str | None = typer.Option(None, "--save-memory", help="Save what was read to this folder."),
    memory: str | None = typer.Option(None, "--memory", help="Answer from memory saved with --save-memory."),
    model: str = typer.Option(models.DEFAULT_MODEL, "--model", "-m", help="Alias, Hugging Face id or path."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    max_new_tokens: int = typer.Option(24, "--max-new-tokens", min=1, max=common.MAX_NEW_TOKENS, help="Longest answer, in tokens."),
    evidence: bool = typer.Option(True, "--evidence/--no-evidence", help="Show what each answer used."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per answer on stdout."),
    each: bool = typer.Option(
        False, "--each", help="Read each document into its own memory and ask it every question "
        "(default: all documents in one memory).",
    ),  # fmt: skip
    ray: str | None = typer.Option(
        None, "--ray", metavar="ADDRESS|auto", help="Answer each document (as --each) on a worker of the Ray "
        "cluster at HOST:PORT (auto: the one running here). Needs pip install 'memllm\\[ray]'.",
    ),  # fmt: skip
    ray_workers: int | None = typer.Option(
        None, "--ray-workers", min=1, help="Ray workers, one model each (default: one per GPU of the cluster, else 2).",
    ),  # fmt: skip
) -> None:
    """Read documents once and answer questions about them, with the evidence of each answer."""
    from memllm.agents.docqa import MODES

    files = list(files or [])
    questions = read_questions(question, questions_file)
    if mode is not None and mode not in MODES[:3]:
        raise ConfigError(f"--mode must be kv, text or hybrid, got {mode!r}")
    common.check_selector(selector)
    given = {"selector": selector, "n_local": n_local, "topk": topk}
    settings = {k: v for k, v in given.items() if v is not None}  # MemoryConfig fields the user changed
    for key in settings:
        flag = "--" + key.replace("_", "-")
        if memory is not None:
            raise ConfigError(f"{flag} applies when documents are read: a saved --memory keeps its own")
        if mode == "text":
            raise ConfigError(f"{flag} applies to --mode kv or hybrid (text mode reads no memory units)")
    if ray_workers is not None and ray is None:
        raise ConfigError("--ray-workers applies with --ray ADDRESS")
    if each or ray is not None:
        flag = "--ray" if ray is not None else "--each"
        if memory is not None or save_memory is not None:
            raise ConfigError(f"{flag} reads each document into a memory of its own: drop --memory/--save-memory")
        if not files:
            raise ConfigError(f"{flag} needs documents to read (FILE..., '-' for stdin)")
    if not files and memory is None:
        raise ConfigError("give documents to read (FILE..., '-' for stdin) or --memory PATH saved earlier")
    if not questions and save_memory is None:
        raise ConfigError("give questions with -q/--questions (or --save-memory PATH to only read)")
    if memory is not None and not (Path(memory) / "docqa.json").is_file():
        raise InputError(f"no document memory at {memory}: expected docqa.json (written by --save-memory)")
    if save_memory is not None:
        from memllm.agents.docqa import check_save_target

        check_save_target(save_memory)  # refused before anything is read, not after
    from memllm.documents import read_document

    docs = [read_document(f) for f in files]  # bounded reads, refused before the model loads
    with common.exit_on_sigterm():
        if each or ray is not None:
            _ask_each(docs, questions, mode, settings, model, device, max_new_tokens, evidence, as_json,
                      ray, ray_workers)  # fmt: skip
            return
        _ask(docs, questions, mode, save_memory, memory, model, device, max_new_tokens, evidence, as_json, settings)


def _ask(files: list[Any], questions: list[str], mode: str | None, save_memory: str | None,
         memory: str | None, model: str, device: str, max_new_tokens: int, evidence: bool,
         as_json: bool, settings: dict[str, Any] | None = None) -> None:  # fmt: skip
    from memllm.agents.batch_docs import document_qa
    from memllm.agents.docqa import DocumentQA

    llm = common.load_llm(model, device)
    if memory is not None:
        start = time.perf_counter()
        saved = DocumentQA.saved_manifest(memory)["mode"]
        if mode is not None and mode != saved:
            raise ConfigError(
                f"the memory at {memory} was saved in mode {saved}: drop --mode or use --mode {saved}"
            )
        # the chunk store's embedder, and the units' text index's where the saved memory selects by text (the default)
        embedder = common.embedder_for(saved, MemoryConfig.selector)
        qa = DocumentQA.load(llm, memory, embedder=embedder, max_new_tokens=max_new_tokens)
        _note(f"restored {len(qa.docs)} document(s) from {memory} in {time.perf_counter() - start:.2f} s")
    else:
        embedder = common.embedder_before_reading(llm, mode, settings)
        qa, note = document_qa(llm, files, mode, settings=settings, embedder=embedder, max_new_tokens=max_new_tokens)
        if note is not None:
            _note(f"note: the documents are {note}")
    try:
        if files:
            bar = _Progress("reading")
            try:
                report = qa.read_many(files, progress=bar)
            finally:
                bar.close()
            for note in report.notes:
                _note(f"note: {note}")
            _note(
                f"read {report.tokens} tokens from {len(report.documents)} document(s) in {report.seconds:.2f} s "
                f"({report.tokens_per_second:,.0f} tokens/s)"
            )
        if save_memory is not None:
            qa.save(save_memory)
            _note(f"memory saved to {save_memory} (answer later with --memory {save_memory})")
        for q in questions:
            answer = qa.ask(q)
            _write(
                json.dumps(answer.to_dict(), ensure_ascii=False) + "\n"
                if as_json
                else render_answer(answer, evidence)
            )
    finally:
        qa.close()


def _ask_each(docs: list[Any], questions: list[str], mode: str | None, settings: dict[str, Any], model: str,
              device: str, max_new_tokens: int, evidence: bool, as_json: bool, ray: str | None,
              ray_workers: int | None) -> None:  # fmt: skip
    """--each and --ray: every document in a memory of its own; the answers printed per document, in the
    documents' order (the same bytes either way, but for the seconds)."""
    from memllm.agents.batch_docs import DocumentAnswers

    total = len(docs)

    def done(n: int, _total: int) -> None:
        _note(f"answered {n}/{total} documents")

    def show(result: DocumentAnswers) -> None:
        for note in result.read.notes:
            _note(f"note: {result.document}: {note}")
        if as_json:
            _write("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in result.to_dicts()))
        else:
            _write(f"== {result.document} ==\n" + "".join(render_answer(a, evidence) for a in result.answers))

    if ray is not None:
        from memllm.distributed.ray_docs import answer_on_ray, cluster

        with cluster(ray) as ray_module:
            _note(f"answering {total} document(s) on the Ray cluster at {ray}")
            for result in answer_on_ray(ray_module, docs, questions, model=model, device=device, mode=mode,
                                        settings=settings, max_new_tokens=max_new_tokens, workers=ray_workers,
                                        on_done=done, log=_note):  # fmt: skip
                show(result)
        return
    from memllm.agents.batch_docs import answer_each

    llm = common.load_llm(model, device)
    embedder = common.embedder_before_reading(llm, mode, settings)
    bars: list[_Progress] = []

    def reading(doc: Any) -> _Progress:
        bars.append(_Progress(f"reading {doc.name}"))
        return bars[-1]

    try:
        results = answer_each(llm, docs, questions, mode, settings=settings, embedder=embedder,
                              max_new_tokens=max_new_tokens, progress=reading)  # fmt: skip
        for n, result in enumerate(results, 1):
            bars.pop().close()
            done(n, total)
            show(result)
    finally:
        for bar in bars:
            bar.close()


@common.fail_on_error
def qa_command(
    lengths: str = typer.Option("8k,32k", "--lengths", help="Document lengths in tokens: 8k,32k,128k,512k."),
    modes: str = typer.Option("kv,text,hybrid,full", "--modes", help="Modes to compare."),
    datasets: str = typer.Option("squad,hotpotqa", "--datasets", help="squad, hotpotqa."),
    questions: int = typer.Option(10, "--questions", "-n", min=1, help="Questions per dataset and length."),
    model: str = typer.Option(models.DEFAULT_MODEL, "--model", "-m", help="Alias, Hugging Face id or path."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    seed: int = typer.Option(0, "--seed", help="Seed for question choice and paragraph order."),
    out: str | None = typer.Option(None, "--out", help="Write the results as JSON to this file."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON instead of a table."),
) -> None:
    """Long-document QA: SQuAD / HotpotQA gold paragraphs hidden among distractors; EM and F1 per mode."""
    from memllm.bench import qa as qa_bench

    llm = common.load_llm(model, device)
    results = qa_bench.run(
        llm,
        lengths=qa_bench.parse_lengths(lengths),
        modes=qa_bench.parse_list(modes, qa_bench.BENCH_MODES, "mode"),
        datasets=qa_bench.parse_list(datasets, qa_bench.DATASETS, "dataset"),
        n_questions=questions,
        seed=seed,
        embedder=common.load_embedder() if {"text", "hybrid"} & set(modes.split(",")) else None,
        log=_note,
    )
    if out is not None:
        Path(out).write_text(json.dumps(results, indent=2))
        _note(f"results written to {out}")
    _write(json.dumps(results) + "\n" if as_json else qa_bench.table(results["rows"]) + "\n")
