"""`memllm serve --memory kv`: users' answers decoded together (--batch, the default) against one at a time
(--no-batch), on a real server over loopback with real HTTP clients (issue 19).

  python benchmarks/serve_batch_cpu.py --users 1,4,8 --max-tokens 32 [--out F]

For each mode a server is started on a fresh store; for each N in --users, N new users each tell it a
few sentences (one after another), then all N ask their question at once (one thread each, greedy
answers): wall time of the N answers, completion tokens/s over them, p50/max latency, the engine's
counters from /metrics. The answers of the two modes are compared user by user (greedy: equal unless a
batched rounding flips a token). Default model (SmolLM2-135M-Instruct), CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx

from benchmarks.serve_load import free_port, start

FACTS = [
    "I keep my bike in the red shed behind the school, next to the old oak tree.",
    "My sister Nora moved to Bergen last spring; she works at the harbour museum there.",
    "The code of my locker at the gym is 4417, and the gym opens at six.",
    "We planted tomatoes, beans and three rows of onions in May this year.",
    "My first car was a blue Volvo that my uncle sold me for a hundred pounds.",
    "The meeting with the architects moved from Tuesday to Thursday at ten.",
    "Our cat is called Pepper and she only eats fish on Fridays.",
    "I am learning Portuguese because we are moving to Porto in the autumn.",
]
ASKS = ["Where do I keep my bike?", "Where did my sister move?", "What is my locker code?",
        "What did we plant in May?", "What was my first car?", "When is the meeting with the architects?",
        "What is my cat called?", "Why am I learning Portuguese?"]  # fmt: skip


def chat(client: httpx.Client, user: str, text: str, max_tokens: int) -> tuple[dict, float]:
    t = time.perf_counter()
    r = client.post("/v1/chat/completions", json={"user": user, "max_tokens": max_tokens,
                                                   "messages": [{"role": "user", "content": text}]})  # fmt: skip
    r.raise_for_status()
    return r.json(), time.perf_counter() - t


def engine_counters(client: httpx.Client) -> dict[str, int]:
    out = {}
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("memllm_engine_"):
            name, value = line.split()
            out[name[len("memllm_engine_") : -len("_total")]] = int(value)
    return out


def run_mode(batch: bool, users: list[int], max_tokens: int) -> dict:
    from benchmarks import serve_load

    serve_load.SERVER_ARGS[:] = ["--memory", "kv", "--batch" if batch else "--no-batch"]
    home = Path(tempfile.mkdtemp(prefix="memllm-serve-batch-"))
    port = free_port()
    proc = start(home, port, fake=False, max_tokens=max_tokens)  # returns once /healthz answers
    rows = []
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as client:
            for n in users:
                names = [f"u{n}_{i}" for i in range(n)]
                for i, u in enumerate(names):
                    chat(client, u, FACTS[i % len(FACTS)], max_tokens)
                before = engine_counters(client)
                got: dict[str, tuple[dict, float]] = {}

                def ask(i: int, u: str, got: dict = got) -> None:
                    got[u] = chat(client, u, ASKS[i % len(ASKS)], max_tokens)

                threads = [threading.Thread(target=ask, args=(i, u)) for i, u in enumerate(names)]
                t0 = time.perf_counter()
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                wall = time.perf_counter() - t0
                after = engine_counters(client)
                tokens = sum(b["usage"]["completion_tokens"] for b, _ in got.values())
                lat = [s for _, s in got.values()]
                rows.append({
                    "users": n, "wall_s": wall, "completion_tokens": tokens, "tokens_per_s": tokens / wall,
                    "latency_p50_s": statistics.median(lat), "latency_max_s": max(lat),
                    "engine": {k: after.get(k, 0) - before.get(k, 0) for k in after},
                    "answers": {u: got[u][0]["choices"][0]["message"]["content"] for u in names},
                })  # fmt: skip
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "answers"}), flush=True)
    finally:
        proc.terminate()  # SIGTERM: the server saves and exits
        proc.wait(60)
    return {"batch": batch, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--users", default="1,4,8")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    users = [int(x) for x in args.users.split(",")]
    modes = [run_mode(False, users, args.max_tokens), run_mode(True, users, args.max_tokens)]
    print("\nusers | one at a time tok/s | batched tok/s | ratio | p50 latency s (one / batched) | answers equal")
    for a, b in zip(modes[0]["rows"], modes[1]["rows"], strict=True):
        same = sum(a["answers"][u] == b["answers"][u] for u in a["answers"])
        print(f"{a['users']:5d} | {a['tokens_per_s']:19.1f} | {b['tokens_per_s']:13.1f} | "
              f"{b['tokens_per_s'] / a['tokens_per_s']:5.2f} | {a['latency_p50_s']:.2f} / {b['latency_p50_s']:.2f} | "
              f"{same}/{a['users']}")  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps({"max_tokens": args.max_tokens, "modes": modes}, indent=1))


if __name__ == "__main__":
    main()
