"""Time `memllm chat` from process start to its first answer, with the weight cache warm.

Usage: python benchmarks/chat_startup.py [--runs 5] [--model smollm2-135m]
Runs once untimed to make sure the cache exists, then `--runs` timed starts with the question piped in.
Reports time to the first byte of the answer and to the end of the process (median, min, max), as JSON
and as a short table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import time

QUESTION = "What is the capital of France? Answer in one word.\n"


def one_run(exe: str, model: str) -> dict[str, float | str]:
    start = time.perf_counter()
    proc = subprocess.Popen(
        [exe, "chat", "--model", model],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert proc.stdin and proc.stdout
    proc.stdin.write(QUESTION.encode())
    proc.stdin.close()
    first = proc.stdout.read(1)
    t_first = time.perf_counter() - start
    rest = proc.stdout.read()
    proc.wait()
    return {
        "first_byte_s": t_first,
        "exit_s": time.perf_counter() - start,
        "answer": (first + rest).decode().strip(),
        "rc": proc.returncode,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--model", default="smollm2-135m")
    args = ap.parse_args()
    exe = shutil.which("memllm")
    if exe is None:
        raise SystemExit("memllm is not on PATH: run ./install.sh first")
    one_run(exe, args.model)  # warm the weight cache (and the OS page cache)
    runs = [one_run(exe, args.model) for _ in range(args.runs)]
    firsts = [float(r["first_byte_s"]) for r in runs]
    exits = [float(r["exit_s"]) for r in runs]
    result = {
        "model": args.model,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "runs": runs,
        "first_answer_median_s": statistics.median(firsts),
        "first_answer_min_s": min(firsts),
        "first_answer_max_s": max(firsts),
        "exit_median_s": statistics.median(exits),
    }
    print(json.dumps(result, indent=2))
    print("\n| runs | first answer median (min-max) | process exit median | answer |")
    print(
        f"| {args.runs} | {result['first_answer_median_s']:.2f} s ({min(firsts):.2f}-{max(firsts):.2f}) | "
        f"{result['exit_median_s']:.2f} s | {runs[0]['answer']!r} |"
    )


if __name__ == "__main__":
    main()
