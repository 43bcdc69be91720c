"""Would a second lexical hop find HotpotQA's bridge paragraph? A model-free diagnostic (issue 25).

HotpotQA's questions need two paragraphs, and the second (the bridge entity's article) often shares no rare
word with the question: the lexical tier finds the first and the rest of the selection may miss the second
(every layer read every gold unit in 0.34-0.72 of HotpotQA questions on the GPU, 0.91-1.00 in SQuAD). A
second hop: the words of the first hop's best unit (its text, rare in the haystack, not the question's) as a
second query, its lexical tier taken from the units outside the first hop's lead (tier and neighbours).

Per HotpotQA question whose gold paragraphs are both past the window: how many of its gold paragraphs
(spans) the first hop's lead touches (a unit of the span among the tier's units and their neighbours,
capped at 3/4 of topk as `select.lexical_evidence` does), and how many the lead plus the second hop's tier
(its best `--hop-units` units with neighbours) touches; and how many units that costs. No attention, no
answers: a selection signal for the next GPU run, not a result.

    python benchmarks/ruler_second_hop.py --tokenizer ~/.cache/memllm/models/qwen2.5-coder-0.5b/weights \
        --suite .gpu/suite_qwen_a.json.gz --chosen benchmarks/results/ruler_query_cpu_qwen_32k.json.gz \
        --out benchmarks/results/ruler_second_hop_qwen.json
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ruler_gpu import load_suite  # noqa: E402
from ruler_query_signal import NoEmbedder  # noqa: E402

from memllm.bench import ruler  # noqa: E402
from memllm.config import MemoryConfig  # noqa: E402
from memllm.context import select  # noqa: E402
from memllm.unit_lexical import words  # noqa: E402
from memllm.unit_text import UnitTextIndex  # noqa: E402


def lead_of(tier: list[int], n_units: int, cap: int) -> list[int]:
    """The tier's units, then their neighbours, up to cap (select.lexical_evidence's lead, no `first`)."""
    lead: list[int] = []
    for v in [*tier, *(u + s for u in tier for s in (-1, 1))]:
        if 0 <= v < n_units and v not in lead and len(lead) < cap:
            lead.append(v)
    return lead


def unit_text(index: UnitTextIndex, u: int) -> str:
    a = index.n_init + u * index.block_size
    return index.tokenizer.decode(list(index.ids[a : a + index.block_size]), skip_special_tokens=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--suite", required=True)
    ap.add_argument("--n-local", type=int, default=4096)
    ap.add_argument(
        "--hop-units", type=int, default=2, help="units the second hop adds (with a neighbour each)"
    )
    ap.add_argument(
        "--chosen",
        default=None,
        help="a run's rows (ruler_query_cpu.py / ruler_gpu.py --out): also against its lexical `chosen`",
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    chosen_by: dict[str, dict] = {}
    if args.chosen:
        with gzip.open(args.chosen, "rt") as fh:
            for r in json.load(fh)["rows"]:
                if r.get("chosen") is not None and r["system"] in ("lexical", "oracle"):
                    chosen_by.setdefault(r["id"], {})[r["system"]] = r
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    cfg = MemoryConfig()
    cap = max(1, min(cfg.topk, round(cfg.topk * select.EVIDENCE_SHARE)))
    rows, t0 = [], time.perf_counter()
    for hays in load_suite(args.suite).values():
        for data in hays:
            hay = ruler.Haystack.from_dict(data)
            qs = [q for q in hay.questions if q.family == "hotpotqa" and q.query]
            if not qs:
                continue
            index = UnitTextIndex(NoEmbedder(), tok, cfg.n_init, cfg.block_size)
            index.write(0, hay.ids)
            n_units = (len(hay.ids) - cfg.n_init - args.n_local) // cfg.block_size
            for q in qs:
                spans = [
                    set(select.units_of_spans([s], cfg.n_init, cfg.block_size, n_units)) for s in q.spans
                ]
                if len(spans) < 2 or not all(spans):
                    continue  # a gold paragraph in the window: not this diagnostic's case
                lexical, _ = index.lexical(q.query, n_units)
                tier = select.lexical_tier(lexical, cap)
                lead = lead_of(tier, n_units, cap)
                row = {"length": hay.length, "id": q.id, "lead": len(lead),
                       "hop1": sum(bool(s & set(lead)) for s in spans)}  # fmt: skip
                if tier:
                    asked = set(words(q.query))
                    second = " ".join(
                        w for w in dict.fromkeys(words(unit_text(index, tier[0]))) if w not in asked
                    )
                    s2, _ = index.lexical(second, n_units)
                    near = {u + d for u in lead for d in (-1, 0, 1)}
                    s2[list(u for u in near if 0 <= u < n_units)] = -1.0
                    best = [int(u) for u in s2.argsort(descending=True)[: args.hop_units] if float(s2[u]) > 0]
                    added = [v for v in lead_of(best, n_units, 2 * args.hop_units) if v not in lead]
                    row["hop2"] = sum(bool(s & (set(lead) | set(added))) for s in spans)
                    row["added"] = len(added)
                else:
                    added = []
                    row["hop2"], row["added"] = row["hop1"], 0
                run = chosen_by.get(q.id, {})
                if "lexical" in run:  # the whole selection of that run, and with the second hop's units
                    chosen = set(run["lexical"]["chosen"])
                    row["run_both"] = all(s & chosen for s in spans)
                    row["run_hop2_both"] = all(s & (chosen | set(added)) for s in spans)
                    row["oracle_answered"] = run.get("oracle", {}).get("score", 0) > 0
                rows.append(row)
            print(f"[{time.perf_counter() - t0:6.1f}s] {hay.length:,}: {len(qs)} questions", flush=True)
    table: dict = defaultdict(lambda: defaultdict(int))
    for r in rows:
        cell = table[r["length"]]
        cell["n"] += 1
        cell["hop1_both"] += r["hop1"] == 2
        cell["hop2_both"] += r["hop2"] == 2
        cell["added"] += r["added"]
        if "run_both" in r:
            cell["run_n"] += 1
            cell["run_both"] += r["run_both"]
            cell["run_hop2_both"] += r["run_hop2_both"]
            cell["completed_oracle_answered"] += (
                r["run_hop2_both"] and not r["run_both"] and r["oracle_answered"]
            )
    print(f"{'length':>8} {'n':>3}  both paragraphs touched: lead -> lead + second hop  (units added, mean)")
    for length, c in sorted(table.items()):
        print(
            f"{length:>8} {c['n']:>3}  {c['hop1_both']:>3} -> {c['hop2_both']:<3}  ({c['added'] / max(1, c['n']):.1f})"
        )
        if c["run_n"]:
            print(f"{'':>8} the run's whole selection, {c['run_n']} questions: both touched {c['run_both']} -> "
                  f"{c['run_hop2_both']} with the second hop; of those completed, the oracle answered "
                  f"{c['completed_oracle_answered']}")  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
