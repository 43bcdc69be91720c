"""Compose a confidence rule offline from measured ruler answers (issue 25): for each question, answer under
several selections and keep the answer the model gave the highest mean log-probability (its rows' `logprob`,
ruler_run.answer_logprob). Prints, per length and family, each system's score, the rule's, and the score if
the best of the systems were always chosen (an upper bound for any rule that picks among them), and how
well the log-probability separates right answers from wrong ones.

    python benchmarks/ruler_confidence.py --runs benchmarks/results/ruler_qwen_run56_*.json.gz --pick lexical,hybrid

Reads the rows of `ruler_gpu.py run` outputs (their `logprob`, recorded since 342c387). A question counts only
where every picked system has a row for it; an answer without a logprob (an empty one) ranks last.
"""

from __future__ import annotations

import argparse
import gzip
import json
from collections import defaultdict
from pathlib import Path


def rows_of(paths: list[str]) -> list[dict]:
    out: list[dict] = []
    for p in paths:
        with gzip.open(p, "rt") as fh:
            out.extend(json.load(fh)["rows"])
    return out


def by_question(rows: list[dict]) -> dict[tuple, dict[str, dict]]:
    """(length, family, id) -> system -> row."""
    out: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in rows:
        out[(int(r["length"]), r["family"], r["id"])][r["system"]] = r
    return out


def confident(answers: dict[str, dict], pick: list[str], margin: float = 0.0) -> dict:
    """The row with the highest logprob among `pick`; the first system keeps its answer unless another's
    logprob is more than `margin` above it (a default that is overruled only with some confidence)."""

    def lp(s: str) -> float:
        v = answers[s].get("logprob")
        return float("-inf") if v is None else float(v)

    best = max(pick, key=lp)
    return answers[best] if lp(best) > lp(pick[0]) + margin else answers[pick[0]]


def auc(right: list[float], wrong: list[float]) -> float | None:
    """P(a right answer's logprob > a wrong one's), ties half: how well confidence tells them apart."""
    if not right or not wrong:
        return None
    wins = sum((r > w) + 0.5 * (r == w) for r in right for w in wrong)
    return wins / (len(right) * len(wrong))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", required=True)
    ap.add_argument(
        "--pick", default="lexical,hybrid", help="systems to choose among; the first is the default"
    )
    ap.add_argument(
        "--margins", default="0,0.1,0.2,0.4", help="the others must beat the first's logprob by this"
    )
    ap.add_argument("--out", default=None, help="also write the table here")
    args = ap.parse_args()
    pick = args.pick.split(",")
    margins = [float(m) for m in args.margins.split(",")]
    questions = by_question(rows_of(args.runs))
    systems = sorted({s for a in questions.values() for s in a})
    cells: dict[tuple, list] = defaultdict(list)
    for (length, family, _), answers in sorted(questions.items()):
        if all(s in answers for s in pick):
            cells[(length, family)].append(answers)
    lines = [f"pick among {pick} (default {pick[0]}); systems in the runs: {systems}"]
    head = f"{'length':>8} {'family':10} {'n':>3} " + " ".join(f"{s[:9]:>9}" for s in systems)
    head += " " + " ".join(f"{'m' + str(m):>7}" for m in margins) + f" {'best-of':>7}"
    lines.append(head)
    totals: dict[str, float] = defaultdict(float)
    for (length, family), qs in sorted(cells.items()):
        per = {
            s: sum(float(a[s]["score"]) for a in qs if s in a) if any(s in a for a in qs) else None
            for s in systems
        }
        rule = {m: sum(float(confident(a, pick, m)["score"]) for a in qs) for m in margins}
        best = sum(max(float(a[s]["score"]) for s in pick) for a in qs)
        for s, v in per.items():
            totals[s] += v or 0.0
        for m, v in rule.items():
            totals[f"m{m}"] += v
        totals["best-of"] += best
        line = f"{length:>8} {family:10} {len(qs):>3} " + " ".join(
            f"{'-':>9}" if per[s] is None else f"{per[s]:>9.2f}" for s in systems
        )
        lines.append(line + " " + " ".join(f"{rule[m]:>7.2f}" for m in margins) + f" {best:>7.2f}")
    lines.append(
        f"{'sum':>8} {'':10} {'':>3} "
        + " ".join(f"{totals[s]:>9.2f}" for s in systems)
        + " "
        + " ".join(f"{totals[f'm{m}']:>7.2f}" for m in margins)
        + f" {totals['best-of']:>7.2f}"
    )
    lines.append("")
    lines.append("how well the mean logprob tells right answers (score >= 0.5) from wrong, per system (AUC):")
    for s in systems:
        scored = [a[s] for qs in cells.values() for a in qs if s in a and a[s].get("logprob") is not None]
        right = [float(r["logprob"]) for r in scored if float(r["score"]) >= 0.5]
        wrong = [float(r["logprob"]) for r in scored if float(r["score"]) < 0.5]
        a = auc(right, wrong)
        lines.append(
            f"  {s:10} right {len(right):>4} wrong {len(wrong):>4} AUC {'-' if a is None else f'{a:.3f}'}"
        )
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
