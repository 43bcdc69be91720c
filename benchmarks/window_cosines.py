"""The text index's per-question cosines (memllm.unit_text.window_cosines) at a stream length: every window's
fp16 MiniLM vector against the question's, converted a chunk at a time, against converting them all first
(NumPy, as before; torch). Random vectors, 384 dimensions, a window every 24 tokens. Medians of 7, ms.

  PYTHONPATH=. python benchmarks/window_cosines.py --tokens 1m --out benchmarks/results/window_cosines_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import numpy as np
import torch

from memllm.bench.passkey import parse_length
from memllm.unit_text import window_cosines


def median_ms(f, n: int = 7) -> float:
    f()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="1m")
    ap.add_argument("--out")
    args = ap.parse_args()
    n = parse_length(args.tokens) // 24
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((n, 384)).astype(np.float16)
    q = rng.standard_normal(384).astype(np.float32)
    want = vectors.astype(np.float32) @ q
    got = window_cosines(vectors, q).numpy()
    res = {
        "windows": n,
        "chunked_ms": median_ms(lambda: window_cosines(vectors, q)),
        "numpy_all_first_ms": median_ms(lambda: vectors.astype(np.float32) @ q),
        "torch_all_first_ms": median_ms(lambda: torch.from_numpy(vectors).float() @ torch.from_numpy(q)),
        "max_abs_diff": float(np.abs(got - want).max()),
        "threads": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__,
    }  # fmt: skip
    print(json.dumps(res))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
