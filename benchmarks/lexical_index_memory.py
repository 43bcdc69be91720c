"""Host memory and time of the lexical selectors' word index (memllm.unit_lexical.WindowWords) at a given
stream length: windows of Paul Graham essay text shaped like UnitTextIndex's (48 tokens every 24, taken as
36 words every 18 at ~0.75 words a token), built, then scored against a few questions. Bytes are
tracemalloc's count of what building it allocated and kept, per stream token.

  PYTHONPATH=. python benchmarks/lexical_index_memory.py --tokens 1m --out benchmarks/results/lexical_index_memory.json

Uses only WindowWords.extend and unit_scores, so the same script measures an earlier implementation
(`git stash` / checkout of memllm/unit_lexical.py).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import tracemalloc

import torch

from memllm.bench import ruler
from memllm.bench.passkey import parse_length
from memllm.unit_lexical import WindowWords

QUESTIONS = (
    "What is the special magic number for jealous-umbrella mentioned in the provided text?",
    "Who founded Viaweb, and why did Lisp matter to it?",
    "What are all the special magic words for clumsy-lantern?",
    "investors",
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="1m")
    ap.add_argument("--out")
    args = ap.parse_args()
    n_tokens = parse_length(args.tokens)
    text = " ".join(ruler.essay_sentences()).split()
    n_win = n_tokens // 24
    span = len(text) - 40
    texts = [" ".join(text[(j * 18) % span : (j * 18) % span + 36]) for j in range(n_win)]
    tracemalloc.start()
    t = time.perf_counter()
    ww = WindowWords()
    ww.extend(texts)
    build_s = time.perf_counter() - t
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    first = torch.arange(0, n_win - 5, 5)  # 128-token units: ~5 windows each
    last = first + 5
    times = []
    for q in QUESTIONS:
        t = time.perf_counter()
        ww.unit_scores(q, first, last, n_win)
        times.append(time.perf_counter() - t)
    res = {
        "tokens": n_tokens, "windows": n_win, "bytes": held, "bytes_per_token": held / n_tokens,
        "build_s": build_s, "score_ms_median": 1000 * statistics.median(times),
        "python": platform.python_version(), "torch": torch.__version__,
    }  # fmt: skip
    if hasattr(ww, "nbytes"):
        res["nbytes_per_token"] = ww.nbytes() / n_tokens
    print(json.dumps(res))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
