"""Compare ways of fusing the question selector's two unit scores offline (issue 25).

Reads a `ruler_gpu.py run --systems ...hybrid... --log-scores` file (or its *_scores.json.gz) whose
hybrid rows hold, per question, the fused attention mass of every unit and the text index's cosine,
and prints, per family, the share of questions whose every gold unit a fusion would read (topk units,
one neighbour each side: what `select.choose` does). The cheap signal for choosing a fusion before a
GPU run answers with it.

    python benchmarks/ruler_fusion.py benchmarks/results/ruler_qwen_128k_hybrid_scores.json.gz

With --suite (the suite file the run read) and --tokenizer (the model's tokenizer directory), the text
score is recomputed on this machine by a UnitTextIndex with --window tokens per window (MiniLM on
the CPU, ~30 s per 128K haystack) in place of the logged one: how the text index's granularity was
chosen.

    python benchmarks/ruler_fusion.py benchmarks/results/ruler_qwen_128k_hybrid_scores.json.gz \
        --suite .gpu/suite_qwen_a.json.gz --length 131072 --tokenizer ~/.cache/memllm/models/qwen2.5-coder-0.5b/weights --window 48

With --replay-switch: each system's points, and the agreement switch's replayed on the logged answers
(see replay_switch).

    python benchmarks/ruler_fusion.py benchmarks/results/ruler_qwen_32k_windows.json.gz --replay-switch

With --choices: how the switch's ranking fills the topk slots, replayed (see compare_choices): every gold
unit read, and the share of the oracle's reading (gold first, then the attention ranking) read.

    python benchmarks/ruler_fusion.py benchmarks/results/ruler_qwen_32k_windows.json.gz --choices
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
from collections.abc import Callable

import torch

from memllm.context import select


def _z(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean()) / x.std().clamp_min(1e-12)


def _rrf(a: torch.Tensor, t: torch.Tensor, k: int = 60) -> torch.Tensor:
    def rank(x: torch.Tensor) -> torch.Tensor:
        r = torch.empty_like(x)
        r[torch.argsort(x, descending=True)] = torch.arange(len(x), dtype=x.dtype)
        return r

    return 1 / (k + rank(a)) + 1 / (k + rank(t))


def _interleave(a: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The two rankings taken in turn, as a score (earlier = higher)."""
    order: list[int] = []
    ranks = (torch.argsort(a, descending=True).tolist(), torch.argsort(t, descending=True).tolist())
    for u_a, u_t in zip(*ranks, strict=True):
        order += [u for u in (u_a, u_t) if u not in order]
    score = torch.zeros_like(a)
    score[torch.tensor(order)] = -torch.arange(len(order), dtype=a.dtype)
    return score


FUSIONS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "attention (question)": lambda a, t: a,
    "text": lambda a, t: t,
    "z(a) + z(t)": lambda a, t: select.standardized_sum([a, t]),
    "z(log a) + z(t)": lambda a, t: select.standardized_sum([torch.log(a.clamp_min(1e-9)), t]),
    "agreement switch (hybrid)": select.hybrid,
    "z(a) + 0.5 z(t)": lambda a, t: _z(a) + 0.5 * _z(t),
    "interleave": _interleave,
    "reciprocal rank (60)": _rrf,
}


def _rescore(rows: list[dict], args: argparse.Namespace) -> list[dict]:
    """The rows of the suite's haystacks, their text score recomputed by a fresh UnitTextIndex."""
    from transformers import AutoTokenizer

    from memllm.memory_stores.embeddings import SentenceTransformerEmbedder
    from memllm.unit_text import UnitTextIndex

    with gzip.open(args.suite, "rt") as fh:
        haystacks = json.load(fh)[args.length]
    where = {q["id"]: (h, q) for h in haystacks for q in h["questions"]}
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    embedder = SentenceTransformerEmbedder(batch_size=128)
    indexes: dict[int, UnitTextIndex] = {}
    out = []
    for r in rows:
        if r["id"] not in where:
            continue
        hay, q = where[r["id"]]
        if id(hay) not in indexes:
            indexes[id(hay)] = UnitTextIndex(embedder, tok, args.n_init, args.block_size, args.window)
            indexes[id(hay)].write(0, hay["ids"])
        text = indexes[id(hay)].scores(q["prompt"].strip(), len(r["scores"]["attention"]))
        out.append({**r, "scores": {**r["scores"], "text": text.tolist()}})
    return out


def _top2_agrees(mass: torch.Tensor, text: torch.Tensor) -> bool:
    """The switch's first agreement test (commit 94b4720, replaced by select.agrees' z test): the
    attention's best unit, or a neighbour, among the text's two best units."""
    best = int(mass.argmax())
    return any(abs(best - int(u)) <= 1 for u in torch.argsort(text.float(), descending=True)[:2].tolist())


def replay_switch(all_rows: list[dict]) -> None:
    """Per family, the points of each system of a run whose hybrid rows were the standardised sum
    alone (commit 8ae7112) with --log-scores, and of the agreement switch replayed on them, with its
    first test (two best) and the current one (select.agrees): per question, the question selector's
    logged answer where attention and text agree (the switch reads exactly the question selector's
    units), else the hybrid's."""
    by: dict[str, dict[str, dict]] = collections.defaultdict(dict)
    for r in all_rows:
        by[r["id"]][r["system"]] = r
    points: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    n: collections.Counter = collections.Counter()
    agreed: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    rules = {"switch, two best (replayed)": _top2_agrees, "switch, best or z >= 3 (replayed)": select.agrees}
    for systems in by.values():
        fam = systems["question"]["family"]
        n[fam] += 1
        for name, r in systems.items():
            points[name][fam] += r["score"]
        h = systems["hybrid"]
        for name, rule in rules.items():
            if "scores" in h:  # the evidence is in memory: the selectors differ
                ok = rule(torch.tensor(h["scores"]["attention"]), torch.tensor(h["scores"]["text"]))
                agreed[name][fam] += ok
                points[name][fam] += systems["question"]["score"] if ok else h["score"]
            else:
                points[name][fam] += systems["question"]["score"]
    fams = sorted(n)
    print("| system | " + " | ".join(f"{f} ({n[f]})" for f in fams) + " | sum |")
    print("|---" * (len(fams) + 2) + "|")
    for name, pts in points.items():
        print(f"| {name} | " + " | ".join(f"{pts[f]:.1f}" for f in fams) + f" | {sum(pts.values()):.1f} |")
    for name in rules:
        print(f"| agree, {name} | " + " | ".join(str(agreed[name][f]) for f in fams) + " | |")


def compare_choices(all_rows: list[dict], topk: int, neighbours: int) -> None:
    """Per family, for the switch's ranking alone (`select.choose`) and evidence then attention
    (`select.evidence_then_attention`) at several shares: the share of questions whose every gold unit
    is read / the mean share of the oracle's topk units read (the oracle: gold first, then the
    question's attention, as `Session.select_prompt` does with oracle spans)."""
    rules: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
        "ranking alone": lambda a, t: select.choose(select.hybrid(a, t), topk, neighbours)
    }
    for share in (0.5, 0.625, 0.75):
        rules[f"evidence {share}"] = lambda a, t, sh=share: select.evidence_then_attention(
            select.hybrid(a, t), a, topk, neighbours, share=sh
        )
    rows = [r for r in all_rows if "scores" in r and r["gold_units"]]
    got: dict[tuple[str, str], list[float]] = collections.defaultdict(lambda: [0.0, 0.0, 0])
    for r in rows:
        a, t = torch.tensor(r["scores"]["attention"]), torch.tensor(r["scores"]["text"])
        gold = set(r["gold_units"])
        oracle = set(select.choose(a, topk, neighbours, first=sorted(gold)).tolist())
        for name, rule in rules.items():
            read = set(rule(a, t).tolist())
            x = got[(r["family"], name)]
            x[0] += gold <= read
            x[1] += len(read & oracle) / topk
            x[2] += 1
    fams = sorted({f for f, _ in got})
    print(f"topk {topk}: every gold unit read / share of the oracle's units read")
    print("| rule | " + " | ".join(fams) + " |")
    print("|---" * (len(fams) + 1) + "|")
    for name in rules:
        cells = [got[(f, name)] for f in fams]
        print(f"| {name} | " + " | ".join(f"{c[0] / c[2]:.2f} / {c[1] / c[2]:.2f}" for c in cells) + " |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("path")
    ap.add_argument("--topk", type=int, default=16)
    ap.add_argument("--neighbours", type=int, default=1)
    ap.add_argument("--suite", help="recompute the text score from this suite's haystacks")
    ap.add_argument("--length", help="the suite's length key (e.g. 131072)")
    ap.add_argument("--tokenizer", help="the model's tokenizer directory")
    ap.add_argument("--window", type=int, default=None, help="tokens per window (UnitTextIndex)")
    ap.add_argument("--n-init", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--replay-switch", action="store_true", help="points of the agreement switch, replayed")
    ap.add_argument("--choices", action="store_true", help="how the ranking fills the topk slots, replayed")
    args = ap.parse_args()
    opener = gzip.open if args.path.endswith(".gz") else open
    with opener(args.path, "rt") as fh:
        all_rows = json.load(fh)["rows"]
    if args.replay_switch:
        replay_switch(all_rows)
        return
    if args.choices:
        compare_choices(all_rows, args.topk, args.neighbours)
        return
    rows = [r for r in all_rows if "scores" in r and r["gold_units"]]
    if args.suite:
        rows = _rescore(rows, args)
    hits: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    n: collections.Counter = collections.Counter()
    for r in rows:
        a = torch.tensor(r["scores"]["attention"])
        t = torch.tensor(r["scores"]["text"])
        n[r["family"]] += 1
        for name, fuse in FUSIONS.items():
            got = set(select.choose(fuse(a, t), args.topk, args.neighbours).tolist())
            hits[name][r["family"]] += all(g in got for g in r["gold_units"])
    fams = sorted(n)
    print("| fusion | " + " | ".join(f"{f} ({n[f]})" for f in fams) + " | mean |")
    print("|---" * (len(fams) + 2) + "|")
    for name in FUSIONS:
        vals = [hits[name][f] / n[f] for f in fams]
        print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in vals) + f" | {sum(vals) / len(vals):.3f} |")


if __name__ == "__main__":
    main()
