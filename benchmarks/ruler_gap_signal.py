"""Where the query fix can move answers: the questions the oracle answers and `lexical` does not, against the
model-free query signal (issue 25).

Joins a run's rows (`ruler_gpu.py run --out`, whose `lexical` matched the whole prompt: runs up to 37) with
`ruler_query_signal.py`'s rows (the lexical tier's best unit with the prompt and with the query alone). Per length
and family: the oracle-only questions ("gap"), how many of them read every gold unit in every layer anyway (lost
with the evidence read: the selection cannot win them by finding gold), and in how many the tier's best unit is a
gold unit with the prompt and with the query (the query can only help where it turns a miss into gold first). Also
the questions `lexical` answers whose tier loses its gold best unit with the query (where it could hurt).

    python benchmarks/ruler_gap_signal.py --signal benchmarks/results/ruler_query_signal_qwen.json \
        benchmarks/results/ruler_qwen_run37_32k_128k_qa.json.gz benchmarks/results/ruler_qwen_run37_512k_qa.json.gz \
        benchmarks/results/ruler_qwen_run37_1m_qa.json.gz
"""

from __future__ import annotations

import argparse
import gzip
import json
from collections import defaultdict


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", help="run files (rows with lexical and oracle)")
    ap.add_argument("--signal", required=True, help="ruler_query_signal.py --out")
    ap.add_argument("--system", default="lexical")
    args = ap.parse_args()
    with open(args.signal) as fh:
        signal = {r["id"]: r for r in json.load(fh)["rows"]}
    cells: dict = defaultdict(lambda: defaultdict(int))
    for path in args.runs:
        with gzip.open(path, "rt") as fh:
            rows = json.load(fh)["rows"]
        by: dict = defaultdict(dict)
        for r in rows:
            by[(r["length"], r["family"], r["id"])][r["system"]] = r
        for (length, family, qid), systems in by.items():
            if args.system not in systems or "oracle" not in systems or qid not in signal:
                continue
            mine, oracle, sig = systems[args.system], systems["oracle"], signal[qid]
            cell = cells[(length, family)]
            if oracle["score"] > 0 and not mine["score"] > 0:
                cell["gap"] += 1
                cell["gap_read_all"] += bool(mine.get("all_layers_read"))
                cell["gap_prompt_gold"] += sig["prompt"]["tier_best_gold"]
                cell["gap_query_gold"] += sig["query"]["tier_best_gold"]
            if mine["score"] > 0:
                cell["answered_query_loses_gold"] += (
                    sig["prompt"]["tier_best_gold"] and not sig["query"]["tier_best_gold"]
                )
    print(
        f"{'length':>8} {'family':9} {'gap':>4} {'read all':>9}  tier best gold, prompt -> query   answered, query loses it"
    )
    for (length, family), c in sorted(cells.items()):
        print(f"{length:>8} {family:9} {c['gap']:>4} {c['gap_read_all']:>9}  "
              f"{c['gap_prompt_gold']:>14} -> {c['gap_query_gold']:<14}  {c['answered_query_loses_gold']:>6}")  # fmt: skip


if __name__ == "__main__":
    main()
