"""Whether a tier that lacks only light words should count as covering the question, from measured answers (issue 25).

`select.lexical_evidence` lets the question's attention fill topk after the lexical tier only where the tier's
units hold every rare word of the question; elsewhere the fused ranking's evidence comes next. A question often
holds a rare word its evidence lacks ("mentioned", "provided"), and then near-duplicates of the evidence are read.
The candidate: the tier covers where the words it lacks weigh less than SHARE of its best unit's score (as
docqa.cover_words judges a missing word in text mode). Where it covers, the selection is what the deleted
`lexical_attention` system read (the tier, its neighbours, then the attention: GPU run 51); elsewhere `lexical`'s.
Both were measured on the same reads (run 51 at 128K and 512K; run 50's `lexical` and run 51's candidate at 1M,
`lexical` equal in every question across runs 50 and 51), so the candidate's answers are those runs' answers,
chosen per question by the rule here, which reads only the suite's token ids and question text.

    python benchmarks/ruler_light_cover.py --shares 0.25,0.5,1.0

Session 24 added a second rule, "missing words" (the ruler system `lexical_missing`, measured on the GPU at 32K in
run 55 and deleted): `lexical`'s selection is kept only where a unit it reads beside what `lexical_attention` read
holds a rare word the tier lacks (the fused ranking's evidence adds a word), `lexical_attention`'s elsewhere;
composed the same way, for every family (a question whose gold sat in the window, no `chosen` recorded, counts
`lexical`'s answer):

    python benchmarks/ruler_light_cover.py --rule missing

And a third, "agree": the attention fills after the tier also where MiniLM's best unit (the text index's cosine, on this
CPU) is in the tier or next to it (two retrievers agree, so the rest of the evidence is near-duplicates); composed from
runs 50/51 at 128K-1M, and as a gate on run 55's `lexical_missing` at 32K (its answer where they agree, `lexical`'s
elsewhere):

    python benchmarks/ruler_light_cover.py --rule agree
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
from pathlib import Path

import numpy as np
import torch
from lexical_sides_signal import index_of
from transformers import AutoTokenizer

from memllm.bench.ruler import Haystack
from memllm.context import select
from memllm.unit_text import UnitTextIndex

RESULTS = Path(__file__).parent / "results"
CELLS = (  # length, suite, measured answers
    ("128k", "suite_qwen_a.json.gz", 131072, ["ruler_qwen_run51_128k_512k.json.gz"]),
    ("512k", "suite_qwen_c.json.gz", 524288, ["ruler_qwen_run51_128k_512k.json.gz"]),
    ("1m", "suite_qwen_b.json.gz", 1048576, ["ruler_qwen_run50_1m.json.gz", "ruler_qwen_run51_1m.json.gz"]),
)


def tier_of(
    index: UnitTextIndex, question: str, n_units: int, topk: int
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Each unit's rare-word score and words held, and the lexical tier as `select.lexical_evidence` takes it."""
    score, held = index.lexical(question, n_units)
    return score, held, select.lexical_tier(score, round(topk * select.EVIDENCE_SHARE))


def missing_weight(
    index: UnitTextIndex, question: str, n_units: int, topk: int
) -> tuple[float, float] | None:
    """(weight of the question's rare words no tier unit holds, the best tier unit's score); None: no tier."""
    score, held, tier = tier_of(index, question, n_units, topk)
    if not tier or held.shape[1] == 0:
        return None
    n_windows = index.windows_for(n_units)
    windows_held = index._words.window_scores(question, n_windows)[1]  # the rare words, as the tier weighs them
    idf = np.log(n_windows / windows_held.sum(axis=0))
    weight = idf / idf.sum()
    covered = held[tier].any(dim=0).numpy()
    return float(weight[~covered].sum()), float(score[tier[0]])


def load(
    suites: str, suite: str, length: int, files: list[str]
) -> tuple[list[Haystack], dict[str, dict[str, dict]]]:
    """The suite's haystacks of `length` and the measured rows of that length: {question id: {system: row}}."""
    with gzip.open(Path(suites) / suite, "rt") as f:
        hays = [Haystack.from_dict(h) for h in json.load(f)[str(length)]]
    rows: dict[str, dict[str, dict]] = collections.defaultdict(dict)
    for file in files:
        with gzip.open(RESULTS / file, "rt") as f:
            for r in json.load(f)["rows"]:
                if abs(r["length"] - length) < length // 8:
                    rows[r["id"]][r["system"]] = r
    return hays, rows


def adds_lacking_word(index: UnitTextIndex, question: str, n_units: int, topk: int, added: set[int]) -> bool:
    """Whether one of `added` (the units `lexical` read and the attention's fill did not) holds a rare word of
    the question that no tier unit holds (select.lexical_evidence's missing_only)."""
    _, held, tier = tier_of(index, question, n_units, topk)
    if not tier or held.shape[1] == 0 or not added:
        # no tier: the rule is `lexical`'s (kept); nothing added: the two selections are one
        return bool(added)
    lacks = ~held[tier].any(dim=0)
    return bool(held[sorted(added)][:, lacks].any())


def _chosen(row: dict) -> set[int]:
    c = row["chosen"]
    return set(c[0] if c and isinstance(c[0], list) else c)


def missing_words(args: argparse.Namespace, tok: AutoTokenizer) -> None:
    print("| length | family | questions | lexical | missing words (questions where the attention fills) |")
    print("|---|---|---|---|---|")
    for name, suite, length, files in CELLS:
        hays, rows = load(args.suites, suite, length, files)
        got: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0, 0.0, 0])
        for h in hays:
            index, n_units = index_of(h, tok, 128, 128, args.n_local)
            for q in h.questions:
                v = rows.get(q.id, {})
                if not {"lexical", "lexical_attention"} <= set(v):
                    continue
                lex, att = v["lexical"], v["lexical_attention"]
                keep = "chosen" not in lex or adds_lacking_word(
                    index, q.query or q.prompt, n_units, args.topk, _chosen(lex) - _chosen(att)
                )
                cell = got[q.family]
                cell[0] += 1
                cell[1] += lex["score"]
                cell[2] += lex["score"] if keep else att["score"]
                cell[3] += not keep
        for family, (n, base, cand, fills) in sorted(got.items()):
            print(f"| {name} | {family} | {n} | {base:g} | {cand:g} ({fills}) |")


def _tier_agrees(index: UnitTextIndex, question: str, n_units: int, topk: int) -> bool:
    """Whether there is a tier that holds every rare word or that MiniLM's best unit is in or next to."""
    _, held, tier = tier_of(index, question, n_units, topk)
    if not tier:
        return False
    if held.shape[1] and bool(held[tier].any(dim=0).all()):
        return True
    best = int(index.scores(question, n_units).argmax())
    return any(abs(best - u) <= 1 for u in tier)


def agreement(args: argparse.Namespace, tok: AutoTokenizer) -> None:
    from memllm.memory_stores.embeddings import shared_embedder

    embedder = shared_embedder()
    gated = (  # run 55: model, suite, length, window, topk, answers
        ("qwen2.5-coder-0.5b", "suite_qwen_a.json.gz", 32768, 4096, 16, "ruler_qwen_run55_32k.json.gz"),
        ("smollm2-135m", "suite_smol.json.gz", 32768, 512, 8, "ruler_smollm2_run55_32k.json.gz"),
        ("smollm2-135m", "suite_smol.json.gz", 131072, 512, 8, "ruler_smollm2_run55_128k.json.gz"),
    )
    jobs = [(args.tokenizer, suite, length, args.n_local, args.topk, files, "lexical_attention")
            for _, suite, length, files in CELLS]  # fmt: skip
    jobs += [(f"~/.cache/memllm/models/{m}/weights", suite, length, n_local, topk, [file], "lexical_missing")
             for m, suite, length, n_local, topk, file in gated]  # fmt: skip
    print(
        "| tokenizer | length | family | lexical | agree (questions where the attention fills) | better / worse |"
    )
    print("|---|---|---|---|---|---|")
    for tok_dir, suite, length, n_local, topk, files, other in jobs:
        tok = AutoTokenizer.from_pretrained(str(Path(tok_dir).expanduser()))
        hays, rows = load(args.suites, suite, length, files)
        got: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0, 0, 0, 0])
        for h in hays:
            index, n_units = index_of(h, tok, 128, 128, n_local, embedder)
            for q in h.questions:
                v = rows.get(q.id, {})
                if not {"lexical", other} <= set(v):
                    continue
                fills = _tier_agrees(index, q.query or q.prompt, n_units, topk)
                a, b = v["lexical"]["score"], v[other if fills else "lexical"]["score"]
                cell = got[q.family]
                cell[0] += a
                cell[1] += b
                cell[2] += fills
                cell[3] += b > a
                cell[4] += b < a
        name = Path(tok_dir).parent.name
        for family, (a, b, fills, up, down) in sorted(got.items()):
            print(f"| {name} | {length // 1024}K | {family} | {a:g} | {b:g} ({fills}) | {up} / {down} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--suites", default=".gpu", help="the folder of the Qwen suites (ruler_gpu.py build)")
    ap.add_argument("--tokenizer", default="~/.cache/memllm/models/qwen2.5-coder-0.5b/weights")
    ap.add_argument("--shares", default="0.25,0.5,1.0")
    ap.add_argument("--n-local", type=int, default=4096)
    ap.add_argument("--topk", type=int, default=16)
    ap.add_argument("--rule", choices=("light", "missing", "agree"), default="light")
    args = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(str(Path(args.tokenizer).expanduser()))
    if args.rule == "missing":
        missing_words(args, tok)
        return
    if args.rule == "agree":
        agreement(args, tok)
        return
    shares = [float(x) for x in args.shares.split(",")]
    print(
        "| length | family | lexical | " + " | ".join(f"share {s} (attention fills)" for s in shares) + " |"
    )
    print("|---|---|---|" + "---|" * len(shares))
    for name, suite, length, files in CELLS:
        hays, rows = load(args.suites, suite, length, files)
        answers = {i: {system: r["score"] for system, r in v.items()} for i, v in rows.items()}
        answers = collections.defaultdict(dict, answers)
        weights: dict[str, tuple[float, float] | None] = {}
        for h in (h for h in hays if h.kind == "qa"):
            index, n_units = index_of(h, tok, 128, 128, args.n_local)
            for q in h.questions:
                weights[q.id] = missing_weight(index, q.query or q.prompt, n_units, args.topk)
        for family in ("hotpotqa", "squad"):
            ids = [
                i
                for i in weights
                if i.startswith(family) and {"lexical", "lexical_attention"} <= set(answers[i])
            ]
            base = sum(answers[i]["lexical"] for i in ids)
            cols = []
            for share in shares:
                light = [i for i in ids if weights[i] is not None and weights[i][0] < share * weights[i][1]]
                got = base + sum(answers[i]["lexical_attention"] - answers[i]["lexical"] for i in light)
                cols.append(f"{got:g} ({len(light)})")
            print(f"| {name} | {family} | {base:g} | " + " | ".join(cols) + " |")


if __name__ == "__main__":
    main()
