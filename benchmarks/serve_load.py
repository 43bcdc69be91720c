"""Load and kill -9 trials of `memllm serve` on loopback.

  python benchmarks/serve_load.py --clients 32 --seconds 120 --kills 10 [--fake] [--max-tokens 8] [--out F]

Load: N asyncio clients (httpx) mix chat completions and memory writes/searches for S seconds; counts
5xx, records p50/p95 per kind, then checks every acknowledged write (201 with an id) is in the store.
Kills: for each trial the server runs under load, gets SIGKILL at a random moment, is restarted on the
same store; every write acknowledged so far (load phase and earlier trials too) must be there exactly once
(no duplicate ids, no fact text stored twice). Clients do not retry, so a write killed before its answer
may or may not be stored; only acknowledged ones are checked.
--fake uses the fake LLM and embedder of the tests (tests/serve/serve_fake.py) instead of the default model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
MIX = ["chat", "stream", "add", "add", "add", "search", "search"]  # --mix changes it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SERVER_ARGS: list[str] = []  # --server-args: more options for `memllm serve`


def start(home: Path, port: int, fake: bool, max_tokens: int) -> subprocess.Popen:
    """The server on `home`/memory (the real model keeps the user's weight cache, $MEMLLM_HOME)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)} | ({"MEMLLM_HOME": str(home)} if fake else {})
    mod = ["-m", "tests.serve.serve_fake"] if fake else ["-m", "memllm.cli.app", "serve"]
    args = [sys.executable, *mod, "--port", str(port), "--max-tokens", str(max_tokens), "--max-concurrent", "256",
            "--store", str(home / "memory"), *SERVER_ARGS]
    proc = subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    raise SystemExit("server did not start in 180 s")


async def client(i: int, base: str, until: float, max_tokens: int, out: dict, tag: str) -> None:
    user = f"u{i % 8}"
    async with httpx.AsyncClient(base_url=base, timeout=300) as c:
        n = 0
        while time.monotonic() < until:
            n += 1
            kind = random.choice(MIX)
            t0 = time.monotonic()
            try:
                if kind == "chat":
                    r = await c.post("/v1/chat/completions", json={"user": user, "max_tokens": max_tokens,
                                     "messages": [{"role": "user", "content": f"client {i} says hello {n}"}]})
                elif kind == "stream":
                    body = {"user": user, "max_tokens": max_tokens, "stream": True,
                            "messages": [{"role": "user", "content": f"client {i} asks for a story {n}"}]}
                    async with c.stream("POST", "/v1/chat/completions", json=body) as r:
                        text = "".join([line async for line in r.aiter_lines()])
                    if r.status_code == 200 and not text.rstrip().endswith("data: [DONE]"):
                        out["torn_streams"] += 1
                elif kind == "add":
                    text = f"fact {tag}-{i}-{n}: client {i} likes number {n}"
                    r = await c.post(f"/v1/memory/{user}/records", json={"text": text})
                    if r.status_code == 201:
                        out["acked"].append((user, r.json()["id"], text))
                else:
                    r = await c.get(f"/v1/memory/{user}/search", params={"q": f"number {n}"})
            except httpx.HTTPError:
                out["conn_errors"] += 1  # expected while the server is killed
                await asyncio.sleep(0.2)
                continue
            out["lat"].setdefault(kind, []).append(time.monotonic() - t0)
            out["status"][r.status_code] = out["status"].get(r.status_code, 0) + 1


async def load(base: str, clients: int, seconds: float, max_tokens: int, tag: str) -> dict:
    """`clients` clients for `seconds`; `tag` makes this run's fact texts unique (the store merges equal facts)."""
    out: dict = {"acked": [], "lat": {}, "status": {}, "conn_errors": 0, "torn_streams": 0}
    t0 = time.monotonic()
    until = t0 + seconds
    await asyncio.gather(*(client(i, base, until, max_tokens, out, tag) for i in range(clients)))
    out["wall_s"] = time.monotonic() - t0  # past `seconds`: requests in flight at the end are finished
    return out


def check(base: str, acked: list) -> dict:
    """Every acknowledged write present with its text; no id or fact text stored twice (turns are events:
    the same words said twice are two turns, so only facts are checked for repeated text)."""
    missing = dup = 0
    for user in sorted({u for u, _, _ in acked}):
        resp = httpx.get(f"{base}/v1/memory/{user}/export", timeout=300)
        resp.raise_for_status()
        recs = resp.json()["records"]
        ids = [r["id"] for r in recs]
        facts = [r["text"] for r in recs if r["kind"] == "fact"]
        dup += len(ids) - len(set(ids)) + len(facts) - len(set(facts))
        have = {r["id"]: r["text"] for r in recs}
        missing += sum(1 for u, rid, text in acked if u == user and have.get(rid) != text)
    return {"acked": len(acked), "acked_ids_unique": len({rid for _, rid, _ in acked}) == len(acked),
            "missing": missing, "duplicated": dup}


def pct(xs: list[float], q: float) -> float:
    return round(statistics.quantiles(xs, n=100)[q - 1] * 1000, 1) if len(xs) > 1 else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--kill-seconds", type=float, default=8)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--fake", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--server-args", default="", help="more options for memllm serve, e.g. '--flash-tokens 512'")
    ap.add_argument("--mix", default="chat=1,stream=1,add=3,search=2", help="kind=weight,...")
    a = ap.parse_args()
    SERVER_ARGS[:] = a.server_args.split()
    MIX[:] = [k for part in a.mix.split(",") for k in [part.split("=")[0]] * int(part.split("=")[1])]
    random.seed(a.seed)
    home = Path(tempfile.mkdtemp(prefix="serve_load_"))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    result: dict = {"command": "python " + " ".join(sys.argv), "fake": a.fake, "clients": a.clients,
                    "max_tokens": a.max_tokens, "seed": a.seed, "mix": a.mix, "server_args": a.server_args, "cpus": os.cpu_count(),
                    "loadavg_before": [round(x, 2) for x in os.getloadavg()]}
    t0 = time.monotonic()
    proc = start(home, port, a.fake, a.max_tokens)
    result["start_s"] = round(time.monotonic() - t0, 1)
    acked: list = []
    try:
        out = asyncio.run(load(base, a.clients, a.seconds, a.max_tokens, "load"))
        acked += out["acked"]
        total = sum(out["status"].values())
        result["load"] = {"seconds": a.seconds, "wall_s": round(out["wall_s"], 1), "requests": total,
                          "per_s": round(total / out["wall_s"], 2),
                          "chats_per_s": round(sum(len(out["lat"].get(k, [])) for k in ("chat", "stream"))
                                               / out["wall_s"], 3),
                          "status": {str(k): v for k, v in sorted(out["status"].items())},
                          "five_xx": sum(n for s, n in out["status"].items() if s >= 500),
                          "conn_errors": out["conn_errors"], "torn_streams": out["torn_streams"],
                          "latency_ms": {k: {"n": len(v), "p50": pct(v, 50), "p95": pct(v, 95)}
                                         for k, v in sorted(out["lat"].items())},
                          **check(base, out["acked"])}
        print(json.dumps(result["load"]), flush=True)
        trials = []
        for t in range(a.kills):
            kill_at = random.uniform(1, a.kill_seconds)

            async def trial(kill_at: float = kill_at, proc: subprocess.Popen = proc, tag: str = f"kill{t}") -> dict:
                task = asyncio.ensure_future(load(base, a.clients, a.kill_seconds + 2, a.max_tokens, tag))
                await asyncio.sleep(kill_at)
                os.kill(proc.pid, signal.SIGKILL)
                return await task

            out = asyncio.run(trial())
            proc.wait()
            acked += out["acked"]
            t0 = time.monotonic()
            proc = start(home, port, a.fake, a.max_tokens)  # restart: the store must open
            restart_s = round(time.monotonic() - t0, 1)
            # every write acknowledged so far (load phase and all trials up to this one) must be there once
            trials.append({"trial": t, "kill_at_s": round(kill_at, 2), "restart_s": restart_s,
                           "acked_this_trial": len(out["acked"]),
                           "five_xx": sum(n for s, n in out["status"].items() if s >= 500),
                           **check(base, acked)})
            print(json.dumps(trials[-1]), flush=True)
        result["kills"] = trials
        result["kills_summary"] = {
            "trials": len(trials), "restarted": len(trials),
            "acked_total": len(acked), "missing_total": sum(x["missing"] for x in trials),
            "duplicated_total": sum(x["duplicated"] for x in trials),
            "five_xx_total": sum(x["five_xx"] for x in trials)}
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
    result["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    text = json.dumps(result, indent=1)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
