"""Units every question reads: how many of a selection's slots go to units that nearly every question of a
haystack reads, whatever it asks (issue 25, a diagnostic of measured ruler rows, no model).

A ruler row keeps the units its question read (`chosen`, the selection at the question). Per file, system and
haystack (rows with the same length, family kind and question-id prefix: one read), a unit is *favoured* when at
least `--share` of that haystack's questions read it. Prints per system and haystack: the questions, the favoured
units, and the mean share of a question's slots they take, with how often they are gold for that question.

    python benchmarks/ruler_favoured_units.py benchmarks/results/ruler_qwen_run59_seed7_512k.json.gz benchmarks/results/ruler_qwen_run50_32k.json.gz
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
from typing import Any

NEEDLES = ("single", "multikey", "multivalue", "multiquery")


def haystack_of(row: dict[str, Any]) -> tuple[int, str]:
    """Rows read from one haystack: the length, and needles or QA (each length's suite holds one of each kind,
    or several of the same size told apart by the id's haystack number)."""
    kind = "needles" if row["family"] in NEEDLES else "qa"
    parts = row["id"].split("-")
    return row["length"], f"{kind} {parts[2] if len(parts) > 2 else ''}".strip()


def favoured(rows: list[dict[str, Any]], share: float) -> list[dict[str, Any]]:
    groups: dict[tuple[str, int, str], list[dict[str, Any]]] = collections.defaultdict(list)
    for r in rows:
        if r.get("chosen"):
            groups[(r["system"], *haystack_of(r))].append(r)
    out = []
    for (system, length, hay), rs in sorted(groups.items()):
        counts = collections.Counter(u for r in rs for u in set(r["chosen"]))
        fav = {u for u, c in counts.items() if c >= share * len(rs)}
        slots = [len(fav & set(r["chosen"])) / len(r["chosen"]) for r in rs]
        gold = sum(bool(fav & set(r["gold_units"])) for r in rs)
        out.append({"system": system, "length": length, "haystack": hay, "questions": len(rs),
                    "favoured": sorted(fav), "slot_share": sum(slots) / len(rs), "gold_favoured": gold})  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--share", type=float, default=0.9, help="a unit read by at least this share of the questions")
    args = ap.parse_args()
    print(f"favoured: read by at least {args.share:.0%} of a haystack's questions")
    print("| file | system | length | haystack | questions | favoured units | their share of the slots | questions whose gold holds one |")
    print("|---|---|---|---|---|---|---|---|")
    for path in args.files:
        with gzip.open(path, "rt") as fh:
            rows = json.load(fh)["rows"]
        for g in favoured(rows, args.share):
            name = path.rsplit("/", 1)[-1].removesuffix(".json.gz")
            print(f"| {name} | {g['system']} | {g['length'] // 1024}K | {g['haystack']} | {g['questions']} | "
                  f"{len(g['favoured'])} | {g['slot_share']:.2f} | {g['gold_favoured']} |")  # fmt: skip


if __name__ == "__main__":
    main()
