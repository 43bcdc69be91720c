"""Where a system's answers fall short of the oracle's, question by question (issue 25): `ruler_run.gap`.

For each (length, family) of the given ruler_gpu.py result files: the questions the reference (default
the oracle) answers and the system does not, split into those where the system read every gold unit in
every layer (`read`: the other units read with them, or the model) and those where it did not
(`not_read`: the selection; of those, how many had a gold unit as the text index's best unit), and the
questions only the system answers.

    python benchmarks/ruler_gap.py benchmarks/results/ruler_qwen_run36_512k.json.gz benchmarks/results/ruler_qwen_run36_1m_qa.json.gz --families squad,hotpotqa
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memllm.bench import ruler_run  # noqa: E402


def load(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as fh:
        return json.load(fh)["rows"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+")
    ap.add_argument("--system", default="lexical")
    ap.add_argument("--reference", default="oracle")
    ap.add_argument("--families", default=None, help="comma-separated; default every family")
    args = ap.parse_args()
    rows = [r for f in args.files for r in load(f)]
    if args.families:
        keep = set(args.families.split(","))
        rows = [r for r in rows if r["family"] in keep]
    print(f"{'length':>8} {'family':11} {'questions':>9} {'ref only, read':>15} {'ref only, not read':>19} {'of which text best':>18} {'system only':>12}")
    for it in ruler_run.gap(rows, args.system, args.reference):
        print(f"{it['length']:>8} {it['family']:11} {it['questions']:>9} {it['read']:>15} {it['not_read']:>19} {it['text_best']:>18} {it['only_system']:>12}")


if __name__ == "__main__":
    main()
