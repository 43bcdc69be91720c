"""A lexical signal for the question selector, replayed offline (issue 25).

Replays selections on logged full score files (`ruler_gpu.py run ... --log-scores`: per question, the fused
attention mass of every unit and the text index's MiniLM cosine) with a third score per unit computed here
from the suite's text: the question's words against the words of the same windows the text index embeds
(48 tokens every 24; a unit's score is its best window's), IDF from the haystack's own windows. Words are
lower-cased runs of letters and digits of the tokenizer's decoded text; nothing here knows the suite's
wording. Three lexical scores:

* rare: the IDF-weighted share of the question's rare words (in at most --rare of the haystack's windows)
  that the window holds (1.0 = all of them);
* overlap: the same over all the question's words the haystack holds;
* bm25: Okapi BM25 (k1 1.2, b 0.75) of the question's distinct words.

Rules (`rules`): today's (`select.evidence_then_attention` on `select.hybrid`), the lexical score added to
the standardised sum (with or without the switch), and the lexical tier: the units whose score is within
--margin of the best (none when more than --cap are), with their neighbours, as evidence alone or first
before today's rule; optionally with the tier's near-duplicates (units at least --near of the best score
holding no question word the tier lacks) ranked last.

Per family: every gold unit read (share of questions) / mean number of chosen units, not gold, holding part
of a needle that is not the question's (distractors; in brackets for multikey: the question's own three
near-duplicates) / mean share of the oracle's units read (gold first, then the question's attention, as
the oracle system reads). Needles are found by replaying the suite's seeded plan (`ruler._plan_needles`)
and locating their tokens: the measurement knows the suite, the rules do not. With --logged, a run's
hybrid and oracle answers against the distractor units each read. Selections, not answers.

    python benchmarks/ruler_lexical.py \
        --pair benchmarks/results/ruler_qwen_32k_windows.json.gz=.gpu/suite_qwen_32k.json.gz \
        --pair benchmarks/results/ruler_qwen_128k_windows.json.gz=.gpu/suite_qwen_128k.json.gz \
        --logged benchmarks/results/ruler_qwen_run33_32k.json.gz=.gpu/suite_qwen_32k.json.gz \
        --logged benchmarks/results/ruler_qwen_run33_128k_needles.json.gz=.gpu/suite_qwen_128k.json.gz \
        --tokenizer ~/.cache/memllm/models/qwen2.5-coder-0.5b/weights
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from memllm.bench import ruler
from memllm.context import select
from memllm.unit_lexical import RARE
from memllm.unit_text import UnitTextIndex

WORD = re.compile(r"\w+")
N_INIT, BLOCK, WINDOW = 128, 128, 48  # the logged runs' n_init, block_size and the text index's window
STRIDE = WINDOW // 2


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


@dataclass
class Haystack:
    """One haystack's windows as words, with the inverted index the scores read."""

    data: dict[str, Any]
    postings: dict[str, tuple[np.ndarray, np.ndarray]]  # word -> (window ids, counts)
    lengths: np.ndarray  # words per window
    needles: list[tuple[int, tuple[int, int]]]  # (planned question index, token span) of every needle

    @property
    def n_windows(self) -> int:
        return len(self.lengths)

    def lexical(
        self, question: str, kind: str, n_units: int, rare: float = 0.02, k1: float = 1.2, b: float = 0.75
    ) -> Lexical:
        """The question's words (those the haystack holds) against the first n_units units: per window BM25
        or the IDF-weighted share of the words it holds, a unit's score its best window's; the words a unit
        holds are its best window's."""
        n = self.n_windows
        q = [w for w in dict.fromkeys(words(question)) if w in self.postings]
        if kind == "rare":  # only the words in at most `rare` of the windows
            q = [w for w in q if len(self.postings[w][0]) <= rare * n]
        df = np.array([len(self.postings[w][0]) for w in q], dtype=float)
        idf = np.log(n / df)
        weight = idf / max(idf.sum(), 1e-12)
        held = np.zeros((n, len(q)), dtype=bool)  # per window, the question's words it holds
        bm = np.zeros(n)
        avg = self.lengths.mean()
        for i, w in enumerate(q):
            at, tf = self.postings[w]
            held[at, i] = True
            norm = k1 * (1 - b + b * self.lengths[at] / avg)
            bm[at] += math.log((n - df[i] + 0.5) / (df[i] + 0.5) + 1) * tf * (k1 + 1) / (tf + norm)
        per_window = bm if kind == "bm25" else held @ weight
        first, last = unit_windows(n_units)
        best = np.array([f + int(np.argmax(per_window[f : e + 1])) for f, e in zip(first, last, strict=True)])
        return Lexical(torch.from_numpy(per_window[best]).float(), held[best], weight)


@dataclass
class Lexical:
    """Per unit, a lexical score and which of the question's words it holds (with their IDF shares)."""

    score: torch.Tensor  # (n_units,)
    matched: np.ndarray  # (n_units, words) bool
    weight: np.ndarray  # (words,) IDF, summing to 1


def unit_windows(n_units: int) -> tuple[np.ndarray, np.ndarray]:
    """As UnitTextIndex.unit_windows: each unit's first and last window (those at least half inside it)."""
    lo = np.arange(n_units) * BLOCK - WINDOW // 2
    hi = lo + BLOCK
    n_windows = (n_units * BLOCK - WINDOW // 2) // STRIDE + 1
    first = np.maximum(0, -(-lo // STRIDE))
    last = np.minimum(hi // STRIDE, n_windows - 1)
    return first, last


def needle_spans(h: dict[str, Any], tok: Any) -> list[tuple[int, tuple[int, int]]]:
    """Every needle's token span with the index of the planned question it belongs to (the last part of
    the question's id), by replaying the suite's seeded plan (ruler.needle_haystack)."""
    if h["kind"] != "needles":
        return []
    per = max(collections.Counter(q["family"] for q in h["questions"]).values())
    rng = random.Random(f"ruler-needles:{h['length']}:{h['seed']}")
    vals = ruler._Values(rng)
    fams = [f for f in ruler.NEEDLE_FAMILIES if any(q["family"] == f for q in h["questions"])]
    planned = [p for f in fams for p in ruler._plan_needles(f, per, rng, vals)]
    owner = [qi for qi, p in enumerate(planned) for _ in p.needles]
    texts = [t for p in planned for t in p.needles]
    ids = h["ids"]
    arr = np.asarray(ids)
    spans = []
    for qi, e in zip(
        owner, tok([" " + t for t in texts], add_special_tokens=False)["input_ids"], strict=True
    ):
        e = list(e)
        for a in np.nonzero(arr[: len(arr) - len(e) + 1] == e[0])[0].tolist():
            if ids[a : a + len(e)] == e:
                spans.append((qi, (a, a + len(e))))
    gold = {tuple(s) for q in h["questions"] for s in q["spans"]}
    missing = gold - {s for _, s in spans}
    if missing:
        raise RuntimeError(
            f"haystack seed {h['seed']}: {len(missing)} gold spans not among the replayed needles"
        )
    return spans


def load_haystacks(suite: str, tok: Any) -> dict[str, tuple[Haystack, dict[str, Any]]]:
    """Question id -> (its haystack, the question), every haystack of the suite's one length."""
    with gzip.open(suite, "rt") as fh:
        data = json.load(fh)
    out = {}
    for hays in data.values():
        for h in hays:
            ids = h["ids"]
            n_windows = (len(ids) - N_INIT - WINDOW) // STRIDE + 1
            texts = tok.batch_decode(
                [ids[N_INIT + j * STRIDE : N_INIT + j * STRIDE + WINDOW] for j in range(n_windows)],
                skip_special_tokens=True,
            )
            post: dict[str, dict[int, int]] = collections.defaultdict(dict)
            lengths = np.zeros(n_windows)
            for j, t in enumerate(texts):
                ws = words(t)
                lengths[j] = len(ws)
                for w, c in collections.Counter(ws).items():
                    post[w][j] = c
            postings = {
                w: (np.fromiter(d.keys(), int), np.fromiter(d.values(), float)) for w, d in post.items()
            }
            hay = Haystack(h, postings, lengths, needle_spans(h, tok))
            for q in h["questions"]:
                out[q["id"]] = (hay, q)
    return out


# ---------------------------------------------------------------------------------------------- rules
def lexical_tier(lex: torch.Tensor, margin: float, cap: int) -> list[int]:
    """The units whose lexical score is within `margin` (a share of the best) of the best, best first; none
    when more than `cap` units are (the words do not single out a few units) or no unit holds a word."""
    best = float(lex.max())
    if best <= 0:
        return []
    tier = (lex >= best * (1 - margin)).nonzero().flatten().tolist()
    return [] if len(tier) > cap else sorted(tier, key=lambda u: -float(lex[u]))


def with_neighbours(units: Sequence[int], n: int, k: int, neighbours: int) -> list[int]:
    out: list[int] = []
    for u in units:
        for v in [u] + [u + s * j for j in range(1, neighbours + 1) for s in (-1, 1)]:
            if 0 <= v < n and v not in out and len(out) < k:
                out.append(v)
    return out


def near_duplicates(lx: Lexical, tier: Sequence[int], lead: Sequence[int], share: float) -> torch.Tensor:
    """(n_units,) bool: units outside the lead whose lexical score is at least `share` of the best and whose
    question words are all held by the tier already (they add no word of the question: near-duplicates of
    the evidence, such as a sentence of the same shape about another subject)."""
    held = lx.matched[list(tier)].any(axis=0)
    subset = ~(lx.matched & ~held).any(axis=1)
    out = torch.from_numpy(subset) & (lx.score >= share * float(lx.score.max()))
    out[list(lead)] = False
    return out


def n_evidence(k: int) -> int:
    return max(1, min(k, round(k * select.EVIDENCE_SHARE)))


def today(a: torch.Tensor, t: torch.Tensor, lx: Lexical, k: int, nb: int) -> torch.Tensor:
    return select.evidence_then_attention(select.hybrid(a, t), a, k, nb)


def zsum3(a: torch.Tensor, t: torch.Tensor, lx: Lexical, k: int, nb: int) -> torch.Tensor:
    """The lexical score added to the standardised sum, no switch."""
    return select.evidence_then_attention(
        select.standardized_sum([a.clamp_min(1e-9).log(), t, lx.score]), a, k, nb
    )


def switch3(a: torch.Tensor, t: torch.Tensor, lx: Lexical, k: int, nb: int) -> torch.Tensor:
    """The switch, with the lexical score added to its standardised sum and to the attention where they agree."""
    if select.agrees(a, t):
        ranked = select.standardized_sum([a.clamp_min(1e-9).log(), lx.score])
    else:
        ranked = select.standardized_sum([a.clamp_min(1e-9).log(), t, lx.score])
    return select.evidence_then_attention(ranked, a, k, nb)


def tier_first(margin: float, cap: int, near: float | None) -> Callable[..., torch.Tensor]:
    """The lexical tier (within `margin` of the best) with neighbours first, then today's rule fills (the
    fused ranking's evidence up to 3/4 of topk, then the attention). With `near`: the tier's near-duplicates
    (`near_duplicates`, at least `near` of the best score) ranked last in both."""

    def rule(a: torch.Tensor, t: torch.Tensor, lx: Lexical, k: int, nb: int) -> torch.Tensor:
        tier = lexical_tier(lx.score, margin, cap)
        lead = with_neighbours(tier, a.numel(), n_evidence(k), nb)
        ranked, mass = select.hybrid(a, t), a
        if tier and near is not None:
            dup = near_duplicates(lx, tier, lead, near)
            ranked = ranked.masked_fill(dup, float(ranked.min()) - 1)
            mass = a.masked_fill(dup, -1.0)
        return select.evidence_then_attention(ranked, mass, k, nb, first=lead)

    return rule


def tier_only(margin: float, cap: int) -> Callable[..., torch.Tensor]:
    """The lexical tier with neighbours is the evidence (today's rule where there is none); the attention
    fills the rest."""

    def rule(a: torch.Tensor, t: torch.Tensor, lx: Lexical, k: int, nb: int) -> torch.Tensor:
        lead = with_neighbours(lexical_tier(lx.score, margin, cap), a.numel(), n_evidence(k), nb)
        return select.choose(a, k, nb, first=lead) if lead else today(a, t, lx, k, nb)

    return rule


def tier_whole(margin: float, cap: int, union: bool = False, whole: float = 0.999) -> Callable[..., torch.Tensor]:
    """Where the tier's best unit holds every rare word of the question in one window (score >= `whole`;
    with `union`: where the tier's units together hold them all), the tier with neighbours is the evidence
    and the attention fills the rest (the oracle's own fill); elsewhere the tier first, then today."""
    first_then_today = tier_first(margin, cap, None)

    def rule(a: torch.Tensor, t: torch.Tensor, lx: Lexical, k: int, nb: int) -> torch.Tensor:
        tier = lexical_tier(lx.score, margin, cap)
        covered = bool(tier) and (bool(lx.matched[tier].any(axis=0).all()) if union
                                  else float(lx.score.max()) >= whole)  # fmt: skip
        if covered:
            return select.choose(a, k, nb, first=with_neighbours(tier, a.numel(), n_evidence(k), nb))
        return first_then_today(a, t, lx, k, nb)

    return rule


def rules(margin: float, cap: int, near: float) -> dict[str, Callable[..., torch.Tensor]]:
    return {
        "today (switch, evidence then attention)": today,
        "z(log a) + z(t) + z(lex)": zsum3,
        "switch + z(lex)": switch3,
        f"lexical tier (margin {margin}) as evidence, then attention": tier_only(margin, cap),
        f"lexical tier (margin {margin}) first, then today": tier_first(margin, cap, None),
        f"same, its near-duplicates (>= {near} of best) last": tier_first(margin, cap, near),
        f"lexical tier (margin {margin}) whole (every rare word in one window): then attention; else first": tier_whole(margin, cap),
        f"lexical tier (margin {margin}) covering every rare word: then attention; else first": tier_whole(margin, cap, True),
    }


# ---------------------------------------------------------------------------------------------- replay
def distractor_units(chosen: Sequence[int], gold: Sequence[int], needles: Sequence[tuple[int, tuple[int, int]]],
                     q: dict[str, Any], n_units: int) -> tuple[int, int]:  # fmt: skip
    """Chosen units, not gold, holding part of a needle that is not the question's evidence: any such needle,
    and the question's own near-duplicates (planned with it: multikey's distractors)."""
    own = {tuple(s) for s in q["spans"]}
    qi = int(q["id"].rsplit("-", 1)[1]) if q["family"] in ruler.NEEDLE_FAMILIES else -1
    other = select.units_of_spans([s for _, s in needles if s not in own], N_INIT, BLOCK, n_units)
    near = select.units_of_spans([s for i, s in needles if i == qi and s not in own], N_INIT, BLOCK, n_units)
    read = set(chosen) - set(gold)
    return len(read & set(other)), len(read & set(near))


ORACLE = "oracle (gold first, then the attention)"
# the library's selectors (session.select_prompt's call), IDF over the windows that score the units
LIBRARY = ("library: selector lexical",)  # "lexical_near" (near-duplicates last) removed after run 34


class _NoEmbedder:
    """UnitTextIndex's embedder where only its words are read."""

    dim = 1


def replay(
    pairs: list[tuple[str, str]], tok: Any, kind: str, k: int, nb: int, rule_set: dict, rare: float
) -> None:
    for scores_path, suite in pairs:
        where = load_haystacks(suite, tok)
        with gzip.open(scores_path, "rt") as fh:
            rows = [
                r for r in json.load(fh)["rows"] if "scores" in r and r["gold_units"] and r["id"] in where
            ]
        # per (family, rule): every gold read, distractor units, near-duplicate units, oracle share, questions
        got: dict[tuple[str, str], list[float]] = collections.defaultdict(lambda: [0.0] * 5)
        lengths = set()
        library = kind == "rare" and rare == RARE  # the library's selectors beside the replay's own rules
        names = [*rule_set, *(LIBRARY if library else ()), ORACLE]
        indexes: dict[int, UnitTextIndex] = {}
        for r in rows:
            hay, q = where[r["id"]]
            lengths.add(hay.data["length"])
            a, t = torch.tensor(r["scores"]["attention"]), torch.tensor(r["scores"]["text"])
            n = a.numel()
            lex = hay.lexical(q["prompt"].strip(), kind, n, rare)
            gold = r["gold_units"]
            oracle = select.choose(a, k, nb, first=sorted(gold))
            chosen: dict[str, torch.Tensor] = {}
            if library:
                if id(hay) not in indexes:
                    indexes[id(hay)] = UnitTextIndex(_NoEmbedder(), tok, N_INIT, BLOCK, WINDOW)
                    indexes[id(hay)].write(0, hay.data["ids"])
                score, held = indexes[id(hay)].lexical(q["prompt"].strip(), n)
                for name in LIBRARY:
                    chosen[name] = select.lexical_evidence(select.hybrid(a, t), a, score, held, k, nb)
            for name in names:
                if name in chosen:
                    read = chosen[name].tolist()
                else:
                    read = oracle.tolist() if name == ORACLE else rule_set[name](a, t, lex, k, nb).tolist()
                if len(set(read)) != k:
                    raise RuntimeError(f"{name} read {len(set(read))} units, not {k}")
                d, near = distractor_units(read, gold, hay.needles, q, n)
                x = got[(r["family"], name)]
                x[0] += set(gold) <= set(read)
                x[1] += d
                x[2] += near
                x[3] += len(set(read) & set(oracle.tolist())) / k
                x[4] += 1
        fams = sorted({f for f, _ in got})
        count = {f: int(got[(f, ORACLE)][4]) for f in fams}
        what = f"rare (words in at most {rare} of the windows)" if kind == "rare" else kind
        print(f"\n{scores_path} ({'/'.join(map(str, sorted(lengths)))} tokens), lexical {what}, topk {k}, "
              f"neighbours {nb}: every gold unit read / distractor units read (the question's own near-duplicates) "
              "/ share of the oracle's units")  # fmt: skip
        print("| rule | " + " | ".join(f"{f} ({count[f]})" for f in fams) + " |")
        print("|---" * (len(fams) + 1) + "|")
        for name in names:
            cells = []
            for f in fams:
                c = got[(f, name)]
                d = f"{c[1] / c[4]:.2f}" if f in ruler.NEEDLE_FAMILIES else "-"
                if f == "multikey":
                    d += f" ({c[2] / c[4]:.2f})"
                cells.append(f"{c[0] / c[4]:.2f} / {d} / {c[3] / c[4]:.2f}")
            print(f"| {name} | " + " | ".join(cells) + " |")


def logged(pairs: list[tuple[str, str]], tok: Any) -> None:
    """A run's hybrid and oracle answers against the distractor units each read (all other needles; the
    question's own near-duplicates)."""
    print(
        "\nlogged answers: questions / mean distractor units read (own near-duplicates), right (score 1) and not"
    )
    print("| run | system | family | right | wrong | wrong with every gold unit read |")
    print("|---|---|---|---|---|---|")
    for path, suite in pairs:
        where = load_haystacks(suite, tok)
        with gzip.open(path, "rt") as fh:
            rows = [r for r in json.load(fh)["rows"] if r.get("chosen") and r["id"] in where]
        by: dict[tuple[str, str], dict[bool, list[tuple[int, int]]]] = collections.defaultdict(
            lambda: {True: [], False: []}
        )
        wrong_read: collections.Counter = collections.Counter()
        for r in rows:
            if r["family"] not in ruler.NEEDLE_FAMILIES or r["system"] not in ("hybrid", "oracle"):
                continue
            hay, q = where[r["id"]]
            n = max(r["chosen"]) + 2  # units beyond the chosen do not matter to the count
            ok = r["score"] >= 1.0
            by[(r["system"], r["family"])][ok].append(
                distractor_units(r["chosen"], r["gold_units"], hay.needles, q, n)
            )
            wrong_read[(r["system"], r["family"])] += (not ok) and r["all_layers_read"]

        def cell(x: list[tuple[int, int]]) -> str:
            return (
                f"{len(x)} / {np.mean([d for d, _ in x]):.2f} ({np.mean([e for _, e in x]):.2f})"
                if x
                else "0 / -"
            )

        for key, d in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            print(
                f"| {path.split('/')[-1]} | {key[0]} | {key[1]} | {cell(d[True])} | {cell(d[False])} | {wrong_read[key]} |"
            )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--pair", action="append", default=[], help="SCORES=SUITE: a logged score file and its suite"
    )
    ap.add_argument(
        "--logged", action="append", default=[], help="RUN=SUITE: a run's rows (chosen units, answers)"
    )
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument(
        "--lexical", default="rare,overlap,bm25", help="lexical scores to replay (rare, overlap, bm25)"
    )
    ap.add_argument(
        "--rare", type=float, default=0.02, help="rare: words in at most this share of the windows"
    )
    ap.add_argument("--topk", type=int, default=16)
    ap.add_argument("--neighbours", type=int, default=1)
    ap.add_argument(
        "--margin", type=float, default=0.1, help="the lexical tier: within this share of the best"
    )
    ap.add_argument(
        "--cap", type=int, default=12, help="no tier when more units than this are within the margin"
    )
    ap.add_argument(
        "--near", type=float, default=0.25, help="near-duplicates: at least this share of the best"
    )
    args = ap.parse_args()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    split = [tuple(p.split("=", 1)) for p in args.pair]
    for kind in args.lexical.split(","):
        replay(
            split, tok, kind, args.topk, args.neighbours, rules(args.margin, args.cap, args.near), args.rare
        )
    if args.logged:
        logged([tuple(p.split("=", 1)) for p in args.logged], tok)


if __name__ == "__main__":
    main()
