"""Multi-session recall workload on real conversations (chitchat-dataset), and its runner.

A case: one real person of the Chit Chat Challenge data (a sender with many conversations), a fact
planted among that person's messages in their first conversation ("My sister's name is Ophelia."),
then N later conversations of the same person as filler, then the question ("What is my sister's
name?"). The person's messages are `user` turns, their partners' `assistant` turns, with the data's
own timestamps. Two systems see the same turns within the same total token budget:
  - memllm: the text memory controller (flash memory + gated, ranked, budgeted archived recall);
  - last-turns: the most recent turns that fit the budget (what a plain chat keeps).
recall@budget: the fact's turn is in the prompt. With an LLM, its answer is checked too (the value
appears in it, case-insensitive: "exact"; or a fuzzy match of its longest word, ratio >= 0.8).

Knows nothing of the CLI; the data is read from the installed `chitchat-dataset` package's file
without importing it.
"""

from __future__ import annotations

import difflib
import json
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from memllm.errors import InputError

Turn = tuple[str, str, float]  # (role, text, unix time)

NAMES = ["Ophelia", "Marcus", "Priya", "Tobias", "Ingrid", "Kenji", "Lucia", "Dmitri", "Amara", "Felix"]
PLACES = ["Lisbon", "Winnipeg", "Osaka", "Nairobi", "Tallinn", "Cordoba", "Dundee", "Hobart"]
THINGS = ["flower pot", "doormat", "garden gnome", "blue bucket", "loose brick"]
COLORS = ["teal", "maroon", "lavender", "ochre", "turquoise"]
JOBS = ["welder", "pharmacist", "beekeeper", "surveyor", "librarian", "glassblower"]

FACTS: list[tuple[str, str, list[str]]] = [
    ("By the way, my sister's name is {v}.", "What is my sister's name?", NAMES),
    ("Oh and I was born in {v}, did I tell you?", "Where was I born?", PLACES),
    ("I always hide my spare key under the {v}.", "Where do I hide my spare key?", THINGS),
    ("My favourite colour is {v}, always has been.", "What is my favourite colour?", COLORS),
    ("My dog is called {v}.", "What is my dog called?", NAMES),
    ("I work as a {v} these days.", "What is my job?", JOBS),
    ("My locker code is {v}.", "What is my locker code?", [str(n) for n in range(1000, 10000, 917)]),
]


@dataclass
class RecallCase:
    user: str
    fact: str
    question: str
    answer: str
    sessions: list[list[Turn]]  # sessions[0] holds the fact
    ask_time: float
    meta: dict[str, Any] = field(default_factory=dict)

    def turns(self) -> Iterator[Turn]:
        for session in self.sessions:
            yield from session


def dataset_path() -> Path:
    """dataset.json of the installed chitchat-dataset package (found without importing it)."""
    try:
        dist = metadata.distribution("chitchat-dataset")
    except metadata.PackageNotFoundError as exc:
        raise InputError(
            "the recall benchmark needs real conversations: run `pip install --no-deps chitchat-dataset`"
        ) from exc
    path = Path(str(dist.locate_file("chitchat_dataset/dataset.json")))
    if not path.is_file():
        raise InputError(f"chitchat-dataset is installed but {path} is missing: reinstall it")
    return path


def _ts(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def _sessions_by_user(data: dict[str, Any]) -> dict[str, list[list[tuple[str, str, float]]]]:
    """sender -> their conversations in time order; each a list of (sender, text, time) messages."""
    by_user: dict[str, list[list[tuple[str, str, float]]]] = {}
    for conv in data.values():
        msgs = [(u["sender"], u["text"].strip(), _ts(u["timestamp"])) for m in conv["messages"] for u in m]
        msgs = [m for m in msgs if m[1]]
        if not msgs:
            continue
        for sender in {m[0] for m in msgs}:
            by_user.setdefault(sender, []).append(msgs)
    for convs in by_user.values():
        convs.sort(key=lambda c: c[0][2])
    return by_user


def build_cases(
    later_sessions: int, n_cases: int, seed: int = 0, path: Path | None = None
) -> list[RecallCase]:
    """n_cases cases, each from a different person with at least later_sessions + 1 conversations."""
    if later_sessions < 1 or n_cases < 1:
        raise InputError("later_sessions and n_cases must be >= 1")
    data = json.loads((path or dataset_path()).read_text())
    by_user = _sessions_by_user(data)
    users = sorted(u for u, convs in by_user.items() if len(convs) >= later_sessions + 1)
    rng = random.Random(seed)
    rng.shuffle(users)
    if len(users) < n_cases:
        raise InputError(
            f"only {len(users)} people have {later_sessions + 1} conversations: ask for fewer cases or sessions"
        )
    cases = []
    for i, user in enumerate(users[:n_cases]):
        convs = by_user[user][: later_sessions + 1]
        sessions = [
            [("user" if s == user else "assistant", text, t) for s, text, t in conv] for conv in convs
        ]
        stmt, question, values = FACTS[i % len(FACTS)]
        value = rng.choice(values)
        first = sessions[0]
        user_idx = [j for j, turn in enumerate(first) if turn[0] == "user"] or [0]
        at = rng.choice(user_idx)
        stamp = first[at][2]
        first.insert(at + 1, ("user", stmt.format(v=value), stamp + 0.5))
        cases.append(
            RecallCase(
                user=f"chitchat-{user[:8]}",
                fact=stmt.format(v=value),
                question=question,
                answer=value,
                sessions=sessions,
                ask_time=sessions[-1][-1][2] + 86400.0,
                meta={"fact_position": at + 1, "turns": sum(len(s) for s in sessions)},
            )
        )
    return cases


def answer_matches(answer: str, gold: str) -> tuple[bool, bool]:
    """(exact, fuzzy): gold appears in the answer; or some answer word is close to it (ratio >= 0.8)."""
    a = answer.lower()
    g = gold.lower()
    exact = g in a
    words = [w.strip(".,!?;:'\"()") for w in a.split()]
    fuzzy = exact or any(difflib.SequenceMatcher(None, w, g).ratio() >= 0.8 for w in words if w)
    return exact, fuzzy


def last_turns(turns: list[Turn], budget: int, count_tokens: Callable[[str], int]) -> list[Turn]:
    """The most recent turns whose `role: text` lines fit `budget` tokens (the plain-chat baseline)."""
    chosen: list[Turn] = []
    used = 0
    for turn in reversed(turns):
        cost = count_tokens(f"{turn[0]}: {turn[1]}\n")
        if used + cost > budget:
            break
        chosen.append(turn)
        used += cost
    return chosen[::-1]


def run_cases(
    cases: list[RecallCase],
    *,
    store: Any,
    count_tokens: Callable[[str], int],
    memory_tokens: int,
    flash_tokens: int,
    llm: Any = None,
    max_new_tokens: int = 24,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Ingest each case into its own namespace of `store`, recall for its question, optionally answer."""
    from memllm.agents.chat import DEFAULT_SYSTEM, build_messages
    from memllm.agents.controller import ControllerConfig, MemoryController
    from memllm.memory_stores.records import MemoryRecord

    cfg = ControllerConfig(memory_tokens=memory_tokens, flash_tokens=flash_tokens)
    rows = []
    for n, case in enumerate(cases):
        ns = f"user:{case.user}"
        records = [
            MemoryRecord(text, namespace=ns, kind="turn", created_at=t, metadata={"role": role})
            for role, text, t in case.turns()
        ]
        last = len(case.sessions[-1])
        ctl = MemoryController(
            store, ns, count_tokens=count_tokens, config=cfg, clock=lambda c=case: c.ask_time
        )
        t0 = time.perf_counter()
        store.add_many(records[:-last])
        ingest_s = time.perf_counter() - t0
        # The gate on ordinary turns: the person's messages of their last conversation, decided against
        # all their earlier conversations (before that conversation is stored: no message meets itself).
        ordinary = [ctl.decide(text)[0] for role, text, _ in case.sessions[-1] if role == "user"]
        t0 = time.perf_counter()
        store.add_many(records[-last:])
        ingest_s += time.perf_counter() - t0
        recall = ctl.recall(case.question)
        in_memory = any(it.record.text == case.fact for it in recall.used)
        in_flash = any(r.text == case.fact for r in recall.flash)
        baseline = last_turns(list(case.turns()), memory_tokens + flash_tokens, count_tokens)
        row: dict[str, Any] = {
            "user": case.user,
            "question": case.question,
            "answer": case.answer,
            "turns": case.meta["turns"],
            "dialogue_tokens": sum(count_tokens(f"{r}: {t}\n") for r, t, _ in case.turns()),
            "memllm_recall": in_memory or in_flash,
            "memllm_in_flash": in_flash,
            "gate_fired": recall.gate.fire,
            "gate_reason": recall.gate.reason,
            "gate_ms": recall.gate.cost_ms,
            "recall_ms": recall.elapsed_ms,
            "ingest_s": ingest_s,
            "baseline_recall": any(t[1] == case.fact for t in baseline),
            "ordinary_turns": len(ordinary),
            "ordinary_fired": sum(d.fire for d in ordinary),
            "ordinary_gate_ms": sum(d.cost_ms for d in ordinary),
        }
        if llm is not None:
            msgs = build_messages(DEFAULT_SYSTEM, case.question, recall)
            mem_answer = llm.chat(msgs, max_new_tokens=max_new_tokens)
            base_msgs = [{"role": "system", "content": DEFAULT_SYSTEM}]
            base_msgs += [{"role": r, "content": t} for r, t, _ in baseline]
            base_msgs.append({"role": "user", "content": case.question})
            base_answer = llm.chat(base_msgs, max_new_tokens=max_new_tokens)
            row["memllm_answer"], row["baseline_answer"] = mem_answer, base_answer
            row["memllm_exact"], row["memllm_fuzzy"] = answer_matches(mem_answer, case.answer)
            row["baseline_exact"], row["baseline_fuzzy"] = answer_matches(base_answer, case.answer)
        rows.append(row)
        if progress:
            progress(n + 1, len(cases))
    return summarize(rows)


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    n = len(rows)

    def rate(key: str) -> float | None:
        vals = [r[key] for r in rows if key in r]
        return sum(bool(v) for v in vals) / len(vals) if vals else None

    summary = {
        "cases": n,
        "memllm_recall_at_budget": rate("memllm_recall"),
        "memllm_in_flash": rate("memllm_in_flash"),
        "baseline_recall_at_budget": rate("baseline_recall"),
        "gate_fire_rate": rate("gate_fired"),
        "gate_ms_mean": sum(r["gate_ms"] for r in rows) / n if n else 0.0,
        "ordinary_turns": sum(r["ordinary_turns"] for r in rows),
        "ordinary_fire_rate": sum(r["ordinary_fired"] for r in rows)
        / max(1, sum(r["ordinary_turns"] for r in rows)),
        "ordinary_gate_ms_mean": sum(r["ordinary_gate_ms"] for r in rows)
        / max(1, sum(r["ordinary_turns"] for r in rows)),
        "recall_ms_mean": sum(r["recall_ms"] for r in rows) / n if n else 0.0,
        "dialogue_tokens_mean": sum(r["dialogue_tokens"] for r in rows) / n if n else 0.0,
        "memllm_exact": rate("memllm_exact"),
        "memllm_fuzzy": rate("memllm_fuzzy"),
        "baseline_exact": rate("baseline_exact"),
        "baseline_fuzzy": rate("baseline_fuzzy"),
    }
    return {"summary": summary, "rows": rows}
