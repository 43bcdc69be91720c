"""kill -9 during `memllm ask --save-memory DIR` (issue 22, must-show 3).

Trial 0 saves a document memory to DIR and times it. Each later trial saves a different document over
DIR (a memllm snapshot of the same kind is replaced whole) and kills the process with SIGKILL at a
uniformly random moment of that time; then `memllm ask --memory DIR -q ...` must answer (exit 0)
from either the previous memory or the new one, never fail, and no temporary folder may be left
beside DIR.

python benchmarks/save_memory_kill.py --trials 20 --out benchmarks/results/save_memory_kill.json
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SENTENCES = ["The {c} door is number {n}.", "Locker {n} holds the {c} key.", "Room {n} was painted {c}."]
COLOURS = ["red", "blue", "green", "amber", "ivory", "cobalt"]


def document(rng: random.Random, n_sentences: int) -> str:
    return " ".join(rng.choice(SENTENCES).format(c=rng.choice(COLOURS), n=rng.randint(1, 999))
                    for _ in range(n_sentences))  # fmt: skip


def memllm(*args: str, model: str | None) -> list[str]:
    cmd = [sys.executable, "-m", "memllm.cli.app", *args]
    return cmd + (["--model", model] if model else [])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--sentences", type=int, default=600, help="document length (~8 tokens each)")
    ap.add_argument("--model", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="memllm-savekill-"))
    target = root / "saved"
    rows = []
    try:
        doc = root / "doc0.txt"
        doc.write_text(document(rng, args.sentences))
        t0 = time.perf_counter()
        subprocess.run(memllm("ask", str(doc), "--save-memory", str(target), model=args.model), check=True,
                       capture_output=True)  # fmt: skip
        full = time.perf_counter() - t0
        for i in range(1, args.trials + 1):
            doc = root / f"doc{i}.txt"
            doc.write_text(document(rng, args.sentences))
            before = (target / "documents.json").read_bytes()
            proc = subprocess.Popen(memllm("ask", str(doc), "--save-memory", str(target), model=args.model),
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
            delay = rng.uniform(0.0, full)
            try:
                proc.wait(timeout=delay)
                killed = False
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                killed = True
            ask = subprocess.run(memllm("ask", "--memory", str(target), "-q", "Which door is red?", model=args.model),
                                 capture_output=True, text=True)  # fmt: skip
            after = (target / "documents.json").read_bytes() if (target / "documents.json").exists() else b""
            leftovers = sorted(p.name for p in root.iterdir() if p.name.startswith(".saved"))
            row = {"trial": i, "kill_at_s": round(delay, 2), "killed": killed, "answer_exit": ask.returncode,
                   "memory": "new" if after != before else "previous", "leftover_temp_folders": leftovers,
                   "stderr_tail": ask.stderr.strip().splitlines()[-1:] if ask.returncode else []}  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    summary = {
        "trials": len(rows), "full_save_s": round(full, 2), "killed": sum(r["killed"] for r in rows),
        "answered_after": sum(r["answer_exit"] == 0 for r in rows),
        "previous_memory": sum(r["memory"] == "previous" for r in rows),
        "new_memory": sum(r["memory"] == "new" for r in rows),
        "leftover_temp_folders": sum(bool(r["leftover_temp_folders"]) for r in rows),
    }  # fmt: skip
    print(json.dumps(summary))
    if args.out:
        args.out.write_text(json.dumps({"command": " ".join(sys.argv), "summary": summary, "rows": rows}, indent=1)
                            + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
