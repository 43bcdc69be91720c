"""Answers, not signal: the selection matching the user's question (`query`) against the whole prompt, on the CPU.

The GPU runs of issue 25 measured the `lexical` selector when it matched the whole decoded prompt (instructions
included); since b0a0e4a it matches the question alone (`Session.generate_ids(query=...)`). The model-free
signal (`ruler_query_signal.py`) says the rare-word tier then finds the gold unit more often in QA. This runs the
answers on this machine's CPU (no device needed), on the same suite files the GPU runs read (`ruler_gpu.py
build`), one read per haystack and, for every question, three systems on that read:

  * `lexical`         the default selector, matching `Question.query` (what the library does now);
  * `lexical_prompt`  the same selector matching the prompt (the question with `query` blanked: as before b0a0e4a);
  * `oracle`          the gold units read first.

(Session 24 began the candidate `lexical_missing` here, deleted after GPU run 55: benchmarks/RESULTS.md.
Session 23 ran `lexical_unsided` here, the tier's neighbours in tier order before `sides`: deleted after GPU run 54.
Session 21 ran the candidate `lexical_half` here, the fused evidence filling half of topk; GPU run 53 measured it
and it was deleted: benchmarks/RESULTS.md.)

    python benchmarks/ruler_query_cpu.py --suite .gpu/suite_qwen_a.json.gz --lengths 32k --families squad,hotpotqa \
        --questions 50 --out benchmarks/results/ruler_query_cpu_qwen_32k.json.gz

Writes every answer after each haystack (a stopped run keeps what it measured) and prints the table last.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
import time
from pathlib import Path

import torch

from memllm.bench import ruler, ruler_run
from memllm.bench.passkey import parse_length
from memllm.config import MemoryConfig
from memllm.session import Session

sys.path.insert(0, str(Path(__file__).parent))
from ruler_gpu import _write, load_suite, subsample  # noqa: E402

SYSTEMS = ("lexical", "lexical_prompt", "oracle")


def ask(session: Session, q: ruler.Question, system: str, newlines: set[int], stops: set[int]) -> dict:
    if system == "lexical_prompt":
        row = ruler_run.ask_memllm(session, dataclasses.replace(q, query=""), "lexical", newlines, stops)
        return {**row, "system": system}
    return ruler_run.ask_memllm(session, q, system, newlines, stops)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--suite", required=True, help="one or more gzipped suites (ruler_gpu.py build), comma-separated"
    )
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--lengths", default="32k")
    ap.add_argument("--families", default="squad,hotpotqa")
    ap.add_argument("--questions", type=int, default=50, help="per family and length")
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--n-local", type=int, default=4096)
    ap.add_argument("--topk", type=int, default=16)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    from memllm.cli.common import load_embedder, load_llm

    systems = args.systems.split(",")
    bad = [s for s in systems if s not in SYSTEMS]
    if bad:
        sys.exit(f"unknown systems {bad}: choose among {', '.join(SYSTEMS)}")
    torch.manual_seed(0)
    llm = load_llm(args.model, "cpu")
    embedder = load_embedder()
    memory = MemoryConfig(n_local=args.n_local, topk=args.topk)
    suite = load_suite(args.suite)
    families = set(args.families.split(","))
    tok = llm.tokenizer
    newlines = ruler_run.newline_ids(tok)
    stops = set(llm.stop_ids())
    env = {
        "device": "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__,
        "python": platform.python_version(), "command": " ".join(sys.argv),
        "memory": memory.resolved(llm.trained_len).to_dict(),
    }  # fmt: skip
    out = Path(args.out)
    rows: list[dict] = []
    for n in (parse_length(x) for x in args.lengths.split(",")):
        hays = [ruler.Haystack.from_dict(h) for h in suite[str(n)]]
        hays = [
            dataclasses.replace(h, questions=[q for q in h.questions if q.family in families]) for h in hays
        ]
        hays = subsample([h for h in hays if h.questions], args.questions)
        for hi, hay in enumerate(hays):
            t0 = time.perf_counter()
            session = Session(llm, memory, embedder=embedder)
            session.feed_ids(hay.ids)
            print(f"{n} haystack {hi + 1}/{len(hays)}: read {len(hay.ids)} tokens in {time.perf_counter() - t0:.0f}s",
                  flush=True)  # fmt: skip
            for qi, q in enumerate(hay.questions):
                for system in systems:
                    rows.append({**ask(session, q, system, newlines, stops), "length": hay.length})
                got = {r["system"]: r["score"] for r in rows[-len(systems) :]}
                print(f"  q{qi + 1}/{len(hay.questions)} {q.family} {got}", flush=True)
            del session
            _write(out, {"env": env, "rows": rows})
    items = ruler_run.summary(rows)
    _write(out, {"env": env, "summary": items, "rows": rows})
    print(ruler_run.table(items))


if __name__ == "__main__":
    main()
