"""Which neighbour the lexical tier reads first, replayed without a model (issue 25).

`select.lexical_evidence` puts the lexical tier's units first, then their neighbours, up to 3/4 of topk. With a
small topk (SmolLM2's long-read window: topk 8, six evidence slots) and several tier units (four values of one
key), the first tier unit's two neighbours take the slots and a needle cut across a unit border loses its other
half. `sides` (UnitTextIndex.lexical_sides) reads first the neighbour each tier unit's words lie against. This
replays, per question of a built suite, the units the rule reads with and without `sides` (the attention's
mass left flat: its fill is the units 0, 1, ... in both) and counts the questions whose gold units (the
evidence spans' units, as the oracle reads) are all read. Selections, not answers; the suite's wording is
not read by the rule.

    python benchmarks/lexical_sides_signal.py --suite .gpu/suite_smol.json.gz \
        --tokenizer ~/.cache/memllm/models/smollm2-135m/weights --lengths 32k,128k --n-local 512 --topk 8
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

from memllm.bench.ruler import Haystack
from memllm.context import select
from memllm.unit_text import UnitTextIndex


class _NoEmbedder:
    dim = 384  # the index's vectors are never made here: only its windows' words are read


def parse_length(text: str) -> int:
    text = text.strip().lower()
    mult = {"k": 1024, "m": 1024 * 1024}.get(text[-1], 1)
    return int(float(text.rstrip("km")) * mult)


def index_of(
    hay: Haystack, tok: Any, n_init: int, block_size: int, n_local: int, embedder: object | None = None
) -> tuple[UnitTextIndex, int]:
    """A haystack's text index and the units past the window; without an embedder, its windows' words only
    (no vectors)."""
    index = UnitTextIndex(_NoEmbedder() if embedder is None else embedder, tok, n_init, block_size)
    index.write(0, hay.ids)
    return index, max(0, (len(hay.ids) - n_init - n_local) // block_size)


def gold_questions(
    hay: Haystack, tok: Any, n_init: int, block_size: int, n_local: int, topk: int
) -> tuple[UnitTextIndex, int, list[tuple[Any, list[int]]]]:
    """A haystack's text index, its units past the window, and each question with gold units there (none
    when no more than topk units are)."""
    index, n_units = index_of(hay, tok, n_init, block_size, n_local)
    asked = [(q, select.units_of_spans(q.spans, n_init, block_size, n_units)) for q in hay.questions]
    return index, n_units, [(q, gold) for q, gold in asked if gold and n_units > topk]


def replay(
    hay: Haystack, tok: Any, n_init: int, block_size: int, n_local: int, topk: int
) -> list[dict[str, Any]]:
    index, n_units, asked = gold_questions(hay, tok, n_init, block_size, n_local, topk)
    flat = torch.zeros(n_units)
    rows = []
    for q, gold in asked:
        score, held, sides, _ = index.lexical_sides(q.query or q.prompt, n_units, reach=0)  # no paragraph read
        row = {"family": q.family, "id": q.id, "gold": gold}
        for name, s in (("today", None), ("sides", sides)):
            chosen = set(select.lexical_evidence(flat, flat, score, held, topk, 1, sides=s).tolist())
            row[name] = {
                "all": all(u in chosen for u in gold),
                "share": sum(u in chosen for u in gold) / len(gold),
            }
        rows.append(row)
    return rows


def suite_args(description: str) -> tuple[argparse.Namespace, list[Haystack], Any]:
    """The replay scripts' command line: the arguments, the suite's haystacks at --lengths, the tokenizer."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--suite", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--lengths", default="32k")
    ap.add_argument("--n-init", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--n-local", type=int, default=4096)
    ap.add_argument("--topk", type=int, default=16)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(str(Path(args.tokenizer).expanduser()))
    with gzip.open(args.suite, "rt") as f:
        data = json.load(f)
    lengths = {parse_length(x) for x in args.lengths.split(",")}
    return args, [Haystack.from_dict(h) for n, hs in data.items() if int(n) in lengths for h in hs], tok


def run(
    replay_fn: Any, doc: str, title: str, names: tuple[str, ...], cell: Any
) -> None:
    """Replay every question of the suite named on the command line (`replay_fn(hay, tok, n_init, block_size,
    n_local, topk)` -> rows), print a table per length and family (`cell(rows, name)` -> its text) and write
    the rows to --out."""
    args, hays, tok = suite_args(doc.split("\n\n")[0])
    rows = []
    for hay in hays:
        for row in replay_fn(hay, tok, args.n_init, args.block_size, args.n_local, args.topk):
            rows.append({**row, "length": hay.length})
    cells: dict[tuple[int, str], list[dict[str, Any]]] = collections.defaultdict(list)
    for r in rows:
        cells[(r["length"], r["family"])].append(r)
    print(title.format(**vars(args)))
    print("| length | family | questions | " + " | ".join(names) + " |")
    print("|---|---|---|" + "---|" * len(names))
    for (length, family), rs in sorted(cells.items()):
        print(f"| {length // 1024}K | {family} | {len(rs)} | " + " | ".join(cell(rs, n) for n in names) + " |")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}) + "\n")


def main() -> None:
    run(
        replay, __doc__, "n_local {n_local}, topk {topk}: every gold unit read (questions) / mean share of gold read",
        ("today", "sides"),
        lambda rs, n: f"{sum(r[n]['all'] for r in rs)} / {sum(r[n]['share'] for r in rs) / len(rs):.3f}",
    )  # fmt: skip


if __name__ == "__main__":
    main()
