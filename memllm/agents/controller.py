"""SCM-style memory controller: what of the text memory goes into the next prompt, within a token budget.

Per user turn: flash memory (the most recent turns that fit `flash_tokens`), an activation gate (does
this turn need archived memory at all?), ranking of archived candidates by relevance + recency decay +
importance, and assembly within `memory_tokens`: every candidate goes in raw, as its summary, or is
dropped, and the chosen ones are placed in time order. Summaries are written when a long record is
stored (`remember`), never on the answer path. Budgets are counted with the caller's `count_tokens`
(the model's tokenizer in production). The result of each recall is kept for `last_recall()`.

Knows nothing of LLMs, chat templates or the CLI: it reads and writes a `MemoryStore`.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from memllm.agents.fact_answer import asks_for, parse_question
from memllm.agents.facts import asks, second_person
from memllm.errors import ConfigError
from memllm.memory_stores.records import KINDS, MemoryRecord, MemoryStore, SearchResult

Mode = Literal["raw", "summary", "dropped"]
GateMode = Literal["heuristic", "always", "never"]

# Words that point back at earlier conversation or at stored facts about the user.
DEFAULT_CUES = (
    r"\b(remember|recall|remind|forgot|forget|earlier|before|previous(ly)?|last time|ago|again|"
    r"you (said|told|mentioned|suggested)|i (said|told|mentioned)|we (talked|discussed|spoke)|"
    r"my (name|birthday|wife|husband|partner|son|daughter|kids?|dog|cat|job|work|favou?rite|address|"
    r"phone|email|hometown|city|age)|what('s| is| was) my|where do i|who am i|do you know)\b"
)


@dataclass(frozen=True)
class ControllerConfig:
    """memory_tokens / flash_tokens: budgets of the archived-memory section and of the recent turns.
    flash_max_turns: most turns ever kept in flash. candidates: archived records ranked per recall.
    w_*: ranking weights; recency decays by half every `recency_half_life_s` seconds since a record
    was last updated. min_relevance: candidates less similar than this are dropped.
    gate: "heuristic" (cue words, else similarity >= gate_similarity), "always" or "never".
    summarize_min_tokens: records longer than this get a summary when stored (if a hook is given).
    kinds: record kinds eligible for archived recall.
    gate_kinds: the similarity gate compares the turn with records of these kinds only (None: all; where
    none of them is archived, all): by default the facts extracted from the user's statements, since
    ordinary chitchat resembles earlier chitchat (gate on all records: 69% of 1,222 ordinary turns
    fired, on facts 6.7%, the same 95% recall: benchmarks/RESULTS.md, "Chat").
    w_fact: added to the score of fact records (short, extracted statements: what a small model uses
    best). max_records: the memory section holds at most this many records (0: as many as fit the
    budget); the 135M model answers from one recalled fact far better than from several (RESULTS.md,
    issue 18). flash_with_memory: False leaves the recent turns out of a turn whose memory section is
    not empty (the 135M model copies its previous answer from them instead of using the recalled fact:
    1/10 in the slow ten-facts CLI test). superseded: "drop" leaves facts a newer fact replaced out of recall (they stay in the store
    and `memory history`), "keep" lets them compete like any record. user_questions: False leaves the
    user's own questions (user turns ending in "?") out of recall: a question tells nothing, yet the
    same question asked again is its nearest record (relevance ~1) and took the one recalled place
    from the fact that answers it ("What is my dog called?" recalled for "What is my dog called?", the
    fact 'My dog is called Biscuit.' dropped, the answer 'Your dog is a Greyhound.': issue 18).
    asked_facts: a question that asks for the subject of one of the user's current facts, and for nothing
    else (agents.fact_answer: "Where am I living these days?" for `home city`), opens the gate and
    brings that fact among the candidates with w_asked added to its score: such a question can be far
    from the fact's words (similarity 0.24 to 'I live in Porto.'; 'Which city do I live in?' 0.40 to 'I
    live in Cordoba.', the gate closed: issue 18).
    self_questions: a question about the user (agents.fact_answer.parse_question: "where do my parents
    live?") that the fact records did not open the gate for is compared with every kind, as when no fact
    is archived: what the user said in a sentence no rule reads as a fact is still recalled for it."""

    memory_tokens: int = 768
    flash_tokens: int = 512
    flash_max_turns: int = 32
    candidates: int = 24
    w_relevance: float = 1.0
    w_recency: float = 0.25
    w_importance: float = 0.15
    recency_half_life_s: float = 7 * 86400.0
    min_relevance: float = 0.2
    gate: GateMode = "heuristic"
    gate_similarity: float = 0.45
    cues: str = DEFAULT_CUES
    summarize_min_tokens: int = 96
    kinds: tuple[str, ...] = KINDS
    w_fact: float = 0.2
    max_records: int = 0
    flash_with_memory: bool = True
    superseded: Literal["drop", "keep"] = "drop"
    user_questions: bool = False
    gate_kinds: tuple[str, ...] | None = ("fact",)
    asked_facts: bool = True
    w_asked: float = 1.0
    self_questions: bool = True

    def __post_init__(self) -> None:
        for name in (
            "memory_tokens",
            "flash_tokens",
            "flash_max_turns",
            "max_records",
            "candidates",
            "summarize_min_tokens",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"ControllerConfig.{name} must be an integer >= 0, got {value!r}")
        if not isinstance(self.user_questions, bool):
            raise ConfigError(
                f"ControllerConfig.user_questions must be True or False, got {self.user_questions!r}"
            )
        if not isinstance(self.flash_with_memory, bool):
            raise ConfigError(
                f"ControllerConfig.flash_with_memory must be True or False, got {self.flash_with_memory!r}"
            )
        if self.superseded not in ("drop", "keep"):
            raise ConfigError(f"ControllerConfig.superseded must be drop or keep, got {self.superseded!r}")
        for flag in ("asked_facts", "self_questions"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(
                    f"ControllerConfig.{flag} must be True or False, got {getattr(self, flag)!r}"
                )
        for name in ("w_relevance", "w_recency", "w_importance", "w_fact", "w_asked"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"ControllerConfig.{name} must be a finite number >= 0, got {value!r}")
        if not self.recency_half_life_s > 0:
            raise ConfigError(
                f"ControllerConfig.recency_half_life_s must be > 0, got {self.recency_half_life_s}"
            )
        if self.gate not in ("heuristic", "always", "never"):
            raise ConfigError(f"ControllerConfig.gate must be heuristic, always or never, got {self.gate!r}")
        bad = [k for k in (*self.kinds, *(self.gate_kinds or ())) if k not in KINDS]
        if bad:
            raise ConfigError(
                f"ControllerConfig.kinds must be among {', '.join(KINDS)}, got {', '.join(bad)}"
            )
        try:
            re.compile(self.cues)
        except re.error as exc:
            raise ConfigError(f"ControllerConfig.cues is not a valid regular expression ({exc})") from exc


@dataclass(frozen=True)
class GateDecision:
    """Whether archived memory was consulted for a turn, why, and what deciding cost."""

    fire: bool
    reason: str
    cost_ms: float
    top_similarity: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "fire": self.fire,
            "reason": self.reason,
            "cost_ms": round(self.cost_ms, 3),
            "top_similarity": self.top_similarity,
        }


@dataclass
class GateStats:
    """How often the gate fired, on what ground, and its total cost."""

    calls: int = 0
    fired: int = 0
    by_cue: int = 0
    by_similarity: int = 0
    by_fact: int = 0  # a question asking for one of the user's facts (ControllerConfig.asked_facts)
    total_ms: float = 0.0

    @property
    def fire_rate(self) -> float:
        return self.fired / self.calls if self.calls else 0.0

    @property
    def mean_ms(self) -> float:
        return self.total_ms / self.calls if self.calls else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "fired": self.fired,
            "by_cue": self.by_cue,
            "by_similarity": self.by_similarity,
            "by_fact": self.by_fact,
            "fire_rate": round(self.fire_rate, 4),
            "total_ms": round(self.total_ms, 3),
            "mean_ms": round(self.mean_ms, 3),
        }


@dataclass
class RecallItem:
    """One archived candidate: how it scored and what assembly did with it."""

    record: MemoryRecord
    mode: Mode
    score: float
    relevance: float
    recency: float
    importance: float
    tokens: int  # tokens it takes in the memory section (0 when dropped)
    why: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.record.id,
            "kind": self.record.kind,
            "mode": self.mode,
            "score": round(self.score, 4),
            "relevance": round(self.relevance, 4),
            "recency": round(self.recency, 4),
            "importance": round(self.importance, 4),
            "tokens": self.tokens,
            "why": self.why,
            "created_at": self.record.created_at,
            "text": self.record.text,
        }


@dataclass
class Recall:
    """What the controller put in front of the model for one turn, and why."""

    query: str
    gate: GateDecision
    flash: list[MemoryRecord]  # recent turns, oldest first
    items: list[RecallItem]  # every archived candidate, best first (dropped ones too)
    memory_text: str  # the archived-memory section (chosen records, time order)
    flash_text: str
    memory_tokens: int
    flash_tokens: int
    memory_budget: int
    flash_budget: int
    elapsed_ms: float

    @property
    def used(self) -> list[RecallItem]:
        """The records placed in the memory section, in time order."""
        chosen = [it for it in self.items if it.mode != "dropped"]
        return sorted(chosen, key=lambda it: (it.record.created_at, it.record.id))

    def to_dict(self) -> dict[str, Any]:
        return {
            "query": self.query,
            "gate": self.gate.to_dict(),
            "flash": [r.id for r in self.flash],
            "items": [it.to_dict() for it in self.items],
            "used": [it.record.id for it in self.used],
            "memory_text": self.memory_text,
            "memory_tokens": self.memory_tokens,
            "memory_budget": self.memory_budget,
            "flash_tokens": self.flash_tokens,
            "flash_budget": self.flash_budget,
            "elapsed_ms": round(self.elapsed_ms, 3),
        }

    def explain(self) -> str:
        """Plain-text account for a `/memory` command."""
        lines = [
            f"gate: {'fired' if self.gate.fire else 'closed'} ({self.gate.reason}, {self.gate.cost_ms:.1f} ms)",
            f"flash: {len(self.flash)} recent turns, {self.flash_tokens}/{self.flash_budget} tokens",
            f"memory: {len(self.used)} records, {self.memory_tokens}/{self.memory_budget} tokens",
        ]
        for it in self.items:
            text = it.record.text if len(it.record.text) <= 60 else it.record.text[:57] + "..."
            lines.append(f"  {it.mode:<7} {it.score:.3f}  {it.record.id[:8]}  {text!r}  ({it.why})")
        return "\n".join(lines)


def render_record(record: MemoryRecord, mode: Mode) -> str:
    """Default line for a record in the memory section. A fact, told back in the second person:
    `- Your locker code is 4417. (told on YYYY-MM-DD)`, and
    `(true until YYYY-MM-DD)` once superseded; another record: date, role or kind, then text or summary."""
    if record.kind == "fact":
        since = record.metadata.get("valid_from", record.created_at)
        body = second_person(record.summary if mode == "summary" and record.summary else record.text)
        line = f"- {body} (told on {time.strftime('%Y-%m-%d', time.gmtime(float(since)))}"
        until = record.metadata.get("valid_to")
        if until is not None:
            line += f", true until {time.strftime('%Y-%m-%d', time.gmtime(float(until)))}"
        return line + ")"
    when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(record.created_at))
    who = record.metadata.get("role") or record.kind
    body = record.summary if mode == "summary" and record.summary else record.text
    tag = " (summary)" if mode == "summary" else ""
    return f"[{when}] {who}{tag}: {body}"


def render_turn(record: MemoryRecord) -> str:
    """Default line for a flash (recent) turn: `role: text`."""
    role = record.metadata.get("role")
    return f"{role}: {record.text}" if role else record.text


class MemoryController:
    """Reads and writes one namespace of a `MemoryStore` for a chat or QA agent.

    count_tokens: the model's token counter (`lambda s: len(tok.encode(s, add_special_tokens=False))`).
    summarize: writes the summary of a long record when it is stored (e.g. one short LLM call).
    importance: scores a new record in [0, 1] (default 0.5 for all).
    gate: replaces the configured gate with `gate(query) -> bool`.
    clock: seconds since the epoch (tests pass a fake one).
    """

    def __init__(
        self,
        store: MemoryStore,
        namespace: str,
        *,
        count_tokens: Callable[[str], int],
        summarize: Callable[[str], str] | None = None,
        importance: Callable[[str], float] | None = None,
        config: ControllerConfig | None = None,
        gate: Callable[[str], bool] | None = None,
        render: Callable[[MemoryRecord, Mode], str] = render_record,
        render_flash: Callable[[MemoryRecord], str] = render_turn,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not namespace:
            raise ConfigError("MemoryController needs a namespace (a user or document name)")
        self.store = store
        self.namespace = namespace
        self.count_tokens = count_tokens
        self.summarize = summarize
        self.importance = importance
        self.config = config or ControllerConfig()
        self.custom_gate = gate
        self.render = render
        self.render_flash = render_flash
        self.clock = clock
        self.since: float | None = None  # flash holds turns stored at or after this (None: any)
        self.gate_stats = GateStats()
        self._cues = re.compile(self.config.cues, re.IGNORECASE)
        self._last: Recall | None = None

    # ------------------------------------------------------------------ writing

    def make_record(
        self,
        text: str,
        *,
        kind: str = "turn",
        role: str | None = None,
        importance: float | None = None,
        metadata: dict[str, Any] | None = None,
        source: str | None = None,
        span: tuple[int, int] | None = None,
        created_at: float | None = None,
    ) -> MemoryRecord:
        """A record of this namespace, with its summary written now when it is long (and not stored yet)."""
        meta = dict(metadata or {})
        if role is not None:
            meta["role"] = role
        if importance is None:
            importance = float(self.importance(text)) if self.importance is not None else 0.5
        record = MemoryRecord(
            text,
            namespace=self.namespace,
            kind=kind,
            importance=importance,  # type: ignore[arg-type]
            created_at=self.clock() if created_at is None else created_at,
            source=source,
            span=span,
            metadata=meta,
        )
        if self.summarize is not None and self.count_tokens(text) > self.config.summarize_min_tokens:
            existing = self._stored(record)
            summary = existing.summary if existing is not None else self.summarize(text).strip()
            if summary and self.count_tokens(summary) < self.count_tokens(text):
                record.summary = summary
        return record

    def _stored(self, record: MemoryRecord) -> MemoryRecord | None:
        return self.store.get_by_hash(record.namespace, record.content_hash)

    def remember(self, text: str, **kwargs: Any) -> str:
        """Store one turn, chunk, summary or fact (see `make_record`); returns its id."""
        return self.store.add(self.make_record(text, **kwargs))

    def remember_many(self, texts: Sequence[str], **kwargs: Any) -> list[str]:
        return self.store.add_many([self.make_record(t, **kwargs) for t in texts])

    def summarize_pending(self, limit: int | None = None) -> int:
        """Write summaries for long records stored without one (e.g. by a bulk ingest); returns how many."""
        if self.summarize is None:
            return 0
        done = 0
        for rec in self.store.list(self.namespace):
            if limit is not None and done >= limit:
                break
            if rec.summary or self.count_tokens(rec.text) <= self.config.summarize_min_tokens:
                continue
            summary = self.summarize(rec.text).strip()
            if summary and self.count_tokens(summary) < self.count_tokens(rec.text):
                self.store.update(rec.id, summary=summary)
                done += 1
        return done

    # ------------------------------------------------------------------ reading

    def flash(self, budget: int | None = None) -> list[MemoryRecord]:
        """The most recent turns whose rendered lines fit `budget` tokens together, oldest first; with
        `since` set (a chat sets it when a conversation starts), only turns of this conversation:
        earlier ones reach the prompt through recall only (as short facts, which the small model
        uses; a wall of old turns in front of the question it does not: RESULTS.md, issue 18)."""
        budget = self.config.flash_tokens if budget is None else budget
        recent = self.store.list(
            self.namespace, filters={"kind": "turn"}, limit=self.config.flash_max_turns, newest_first=True
        )
        if self.since is not None:
            recent = [r for r in recent if r.created_at >= self.since]
        chosen: list[MemoryRecord] = []
        used = 0
        for rec in recent:
            cost = self.count_tokens(self.render_flash(rec) + "\n")
            if used + cost > budget:
                break
            chosen.append(rec)
            used += cost
        chosen.reverse()
        while chosen and self.count_tokens(self._flash_text(chosen)) > budget:  # non-additive tokenizers
            chosen.pop(0)
        return chosen

    def _flash_text(self, turns: Sequence[MemoryRecord]) -> str:
        return "\n".join(self.render_flash(r) for r in turns)

    def _search(self, query: str, exclude: set[str]) -> list[SearchResult]:
        k = self.config.candidates + len(exclude)
        kinds = None if set(self.config.kinds) >= set(KINDS) else {"kind": self.config.kinds}
        hits = self.store.search(query, k, namespace=self.namespace, filters=kinds)
        return [h for h in hits if h.record.id not in exclude and h.record.namespace == self.namespace]

    def _similar(self, query: str, exclude: set[str]) -> tuple[list[SearchResult], float | None, bool]:
        """The search over every eligible kind, its top similarity (None: no candidate), and whether
        that reaches gate_similarity."""
        hits = self._search(query, exclude)
        top = max((h.score for h in hits), default=None)
        return hits, top, top is not None and top >= self.config.gate_similarity

    def decide(
        self, query: str, exclude: set[str] | None = None
    ) -> tuple[GateDecision, list[SearchResult] | None]:
        """The activation gate for one turn; also returns the search it ran, if any, for reuse."""
        exclude = exclude or set()
        start = time.perf_counter()
        hits: list[SearchResult] | None = None
        top: float | None = None
        by = ""
        if self.custom_gate is not None:
            fire, reason = bool(self.custom_gate(query)), "custom gate"
        elif self.config.gate == "always":
            fire, reason = True, "gate=always"
        elif self.config.gate == "never":
            fire, reason = False, "gate=never"
        elif not self.store.list(self.namespace, limit=1, offset=len(exclude)):  # no more than the flash
            fire, reason = False, "nothing archived beyond the recent turns"
        elif cue := self._cues.search(query):
            fire, reason, by = True, f"cue {cue.group(0)!r}", "cue"
        elif asked := self.asked_facts(query, exclude):
            subject = asked[0].metadata.get("subject")
            fire, reason, by = True, f"asks for the fact {subject!r}", "fact"
        elif self.config.gate_kinds is not None and (
            found := [
                h
                for h in self.store.search(
                    query,
                    1 + len(exclude),
                    namespace=self.namespace,
                    filters={"kind": self.config.gate_kinds},
                )
                if h.record.id not in exclude
            ]  # fmt: skip
        ):
            top = max(h.score for h in found)
            fire = top >= self.config.gate_similarity
            reason = (
                f"top {'/'.join(self.config.gate_kinds)} similarity {top:.3f} "
                f"{'>=' if fire else '<'} {self.config.gate_similarity}"
            )
            by = "similarity" if fire else ""
            if not fire and self.config.self_questions and parse_question(query) is not None:
                hits, every, fire = self._similar(query, exclude)
                top = top if every is None else every
                reason += f"; a question about the user: top similarity {top:.3f}"
                by = "similarity" if fire else ""
        else:  # every kind (also where no record of gate_kinds is archived: facts not extracted)
            hits, top, fire = self._similar(query, exclude)
            reason = (
                f"top similarity {top:.3f} {'>=' if fire else '<'} {self.config.gate_similarity}"
                if top is not None
                else "no archived candidate"
            )
            by = "similarity" if fire else ""
        cost = (time.perf_counter() - start) * 1000.0
        stats = self.gate_stats
        stats.calls += 1
        stats.total_ms += cost
        stats.fired += int(fire)
        stats.by_cue += int(by == "cue")
        stats.by_similarity += int(by == "similarity")
        stats.by_fact += int(by == "fact")
        return GateDecision(fire, reason, cost, top), hits

    def recall(
        self,
        query: str,
        *,
        memory_tokens: int | None = None,
        flash_tokens: int | None = None,
        now: float | None = None,
    ) -> Recall:
        """Flash memory plus, when the gate fires, archived records assembled within `memory_tokens`."""
        start = time.perf_counter()
        cfg = self.config
        memory_budget = cfg.memory_tokens if memory_tokens is None else memory_tokens
        flash_budget = cfg.flash_tokens if flash_tokens is None else flash_tokens
        if memory_budget < 0 or flash_budget < 0:
            raise ConfigError(
                f"recall budgets must be >= 0, got memory {memory_budget}, flash {flash_budget}"
            )
        now = self.clock() if now is None else now
        flash = self.flash(flash_budget)
        flash_text = self._flash_text(flash)
        decision, hits = self.decide(query, {r.id for r in flash})
        items: list[RecallItem] = []
        if decision.fire:
            if hits is None:
                hits = self._search(query, {r.id for r in flash})
            asked = self.asked_facts(query, {r.id for r in flash})
            found = {h.record.id for h in hits}
            hits = [*hits, *(SearchResult(r, 0.0) for r in asked if r.id not in found)]
            items = self.assemble(self.rank(hits, now, asked={r.id for r in asked}), memory_budget)
        memory_text = self._memory_text(items)
        if memory_text and not cfg.flash_with_memory:
            flash, flash_text = [], ""
        recall = Recall(
            query=query,
            gate=decision,
            flash=flash,
            items=items,
            memory_text=memory_text,
            flash_text=flash_text,
            memory_tokens=self.count_tokens(memory_text) if memory_text else 0,
            flash_tokens=self.count_tokens(flash_text) if flash_text else 0,
            memory_budget=memory_budget,
            flash_budget=flash_budget,
            elapsed_ms=(time.perf_counter() - start) * 1000.0,
        )
        self._last = recall
        return recall

    def last_recall(self) -> Recall | None:
        """The result of the latest `recall`, for `/memory` and `.last_recall()`."""
        return self._last

    # ------------------------------------------------------------------ ranking and assembly

    def asked_facts(self, query: str, exclude: set[str] | None = None) -> list[MemoryRecord]:
        """The user's current fact records whose subject `query` asks for, and nothing else
        (agents.fact_answer; newest first); none unless ControllerConfig.asked_facts and kinds holds
        facts."""
        if not self.config.asked_facts or "fact" not in self.config.kinds:
            return []
        question = parse_question(query)
        if question is None:
            return []
        facts = self.store.list(self.namespace, filters={"kind": "fact"}, newest_first=True)
        return [
            r
            for r in facts
            if r.id not in (exclude or set())
            and r.metadata.get("valid_to") is None
            and isinstance(r.metadata.get("subject"), str)
            and asks_for(question, r.metadata["subject"])
        ]

    def rank(
        self, hits: Sequence[SearchResult], now: float, asked: set[str] | None = None
    ) -> list[RecallItem]:
        """Score = w_relevance*similarity + w_recency*0.5**(age/half_life) + w_importance*importance
        (+ w_fact for a fact, + w_asked for a fact in `asked`: ids of facts the question asks for);
        best first. Candidates below min_relevance (not asked for) come last, marked dropped."""
        cfg = self.config
        asked = asked or set()
        items = []
        for hit in hits:
            rec = hit.record
            relevance = max(0.0, float(hit.score))
            age = max(0.0, now - float(rec.updated_at or rec.created_at))
            recency = 0.5 ** (age / cfg.recency_half_life_s)
            score = cfg.w_relevance * relevance + cfg.w_recency * recency + cfg.w_importance * rec.importance
            score += cfg.w_fact if rec.kind == "fact" else 0.0
            score += cfg.w_asked if rec.id in asked else 0.0
            item = RecallItem(rec, "raw", score, relevance, recency, rec.importance, 0, "")
            if cfg.superseded == "drop" and rec.kind == "fact" and rec.metadata.get("valid_to") is not None:
                item.mode, item.why = "dropped", "superseded by a newer fact"
            elif (
                not cfg.user_questions
                and rec.kind == "turn"
                and rec.metadata.get("role") == "user"
                and asks(rec.text)
            ):
                item.mode, item.why = "dropped", "the user's question: it tells no fact"
            elif relevance < cfg.min_relevance and rec.id not in asked:
                item.mode, item.why = (
                    "dropped",
                    f"relevance {relevance:.3f} < min_relevance {cfg.min_relevance}",
                )
            items.append(item)
        return sorted(items, key=lambda it: (it.mode == "dropped", -it.score, -it.record.created_at))

    def _line_cost(self, record: MemoryRecord, mode: Mode) -> int:
        return self.count_tokens(self.render(record, mode) + "\n")

    def assemble(self, ranked: list[RecallItem], budget: int) -> list[RecallItem]:
        """Choose raw / summary / dropped for ranked candidates within `budget` tokens.

        Pass 1 (coverage), best first: each candidate takes its cheaper form (the summary when it has
        a shorter one) if that fits, else it is dropped. Pass 2 (fidelity), best first: summaries are
        upgraded to raw text while the difference fits. Finally the joined text is counted as a whole
        and, should a tokenizer count it above the sum of its lines, the lowest-ranked are dropped
        until it fits. Returns the candidates best first, each with its mode, tokens and reason."""
        left = budget
        for it in ranked:
            if it.mode == "dropped":
                continue
            raw = self._line_cost(it.record, "raw")
            summary = self._line_cost(it.record, "summary") if it.record.summary else None
            if summary is not None and summary < raw and summary <= left:
                it.mode, it.tokens = "summary", summary
                it.why = (
                    f"summary: raw needs {raw} tokens, {left} were left" if raw > left else "summary first"
                )
            elif raw <= left:
                it.mode, it.tokens, it.why = "raw", raw, f"raw: fits ({raw} tokens)"
            else:
                need = raw if summary is None else min(raw, summary)
                it.mode, it.tokens, it.why = "dropped", 0, f"over budget: needs {need} tokens, {left} left"
                continue
            left -= it.tokens
        for it in ranked:
            if it.mode != "summary":
                continue
            raw = self._line_cost(it.record, "raw")
            if raw - it.tokens <= left:
                left -= raw - it.tokens
                it.mode, it.tokens, it.why = "raw", raw, f"raw: fits ({raw} tokens)"
            elif it.why == "summary first":
                it.why = f"summary: raw needs {raw - it.tokens} more tokens, {left} were left"
        chosen = [it for it in ranked if it.mode != "dropped"]
        if self.config.max_records:
            for it in chosen[self.config.max_records :]:
                it.mode, it.tokens, it.why = "dropped", 0, f"beyond max_records ({self.config.max_records})"
            chosen = chosen[: self.config.max_records]
        while chosen and self.count_tokens(self._memory_text(chosen)) > budget:
            worst = chosen.pop()
            worst.mode, worst.tokens, worst.why = "dropped", 0, "over budget once joined with the others"
        return ranked

    def _memory_text(self, items: Sequence[RecallItem]) -> str:
        chosen = sorted(
            (it for it in items if it.mode != "dropped"), key=lambda it: (it.record.created_at, it.record.id)
        )
        return "\n".join(self.render(it.record, it.mode) for it in chosen)

    def with_config(self, **changes: Any) -> MemoryController:
        """A controller like this one with some config fields changed (stats and last recall not shared)."""
        return MemoryController(
            self.store,
            self.namespace,
            count_tokens=self.count_tokens,
            summarize=self.summarize,
            importance=self.importance,
            config=replace(self.config, **changes),
            gate=self.custom_gate,
            render=self.render,
            render_flash=self.render_flash,
            clock=self.clock,
        )


def whitespace_tokens(text: str) -> int:
    """A token counter for tests and tokenizer-less tools: whitespace-separated words."""
    return len(text.split())


__all__ = [
    "ControllerConfig",
    "GateDecision",
    "GateStats",
    "MemoryController",
    "Recall",
    "RecallItem",
    "render_record",
    "render_turn",
    "whitespace_tokens",
]
