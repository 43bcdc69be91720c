"""Documents read as `memllm ask` reads them, in the library.

`read_documents` (and `document_qa`, which it and `ask` build on) choose the mode and the window for the
documents' length (long_read_choice: what was measured to answer best for the model) and read them into one
DocumentQA. `answer_each` reads each document on its own: one DocumentQA per document, every question asked of each.
`answer_each` is what `memllm ask --each` runs in its own process, and what every Ray worker runs on the
documents it is given (memllm.distributed.ray_docs), so that both give the same answers.

Knows nothing of the CLI or of Ray.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from memllm import models
from memllm.agents.docqa import (
    Answer,
    DocumentQA,
    Progress,
    ReadReport,
    as_documents,
    estimate_tokens,
    memory_for,
)
from memllm.config import MemoryConfig
from memllm.documents import Document

# Tokens kept free beside the documents for the question's prompt and its answer when deciding whether
# they fit the default window whole (a quarter of the window where that is less: small test models).
ASK_ROOM = 512


@dataclass
class DocumentAnswers:
    """One document's answers (in the order of the questions) and what reading it did."""

    document: str
    answers: list[Answer]
    read: ReadReport

    def to_dicts(self) -> list[dict[str, Any]]:
        """Each answer's dict (Answer.to_dict) with the document's name added."""
        return [{"document": self.document, **a.to_dict()} for a in self.answers]


def answer_each(
    llm: Any,
    documents: Iterable[Document],
    questions: Sequence[str],
    mode: str | None = "kv",
    *,
    settings: Mapping[str, Any] | None = None,
    embedder: Any = None,
    max_new_tokens: int = 24,
    progress: Callable[[Document], Progress | None] | None = None,
) -> Iterator[DocumentAnswers]:
    """Read each document into its own memory and ask it every question; one result per document, in
    order. mode: kv, text or hybrid, or None (`ask` without --mode: kv, or the model's mode for a document
    longer than its window, `long_read_mode`); settings: MemoryConfig fields changed from the model's own
    (`memory_settings`: the selector, n_local, topk; kv and hybrid modes); embedder: the chunk store's and
    units' text index's (None: the packaged MiniLM where one is needed); progress(doc): a reading progress
    callback for that document, or None."""
    for doc in documents:
        qa, note = document_qa(llm, [doc], mode, settings=settings, embedder=embedder, max_new_tokens=max_new_tokens)
        try:
            report = qa.read(doc, progress(doc) if progress is not None else None)
            answers = [qa.ask(q) for q in questions]
        finally:
            qa.close()
        if note is not None:
            report.notes.append(note)
        yield DocumentAnswers(doc.name, answers, report)


def document_qa(
    llm: Any,
    documents: Sequence[Document],
    mode: str | None = None,
    *,
    settings: Mapping[str, Any] | None = None,
    embedder: Any = None,
    max_new_tokens: int = 24,
) -> tuple[DocumentQA, str | None]:
    """A DocumentQA for `documents` chosen as `memllm ask` chooses (long_read_choice): the mode (`mode`, or
    None: kv, or the model's own mode for documents longer than its default window) and the window (the
    model's long-read window where they do not fit it), with the user's memory `settings` (memory_settings);
    and the note saying what was chosen for the user (None where nothing was). Nothing is read yet."""
    picked, chosen, note = long_read_choice(llm, documents, mode, settings)
    qa = DocumentQA(llm, picked, memory=memory_settings(llm, chosen), embedder=embedder, max_new_tokens=max_new_tokens)
    return qa, note


def read_documents(
    llm: Any,
    sources: Sequence[str | Path | Document],
    mode: str | None = None,
    *,
    settings: Mapping[str, Any] | None = None,
    embedder: Any = None,
    max_new_tokens: int = 24,
    progress: Progress | None = None,
) -> tuple[DocumentQA, ReadReport]:
    """Read files (paths) or Documents as `memllm ask` reads them (document_qa: the mode and the window chosen
    for their length) into one DocumentQA, ready for `ask`; the read's report, with the choice's note first
    among its notes. The caller closes the DocumentQA (or uses it in a `with` block)."""
    docs = as_documents(sources)
    qa, note = document_qa(llm, docs, mode, settings=settings, embedder=embedder, max_new_tokens=max_new_tokens)
    try:
        report = qa.read_many(docs, progress=progress)
    except BaseException:
        qa.close()
        raise
    if note is not None:
        report.notes.insert(0, note)
    return qa, report


def memory_settings(llm: Any, settings: Mapping[str, Any] | None) -> MemoryConfig | None:
    """The model's document-QA memory settings (`memory_for`) with `settings` (MemoryConfig fields:
    `memllm ask`'s --selector, --n-local, --topk) changed; None where nothing is changed. A bad value
    is ConfigError, from MemoryConfig's own checks and from resolving it for the model's window."""
    if not settings:
        return None
    config = replace(memory_for(llm), **settings)
    config.resolved(llm.trained_len)  # a window that does not fit the model: refused before anything is read
    return config


def fits_default_window(llm: Any, documents: Sequence[Document]) -> bool:
    """Whether `documents` fit the model's default window whole, with ASK_ROOM for a question (a quarter
    of the window where that is less): read there, every token is attended (full attention, exact)."""
    window = memory_for(llm).resolved(llm.trained_len)
    tokens = sum(estimate_tokens(d.text, llm.tokenizer) for d in documents)
    return tokens + min(ASK_ROOM, (window.n_local or 0) // 4) <= window.exact_tokens()


def _fits(llm: Any, documents: Sequence[Document], fits: Callable[[], bool] | None) -> bool:
    """fits_default_window, or the caller's `fits` where it has one."""
    return fits() if fits is not None else fits_default_window(llm, documents)


def _long_read_spec(llm: Any) -> models.PackagedModel | None:
    """The packaged alias whose long-document choices apply: none where the loaded model has a memory of its own."""
    spec = models.packaged(llm)
    return None if spec is None or getattr(llm, "memory", None) is not None else spec


def long_read_mode(
    llm: Any,
    documents: Sequence[Document],
    mode: str | None,
    settings: Mapping[str, Any] | None = None,
    fits: Callable[[], bool] | None = None,
) -> str:
    """The mode to read `documents` in: `mode` where given; else the model's `long_mode`
    (models.PackagedModel) where the documents do not fit its default window and the user changed no memory
    setting (selector, n_local, topk in `settings`: those are kv's); else kv. `fits`: fits_default_window
    for these documents, where the caller has it (long_read_choice asks it once)."""
    known = mode_before_reading(llm, mode, settings)
    if known is not None:
        return known
    return "kv" if _fits(llm, documents, fits) else _long_read_spec(llm).long_mode  # type: ignore[union-attr]


def mode_before_reading(llm: Any, mode: str | None, settings: Mapping[str, Any] | None = None) -> str | None:
    """The mode long_read_mode picks whatever the documents are; None where it depends on their length (no
    mode given, no memory setting, a model with a long mode of its own): what decides, before any document
    is read, whether an embedder is needed (cli.common.embedder_for)."""
    if mode is not None:
        return mode
    spec = _long_read_spec(llm)
    return "kv" if spec is None or not spec.long_mode or settings else None


def long_read_settings(
    llm: Any,
    documents: Sequence[Document],
    mode: str,
    settings: Mapping[str, Any] | None,
    fits: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """`settings` with the model's long-read window (models.PackagedModel.long_read) added where the
    documents will not fit its default window whole (`fits_default_window`) and nothing chose a window:
    not the user (n_local, topk in `settings`), not the loaded model (`llm.memory`). Documents that fit keep
    the default window, where every token is attended (full attention, exact). kv mode only: hybrid puts
    n_local/2 tokens of retrieved passages in the window with the question (2,048 at the default window,
    256 at SmolLM2's 512), and answers fewer QA questions at the small window (RESULTS). `fits`: as in
    long_read_mode."""
    out = dict(settings or {})
    spec = _long_read_spec(llm)
    if mode != "kv" or spec is None or not spec.long_read or {"n_local", "topk"} & out.keys():
        return out
    return out if _fits(llm, documents, fits) else {**out, **dict(spec.long_read)}


def long_read_choice(
    llm: Any, documents: Sequence[Document], mode: str | None, settings: Mapping[str, Any] | None
) -> tuple[str, dict[str, Any], str | None]:
    """How `ask` reads `documents` given the user's `mode` (None: not given) and memory `settings`: the mode
    (long_read_mode), the settings (long_read_settings) and the note saying what was chosen for the user
    (long_read_note; None where nothing was)."""
    fits = functools.cache(lambda: fits_default_window(llm, documents))  # the documents are tokenized once
    picked = long_read_mode(llm, documents, mode, settings, fits)
    chosen = long_read_settings(llm, documents, picked, settings, fits)
    return picked, chosen, long_read_note(llm, settings, chosen, None if picked == (mode or "kv") else picked)


def long_read_note(
    llm: Any, settings: Mapping[str, Any] | None, chosen: Mapping[str, Any], mode: str | None = None
) -> str | None:
    """What long_read_mode (the `mode` it picked, where it picked one) and long_read_settings added, as a
    line for the user; None where they added nothing."""
    added = {k: v for k, v in chosen.items() if k not in (settings or {})}
    flags = " ".join(([f"--mode {mode}"] if mode else []) + ([models.as_flags(added)] if added else []))
    if not flags:
        return None
    why = "the mode it answers long documents in best" if mode else "the window it reads from memory with"
    return f"longer than {llm.name}'s default window: read with {flags} ({why})"


def units_selector(llm: Any, settings: Mapping[str, Any] | None) -> str:
    """The selector a memory with `settings` uses (the model's own where they leave it): what decides
    whether its units need a text index's embedder (cli.common.embedder_for)."""
    return (settings or {}).get("selector") or memory_for(llm).selector
