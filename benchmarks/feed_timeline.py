"""Where a long feed's wall time goes, chunk by chunk (issue 3, must-show 3): a profile, not a result.

Reads the 1M passkey prompt (depth 0.5) through `Session.feed_ids` from host ids, as the passkey
benchmark does, after a warm-up feed (kernels compiled, host memory allocated once). A progress
callback records, after each chunk, the host time and a CUDA event (no synchronisation), and the
graph's counters (what kind of step the chunk was: replayed, captured, eager). Modes:
  * "async": the feed as it is;
  * "sync": the same with torch.cuda.synchronize() after each chunk (what a per-chunk upload from
    pageable memory did before prefill.upload: the host waits for the GPU every chunk).
Prints per mode: wall seconds, tokens/s, the GPU time of the replayed chunks (median, sum), and the
wall time not covered by them. Writes every chunk's numbers to --out.
Usage: PYTHONPATH=/tmp/site:. python benchmarks/feed_timeline.py --model-dir /root/m --gguf smollm2.gguf \
           --tokens 1m --out $OUT/feed_timeline.json
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import torch
from passkey_gpu import DeviceLLM
from profile_prefill import load


def timed_feed(llm, ids: list[int], memory, sync_each: bool) -> dict:
    from memllm.session import Session

    s = Session(llm, memory)
    rows: list[dict] = []
    events: list[torch.cuda.Event] = []

    def progress(done: int, total: int) -> None:
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        events.append(e)
        if sync_each:
            torch.cuda.synchronize()
        g = s.cache.decode_graph()
        c = g.counters() if g is not None else {}
        rows.append({"done": done, "host_s": time.perf_counter() - t0, **c})

    torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True)
    t0 = time.perf_counter()
    start.record()
    s.feed_ids(ids, progress)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    prev, prev_counts = start, {"replays": 0, "captures": 0, "static_steps": 0}
    for row, e in zip(rows, events, strict=True):
        row["gpu_ms"] = prev.elapsed_time(e)  # from the end of the chunk before: GPU time and idle gaps
        new = {k: row.get(k, 0) - prev_counts.get(k, 0) for k in prev_counts}
        row["kind"] = "capture" if new["captures"] else "replay" if new["replays"] else (
            "static" if new["static_steps"] else "plain")  # fmt: skip
        prev, prev_counts = e, {k: row.get(k, 0) for k in prev_counts}
    replay = [r["gpu_ms"] for r in rows if r["kind"] == "replay"]
    s = None  # its memory must not count in the next feed
    gc.collect()
    torch.cuda.empty_cache()
    return {
        "wall_s": wall,
        "tokens_per_s": len(ids) / wall,
        "chunks": len(rows),
        "kinds": {k: sum(r["kind"] == k for r in rows) for k in ("plain", "static", "capture", "replay")},
        "replay_ms_median": statistics.median(replay) if replay else None,
        "replay_s_sum": sum(replay) / 1000,
        "other_s": wall - sum(replay) / 1000,
        "other_chunks_s": sum(r["gpu_ms"] for r in rows if r["kind"] != "replay") / 1000,
        "rows": rows,
    }


def main() -> None:
    from memllm.bench.passkey import keys_for, parse_length, prompt_ids
    from memllm.config import MemoryConfig

    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--gguf", default=None)
    ap.add_argument("--tokens", default="1m")
    ap.add_argument("--warmup", default="128k")
    ap.add_argument("--modes", default="async,sync,async")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    model, tok = load(args.model_dir, args.gguf)
    llm = DeviceLLM(model, tok, "SmolLM2-135M-Instruct")
    n = parse_length(args.tokens)
    memory = MemoryConfig()
    ids = prompt_ids(tok, n, 0.5, keys_for(n, 2)[1])
    w = parse_length(args.warmup)
    t = time.perf_counter()
    timed_feed(llm, prompt_ids(tok, w, 0.5, keys_for(w, 2)[1]), memory, False)
    print(f"warm-up {w} tokens: {time.perf_counter() - t:.1f} s", flush=True)
    runs = []
    for mode in args.modes.split(","):
        r = timed_feed(llm, ids, memory, mode == "sync")
        r["mode"] = mode
        runs.append(r)
        print({k: v for k, v in r.items() if k != "rows"}, flush=True)
    import transformers

    env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "transformers": transformers.__version__, "tokens": n, "command": " ".join(__import__("sys").argv)}  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps({"env": env, "runs": runs}, indent=1))
    print(json.dumps(env))
    print(f"{'mode':6} {'wall s':>7} {'tok/s':>9} {'replay ms med':>14} {'replays s':>10} {'other s':>8} {'kinds'}")
    for r in runs:
        print(f"{r['mode']:6} {r['wall_s']:7.2f} {r['tokens_per_s']:9,.0f} {r['replay_ms_median'] or 0:14.2f} "
              f"{r['replay_s_sum']:10.2f} {r['other_s']:8.2f} {r['kinds']}")  # fmt: skip


if __name__ == "__main__":
    main()
