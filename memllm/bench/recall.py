"""Multi-session recall workload on real conversations (chitchat-dataset), and its runner.

A case: one real person of the Chit Chat Challenge data (a sender with many conversations), a fact
planted among that person's messages in their first conversation ("My sister's name is Ophelia."),
then N later conversations of the same person as filler, then the question ("What is my sister's
name?"). The person's messages are `user` turns, their partners' `assistant` turns, with the data's
own timestamps. Two systems see the same turns within the same total token budget:
  - memllm: the text memory controller (flash memory + gated, ranked, budgeted archived recall);
  - last-turns: the most recent turns that fit the budget (what a plain chat keeps);
  - full history: the most recent turns that fit the model's whole window (less the answer).
The person's messages go through the chat agent's fact extraction (agents.facts, rules) as they are
stored, as `memllm chat --user` does. With `updates=True` the fact changes in a later conversation
(a new city, a new code) and the newest value is the gold answer.
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
CODES = [str(n) for n in range(1000, 10000, 917)]

FACTS: list[tuple[str, str, list[str]]] = [
    ("By the way, my sister's name is {v}.", "What is my sister's name?", NAMES),
    ("Oh and I was born in {v}, did I tell you?", "Where was I born?", PLACES),
    ("I always hide my spare key under the {v}.", "Where do I hide my spare key?", THINGS),
    ("My favourite colour is {v}, always has been.", "What is my favourite colour?", COLORS),
    ("My dog is called {v}.", "What is my dog called?", NAMES),
    ("I work as a {v} these days.", "What is my job?", JOBS),
    ("My locker code is {v}.", "What is my locker code?", CODES),
]


CARS = ["Volvo", "Skoda", "Toyota", "Fiat", "Subaru", "Peugeot"]
PHONES = ["555-0142", "555-0199", "555-0173", "555-0128", "555-0186"]
PASSWORDS = ["bluefern42", "redoak17", "silvermoth8", "quietlake55", "amberfox31"]
FOODS = ["sushi", "lasagna", "ramen", "paella", "falafel", "goulash"]
ADDRESSES = ["12 Elm Street", "7 Harbour Road", "41 Mill Lane", "3 Quarry Close", "88 Station Road"]
HOBBIES = ["pottery", "chess", "archery", "birdwatching", "knitting", "rowing"]
BANDS = ["Radiohead", "ABBA", "Metallica", "Coldplay", "Queen", "Blondie"]
EMAILS = ["ana@mail.org", "ana.k@post.net", "a.kovac@inbox.eu", "annak@fastmail.com"]
TEAMS = ["Arsenal", "Celtic", "Ajax", "Benfica", "Porto", "Napoli"]
DENTISTS = ["Dr Okafor", "Dr Lindqvist", "Dr Moreau", "Dr Haddad", "Dr Novak"]
AREAS = ["Leith", "Camden", "Brixton", "Morningside", "Ealing"]
DRINKS = ["coffee", "green tea", "lemonade", "hot chocolate", "mint tea"]
PINS = [str(n) for n in range(1203, 10000, 811)]

# (first statement, later statement, question, values): the fact changes in a later conversation. Twenty
# subjects, one per case of a 20-case run (case i takes UPDATES[i % 20]); each later statement is worded
# as people say it (a reason first, the new value in a clause after it, "now" at the end).
UPDATES: list[tuple[str, str, str, list[str]]] = [
    ("I live in {v}.", "I just moved to {v}!", "Which city do I live in?", PLACES),
    ("My locker code is {v}.", "My new locker code is {v}.", "What is my locker code?", CODES),
    ("I work as a {v}.", "I now work as a {v}.", "What is my job?", JOBS),
    (
        "My favourite colour is {v}.",
        "My favourite colour is {v} now.",
        "What is my favourite colour?",
        COLORS,
    ),
    ("My dog is called {v}.", "We renamed our dog, my dog is called {v}.", "What is my dog called?", NAMES),
    (
        "My cat is called {v}.",
        "Sadly our old cat died, and we adopted a new one: my cat is called {v}.",
        "What is my cat called?",
        NAMES,
    ),
    ("I drive a {v}.", "I sold my old car, I drive a {v} now.", "What car do I drive?", CARS),
    (
        "My phone number is {v}.",
        "I got a new phone, my phone number is {v} now.",
        "What is my phone number?",
        PHONES,
    ),
    (
        "My wifi password is {v}.",
        "I changed the router settings, my wifi password is {v} now.",
        "What is my wifi password?",
        PASSWORDS,
    ),
    (
        "My boss is called {v}.",
        "I have a new manager at work, my boss is called {v}.",
        "What is my boss called?",
        NAMES,
    ),
    (
        "My favourite food is {v}.",
        "My favourite food is {v} these days.",
        "What is my favourite food?",
        FOODS,
    ),
    (
        "My address is {v}.",
        "We moved house last month, my address is {v} now.",
        "What is my address?",
        ADDRESSES,
    ),
    ("My hobby is {v}.", "I gave that up, my hobby is {v} now.", "What is my hobby?", HOBBIES),
    (
        "My favourite band is {v}.",
        "My taste changed, my favourite band is {v} now.",
        "What is my favourite band?",
        BANDS,
    ),
    ("My email address is {v}.", "My new email address is {v}.", "What is my email address?", EMAILS),
    (
        "My favourite team is {v}.",
        "I switched sides, my favourite team is {v} now.",
        "What is my favourite team?",
        TEAMS,
    ),
    (
        "My dentist is called {v}.",
        "I switched dentists, my dentist is called {v}.",
        "What is my dentist called?",
        DENTISTS,
    ),
    ("My gym is in {v}.", "I switched gyms, my gym is in {v} now.", "Where is my gym?", AREAS),
    (
        "My favourite drink is {v}.",
        "I quit coffee, my favourite drink is {v} now.",
        "What is my favourite drink?",
        DRINKS,
    ),
    ("My bank PIN is {v}.", "I reset it at the bank, my bank PIN is {v} now.", "What is my bank PIN?", PINS),
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
    later_sessions: int, n_cases: int, seed: int = 0, path: Path | None = None, updates: bool = False
) -> list[RecallCase]:
    """n_cases cases, each from a different person with at least later_sessions + 1 conversations.
    updates: the fact is told again with a new value in the middle later conversation."""
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
        meta: dict[str, Any] = {}
        if updates:
            stmt, later_stmt, question, values = UPDATES[i % len(UPDATES)]
            value, new = rng.sample(values, 2)
            mid = sessions[len(sessions) // 2]
            idx = [j for j, turn in enumerate(mid) if turn[0] == "user"] or [0]
            j = rng.choice(idx)
            mid.insert(j + 1, ("user", later_stmt.format(v=new), mid[j][2] + 0.5))
            meta = {"old_answer": value, "update": later_stmt.format(v=new)}
        told = stmt.format(v=value)
        first.insert(at + 1, ("user", told, stamp + 0.5))
        if updates:
            value = new
        cases.append(
            RecallCase(
                user=f"chitchat-{user[:8]}",
                fact=told,
                question=question,
                answer=value,
                sessions=sessions,
                ask_time=sessions[-1][-1][2] + 86400.0,
                meta={"fact_position": at + 1, "turns": sum(len(s) for s in sessions), **meta},
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
    controller: dict[str, Any] | None = None,
    extract: bool = True,
    full_history: bool = True,
    gate_variants: dict[str, dict[str, Any]] | None = None,
    conversation: bool = True,
) -> dict[str, Any]:
    """Ingest each case into its own namespace of `store`, recall for its question, optionally answer.
    controller: ControllerConfig fields to change (e.g. gate_similarity). extract: the person's messages
    go through fact extraction as they are stored. full_history: also answer with the whole window.
    gate_variants: name -> ControllerConfig changes; each is measured on the same ordinary turns and
    question (firing rate, recall@budget), on the same ingested store. conversation: the question starts
    a new conversation (no earlier turns as recent turns, as the chat does); False: the last turns that
    fit flash_tokens go in front (the layout before issue 18's measurement)."""
    from memllm.agents.chat import CHAT_MAX_RECORDS, DEFAULT_SYSTEM, build_messages, start_from_fact
    from memllm.agents.controller import ControllerConfig, MemoryController
    from memllm.agents.factbook import FactBook
    from memllm.agents.facts import extract_facts
    from memllm.memory_stores.records import MemoryRecord

    # The chat's own prompt settings (one recalled record; the question starts a new conversation, so
    # no earlier turns in front of it), unless `controller` changes them.
    cfg = ControllerConfig(
        memory_tokens=memory_tokens,
        flash_tokens=flash_tokens,
        **{"max_records": CHAT_MAX_RECORDS, "flash_with_memory": not conversation, **(controller or {})},
    )
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
        if conversation:
            ctl.since = case.ask_time  # as ChatAgent: the question opens a new conversation
        book = FactBook(store, ns)

        def ingest(part: list[MemoryRecord], book: FactBook = book) -> None:
            ids = store.add_many(part)
            if not extract:
                return
            for rec, rid in zip(part, ids, strict=True):
                if rec.metadata.get("role") == "user":
                    for fact in extract_facts(rec.text):
                        book.add(fact, at=rec.created_at, evidence=rid)

        t0 = time.perf_counter()
        ingest(records[:-last])
        ingest_s = time.perf_counter() - t0
        # The gate on ordinary turns: the person's messages of their last conversation, decided against
        # all their earlier conversations (before that conversation is stored: no message meets itself).
        mine = [text for role, text, _ in case.sessions[-1] if role == "user"]
        ordinary = [ctl.decide(text)[0] for text in mine]
        variants = {name: ctl.with_config(**changes) for name, changes in (gate_variants or {}).items()}
        variant_fired = {name: sum(v.decide(text)[0].fire for text in mine) for name, v in variants.items()}
        t0 = time.perf_counter()
        ingest(records[-last:])
        ingest_s += time.perf_counter() - t0
        recall = ctl.recall(case.question)
        gold = case.meta.get("update", case.fact)
        in_memory = any(
            it.record.text == gold or (it.record.kind == "fact" and case.answer in it.record.text)
            for it in recall.used
        )
        in_flash = any(r.text == gold for r in recall.flash)

        def found(r: Any, gold: str = gold, answer: str = case.answer) -> bool:
            return any(
                it.record.text == gold or (it.record.kind == "fact" and answer in it.record.text)
                for it in r.used
            ) or any(x.text == gold for x in r.flash)

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
            "baseline_recall": any(t[1] == gold for t in baseline),
            "ordinary_turns": len(ordinary),
            "ordinary_fired": sum(d.fire for d in ordinary),
            "ordinary_gate_ms": sum(d.cost_ms for d in ordinary),
        }
        for name, v in variants.items():
            r = v.recall(case.question)
            row[f"variant_{name}_fired"] = variant_fired[name]
            row[f"variant_{name}_question_fired"] = r.gate.fire
            row[f"variant_{name}_recall"] = found(r)
        if llm is not None:

            def plain(turns: list[Turn], question: str = case.question) -> list[dict[str, str]]:
                msgs = [{"role": "system", "content": DEFAULT_SYSTEM}] if DEFAULT_SYSTEM else []
                msgs += [{"role": r, "content": t} for r, t, _ in turns]
                return [*msgs, {"role": "user", "content": question}]

            systems = {
                "memllm": build_messages(DEFAULT_SYSTEM, case.question, recall),
                "baseline": plain(baseline),
            }
            if full_history:
                window = llm.trained_len - max_new_tokens - count_tokens(case.question) - 64
                whole = last_turns(list(case.turns()), window, count_tokens)
                row["full_recall"] = any(t[1] == gold for t in whole)
                systems["full"] = plain(whole)
            _, prefix = start_from_fact(case.question, recall)  # as the chat starts an answer from a fact
            row["memllm_memory"], row["memllm_answer_prefix"] = recall.memory_text, prefix
            for name, msgs in systems.items():
                opts = {"answer_prefix": prefix} if name == "memllm" and prefix else {}
                answer = llm.chat(msgs, max_new_tokens=max_new_tokens, **opts)
                row[f"{name}_answer"] = answer
                row[f"{name}_exact"], row[f"{name}_fuzzy"] = answer_matches(answer, case.answer)
                if "old_answer" in case.meta:
                    row[f"{name}_old"] = case.meta["old_answer"].lower() in answer.lower()
        rows.append(row)
        if progress:
            progress(n + 1, len(cases))
    return summarize(rows)


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    n = len(rows)

    def rate(key: str) -> float | None:
        vals = [r[key] for r in rows if key in r]
        return sum(bool(v) for v in vals) / len(vals) if vals else None

    names = sorted(
        {
            k[len("variant_") : -len("_recall")]
            for r in rows
            for k in r
            if k.startswith("variant_") and k.endswith("_recall")
        }
    )
    ordinary_n = max(1, sum(r["ordinary_turns"] for r in rows))
    variants = {
        name: {
            "ordinary_fire_rate": sum(r[f"variant_{name}_fired"] for r in rows) / ordinary_n,
            "question_fire_rate": rate(f"variant_{name}_question_fired"),
            "recall_at_budget": rate(f"variant_{name}_recall"),
        }
        for name in names
    }
    summary = {
        "cases": n,
        "gate_variants": variants,
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
        "full_recall_at_window": rate("full_recall"),
        "full_exact": rate("full_exact"),
        "full_fuzzy": rate("full_fuzzy"),
        "memllm_old_value": rate("memllm_old"),
        "baseline_old_value": rate("baseline_old"),
        "full_old_value": rate("full_old"),
    }
    return {"summary": summary, "rows": rows}
