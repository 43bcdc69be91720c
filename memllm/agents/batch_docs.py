"""Each document on its own: one DocumentQA per document, every question asked of each.

`answer_each` is what `memllm ask --each` runs in its own process, and what every Ray worker runs on the
documents it is given (memllm.distributed.ray_docs), so that both give the same answers.

Knows nothing of the CLI or of Ray.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from memllm.agents.docqa import Answer, DocumentQA, Progress, ReadReport, memory_for
from memllm.config import MemoryConfig
from memllm.documents import Document


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
    mode: str = "kv",
    *,
    settings: Mapping[str, Any] | None = None,
    embedder: Any = None,
    max_new_tokens: int = 24,
    progress: Callable[[Document], Progress | None] | None = None,
) -> Iterator[DocumentAnswers]:
    """Read each document into its own memory and ask it every question; one result per document, in
    order. settings: MemoryConfig fields changed from the model's own (`memory_settings`: the
    selector, n_local, topk; kv and hybrid modes); embedder: the chunk store's and units' text index's
    (None: the packaged MiniLM where one is needed); progress(doc): a reading progress callback for that
    document, or None."""
    config = memory_settings(llm, settings)
    for doc in documents:
        qa = DocumentQA(llm, mode, memory=config, embedder=embedder, max_new_tokens=max_new_tokens)
        try:
            report = qa.read(doc, progress(doc) if progress is not None else None)
            answers = [qa.ask(q) for q in questions]
        finally:
            qa.close()
        yield DocumentAnswers(doc.name, answers, report)


def memory_settings(llm: Any, settings: Mapping[str, Any] | None) -> MemoryConfig | None:
    """The model's document-QA memory settings (`memory_for`) with `settings` (MemoryConfig fields:
    `memllm ask`'s --selector, --n-local, --topk) changed; None where nothing is changed. A bad value
    is ConfigError, from MemoryConfig's own checks and from resolving it for the model's window."""
    if not settings:
        return None
    config = replace(memory_for(llm), **settings)
    config.resolved(llm.trained_len)  # a window that does not fit the model: refused before anything is read
    return config


def units_selector(llm: Any, settings: Mapping[str, Any] | None) -> str:
    """The selector a memory with `settings` uses (the model's own where they leave it): what decides
    whether its units need a text index's embedder (cli.common.embedder_for)."""
    return (settings or {}).get("selector") or memory_for(llm).selector
