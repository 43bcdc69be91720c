"""`memllm ask`'s path on a long document with the default model, on the CPU: the two windows, SmolLM2-135M's
long-read one (n_local 512, topk 8; models.PackagedModel.long_read) and the default (4,096, topk 16), in kv,
hybrid or text mode (text reads no units: its window does not matter), marking the one `ask --mode MODE` picks
(kv: the long-read window past the default window; hybrid, text: the default).

One haystack of the RULER-style suite (memllm.bench.ruler: an essay with single needles and multikey needles with
near-duplicate distractors, or with --families squad,hotpotqa Wikipedia paragraphs around the gold ones) decoded to text, read by `batch_docs.answer_each` exactly as `ask --each`
reads a document, every question asked as a user asks it (the question alone, `Question.query`), each
answer scored by the suite's rule. Both settings read the same text and ask the same questions.

    python benchmarks/ask_long_read_cpu.py --length 12k --per-family 8 --max-new-tokens 48 --out benchmarks/results/ask_long_read_cpu.json
    python benchmarks/ask_long_read_cpu.py --mode hybrid --length 12k --per-family 8 --max-new-tokens 48 --out benchmarks/results/ask_long_read_cpu_hybrid.json
    python benchmarks/ask_long_read_cpu.py --mode hybrid --families squad,hotpotqa --length 12k --per-family 8 --max-new-tokens 24 --out benchmarks/results/ask_long_read_cpu_hybrid_qa.json   # and --mode kv: ..._kv_qa.json
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import time

import torch
import transformers

from memllm import MemLLM
from memllm.agents import batch_docs
from memllm.agents.batch_docs import answer_each, long_read_settings
from memllm.bench import ruler
from memllm.bench.passkey import parse_length
from memllm.documents import read_text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--length", default="12k")
    ap.add_argument("--families", default="single,multikey")
    ap.add_argument("--per-family", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mode", default="kv", choices=("kv", "hybrid", "text"))  # text: no window (chunks alone)
    ap.add_argument("--max-new-tokens", type=int, default=48)  # a UUID is ~25 tokens, after a restated question
    ap.add_argument("--windows", default="512,4096", help="comma-separated: 512 (topk 8) and/or 4096 (topk 16)")
    ap.add_argument("--retrieval", default=None, help="DocumentQA's text retrieval (text, hybrid modes); default: its own")
    ap.add_argument("--context-tokens", type=int, default=None,
                    help="DocumentQA's context_tokens: tokens of chunks text mode puts in the prompt; default: its own")  # fmt: skip
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    given = {k: v for k, v in (("retrieval", args.retrieval), ("context_tokens", args.context_tokens)) if v is not None}
    if given:  # every DocumentQA answer_each builds is made so
        batch_docs.DocumentQA = functools.partial(batch_docs.DocumentQA, **given)
    llm = MemLLM.from_pretrained(args.model, device="cpu", dtype="fp32")
    families = args.families.split(",")
    if set(families) <= set(ruler.QA_FAMILIES):  # SQuAD / HotpotQA: gold paragraphs among Wikipedia paragraphs
        hay = ruler.build_suite(llm.tokenizer, parse_length(args.length), families, args.per_family, args.seed)[0]
    else:
        hay = ruler.needle_haystack(llm.tokenizer, parse_length(args.length), families, args.per_family, args.seed)
    doc = read_text(llm.tokenizer.decode(hay.ids), "haystack")
    picked = long_read_settings(llm, [doc], args.mode, None)  # what `ask --mode MODE` reads this document with
    windows = {512: {"n_local": 512, "topk": 8}, 4096: {"n_local": 4096, "topk": 16}}
    systems = {f"n_local {w}, topk {windows[w]['topk']}": windows[w] for w in map(int, args.windows.split(","))}
    queries = [q.query or q.prompt for q in hay.questions]
    rows, details = [], []
    for name, settings in systems.items():
        start = time.perf_counter()
        (result,) = answer_each(llm, [doc], queries, args.mode, settings=settings, max_new_tokens=args.max_new_tokens)
        seconds = time.perf_counter() - start
        per_family: dict[str, list[float]] = {}
        for q, a in zip(hay.questions, result.answers, strict=True):
            s = q.score(a.text)
            per_family.setdefault(q.family, []).append(s)
            details.append({"system": name, "family": q.family, "id": q.id, "query": q.query, "answers": q.answers,
                            "answer": a.text, "score": s, "depth": q.depth})  # fmt: skip
        rows.append({"system": name, "settings": settings, "ask_picks_it": settings == {**{"n_local": 4096, "topk": 16},
                     **picked}, "read_tokens": result.read.tokens,
                     "read_s": round(result.read.seconds, 2), "total_s": round(seconds, 2), "notes": result.read.notes,
                     "scores": {f: sum(v) for f, v in per_family.items()},
                     "questions": {f: len(v) for f, v in per_family.items()}})  # fmt: skip
    env = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
           "device": "cpu", "threads": torch.get_num_threads(), "args": vars(args)}  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"env": env, "rows": rows, "details": details}, f, indent=1)
    print(json.dumps(env))
    for r in rows:
        cells = " ".join(f"{f} {s:g}/{r['questions'][f]}" for f, s in r["scores"].items())
        picked_mark = " (what ask picks)" if r["ask_picks_it"] else ""
        print(f"{args.mode} {r['system']:22s}{picked_mark:18s} {cells}  read {r['read_tokens']} tokens in {r['read_s']} s")


if __name__ == "__main__":
    main()
