"""Multi-session recall on real conversations (chitchat-dataset): memllm's controller vs last turns.

Usage:
  python benchmarks/recall_bench.py --later-sessions 10 --cases 40 [--answer] [--out results.json]
Each case plants a fact in a real person's first conversation and asks for it after N of their later
conversations (see memllm/bench/recall.py). Retrieval uses the packaged all-MiniLM-L6-v2 embedder;
--answer also asks the real default model (smollm2-135m, CPU) with each system's prompt.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time

from memllm.bench.recall import build_cases, run_cases
from memllm.memory_stores.embeddings import SentenceTransformerEmbedder
from memllm.memory_stores.faiss_store import FaissStore


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--later-sessions", type=int, default=10)
    ap.add_argument("--cases", type=int, default=40)
    ap.add_argument("--memory-tokens", type=int, default=512)
    ap.add_argument("--flash-tokens", type=int, default=512)
    ap.add_argument("--answer", action="store_true", help="also answer with the real default model")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--updates", action="store_true", help="the fact changes in a later conversation")
    ap.add_argument("--gate-similarity", type=float, default=None, help="ControllerConfig.gate_similarity")
    ap.add_argument("--gate-kinds", default=None, help="ControllerConfig.gate_kinds, e.g. fact")
    ap.add_argument("--no-extract", action="store_true", help="store turns only (no fact records)")
    ap.add_argument("--no-full", action="store_true", help="skip the full-history baseline")
    ap.add_argument(
        "--gate-variants",
        default=None,
        help='JSON: name -> ControllerConfig changes, e.g. \'{"sim0.6": {"gate_similarity": 0.6}}\'',
    )
    ap.add_argument("--old-layout", action="store_true", help="recent turns in front, no record limit (before)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from memllm.llm import MemLLM

    llm = MemLLM.from_pretrained(args.model, device="cpu")
    cases = build_cases(args.later_sessions, args.cases, seed=args.seed, updates=args.updates)
    controller = {}
    if args.gate_similarity is not None:
        controller["gate_similarity"] = args.gate_similarity
    if args.gate_kinds is not None:
        controller["gate_kinds"] = tuple(args.gate_kinds.split(","))
    if args.old_layout:
        controller["max_records"] = 0
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        store = FaissStore(tmp, SentenceTransformerEmbedder())

        def show(done: int, total: int) -> None:
            print(f"\r{done}/{total} cases ({time.perf_counter() - start:.0f} s)", end="", file=sys.stderr)

        result = run_cases(
            cases,
            store=store,
            count_tokens=llm.count_tokens,
            memory_tokens=args.memory_tokens,
            flash_tokens=args.flash_tokens,
            llm=llm if args.answer else None,
            progress=show,
            controller=controller,
            extract=not args.no_extract,
            full_history=not args.no_full,
            conversation=not args.old_layout,
            gate_variants={
                k: {kk: tuple(vv) if isinstance(vv, list) else vv for kk, vv in v.items()}
                for k, v in json.loads(args.gate_variants or "{}").items()
            },
        )
        store.close()
    print(file=sys.stderr)
    result["config"] = {
        **vars(args),
        "python": platform.python_version(),
        "seconds": time.perf_counter() - start,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    s = result["summary"]

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.0f}%"

    print(json.dumps(s, indent=1))
    print(
        "\n| later sessions | cases | dialogue tokens (mean) | budget (memory+flash) | system | recall@budget "
        "| answer exact | answer fuzzy |"
    )
    print("|---|---|---|---|---|---|---|---|")
    budget = f"{args.memory_tokens}+{args.flash_tokens}"
    common = f"| {args.later_sessions} | {s['cases']} | {s['dialogue_tokens_mean']:.0f} | {budget} "
    print(
        common + f"| memllm controller | {pct(s['memllm_recall_at_budget'])} | {pct(s['memllm_exact'])} "
        f"| {pct(s['memllm_fuzzy'])} |"
    )
    print(
        common + f"| last turns | {pct(s['baseline_recall_at_budget'])} | {pct(s['baseline_exact'])} "
        f"| {pct(s['baseline_fuzzy'])} |"
    )
    if s.get("full_exact") is not None:
        print(
            common + f"| full history (window) | {pct(s['full_recall_at_window'])} | {pct(s['full_exact'])} "
            f"| {pct(s['full_fuzzy'])} |"
        )
    if args.updates and s.get("memllm_old_value") is not None:
        print(
            f"\nold value in the answer: memllm {pct(s['memllm_old_value'])}, last turns "
            f"{pct(s['baseline_old_value'])}, full history {pct(s['full_old_value'])}"
        )
    print(
        f"\ngate on the recall questions: fired {pct(s['gate_fire_rate'])}, {s['gate_ms_mean']:.1f} ms mean; "
        f"on {s['ordinary_turns']} ordinary turns: fired {pct(s['ordinary_fire_rate'])}, "
        f"{s['ordinary_gate_ms_mean']:.1f} ms mean; recall {s['recall_ms_mean']:.1f} ms mean"
    )


if __name__ == "__main__":
    main()
