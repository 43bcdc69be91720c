"""`memllm serve --memory kv|text`: users' answers decoded together (--batch, the default) against one at a
time (--no-batch), on a real server over loopback with real HTTP clients (issue 19).

  python -m benchmarks.serve_batch_cpu --users 1,4,8 --max-tokens 32 --repeats 3 [--memory text] [--out F]

With --memory text every answer comes from its prompt (system, recalled memory, the message): batched,
through EngineThread.generate_text; one at a time, through llm.chat_stream.

For each mode a server is started on a fresh store; for each N in --users, N new users each tell it a
few sentences (one after another), then all N ask for a short text that recalls none of them (answered
from their kv streams) at once (one thread each, greedy
answers), --repeats rounds: per round the wall time of the N answers, completion tokens/s over them,
p50/max latency, how many were answered from the kv stream, the engine's counters from /metrics;
medians over the rounds in the table. The answers of the two modes are compared user by user (greedy: equal unless a
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
# Requests that recall none of the facts: they are answered from each user's kv stream (a turn that
# recalls a fact record is answered from the fact alone, a text-mode prompt: agents/chat.py).
ASKS = ["Write two sentences about autumn.", "Tell me a short story about a lighthouse.",
        "Describe a busy train station.", "Give me three ideas for a rainy afternoon.",
        "Write a short poem about the sea.", "Explain how a bicycle works.",
        "Describe your favourite kind of weather.", "Tell me about a walk in the mountains."]  # fmt: skip


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


def run_mode(batch: bool, users: list[int], max_tokens: int, repeats: int, memory: str = "kv") -> dict:
    from benchmarks import serve_load

    serve_load.SERVER_ARGS[:] = ["--memory", memory, "--batch" if batch else "--no-batch"]
    home = Path(tempfile.mkdtemp(prefix="memllm-serve-batch-"))
    port = free_port()
    proc = start(home, port, fake=False, max_tokens=max_tokens)  # returns once /healthz answers
    rows, rounds = [], []
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as client:
            for n in users:
                names = [f"u{n}_{i}" for i in range(n)]
                for i, u in enumerate(names):
                    chat(client, u, FACTS[i % len(FACTS)], max_tokens)
                for rnd in range(repeats):  # the same users ask again: a round's numbers each
                    before = engine_counters(client)
                    got: dict[str, tuple[dict, float]] = {}

                    def ask(i: int, u: str, got: dict = got, rnd: int = rnd) -> None:
                        got[u] = chat(client, u, ASKS[(i + rnd) % len(ASKS)], max_tokens)

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
                    rounds.append({
                        "users": n, "round": rnd, "wall_s": wall, "completion_tokens": tokens,
                        "tokens_per_s": tokens / wall, "latency_p50_s": statistics.median(lat), "latency_max_s": max(lat),
                        "from_stream": sum(b["memllm"].get("kv") is not None and not any(
                            r["kind"] == "fact" for r in b["memllm"]["recalled"]) for b, _ in got.values()),
                        "engine": {k: after.get(k, 0) - before.get(k, 0) for k in after},
                        "answers": {u: got[u][0]["choices"][0]["message"]["content"] for u in names},
                    })  # fmt: skip
                    print(json.dumps({k: v for k, v in rounds[-1].items() if k != "answers"}), flush=True)
                mine = [r for r in rounds if r["users"] == n]
                rows.append({"users": n, "tokens_per_s": statistics.median(r["tokens_per_s"] for r in mine),
                             "latency_p50_s": statistics.median(r["latency_p50_s"] for r in mine),
                             "answers": [r["answers"] for r in mine]})  # fmt: skip
    finally:
        proc.terminate()  # SIGTERM: the server saves and exits
        proc.wait(60)
    return {"batch": batch, "rows": rows, "rounds": rounds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--users", default="1,4,8")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="rounds of asks per N (medians reported)")
    ap.add_argument("--memory", default="kv", choices=["kv", "text"],
                    help="the server's memory mode (text: answers from the prompt, through generate_text when batched)")  # fmt: skip
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    users = [int(x) for x in args.users.split(",")]
    modes = [run_mode(b, users, args.max_tokens, args.repeats, args.memory) for b in (False, True)]
    print("\nusers | one at a time tok/s | batched tok/s | ratio | p50 latency s (one / batched) | answers equal"
          " (medians of the rounds)")
    for a, b in zip(modes[0]["rows"], modes[1]["rows"], strict=True):
        pairs = [(x[u], y[u]) for x, y in zip(a["answers"], b["answers"], strict=True) for u in x]
        same = f"{sum(x == y for x, y in pairs)}/{len(pairs)}"
        print(f"{a['users']:5d} | {a['tokens_per_s']:19.1f} | {b['tokens_per_s']:13.1f} | "
              f"{b['tokens_per_s'] / a['tokens_per_s']:5.2f} | {a['latency_p50_s']:.2f} / {b['latency_p50_s']:.2f} | "
              f"{same}")  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps({"max_tokens": args.max_tokens, "repeats": args.repeats,
                                              "memory": args.memory, "modes": modes}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
