"""The switch's agreement test on a run without logged attention scores (issue 25, 1M): the text
index's scores are recomputed here (CPU MiniLM, as ruler_fusion.py --suite does), and for every
question whose gold unit was the attention's best (the run's `gold_rank` holds 0, so that unit is
known), each test says whether the text supports it. There the switch should keep the attention
ranking: a question the test fails goes to the fused ranking, which reads the near-duplicates.

    python benchmarks/agreement_text.py benchmarks/results/ruler_qwen_1m_a.json.gz,... \\
        --suite .gpu/suite_qwen_b.json.gz --length 1048576 \\
        --tokenizer ~/.cache/memllm/models/qwen2.5-coder-0.5b/weights --scores /tmp/text1m.json.gz

Prints per family: such questions, how many each test keeps on the attention ranking, and the
hybrid's and the oracle's points on those the two-best test sent to the fused ranking.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from ruler_fusion import _top2_agrees  # noqa: E402

from memllm.context import select  # noqa: E402


def text_scores(rows: list[dict], args: argparse.Namespace) -> dict[str, list[float]]:
    from transformers import AutoTokenizer

    from memllm.memory_stores.embeddings import SentenceTransformerEmbedder
    from memllm.unit_text import UnitTextIndex

    with gzip.open(args.suite, "rt") as fh:
        haystacks = json.load(fh)[args.length]
    n_units = {r["id"]: r["n_units"] for r in rows}
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    embedder = SentenceTransformerEmbedder(batch_size=128)
    out = {}
    for h in haystacks:
        qs = [q for q in h["questions"] if q["id"] in n_units]
        if not qs:
            continue
        index = UnitTextIndex(embedder, tok, args.n_init, args.block_size)
        index.write(0, h["ids"])
        for q in qs:
            out[q["id"]] = index.scores(q["prompt"].strip(), n_units[q["id"]]).tolist()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", help="run files (ruler_gpu.py --out), comma-separated")
    ap.add_argument("--suite", required=True)
    ap.add_argument("--length", required=True, help="the suite's key, e.g. 1048576")
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--n-units", type=int, required=True, help="units per layer of the run's read")
    ap.add_argument("--n-init", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--scores", default=None, help="a .json.gz of text scores: read if present, else written")
    args = ap.parse_args()
    rows = []
    for path in args.runs.split(","):
        with gzip.open(path, "rt") as fh:
            rows += json.load(fh)["rows"]
    by: dict[str, dict[str, dict]] = collections.defaultdict(dict)
    for r in rows:
        by[r["id"]][r["system"]] = {**r, "n_units": args.n_units}
    hybrid = [s["hybrid"] for s in by.values() if "hybrid" in s and s["hybrid"].get("gold_units")]
    cache = Path(args.scores) if args.scores else None
    if cache and cache.exists():
        with gzip.open(cache, "rt") as fh:
            text = json.load(fh)
    else:
        text = text_scores(hybrid, args)
        if cache:
            with gzip.open(cache, "wt") as fh:
                json.dump(text, fh)
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for h in hybrid:
        ranks = h.get("gold_rank") or []
        if 0 not in ranks or h["id"] not in text:
            continue
        best = h["gold_units"][ranks.index(0)]
        mass = torch.zeros(args.n_units)
        mass[best] = 1.0  # only the attention's best unit matters to both tests
        t = torch.tensor(text[h["id"]])
        c = counts[h["family"]]
        c["attention's best is gold"] += 1
        two, z = _top2_agrees(mass, t), select.agrees(mass, t)
        c["two best agree"] += two
        c["best or z >= 3 agrees"] += z
        if not two:
            c["hybrid points where two best failed"] += h["score"]
            c["oracle points there"] += by[h["id"]]["oracle"]["score"]
    keys = ["attention's best is gold", "two best agree", "best or z >= 3 agrees", "hybrid points where two best failed",
            "oracle points there"]  # fmt: skip
    print("| family | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for fam in sorted(counts):
        print(f"| {fam} | " + " | ".join(f"{counts[fam][k]:g}" for k in keys) + " |")


if __name__ == "__main__":
    main()
