"""Where the host time of a feed's first chunks goes (issue 3, must-show 3): a profile, not a result.

feed_timeline.py showed a fresh session's first chunks (two plain calls, the warm-up and capture of
the steady chunk's graph) taking ~0.5 s more than replays would. With SmolLM2's shapes and random
weights (the host's work does not depend on them), after one warm-up session in the process, this
feeds --tokens into a new session under cProfile and prints the functions by cumulative and by own
time, and each chunk's host time.
Usage: PYTHONPATH=/tmp/site:.:benchmarks python benchmarks/feed_start_profile.py --out $OUT/start.txt
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time
from pathlib import Path

import torch
from passkey_gpu import DeviceLLM
from profile_gpu import smollm2_shaped


def main() -> None:
    from memllm.bench.passkey import parse_length
    from memllm.config import MemoryConfig
    from memllm.session import Session

    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="32k")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    llm = DeviceLLM(smollm2_shaped("cuda"), None, "SmolLM2 shapes, random weights")
    n = parse_length(args.tokens)
    ids = torch.randint(100, 40000, (n,)).tolist()
    Session(llm, MemoryConfig()).feed_ids(ids)  # warm-up: kernels compiled, host memory allocated
    torch.cuda.synchronize()
    s = Session(llm, MemoryConfig())
    marks: list[float] = []
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    s.feed_ids(ids, lambda done, total: marks.append(time.perf_counter() - t0))
    torch.cuda.synchronize()
    prof.disable()
    wall = time.perf_counter() - t0
    out = io.StringIO()
    out.write(f"{n} tokens in {wall:.3f} s; host time at each chunk's end: {[round(m, 3) for m in marks]}\n")
    out.write(f"graph: {s.cache.decode_graph().counters()}\n")
    for key in ("cumulative", "tottime"):
        pstats.Stats(prof, stream=out).sort_stats(key).print_stats(45)
    text = out.getvalue()
    print(text[:20000])
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
