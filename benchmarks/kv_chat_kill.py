"""kv chat memory survives kill -9 and SIGTERM (issue 24, must-show 2).

For each signal, N trials on one user's store, each a fresh `memllm chat --user U --memory kv --json`
process: send one message, and
  after  - kill it the moment its answer line arrives (the turn is answered: it must be in the next
           run's kv memory), or
  save   - (without --json: the answer streams, then the turn is saved) kill it 0-300 ms after the
           first piece of the answer appears: mostly while the snapshot is being written;
  random - kill it at a random time while it answers (the turn may be lost, but what the next run
           restores must be a whole snapshot: one that passes its checksums, or a one-line warning
           and a rebuild from the user's text records; never a torn manifest/state pair).
The next trial's process reports what it restored ("kv memory of U: T tokens, N turns" on stderr);
a final run reads the last one. Every restored snapshot is also read back here with
`Session.restore_checked` and its token count compared with its manifest's.

python benchmarks/kv_chat_kill.py --trials 20 --out benchmarks/results/kv_chat_kill.json
(the default model; --model PATH for another, e.g. the tests' tiny random GGUF)
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STATUS = re.compile(r"kv memory of \S+: (\d+) tokens, (\d+) turns")


def start(store: Path, model: str | None, as_json: bool = True) -> subprocess.Popen:
    args = [sys.executable, "-m", "memllm.cli.app", "chat", "--user", "U", "--store", str(store),
            "--memory", "kv", "--max-new-tokens", "8", *(["--json"] if as_json else [])]  # fmt: skip
    if model:
        args += ["--model", model]
    return subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def restored(stderr: str) -> tuple[int, int, bool]:
    """(tokens, turns, warned) from a run's stderr; (0, 0, ...) when it started empty."""
    m = STATUS.search(stderr)
    warned = "warning:" in stderr
    return (int(m.group(1)), int(m.group(2)), warned) if m else (0, 0, warned)


def check_snapshot(store: Path, model: str | None) -> dict:
    """Read the user's snapshot back in this process: checksums, namespace, tokens vs manifest."""
    from memllm.errors import SnapshotError
    from memllm.llm import MemLLM
    from memllm.paths import keyed
    from memllm.session import Session

    global _LLM
    if _LLM is None:
        _LLM = MemLLM.from_pretrained(model) if model else MemLLM.from_pretrained()
    folder = keyed(store / "kv", "user:U")
    try:
        session, manifest = Session.restore_checked(_LLM, folder, "user:U")
    except SnapshotError as exc:
        return {"ok": False, "error": str(exc)}
    return {"ok": session.cache.seen_tokens == manifest["tokens"], "tokens": manifest["tokens"],
            "turns": manifest["extra"]["turns"]}  # fmt: skip


_LLM = None


def run(sig: signal.Signals, mode: str, trials: int, model: str | None, root: Path, rng: random.Random) -> dict:
    store = root / f"{sig.name}-{mode}"
    answered = 0  # turns whose answer line arrived before the kill
    rows = []
    for i in range(trials):
        t0 = time.perf_counter()
        proc = start(store, model, as_json=mode != "save")
        proc.stdin.write(f"Note {i}: the code word for locker {i} is {rng.choice(['amber', 'cobalt', 'ivory'])}.\n")
        proc.stdin.flush()
        got_answer = False
        if mode == "after":
            line = proc.stdout.readline()
            got_answer = bool(line.strip()) and "answer" in json.loads(line)
            proc.send_signal(sig)
        elif mode == "save":
            proc.stdout.read(1)  # the answer's first piece: the save follows the last one
            time.sleep(rng.uniform(0.0, 0.3))
            proc.send_signal(sig)
        else:
            time.sleep(rng.uniform(0.0, 6.0))  # startup + answer of the default model on 2 CPU cores
            if proc.poll() is None:
                proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        tokens, turns, warned = restored(err)
        snap = check_snapshot(store, model) if (store / "kv").exists() else {"ok": True, "turns": 0}
        rows.append({"trial": i, "restored_turns": turns, "restored_tokens": tokens, "warned": warned,
                     "answered_before_kill": got_answer, "returncode": proc.returncode,
                     "failed": proc.returncode > 0 or "error:" in err, "snapshot": snap,
                     "expected_turns_at_least": answered, "seconds": round(time.perf_counter() - t0, 2)})  # fmt: skip
        if mode == "after" and not got_answer:
            raise SystemExit(f"trial {i}: no answer line before the kill:\n{err}")
        kept = snap.get("turns", 0)
        answered = answered + 1 if got_answer else kept  # random kills: what the snapshot holds now
    final = start(store, model)
    _, err = final.communicate("", timeout=120)
    tokens, turns, warned = restored(err)
    after_rows = rows[1:] + [{"restored_turns": turns, "warned": warned}]
    lost = sum(1 for r, nxt in zip(rows, after_rows, strict=True)
               if r["answered_before_kill"] and nxt["restored_turns"] < r["expected_turns_at_least"] + 1)  # fmt: skip
    return {
        "signal": sig.name, "mode": mode, "trials": trials,
        "answered_before_kill": sum(r["answered_before_kill"] for r in rows),
        "answered_turns_lost": lost,
        "restores_with_warning": sum(r["warned"] for r in after_rows),
        "snapshots_failing_checks": sum(not r["snapshot"]["ok"] for r in rows),
        "runs_that_failed": sum(r["failed"] for r in rows) + int(final.returncode != 0),
        "final_turns": turns, "rows": rows,
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--model", default=None)
    ap.add_argument("--modes", default="after,save,random")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="memllm-kill-"))
    results = []
    try:
        for mode in args.modes.split(","):
            for sig in (signal.SIGKILL, signal.SIGTERM):
                res = run(sig, mode, args.trials, args.model, root, rng)
                results.append(res)
                print(f"{sig.name:8} {mode:7} trials {res['trials']:3}  answered {res['answered_before_kill']:3}  "
                      f"answered lost {res['answered_turns_lost']}  warned {res['restores_with_warning']}  "
                      f"snapshots failing checks {res['snapshots_failing_checks']}  runs failed {res['runs_that_failed']}  "
                      f"final turns {res['final_turns']}",
                      flush=True)  # fmt: skip
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.out:
        args.out.write_text(json.dumps({"command": " ".join(sys.argv), "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
