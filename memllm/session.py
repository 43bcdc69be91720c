"""Session: a stream of text read into one context memory (InfLLM-style), asked and generated from.

`feed(text)` streams any length through chunked prefill; `ask(q)` answers and rolls the memory back
so the document memory is unchanged; `generate(...)` continues the stream (what it generates stays);
`save(path)` / `Session.restore(llm, path)` write and read a snapshot (safetensors + a versioned JSON
manifest, no pickle). `llm` is any object with .model, .tokenizer, .device, .dtype, .trained_len and
.name (memllm.llm.MemLLM). Knows nothing of text memory, agents or the CLI.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from memllm import limits, snapshot
from memllm.config import TEXT_SELECTORS, MemoryConfig
from memllm.context import prefill, select
from memllm.context.attach import attach
from memllm.context.cache import ContextMemoryCache
from memllm.context.support import inspect_model
from memllm.errors import ConfigError, HostBudgetError, InputError, SnapshotError
from memllm.generation import RepetitionGuard, decode, decode_stream
from memllm.host_budget import HostBudget
from memllm.unit_text import UnitTextIndex

SNAPSHOT_FORMAT = "memllm-context-snapshot"
SNAPSHOT_VERSION = 2
SAMPLE_CHARS = 65536
LIMIT_HINT = (
    "feed less text, use int8 units (MemoryConfig(offload_dtype='int8')), or give the process more memory"
)


def _stop_ids(llm: Any) -> set[int]:
    if hasattr(llm, "stop_ids"):
        return set(llm.stop_ids())
    eos = getattr(llm.tokenizer, "eos_token_id", None)
    return {eos} if eos is not None else set()


class Session:
    """One context memory over one model. Batch size 1; not thread-safe."""

    def __init__(self, llm: Any, memory: MemoryConfig | None = None, embedder: Any = None):
        self.llm = llm
        spec = inspect_model(llm.model)
        trained = min(spec.trained_len, int(getattr(llm, "trained_len", spec.trained_len)))
        self.spec = replace(spec, trained_len=trained)
        self.cache = ContextMemoryCache(self.spec, memory or MemoryConfig())
        self.config = self.cache.config
        self.last_logits: torch.Tensor | None = None  # (vocab,) fp32: next-token logits after the stream
        self.asks = 0
        self.last_selection: dict[str, Any] | None = None  # what select_prompt chose last
        self.limit_hint = LIMIT_HINT  # what a MemoryLimitError tells to do (the chat agent sets its own)
        # embedder (a memllm Embedder): a text index over the units' text, which the selectors of
        # config.TEXT_SELECTORS read (the default "lexical" among them); without one, the packaged
        # MiniLM shared by the process (loaded when a question first needs the index); other
        # selectors keep no index unless given an embedder
        if embedder is None and self.config.selector in TEXT_SELECTORS:
            from memllm.memory_stores.embeddings import shared_embedder

            embedder = shared_embedder("cuda" if self.cache.layers[0].device.type == "cuda" else "cpu")
        self.text_index = (
            None
            if embedder is None
            else UnitTextIndex(embedder, llm.tokenizer, self.config.n_init, self.config.block_size)
        )
        # the host-memory budget shared by the sessions of `llm` (memllm.host_budget), if it
        # has one: a new session must have room for its first unit (a segment in every layer)
        self.budget: HostBudget | None = getattr(llm, "host_budget", None)
        if self.budget is not None:
            self.budget.require(self, self.cache.host_bytes_for_units(1), "a new session")

    def host_bytes(self) -> int:
        """Host bytes the memory units hold now (all segments' capacity, and those allocated ahead):
        pinned memory on a GPU. What a HostBudget counts."""
        return sum(lay.store.host_bytes() + lay.store.prefetched_bytes() for lay in self.cache.layers)

    def unit_bytes_per_token(self) -> int:
        """Host bytes of memory units one more token of the stream takes (its K/V in every layer)."""
        s = self.spec
        return limits.kv_bytes_per_token(s.num_layers, s.kv_heads, s.head_dim, self.config.offload_dtype)

    def close(self) -> None:
        """This session no longer counts against its host-memory budget (it is being dropped)."""
        if self.budget is not None:
            self.budget.release(self)

    def bytes_per_token(self) -> int:
        """Host bytes one more token of the stream takes in context memory (its K/V in every layer)."""
        per = self.unit_bytes_per_token()
        return per + (0 if self.text_index is None else math.ceil(self.text_index.bytes_per_token()))

    def work_bytes(self, call_tokens: int) -> int:
        """Host bytes one model call over `call_tokens` new tokens needs while it runs (prefill calls
        are cut at chunk_size): the attention scores in fp32 for every head, each
        query against the sinks, the window, the units read and the call's own keys, and the MLP's
        activations (the layers run one after another, so one layer's worth). On a CPU the scores
        dominate: measured 1.3 GB of peak over the resting size for a 3,863-token SmolLM2 turn."""
        cfg, s = self.config, self.spec
        c = max(1, min(call_tokens, cfg.chunk_size or call_tokens))
        keys = cfg.n_init + cfg.n_local + cfg.topk * cfg.block_size + c
        inter = (
            getattr(getattr(self.llm.model, "config", None), "intermediate_size", None)
            or 4 * s.num_heads * s.head_dim
        )
        return s.num_heads * c * keys * 4 + c * int(inter) * 4 * 3

    def window_bytes(self) -> int:
        """Host bytes of the sinks and the local window of every layer (what a snapshot's head holds)."""
        s, cfg = self.spec, self.config
        item = torch.empty(0, dtype=s.dtype).element_size()
        return (cfg.n_init + cfg.n_local) * s.num_layers * s.kv_heads * s.head_dim * 2 * item

    def deferred_bytes(self) -> int:
        """Host bytes the window's deferred received scores may hold at most (impl "fast" on the CPU,
        before the first cut: the fp32 queries and log-sum-exps of a full window, every layer)."""
        layer, s, cfg = self.cache.layers[0], self.spec, self.config
        if not getattr(layer.kernels, "defers_scores", False) or layer.cut:
            return 0
        return (cfg.n_init + cfg.n_local) * s.num_layers * s.num_heads * (s.head_dim + 1) * 4

    def check_room(self, n_tokens: int, extra_bytes: int = 0, call_tokens: int | None = None) -> None:
        """MemoryLimitError, before anything is computed, when `n_tokens` more tokens (and
        `extra_bytes` of other work, and the working memory of its largest model call, `call_tokens`
        new tokens, default n_tokens) would not fit the memory this process may use (host, the
        container's limit, RLIMIT_AS, MEMLLM_MEMORY_LIMIT)."""
        per = self.bytes_per_token()
        work = self.work_bytes(n_tokens if call_tokens is None else call_tokens)
        if self.budget is not None:  # the units these tokens will cut, against the sessions' budget
            self.budget.require(
                self, self.cache.host_bytes_for(n_tokens),
                f"{n_tokens:,} more tokens (the session holds {self.cache.seen_tokens:,})",
            )  # fmt: skip
        limits.require(
            n_tokens * per + extra_bytes + work + self.deferred_bytes(),
            f"{n_tokens:,} more tokens of context memory (it holds {self.cache.seen_tokens:,}, "
            f"{per:,} bytes per token) and {limits.human_bytes(work)} of working memory for the model",
            self.limit_hint,
        )

    # ---- reading ---------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of `text` as feed() would append them (BOS first on an empty stream, if the
        tokenizer adds one)."""
        return self._encode(text)

    def _encode(self, text: str) -> list[int]:
        tok = self.llm.tokenizer
        ids = list(tok(text, add_special_tokens=False)["input_ids"])
        bos = getattr(tok, "bos_token_id", None)
        if self.cache.seen_tokens == 0 and bos is not None and getattr(tok, "add_bos_token", False):
            if not ids or ids[0] != bos:
                ids = [bos, *ids]
        return ids

    def feed_ids(
        self, ids: list[int] | torch.Tensor, progress: Callable[[int, int], None] | None = None
    ) -> None:
        """Append token ids to the stream (chunked; progress(done, total))."""
        t = torch.as_tensor(ids, dtype=torch.long).reshape(1, -1)
        if t.shape[1] == 0:
            return
        self.check_room(int(t.shape[1]))
        self._record(t[0])
        with attach(self.llm.model, cache=self.cache):
            logits = prefill.feed(self.llm.model, self.cache, t, progress)
        self.last_logits = logits

    def mark(self) -> tuple[dict, torch.Tensor | None]:
        """Where the stream stands now (the cache's checkpoint and the last logits), for `rewind`."""
        return self.cache.checkpoint(), self.last_logits

    def rewind(self, mark: tuple[dict, torch.Tensor | None]) -> None:
        """Roll the stream back to a `mark` taken earlier."""
        self.cache.rollback(mark[0])
        self.last_logits = mark[1]

    def feed(self, text: str, progress: Callable[[int, int], None] | None = None) -> int:
        """Read `text` into memory; returns the number of tokens added."""
        if not isinstance(text, str):
            raise InputError(f"feed() takes text (str), got {type(text).__name__}")
        if len(text) > SAMPLE_CHARS:  # long text: refuse before tokenising it, from a sample's rate
            sample = len(self.llm.tokenizer(text[:SAMPLE_CHARS], add_special_tokens=False)["input_ids"])
            self.check_room(len(text) * sample // SAMPLE_CHARS, len(text) * limits.READ_BYTES_PER_BYTE)
        ids = self._encode(text)
        self.feed_ids(ids, progress)
        return len(ids)

    # ---- generating ------------------------------------------------------------------------------
    def generate_ids(
        self,
        prompt: str | list[int] | None = None,
        max_new_tokens: int = 32,
        stop: set[int] | None = None,
        oracle_spans: Sequence[tuple[int, int]] | None = None,
        selector: str | None = None,
        guard: RepetitionGuard | None = None,
        query: str | None = None,
        logprobs: list[float] | None = None,
    ) -> Iterator[int]:
        """Greedy continuation of the stream (after `prompt`): yields token ids; they stay in memory.

        With a prompt and the "question" selector, the prompt is probed first and the units it needs
        are read by every layer for the prompt and the continuation (select_prompt).
        oracle_spans (a diagnostic): token spans of the stream whose units are read first; selector:
        this call's instead of the config's ("question" or "infllm"); guard (memllm.generation.RepetitionGuard)
        adjusts each step's logits for the tokens generated; query: the user's question alone, which the
        text index and the rare words match instead of the whole prompt (select_prompt); logprobs (a
        diagnostic): each yielded token's log-probability is appended to it (generation.decode)."""
        stop = _stop_ids(self.llm) if stop is None else stop
        forced = False
        if prompt is not None:
            ids = self._encode(prompt) if isinstance(prompt, str) else list(prompt)
            forced = self.select_prompt(ids, oracle_spans, selector, query)
            self.feed_ids(ids)
        try:
            if self.last_logits is None:
                raise InputError("nothing to continue from: feed text or give a prompt first")
            self.check_room(max_new_tokens, call_tokens=1)
            model = self.llm.model

            def step(tok: int) -> torch.Tensor:  # the token joins the stream before it is yielded
                self._record([tok])
                self.last_logits = prefill.step(model, self.cache, torch.tensor([[tok]]))
                return self.last_logits

            with attach(model, cache=self.cache):
                yield from decode(
                    self.last_logits, step, max_new_tokens, stop_ids=stop, guard=guard, feed_last=True, logprobs=logprobs
                )
        finally:
            if forced:
                self.cache.forced.clear()

    def _record(self, ids: torch.Tensor | list[int]) -> None:
        """The text index sees every token the cache is about to take, where the cache takes it
        (nothing is converted without an index: feed_ids may carry a million ids)."""
        if self.text_index is not None:
            host = ids.to("cpu", torch.int32).numpy() if isinstance(ids, torch.Tensor) else ids
            self.text_index.write(self.cache.seen_tokens, host)

    def select_prompt(
        self,
        ids: list[int],
        oracle_spans: Sequence[tuple[int, int]] | None = None,
        selector: str | None = None,
        query: str | None = None,
    ) -> bool:
        """Before `ids` (a question, a chat turn) are fed: with the "question" selector, probe them (fed
        and rolled back, every layer scoring all its units, select.py) and force the chosen units into
        every layer's lookups until `cache.forced.clear()`. Returns whether units were forced; records
        what was chosen in `last_selection`.

        query: the text the text index and the rare words match (the text selectors): the user's question
        alone, where the prompt also holds instructions, a template or an example (their words would
        pull the units that hold them: "answer", "question", "documents" are rare in a book); default,
        or blank, the prompt's own text. The probe's attention always reads the whole prompt."""
        if query is not None and not isinstance(query, str):
            raise InputError(f"query must be text (str), got {type(query).__name__}")
        cache, cfg = self.cache, self.config
        self.last_selection = None
        n_units = cache.layers[0].store.n_units
        if cache.forced is None or n_units <= cfg.topk or not ids:
            return False
        selector = selector or cfg.selector
        if selector == "infllm" and oracle_spans is None:
            return False
        gold = (
            select.units_of_spans(oracle_spans, cfg.n_init, cfg.block_size, n_units) if oracle_spans else []
        )
        mark = self.mark()
        with cache.probing() as probe:
            self.feed_ids(ids)
        self.rewind(mark)
        masses = probe.per_layer()
        if masses is None:
            return False
        score = select.fuse(masses)
        text = None  # the text index's cosine of each unit with the question (TEXT_SELECTORS)
        lexical = None  # the rare-word score and words of each unit ("lexical")
        question = None  # the text they matched
        if selector in TEXT_SELECTORS and self.text_index is not None:
            question = (query or "").strip() or self.llm.tokenizer.decode(ids, skip_special_tokens=True).strip()
            text = self.text_index.scores(question, n_units).to(score.device)
            if selector == "lexical":
                lexical = self.text_index.lexical_sides(question, n_units, reach=cfg.paragraph_reach)
        if text is None:
            ranked = score
        elif selector == "text":
            ranked = text
        else:
            ranked = select.hybrid(score, text)
        if lexical is not None:
            chosen = select.lexical_evidence(
                ranked, score, lexical.score, lexical.held, cfg.topk, cfg.select_neighbours, first=gold,
                sides=lexical.sides, reach=lexical.reach,
            )  # fmt: skip
        elif text is not None and selector == "hybrid":
            chosen = select.evidence_then_attention(ranked, score, cfg.topk, cfg.select_neighbours, first=gold)
        else:
            chosen = select.choose(ranked, cfg.topk, cfg.select_neighbours, first=gold)
        cache.forced.set(chosen)
        units, worst_first = chosen.tolist(), (-ranked[chosen]).tolist()  # one read of the scores, not one per unit
        self.last_selection = {
            "units": units,
            # the chosen units best first (the ranking that chose them; the gold units of a diagnostic first)
            "ranked_units": [u for _, _, u in sorted(zip([u not in gold for u in units], worst_first, units, strict=True))],
            "gold_units": gold,
            "score": score,
            "text_score": text,
            "lexical_score": None if lexical is None else lexical[0],
            "query": question,
            "per_layer": masses,
        }
        return True

    def generate(
        self,
        prompt: str | list[int] | None = None,
        max_new_tokens: int = 32,
        guard: RepetitionGuard | None = None,
        query: str | None = None,
    ) -> Iterator[str]:
        """Like generate_ids, yielding text pieces (decoded incrementally, so multi-token characters are whole)."""
        yield from decode_stream(
            self.llm.tokenizer, self.generate_ids(prompt, max_new_tokens, guard=guard, query=query)
        )

    @contextmanager
    def answering(self) -> Iterator[None]:
        """Within the block, what is fed and generated is rolled back afterwards (also on error), and
        while it lasts its tokens cut no units where they fit the held limit (cache.hold_cuts): they stay
        in the window at exact positions, and short calls stay eligible for the static step."""
        mark = self.mark()
        try:
            with self.cache.hold_cuts():
                yield
        finally:
            if self.cache.forced is not None:
                self.cache.forced.clear()
            self.rewind(mark)
            self.asks += 1

    def ask(
        self,
        question: str,
        max_new_tokens: int = 32,
        oracle_spans: Sequence[tuple[int, int]] | None = None,
        selector: str | None = None,
        query: str | None = None,
    ) -> str:
        """Answer from memory; the question and answer are rolled back out of the memory afterwards.
        oracle_spans, selector, query: see generate_ids."""
        with self.answering():
            ids = self.generate_ids(
                question, max_new_tokens, oracle_spans=oracle_spans, selector=selector, query=query
            )
            return "".join(decode_stream(self.llm.tokenizer, ids)).strip()

    # ---- accounting ------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        s = self.cache.stats()
        s["device_bytes"] = s["device_bytes_window"] + s["device_bytes_index"] + s.get("device_bytes_unit_cache", 0)
        s["asks"] = self.asks
        return s

    # ---- snapshots -------------------------------------------------------------------------------
    def save(self, path: str | Path, namespace: str | None = None) -> Path:
        """Write the memory to folder `path` (memllm.snapshot: files with checksums, manifest last).
        `path` must be new, empty, or a snapshot saved before; `namespace` is recorded and required
        again by restore when given."""
        return snapshot.save_session(self, path, namespace)

    @classmethod
    def restore(cls, llm: Any, path: str | Path, namespace: str | None = None, embedder: Any = None) -> Session:
        """A session equal to the saved one (same next-token logits) on `llm`; SnapshotError when the
        snapshot is torn, altered, or was written with other weights (or for another namespace).
        embedder: the text index's, for a snapshot whose selector reads one (default: the shared MiniLM)."""
        return cls.restore_checked(llm, path, namespace, embedder)[0]

    @classmethod
    def restore_checked(
        cls, llm: Any, path: str | Path, namespace: str | None = None, embedder: Any = None
    ) -> tuple[Session, dict]:
        """(session, manifest): restore() that also returns the snapshot's manifest."""
        manifest = snapshot.read_checked(llm, path, namespace)
        try:
            config = MemoryConfig.from_dict(manifest["memory"])
        except ConfigError as exc:
            raise SnapshotError(f"snapshot at {path} is altered: its memory config: {exc}") from exc
        session = cls(llm, config, embedder=embedder if config.selector in TEXT_SELECTORS else None)
        if session.budget is not None:  # the units the snapshot holds, before they are loaded
            units = max((int(layer.get("units", 0)) for layer in manifest.get("layers", [])), default=0)
            try:
                session.budget.require(session, session.cache.host_bytes_for_units(units), f"restoring {path}")
            except HostBudgetError:
                session.close()
                raise
        snapshot.restore_into(session, path, manifest)
        return session, manifest
