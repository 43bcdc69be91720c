"""MemllmRetriever: memllm's memory controller as a LangChain retriever.

A query goes through the controller's recall (ranking by relevance, recency and importance, then
token-budgeted assembly: raw, summary or dropped per record). The records it chose come back as
Documents, in time order (as the controller places them in a prompt) or best first, each with its
score and why it was chosen. The page content is what the controller would put in the prompt: the
record's text, or its summary when the budget only fits that.

Knows nothing of models beyond a token counter.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any, Literal

from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from pydantic import ConfigDict, Field, PrivateAttr, model_validator

from memllm.agents.controller import ControllerConfig, MemoryController, Recall, RecallItem, whitespace_tokens
from memllm.errors import ConfigError


def item_to_document(item: RecallItem, rank: int) -> Document:
    """A Document for one record the controller chose (its text, or its summary in summary mode)."""
    rec = item.record
    text = rec.summary if item.mode == "summary" and rec.summary else rec.text
    metadata: dict[str, Any] = {
        "id": rec.id,
        "score": item.score,
        "relevance": item.relevance,
        "recency": item.recency,
        "importance": item.importance,
        "rank": rank,
        "mode": item.mode,
        "tokens": item.tokens,
        "why": item.why,
        "namespace": rec.namespace,
        "kind": rec.kind,
        "created_at": rec.created_at,
        "updated_at": rec.updated_at,
        "source": rec.source,
        "span": list(rec.span) if rec.span is not None else None,
    }
    if "role" in rec.metadata:
        metadata["role"] = rec.metadata["role"]
    return Document(id=rec.id, page_content=text, metadata=metadata)


class MemllmRetriever(BaseRetriever):
    """Controller-selected, token-budgeted memory of one user or document, as Documents.

        MemllmRetriever(store=store, user="alice", llm=chat_memllm)       # ChatAgent's namespace
        MemllmRetriever(store=store, namespace="doc:manual", k=8, memory_tokens=512)
        retriever.invoke("what is my dog called?", k=3)

    k: most records returned (the controller's candidates). memory_tokens: the token budget of what
    is returned, counted with `llm`'s tokenizer (a ChatMemLLM or MemLLM), else `count_tokens`, else
    whitespace words. gate: 'always' (default: a retriever is asked on purpose) or the controller's
    'heuristic' gate. order: 'time' (as in the prompt) or 'score' (best first).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    store: Any
    """A memllm MemoryStore (e.g. FaissStore) opened with an embedder."""
    user: str | None = None
    """A chat user: searches the ChatAgent's namespace `user:<user>`."""
    namespace: str | None = None
    """A store namespace (instead of `user`)."""
    k: int = Field(default=4, ge=1)
    memory_tokens: int = Field(default=768, ge=0)
    llm: Any = Field(default=None, exclude=True)
    count_tokens: Callable[[str], int] | None = Field(default=None, exclude=True)
    config: ControllerConfig | None = None
    """Controller settings (ranking weights, min_relevance, kinds); k, budgets and gate override it."""
    gate: Literal["always", "heuristic"] = "always"
    order: Literal["time", "score"] = "time"

    _controller: MemoryController | None = PrivateAttr(default=None)
    _last: Recall | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _check(self) -> MemllmRetriever:
        if (self.user is None) == (self.namespace is None):
            raise ConfigError("MemllmRetriever needs exactly one of user=... or namespace=...")
        return self

    def _token_counter(self) -> Callable[[str], int]:
        if self.llm is not None:
            llm = self.llm.get_llm() if hasattr(self.llm, "get_llm") else self.llm
            return llm.count_tokens
        return self.count_tokens or whitespace_tokens

    @property
    def controller(self) -> MemoryController:
        """The controller behind this retriever (its `last_recall()` explains the latest query)."""
        if self._controller is None:
            if self.user is not None:
                from memllm.agents.chat import user_namespace

                namespace = user_namespace(self.user)
            else:
                namespace = str(self.namespace)
            base = self.config or ControllerConfig()
            config = replace(
                base, candidates=self.k, flash_tokens=0, memory_tokens=self.memory_tokens, gate=self.gate
            )
            self._controller = MemoryController(
                self.store, namespace, count_tokens=self._token_counter(), config=config
            )
        return self._controller

    def recall(self, query: str, *, k: int | None = None, memory_tokens: int | None = None) -> Recall:
        """The controller's full recall for `query` (every candidate, with scores and decisions)."""
        controller = self.controller
        if k is not None and k != controller.config.candidates:
            if k < 1:
                raise ConfigError(f"k must be >= 1, got {k}")
            controller = controller.with_config(candidates=k)
        self._last = controller.recall(query, memory_tokens=memory_tokens, flash_tokens=0)
        return self._last

    def last_recall(self) -> Recall | None:
        """The latest query's recall: every candidate with its scores, mode and reason."""
        return self._last

    def _get_relevant_documents(
        self,
        query: str,
        *,
        run_manager: CallbackManagerForRetrieverRun,
        k: int | None = None,
        memory_tokens: int | None = None,
    ) -> list[Document]:
        recall = self.recall(query, k=k, memory_tokens=memory_tokens)
        chosen = [it for it in recall.items if it.mode != "dropped"]  # best first
        ranks = {id(it): rank for rank, it in enumerate(chosen, 1)}
        ordered = recall.used if self.order == "time" else chosen
        return [item_to_document(it, ranks[id(it)]) for it in ordered]

    # _aget_relevant_documents: BaseRetriever's default runs the sync method in a worker thread.
