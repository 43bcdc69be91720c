"""Each document on its own: one DocumentQA per document, every question asked of each.

`answer_each` is what `memllm ask --each` runs in its own process, and what every Ray worker runs on the
documents it is given (memllm.distributed.ray_docs), so that both give the same answers.

Knows nothing of the CLI or of Ray.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from memllm.agents.docqa import Answer, DocumentQA, Progress, ReadReport, memory_for
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
    selector: str | None = None,
    embedder: Any = None,
    max_new_tokens: int = 24,
    progress: Callable[[Document], Progress | None] | None = None,
) -> Iterator[DocumentAnswers]:
    """Read each document into its own memory and ask it every question; one result per document, in
    order. selector: the units' selector (kv, hybrid modes; None: the model's default); embedder: the
    chunk store's and units' text index's (None: the packaged MiniLM where one is needed);
    progress(doc): a reading progress callback for that document, or None."""
    config = replace(memory_for(llm), selector=selector) if selector is not None else None
    for doc in documents:
        qa = DocumentQA(llm, mode, memory=config, embedder=embedder, max_new_tokens=max_new_tokens)
        try:
            report = qa.read(doc, progress(doc) if progress is not None else None)
            answers = [qa.ask(q) for q in questions]
        finally:
            qa.close()
        yield DocumentAnswers(doc.name, answers, report)
