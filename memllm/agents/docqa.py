"""DocumentQA: read documents once, answer many questions, and show the evidence of each answer.

Modes:
  kv      the documents are streamed into one context-memory Session (InfLLM-style); each question is
          asked from a checkpoint and rolled back, so question 50 sees the same memory as question 1.
          Evidence: the memory units the question's lookups selected, per group of layers, mapped
          back to character spans and line numbers of the source.
  text    the documents are cut into chunks (char spans, line numbers) stored in a text-memory store
          under one namespace; the controller retrieves the best chunks within the window's budget and
          the model answers from them with plain full attention. Evidence: the chunks and their scores.
  hybrid  both: the documents in KV memory, and the retrieved chunks placed right before the question
          (inside the exact local window). Evidence: chunks and units.
  full    baseline: plain full attention over the documents truncated to the model's window (the
          middle is cut, head and tail kept); for benchmarks.

Prompts are plain completions: the text, a one-line instruction, one worked example and
"Question: ...\\nAnswer:" (PROMPT_QUESTION). On 16 SQuAD/HotpotQA questions with the gold paragraph
alone, SmolLM2-135M scored EM 0.375 / F1 0.47 this way against EM 0 / F1 0.02 with a bare
"Q: ... A:". Answers are greedy and end at the first line break after some text. `save(path)` writes everything needed to answer without re-reading
(context snapshot, chunk store, documents and token spans); `DocumentQA.load(llm, path)` restores it.

Knows nothing of the CLI. Uses memllm.session (kv), agents.controller + memory_stores (text).
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from memllm import limits, models, validate
from memllm.agents.doc_chunks import TokenizedDocument, chunk_spans
from memllm.config import TEXT_SELECTORS, MemoryConfig
from memllm.documents import Document, read_document, read_text
from memllm.errors import ConfigError, InputError, SnapshotError
from memllm.savedir import check_target, private_tempdir, replace_folder

MODES = ("kv", "text", "hybrid", "full")
# Text retrieval (text and hybrid modes): "lexical", the chunks holding the question's rare words first, then MiniLM's
# ranking (_lexical_first; benchmarks/RESULTS.md, "Text mode's retrieval"); "dense", MiniLM's ranking alone (the
# baseline benchmarks compare with).
RETRIEVALS = ("lexical", "dense")
DOCQA_FORMAT = "memllm-docqa"
DOCQA_VERSION = 1
PROMPT_QUESTION = (
    "\n\nAnswer each question with a few words from the text.\n\n"
    "Question: What is the capital of France?\nAnswer: Paris\n\nQuestion: {question}\nAnswer:"
)
PASSAGES_HEADER = "\n\nRelevant passages:\n"
SEPARATOR = "\n\n"
Progress = Callable[[int, int], None]
_clock = time.perf_counter  # tests replace it with a fake clock


# ---------------------------------------------------------------------------------------- results
@dataclass
class Evidence:
    """One thing an answer used. kind: 'chunk' (text retrieval) or 'unit' (a KV memory unit).

    score: similarity for chunks; for units, the share of the group's lookups (layers x KV heads x
    query blocks) that selected it. group: the layer group for units ('layers 0-9'; adjacent groups whose
    best units are the same, as when every layer reads the units the question chose, are one group:
    'layers 0-29'), None for chunks.
    """

    kind: str
    source: str
    start: int
    end: int
    lines: tuple[int, int]
    score: float
    text: str
    group: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "source": self.source, "span": [self.start, self.end],
                "lines": list(self.lines), "score": round(self.score, 4), "group": self.group,
                "text": self.text}  # fmt: skip

    def location(self) -> str:
        a, b = self.lines
        where = f"line {a}" if a == b else f"lines {a}-{b}"
        return f"{self.source}:{where} (chars {self.start}-{self.end})"


@dataclass
class Answer:
    """An answer, what it was drawn from, and how long it took (seconds, question to last token)."""

    question: str
    text: str
    evidence: list[Evidence] = field(default_factory=list)
    seconds: float = 0.0
    mode: str = "kv"
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"question": self.question, "answer": self.text, "mode": self.mode,
                "seconds": round(self.seconds, 3), "evidence": [e.to_dict() for e in self.evidence],
                "notes": list(self.notes)}  # fmt: skip


@dataclass
class ReadReport:
    """What one `read` did: documents, tokens, chunks, seconds, and notes (encoding fallbacks...)."""

    documents: list[str]
    tokens: int
    chunks: int
    seconds: float
    notes: list[str]
    kv_seconds: float = 0.0  # streaming into context memory
    text_seconds: float = 0.0  # chunking, embedding and storing

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


# ---------------------------------------------------------------------------------------- helpers
def default_memory(trained_len: int) -> MemoryConfig:
    """Context-memory settings for a model's trained window: InfLLM's defaults from 8K up (128 sinks,
    4096-token window, 128-token units, top 16), scaled down proportionally for smaller test models."""
    if trained_len >= 8192:
        return MemoryConfig()
    block = min(128, max(4, trained_len // 16))
    return MemoryConfig(n_init=block, n_local=trained_len // 4, block_size=block, repr_topk=min(4, block),
                        topk=4, exc_block_size=block)  # fmt: skip


def memory_for(llm: Any, memory: MemoryConfig | None = None) -> MemoryConfig:
    """The context-memory settings document QA uses: `memory`, else the model's own, else default_memory."""
    return memory or getattr(llm, "memory", None) or default_memory(llm.trained_len)


def kv_bytes_per_token(llm: Any, memory: MemoryConfig) -> int:
    """Host bytes one token takes in context memory (keys + values of every layer)."""
    cfg = llm.model.config
    layers = int(cfg.num_hidden_layers)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    return limits.kv_bytes_per_token(layers, kv_heads, head_dim, memory.offload_dtype)


SAMPLE_CHARS = 65536  # text tokenised to estimate a document's tokens before tokenising it whole


def estimate_tokens(text: str, tokenizer: Any) -> int:
    """About how many tokens `text` has, from a sample of its start (no whole tokenisation)."""
    if len(text) <= SAMPLE_CHARS:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])
    sample = text[:SAMPLE_CHARS]
    n = max(1, len(tokenizer(sample, add_special_tokens=False)["input_ids"]))
    return int(len(text) * n / len(sample))


_NEWLINE_IDS: dict[int, frozenset[int]] = {}


def newline_ids(tokenizer: Any) -> frozenset[int]:
    """Token ids whose text contains a line break (cached per tokenizer)."""
    key = id(tokenizer)
    if key not in _NEWLINE_IDS:
        vocab = tokenizer.get_vocab()
        ids = [i for i in vocab.values()]
        texts = tokenizer.batch_decode([[i] for i in ids])
        _NEWLINE_IDS[key] = frozenset(i for i, t in zip(ids, texts, strict=True) if "\n" in t)
    return _NEWLINE_IDS[key]


# A chunk joins the tier for words the tier lacks only where those words weigh at least this share of what the
# tier's best chunk holds: a second key of a question about two (multiquery, HotpotQA's two titles), not a word such
# as "year" or "did" that few chunks of a small document happen to hold (those brought chunks MiniLM ranked nowhere
# in front of the gold one and cost SmolLM2 QA answers; benchmarks/RESULTS.md, "Text mode's retrieval").
COVER_SHARE = 0.5


def cover_words(lead: list[int], held: Any, cap: int, share: float = COVER_SHARE) -> list[int]:
    """`lead` (chunk indexes) and then, while some of the question's rare words are in none of them, the chunk
    holding the most of those words (IDF-weighted, IDF over the chunks), up to `cap` chunks, each only where its
    new words weigh at least `share` of the best lead chunk's. held: (chunks, words) bool, the rare words each
    chunk holds (unit_lexical.WindowWords.unit_scores)."""
    import torch

    held = held.bool()
    idf = torch.log(held.shape[0] / held.sum(dim=0).clamp(min=1).float())
    weight = idf / idf.sum().clamp(min=1e-12)
    out = list(lead)
    least = share * float((held[out].float() @ weight).max())
    left = ~held[out].any(dim=0)
    while left.any() and len(out) < cap:
        gain = held[:, left].float() @ weight[left]
        gain[out] = -1.0
        best = int(gain.argmax())
        if float(gain[best]) < least or float(gain[best]) <= 0:
            break
        out.append(best)
        left &= ~held[best]
    return out


def as_documents(sources: Sequence[str | Path | Document]) -> list[Document]:
    """Files (paths) read into Documents (read_document: bounded, InputError with the reason); Documents as they are."""
    return [s if isinstance(s, Document) else read_document(s) for s in sources]


def first_line(text: str) -> str:
    return text.strip().split("\n", 1)[0].strip()


_SAVED_FILES = re.compile(
    r"(docqa\.json|documents\.json"
    r"|kv/(manifest\.json|name\.json|state\.safetensors|(units|head|state)-[0-9]+\.safetensors|\..+\.tmp)"
    r"|store/(memory\.db(-wal|-shm|-journal)?|store\.lock|index/[0-9a-f]{32}\.faiss|index/\..+\.tmp))"
)


def check_save_target(path: str | Path) -> Path:
    """SnapshotError unless `save(path)` may write there: a new or empty folder, or a document memory
    saved earlier that holds only what memllm writes (see memllm.savedir.check_target)."""
    return check_target(path, DOCQA_FORMAT, lambda rel: _SAVED_FILES.fullmatch(rel) is not None)


def _copy_store(src: Path, dst: Path) -> None:
    """Replace folder `dst` with a copy of the FaissStore folder `src` (flushed, no write under way),
    leaving out its lock file and SQLite's shared-memory index (rebuilt from the WAL on open)."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("store.lock", "*-shm"))


def _layer_groups(n_layers: int, groups: int) -> list[range]:
    groups = max(1, min(groups, n_layers))
    bounds = [round(i * n_layers / groups) for i in range(groups + 1)]
    return [range(bounds[i], bounds[i + 1]) for i in range(groups)]


class _LookupRecorder:
    """Read-only: the unit ids each layer's lookups select while a question is asked, through the
    cache's own `record_lookups()` log (ids stay on their device until the block ends, so no host
    synchronisation is added per lookup)."""

    def __init__(self, cache: Any) -> None:
        self.cache = cache
        self.log: list[tuple[int, Any]] = []
        self.supported = hasattr(cache, "record_lookups")
        self._scope: Any = None

    def __enter__(self) -> _LookupRecorder:
        if self.supported:
            self._scope = self.cache.record_lookups()
            self.log = self._scope.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._scope is not None:
            self._scope.__exit__(*exc)
            self._scope = None

    def counts(self) -> dict[int, Counter]:
        """layer -> Counter of unit id -> times selected (over KV heads and query blocks)."""
        out: dict[int, Counter] = {}
        for layer, ids in self.log:
            out.setdefault(layer, Counter()).update(ids.reshape(-1).tolist())
        return out


# ---------------------------------------------------------------------------------------- the agent
def _check_saved(manifest: dict[str, Any], docs: Any, folder: Path) -> None:
    """SnapshotError unless docqa.json and documents.json have what load() reads, typed and in range."""

    def err(msg: str) -> SnapshotError:
        return SnapshotError(f"document memory at {folder} is altered or torn: {msg}")

    validate.one_of(manifest.get("mode"), MODES, "docqa.json mode", err)
    validate.text(manifest.get("namespace"), "docqa.json namespace", err, 1 << 16)
    validate.integer(manifest.get("chunk_tokens"), "docqa.json chunk_tokens", err, 1)
    stream = validate.integer(manifest.get("stream_tokens"), "docqa.json stream_tokens", err)
    validate.integer(manifest.get("chunks", 0), "docqa.json chunks", err)
    docs = validate.seq(docs, "documents.json", err, 1 << 20)
    for i, seg in enumerate(validate.seq(manifest.get("segments"), "docqa.json segments", err, len(docs))):
        seg = validate.seq(seg, f"docqa.json segments[{i}]", err, 2)
        if len(seg) != 2:
            raise err(f"docqa.json segments[{i}] must be [stream start, document index]")
        validate.integer(seg[0], f"docqa.json segments[{i}][0]", err, 0, stream)
        validate.integer(seg[1], f"docqa.json segments[{i}][1]", err, 0, max(0, len(docs) - 1))
    for i, d in enumerate(docs):
        d = validate.obj(d, f"documents.json[{i}]", err)
        doc = validate.obj(d.get("doc"), f"documents.json[{i}].doc", err)
        validate.text(doc.get("name"), f"documents.json[{i}].doc.name", err, 4096)
        body = validate.text(doc.get("text"), f"documents.json[{i}].doc.text", err, 1 << 40)
        for key in ("kind", "encoding"):
            validate.text(doc.get(key, ""), f"documents.json[{i}].doc.{key}", err, 64)
        for note in validate.seq(doc.get("notes", []), f"documents.json[{i}].doc.notes", err, 1000):
            validate.text(note, f"documents.json[{i}].doc.notes", err, 4096)
        lists = [validate.seq(d.get(k), f"documents.json[{i}].{k}", err) for k in ("ids", "starts", "ends")]
        if len({len(x) for x in lists}) != 1:
            raise err(f"documents.json[{i}]: ids, starts and ends differ in length")
        for key, values in zip(("ids", "starts", "ends"), lists, strict=True):
            if not all(type(v) is int and 0 <= v <= len(body) + (1 << 31) for v in values):
                raise err(f"documents.json[{i}].{key} must hold non-negative integers")


def text_tokens(llm: Any) -> int:
    """The tokens of chunks text mode puts before a question for `llm`: its packaged alias's `text_tokens`
    (models.PackagedModel), 2048 for other models."""
    spec = models.packaged(llm)
    return spec.text_tokens if spec is not None else models.PackagedModel.text_tokens


class DocumentQA:
    """Read documents once, ask many questions. `llm` is a memllm.MemLLM (model + fast tokenizer).

    store: a MemoryStore for text/hybrid (default: a private FaissStore in a temporary folder, with the
    packaged MiniLM embedder); namespace: where the chunks go in it. memory: context-memory settings
    for kv/hybrid (default: `default_memory(trained window)`). chunk_tokens: chunk size for text/hybrid
    (default 192; window / 8 for windows under 1536 tokens).
    context_tokens: how many tokens of retrieved chunks text mode puts in the prompt, at most the window
    left after question and answer (default: the packaged model's `text_tokens`, 512 for the 135M default
    model, which answers more from short prompts, 2048 for others); hybrid_tokens: the same for hybrid
    (default: n_local/2).
    evidence_units: units shown per layer group; layer_groups: how many groups of layers.
    retrieval: how text and hybrid modes choose chunks (RETRIEVALS; default "lexical": the chunks holding the
    question's rare words, its names and keys, first, then MiniLM's ranking).
    """

    def __init__(
        self,
        llm: Any,
        mode: str = "kv",
        store: Any = None,
        memory: MemoryConfig | None = None,
        *,
        namespace: str = "documents",
        chunk_tokens: int | None = None,
        context_tokens: int | None = None,
        hybrid_tokens: int | None = None,
        max_new_tokens: int = 24,
        evidence_units: int = 3,
        layer_groups: int = 3,
        embedder: Any = None,
        retrieval: str = "lexical",
    ) -> None:
        if mode not in MODES:
            raise ConfigError(f"document QA mode must be one of {', '.join(MODES)}, got {mode!r}")
        if chunk_tokens is None:  # 192, less for small test models so that several fit the window
            chunk_tokens = min(192, max(16, llm.trained_len // 8))
        if chunk_tokens < 16:
            raise ConfigError(f"chunk_tokens must be at least 16, got {chunk_tokens}")
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if context_tokens is None:
            context_tokens = text_tokens(llm)
        if isinstance(context_tokens, bool) or not isinstance(context_tokens, int) or context_tokens < 1:
            raise ConfigError(f"context_tokens must be an integer >= 1, got {context_tokens!r}")
        self.llm = llm
        self.mode = mode
        self.namespace = namespace
        self.chunk_tokens = chunk_tokens
        self.context_tokens = context_tokens
        self.max_new_tokens = max_new_tokens
        self.evidence_units = evidence_units
        self.layer_groups = layer_groups
        self.memory = memory_for(llm, memory)
        self.docs: list[TokenizedDocument] = []
        self.segments: list[tuple[int, int]] = []  # (stream token start, doc index) for kv
        self.session: Any = None
        self.stream_tokens = 0
        self._tmp: Path | None = None
        self._owns_store = False
        self.store = store
        self._embedder = embedder
        if mode in ("kv", "hybrid"):
            # the text selectors read a text index over the units (the chunk store's embedder)
            units_text = self._embedder_or_default() if self.memory.selector in TEXT_SELECTORS else None
            self.session = llm.session(self.memory, embedder=units_text)
            self.memory = self.session.config
        n_local = self.memory.n_local or 0
        self.hybrid_tokens = hybrid_tokens if hybrid_tokens is not None else max(64, n_local // 2)
        self.controller: Any = None
        self.chunk_count = 0
        if retrieval not in RETRIEVALS:
            raise ConfigError(f"retrieval must be one of {', '.join(RETRIEVALS)}, got {retrieval!r}")
        self.retrieval = retrieval
        self._words: tuple[list[Any], Any] | None = None  # _chunk_words

    # ------------------------------------------------------------------ text store
    def _embedder_or_default(self) -> Any:
        """The embedder given, else the packaged MiniLM (loaded once, shared by the chunk store and
        the units' text index)."""
        if self._embedder is None:
            from memllm.memory_stores.embeddings import shared_embedder

            self._embedder = shared_embedder()
        return self._embedder

    def _ensure_store(self, copy_of: Path | None = None) -> Any:
        """The chunk store; without one given, a private FaissStore in a temporary folder, started as
        a copy of the saved store `copy_of` (so that reading more never changes a saved memory, and
        `save` can copy it out whole)."""
        if self.store is None:
            from memllm.memory_stores.faiss_store import FaissStore

            embedder = self._embedder_or_default()
            self._tmp = private_tempdir("docqa")  # 0700, removed at close (and on SIGTERM by the CLI)
            if copy_of is not None:
                _copy_store(copy_of, self._tmp / "store")
            self.store = FaissStore(self._tmp / "store", embedder)
            self._owns_store = True
        if self.controller is None:
            from memllm.agents.controller import ControllerConfig, MemoryController

            cfg = ControllerConfig(memory_tokens=self.llm.trained_len, flash_tokens=0, candidates=24,
                                   w_recency=0.0, w_importance=0.0, min_relevance=0.0, gate="always",
                                   kinds=("chunk",))  # fmt: skip
            self.controller = MemoryController(
                self.store, self.namespace, count_tokens=self.llm.count_tokens, config=cfg,
                render=lambda rec, mode: rec.text,
            )  # fmt: skip
        return self.store

    def _store_chunks(self, doc_index: int, td: TokenizedDocument) -> int:
        from memllm.memory_stores.records import MemoryRecord

        store = self._ensure_store()
        records = []
        for i, (s, e) in enumerate(chunk_spans(td, self.chunk_tokens)):
            a, b = td.doc.lines(s, e)
            records.append(MemoryRecord(
                td.doc.text[s:e], namespace=self.namespace, kind="chunk", source=td.doc.name, span=(s, e),
                created_at=float(doc_index * 1_000_000 + i), importance=0.5,
                metadata={"doc": doc_index, "chunk": i, "lines": [a, b]},
            ))  # fmt: skip
        store.add_many(records)
        self._words = None  # rebuilt at the next question
        return len(records)

    # ------------------------------------------------------------------ reading
    def read(self, source: str | Path | Document | TokenizedDocument, progress: Progress | None = None,
             *, name: str | None = None) -> ReadReport:  # fmt: skip
        """Read one document: a Document, a path (or '-' for stdin), or text (when `name` is given or
        the string is not an existing path). progress(done, total) in tokens (kv/hybrid)."""
        start = _clock()
        if isinstance(source, TokenizedDocument):
            doc = source.doc
        elif isinstance(source, Document):
            doc = source
        elif name is not None:
            doc = read_text(str(source), name)
        elif isinstance(source, Path) or (
            str(source) == "-" or ("\n" not in str(source) and Path(str(source)).exists())
        ):
            doc = read_document(source)
        else:
            doc = read_text(str(source))
        if not isinstance(source, TokenizedDocument):
            self.check_memory([doc])
        td = (
            source
            if isinstance(source, TokenizedDocument)
            else TokenizedDocument.build(doc, self.llm.tokenizer)
        )
        if not td.ids:
            raise InputError(f"{doc.name} has no tokens: nothing to read")
        index = len(self.docs)
        chunks = 0
        kv_s = text_s = 0.0
        if self.session is not None:
            t0 = _clock()
            self._feed(index, td, progress)
            kv_s = _clock() - t0
        if self.mode in ("text", "hybrid"):
            t0 = _clock()
            chunks = self._store_chunks(index, td)
            text_s = _clock() - t0
            self.chunk_count += chunks
        if self.session is None and progress is not None:
            progress(len(td.ids), len(td.ids))
        self.docs.append(td)
        return ReadReport([doc.name], len(td.ids), chunks, _clock() - start, list(doc.notes),
                          kv_s, text_s)  # fmt: skip

    def read_many(
        self, sources: Sequence[str | Path | Document], progress: Progress | None = None
    ) -> ReadReport:
        """Read several documents; progress(done, total) over all of them."""
        docs = as_documents(sources)
        self.check_memory(docs)
        tds = [TokenizedDocument.build(d, self.llm.tokenizer) for d in docs]
        total = sum(len(td) for td in tds)
        done = 0
        reports = []
        for td in tds:
            base = done
            cb = (lambda a, _b, base=base: progress(base + a, total)) if progress else None
            reports.append(self.read(td, cb))
            done += len(td)
        return ReadReport(
            [n for r in reports for n in r.documents], sum(r.tokens for r in reports),
            sum(r.chunks for r in reports), sum(r.seconds for r in reports), [x for r in reports for x in r.notes],
            sum(r.kv_seconds for r in reports), sum(r.text_seconds for r in reports),
        )  # fmt: skip

    def check_memory(self, docs: Sequence[Document]) -> None:
        """MemoryLimitError, before tokenising, when reading `docs` would not fit the memory this
        process may use: tokenising costs about limits.READ_BYTES_PER_BYTE per byte of the largest
        document, and in kv/hybrid every token stays in context memory (tokens estimated from a
        sample of each document)."""
        if not docs:
            return
        budget = limits.memory_budget()
        names = docs[0].name if len(docs) == 1 else f"{len(docs)} documents"
        read = max(len(d.text) for d in docs) * limits.READ_BYTES_PER_BYTE
        if self.session is None:
            limits.require(read, f"reading {names} ({limits.human_bytes(max(len(d.text) for d in docs))} "
                           "of text)", "split the document or give it more memory", budget)  # fmt: skip
            return
        per = kv_bytes_per_token(self.llm, self.memory)
        tokens = sum(estimate_tokens(d.text, self.llm.tokenizer) for d in docs)
        limits.require(
            read + tokens * per,
            f"reading {names} into context memory (about {tokens:,} tokens at {per:,} bytes per token)",
            "use --mode text, a smaller document, or int8 offload",
            budget,
        )

    def _feed(self, index: int, td: TokenizedDocument, progress: Progress | None) -> None:
        s = self.session
        ids = list(td.ids)
        tok = self.llm.tokenizer
        lead: list[int] = []
        if self.stream_tokens == 0:
            bos = getattr(tok, "bos_token_id", None)
            if bos is not None and getattr(tok, "add_bos_token", False):
                lead = [bos]
        else:
            lead = list(tok(SEPARATOR, add_special_tokens=False)["input_ids"])
        if lead:
            s.feed_ids(lead)
        self.stream_tokens += len(lead)
        self.segments.append((self.stream_tokens, index))
        s.feed_ids(ids, progress)
        self.stream_tokens += len(ids)

    # ------------------------------------------------------------------ asking
    def modes(self) -> list[str]:
        """The modes this reading can answer in: hybrid reads serve kv, text and full too."""
        out = ["full"]
        if self.session is not None:
            out.insert(0, "kv")
        if self.mode in ("text", "hybrid"):
            out.insert(-1, "text")
        if self.mode == "hybrid":
            out.insert(-1, "hybrid")
        return out

    def ask(self, question: str, max_new_tokens: int | None = None, mode: str | None = None) -> Answer:
        """Answer one question from what was read; the memory is left as it was. `mode` answers in
        another mode than the reading's, where the reading supports it (see `modes()`)."""
        mode = mode or self.mode
        if mode not in self.modes():
            raise ConfigError(f"documents read in mode {self.mode} cannot be asked in mode {mode}: "
                              f"use one of {', '.join(self.modes())}")  # fmt: skip
        question = " ".join(question.split())
        if not question:
            raise InputError("a question must be non-empty")
        if not self.docs:
            raise InputError("nothing has been read yet: read a document before asking")
        n_new = max_new_tokens or self.max_new_tokens
        start = _clock()
        tail = PROMPT_QUESTION.format(question=question)
        evidence: list[Evidence] = []
        notes: list[str] = []
        if mode == "kv":
            text, evidence, notes = self._ask_kv(tail, n_new, question)
        elif mode == "hybrid":
            chunks, chunk_text = self._retrieve(question, self.hybrid_tokens)
            text, units, notes = self._ask_kv(
                PASSAGES_HEADER + chunk_text + tail if chunk_text else tail, n_new, question
            )
            evidence = chunks + units
        elif mode == "text":
            budget = self._text_budget(tail, n_new)
            evidence, chunk_text = self._retrieve(question, budget)
            text = self._complete(chunk_text + tail, n_new)
        else:
            text, notes = self._ask_full(tail, n_new)
        return Answer(question, text, evidence, _clock() - start, mode, notes)

    def _text_budget(self, tail: str, n_new: int) -> int:
        room = self.llm.trained_len - self.llm.count_tokens(tail) - n_new - 8
        return max(0, min(room, self.context_tokens))

    def _retrieve(self, question: str, budget: int) -> tuple[list[Evidence], str]:
        """The best chunks that fit `budget` tokens: evidence (best first) and their text, best last."""
        if budget <= 0 or self.controller is None:
            return [], ""
        ctl = self.controller
        want = max(4, budget // max(16, self.chunk_tokens // 2) + 2)
        if ctl.config.candidates != want:
            ctl.config = replace(ctl.config, candidates=want)
        recall = ctl.recall(question, memory_tokens=budget, flash_tokens=0)
        used = [(it.record, float(it.relevance)) for it in recall.items if it.mode != "dropped"]
        if self.retrieval == "lexical":
            used = self._lexical_first(question, used, budget)
        evidence = []
        for rec, relevance in used:
            s, e = rec.span or (0, len(rec.text))
            lines = tuple(rec.metadata.get("lines") or (0, 0))
            evidence.append(Evidence("chunk", rec.source or "", s, e, (int(lines[0]), int(lines[1])),
                                     relevance, rec.text))  # fmt: skip
        order = [rec for rec, _ in reversed(used)]  # best chunk nearest the question
        return evidence, "\n\n".join(rec.text for rec in order)

    def _lexical_first(self, question: str, used: list[tuple[Any, float]], budget: int) -> list[tuple[Any, float]]:
        """The chunks whose rare-word score (unit_lexical: the question's rare words they hold, IDF over the
        chunks) is within LEXICAL_MARGIN of the best first, up to EVIDENCE_SHARE of the budget's chunks
        (select.lexical_tier: none where more hold them), then the MiniLM ranking `used`; within `budget` tokens."""
        import torch

        from memllm.context.select import EVIDENCE_SHARE, lexical_tier

        records, words = self._chunk_words()
        n = len(records)
        if not n:
            return used
        at = torch.arange(n)
        scores, held = words.unit_scores(question, at, at, n)
        cap = max(1, round(EVIDENCE_SHARE * budget / max(16, self.chunk_tokens)))
        tier = lexical_tier(scores, cap)
        if tier and held.shape[1]:
            tier = cover_words(tier, held, cap)
        tier = [records[i] for i in tier]
        cosine = {rec.id: r for rec, r in used}
        cosine.update(self._cosines(question, [rec for rec in tier if rec.id not in cosine]))
        lead = [(rec, cosine.get(rec.id, 0.0)) for rec in tier]
        led = {rec.id for rec in tier}
        out, room = [], budget
        for rec, r in [*lead, *((rec, r) for rec, r in used if rec.id not in led)]:
            cost = self.llm.count_tokens(rec.text + "\n")
            if cost <= room:
                out.append((rec, r))
                room -= cost
        return out

    def _cosines(self, question: str, records: list[Any]) -> dict[str, float]:
        """The store embedder's cosine of `question` with each of `records` (chunks the rare words brought that
        MiniLM's candidates did not hold): the relevance their evidence shows, as the others' (clipped at 0 as the
        controller's); none without an embedder."""
        embedder = getattr(self.store, "embedder", None)
        if not records or embedder is None:
            return {}
        from memllm.memory_stores.embeddings import normalize_rows

        vectors = normalize_rows(embedder.embed([question, *(rec.text for rec in records)]))
        return {rec.id: max(0.0, float(v)) for rec, v in zip(records, vectors[1:] @ vectors[0], strict=True)}

    def _chunk_words(self) -> tuple[list[Any], Any]:
        """The namespace's chunks in reading order and their words (unit_lexical.WindowWords), built once
        after each read."""
        if self._words is None:
            from memllm.unit_lexical import WindowWords

            records = self.store.list(self.namespace, filters={"kind": "chunk"})
            words = WindowWords()
            words.extend(r.text for r in records)
            self._words = (records, words)
        return self._words

    def _generate(self, ids: list[int], cache: Any, n_new: int, start_position: int = 0) -> str:
        import torch

        from memllm.generation import generate_ids

        tok = self.llm.tokenizer
        stops = set(self.llm.stop_ids())
        nl = newline_ids(tok)
        out: list[int] = []
        gen = generate_ids(self.llm.model, torch.tensor([ids], device=self.llm.device), cache=cache,
                           max_new_tokens=n_new, stop_ids=stops, start_position=start_position)  # fmt: skip
        for t in gen:
            out.append(t)
            if t in nl and tok.decode(out, skip_special_tokens=True).strip():
                break
        return first_line(tok.decode(out, skip_special_tokens=True))

    def _complete(self, prompt: str, n_new: int) -> str:
        from transformers import DynamicCache

        ids = list(self.llm.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        limit = self.llm.trained_len - n_new
        if len(ids) > limit:
            ids = ids[-limit:]
        return self._generate(ids, DynamicCache(config=self.llm.model.config), n_new)

    def _ask_full(self, tail: str, n_new: int) -> tuple[str, list[str]]:
        """Full attention over the documents, the middle cut to fit the window."""
        tok = self.llm.tokenizer
        tail_ids = list(tok(tail, add_special_tokens=False)["input_ids"])
        sep = list(tok(SEPARATOR, add_special_tokens=False)["input_ids"])
        body: list[int] = []
        for i, td in enumerate(self.docs):
            body.extend((sep if i else []) + td.ids)
        room = self.llm.trained_len - n_new - len(tail_ids)
        notes = []
        if len(body) > room:
            head = room // 2
            notes.append(f"documents truncated: {len(body)} tokens, the middle {len(body) - room} cut")
            body = body[:head] + body[len(body) - (room - head) :]
        from transformers import DynamicCache

        return self._generate(body + tail_ids, DynamicCache(config=self.llm.model.config), n_new), notes

    def _ask_kv(self, prompt: str, n_new: int, question: str) -> tuple[str, list[Evidence], list[str]]:
        """The answer after `prompt` from the memory's units; the selection matches `question` (the user's
        words), not the prompt's instructions and example."""
        s = self.session
        tok = self.llm.tokenizer
        stops = set(self.llm.stop_ids())
        nl = newline_ids(tok)
        out: list[int] = []
        recorder = _LookupRecorder(s.cache)
        with s.answering(), recorder:
            for t in s.generate_ids(prompt, n_new, stop=stops, query=question):
                out.append(t)
                if t in nl and tok.decode(out, skip_special_tokens=True).strip():
                    break
        notes = []
        if not recorder.supported:
            notes.append("this context memory exposes no unit lookups: no KV evidence")
        elif not recorder.log:
            notes.append(
                "the documents fit in the attention window: every token was attended, no units retrieved"
            )
        return first_line(tok.decode(out, skip_special_tokens=True)), self._unit_evidence(recorder), notes

    def _unit_evidence(self, recorder: _LookupRecorder) -> list[Evidence]:
        counts = recorder.counts()
        if not counts:
            return []
        cfg = self.memory
        n_layers = len(self.session.cache.layers)
        # units read as often (every layer reads what the question chose): the question's ranking decides
        chosen = (self.session.last_selection or {}).get("ranked_units", [])
        rank = {u: i for i, u in enumerate(chosen)}
        # per group of layers: its best units and their shares; adjacent groups that show the same (every
        # layer reads the units the question chose) are shown once, as one group
        picked: list[tuple[range, list[tuple[Evidence, float]]]] = []
        for group in _layer_groups(n_layers, self.layer_groups):
            total: Counter = Counter()
            picks = 0
            for layer in group:
                c = counts.get(layer, Counter())
                total.update(c)
                picks += sum(c.values())
            shown: list[tuple[Evidence, float]] = []
            for unit, times in sorted(total.items(), key=lambda kv: (-kv[1], rank.get(kv[0], len(rank)), kv[0])):
                ev = self._unit_to_evidence(unit, cfg, times / max(1, picks), "")
                if ev is not None:
                    shown.append((ev, round(ev.score, 6)))
                if len(shown) >= self.evidence_units:
                    break
            same = picked and [(e.start, e.end, sc) for e, sc in picked[-1][1]] == [(e.start, e.end, sc) for e, sc in shown]
            if same:
                picked[-1] = (range(picked[-1][0].start, group.stop), picked[-1][1])
            else:
                picked.append((group, shown))
        return [replace(ev, group=f"layers {g.start}-{g.stop - 1}") for g, shown in picked for ev, _ in shown]

    def _unit_to_evidence(self, unit: int, cfg: MemoryConfig, share: float, label: str) -> Evidence | None:
        """Unit u holds stream tokens [n_init + u*block, n_init + (u+1)*block)."""
        t0 = cfg.n_init + unit * cfg.block_size
        t1 = t0 + cfg.block_size
        for seg_start, index in reversed(self.segments):
            if t0 >= seg_start or t1 > seg_start:
                td = self.docs[index]
                a, b = max(0, t0 - seg_start), min(len(td), t1 - seg_start)
                if a >= len(td) or b <= 0:
                    return None
                s, e = td.char_span(a, b)
                return Evidence("unit", td.doc.name, s, e, td.doc.lines(s, e), share, td.doc.text[s:e], label)
        return None

    # ------------------------------------------------------------------ snapshots
    def save(self, path: str | Path) -> Path:
        """Write what answering needs: docqa.json, documents, kv/ (context snapshot), store/ (chunks).
        The chunk store is copied only when this DocumentQA owns it (made it, or loaded it from a
        snapshot); a store passed in by the caller stays theirs: pass it again to `load`.
        `path` must be new, empty, or a document memory saved before (check_save_target): the new
        content is written beside it and swapped in whole, nothing memllm did not write is removed."""
        target = check_save_target(path)
        with replace_folder(target) as folder:
            if self.session is not None:
                self.session.save(folder / "kv")
            if self.store is not None and self.mode in ("text", "hybrid") and self._owns_store:
                self.store.flush()
                _copy_store(self._tmp / "store", folder / "store")
            docs = [
                {"doc": td.doc.to_dict(), "ids": td.ids, "starts": td.starts, "ends": td.ends}
                for td in self.docs
            ]
            (folder / "documents.json").write_text(json.dumps(docs))
            manifest = {"format": DOCQA_FORMAT, "version": DOCQA_VERSION, "mode": self.mode,
                        "namespace": self.namespace, "segments": self.segments,
                        "stream_tokens": self.stream_tokens, "chunk_tokens": self.chunk_tokens,
                        "chunks": self.chunk_count, "model": getattr(self.llm, "name", None)}  # fmt: skip
            (folder / "docqa.json").write_text(json.dumps(manifest, indent=2))
        return target

    @staticmethod
    def saved_manifest(path: str | Path) -> dict[str, Any]:
        """docqa.json of a memory saved with `save(path)`, format and version checked
        (SnapshotError when it is missing, torn or of another kind)."""
        folder = Path(path)
        mpath = folder / "docqa.json"
        if not mpath.is_file():
            raise SnapshotError(
                f"no document memory at {folder}: expected docqa.json (written by --save-memory)"
            )
        try:
            manifest = json.loads(mpath.read_text())
        except (OSError, ValueError) as exc:
            raise SnapshotError(f"document memory at {folder} is unreadable ({exc}): save it again") from exc
        if not isinstance(manifest, dict) or (manifest.get("format"), manifest.get("version")) != (
            DOCQA_FORMAT,
            DOCQA_VERSION,
        ):
            raise SnapshotError(f"{mpath} is not a memllm document memory of version {DOCQA_VERSION}")
        validate.one_of(
            manifest.get("mode"), MODES, "docqa.json mode", lambda m: SnapshotError(f"{folder}: {m}")
        )
        return manifest

    @classmethod
    def load(
        cls, llm: Any, path: str | Path, *, store: Any = None, embedder: Any = None, **kwargs: Any
    ) -> DocumentQA:
        """A DocumentQA restored from `save(path)`: answers without reading the documents again."""
        folder = Path(path)
        manifest = cls.saved_manifest(folder)
        try:
            docs = json.loads((folder / "documents.json").read_text())
        except (OSError, ValueError) as exc:
            raise SnapshotError(f"document memory at {folder} is unreadable ({exc}): save it again") from exc
        _check_saved(manifest, docs, folder)
        mode = manifest["mode"]
        saved_store = folder / "store"
        if store is None and mode in ("text", "hybrid") and not saved_store.is_dir():
            raise SnapshotError(
                f"document memory at {folder} has no chunk store (store/): save it again with --save-memory"
            )
        qa = cls.__new__(cls)
        memory = None
        if mode in ("kv", "hybrid"):
            session = llm.restore(str(folder / "kv"), embedder=embedder)
            memory = session.config
        cls.__init__(qa, llm, "text" if mode in ("kv", "hybrid") else mode, store, memory,
                     namespace=manifest["namespace"], chunk_tokens=manifest["chunk_tokens"], embedder=embedder,
                     **kwargs)  # fmt: skip
        qa.mode = mode
        if mode in ("kv", "hybrid"):
            qa.session = session
            qa.memory = session.config
            qa.hybrid_tokens = kwargs.get("hybrid_tokens") or max(64, (qa.memory.n_local or 0) // 2)
        if mode in ("text", "hybrid"):
            qa._ensure_store(copy_of=saved_store)
        qa.docs = [
            TokenizedDocument(Document.from_dict(d["doc"]), d["ids"], d["starts"], d["ends"]) for d in docs
        ]
        qa.segments = [tuple(x) for x in manifest["segments"]]
        qa.stream_tokens = manifest["stream_tokens"]
        qa.chunk_count = manifest.get("chunks", 0)
        return qa

    def close(self) -> None:
        if self._owns_store and self.store is not None:
            self.store.close()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> DocumentQA:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mode": self.mode, "documents": len(self.docs),
                               "tokens": sum(len(td) for td in self.docs), "chunks": self.chunk_count}  # fmt: skip
        if self.session is not None:
            out["context"] = self.session.stats()
        return out
