"""`memllm serve --ray` on the CPU: start-up, the cost of the ingress hop, and a user's way back after their
replica is killed (issue 19).

Starts a local Ray head node (127.0.0.1, 2 CPUs) and `memllm serve --ray` with 2 replicas of the tiny
random Llama in kv memory (tests/distributed/serve_ray_fake.py), then `memllm serve` alone (the same
model, one process, one torch thread as each replica has) for comparison; sequential requests, so
latencies are per request, not throughput.
Everything it starts is stopped by pid (process groups). Writes JSON to stdout.

    PYTHONPATH=. python benchmarks/serve_ray_cpu.py > benchmarks/results/serve_ray_cpu.json
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.distributed.conftest import free_port, stop_group  # noqa: E402
from tests.foundation.tiny_gguf import write_tiny_llama_gguf  # noqa: E402

N = 20


def wait_for(path: Path, text: bytes, proc: subprocess.Popen, limit: float) -> float:
    t0 = time.monotonic()
    while text not in path.read_bytes():
        if proc.poll() is not None or time.monotonic() - t0 > limit:
            raise RuntimeError(path.read_text(errors="replace")[-3000:])
        time.sleep(0.1)
    return time.monotonic() - t0


def timed(fn, n: int = N) -> dict:
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        fn(i)
        times.append((time.perf_counter() - t0) * 1000)
    return {"p50_ms": round(statistics.median(times), 1), "max_ms": round(max(times), 1), "n": n}


def chat(http: httpx.Client, user: str, text: str) -> httpx.Response:
    r = http.post("/v1/chat/completions", json={"user": user, "max_tokens": 6,
                                                "messages": [{"role": "user", "content": text}]})
    r.raise_for_status()
    return r


def measure(base: str) -> dict:
    with httpx.Client(base_url=base, timeout=60) as http:
        chat(http, "warm", "hello")
        return {
            "healthz": timed(lambda i: http.get("/healthz").raise_for_status()),
            "memory_history": timed(lambda i: http.get("/v1/memory/warm/history").raise_for_status()),
            "chat_kv_6_tokens": timed(lambda i: chat(http, f"user{i % 4}", f"turn {i}: my cat is called Biscuit.")),
        }


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="mrb", dir="/tmp"))
    model = write_tiny_llama_gguf(work / "tiny.gguf", context=1024)
    env = dict(os.environ, PYTHONPATH=str(ROOT), MEMLLM_HOME=str(work / "home"), RAY_USAGE_STATS_ENABLED="0")
    ray_bin = Path(sys.executable).with_name("ray")
    port, http_port = free_port(), free_port()
    out: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "python": platform.python_version()}
    procs: list[subprocess.Popen] = []
    try:
        ray_log = work / "ray.log"
        with open(ray_log, "wb") as log:
            head = subprocess.Popen(
                [str(ray_bin), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
                 "--num-cpus=2", "--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats",
                 "--object-store-memory=100000000", f"--temp-dir={work / 'ray'}"],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=work, start_new_session=True)  # fmt: skip
        procs.append(head)
        out["ray_head_start_s"] = round(wait_for(ray_log, b"Ray runtime started", head, 90), 1)
        serve_log = work / "serve.log"
        with open(serve_log, "wb") as log:
            server = subprocess.Popen(
                [sys.executable, "-m", "tests.distributed.serve_ray_fake", "--ray", f"127.0.0.1:{port}",
                 "--replicas", "2", "--port", str(http_port), "--model", str(model), "--memory", "kv",
                 "--store", str(work / "store"), "--max-tokens", "6"],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)  # fmt: skip
        procs.append(server)
        out["serve_ray_start_s"] = round(wait_for(serve_log, b"memllm: serving on", server, 180), 1)
        base = f"http://127.0.0.1:{http_port}"
        out["ray_2_replicas"] = measure(base)
        with httpx.Client(base_url=base, timeout=60) as http:
            victim = chat(http, "victim", "My cat is called Biscuit.")
            replica = victim.headers["x-memllm-replica"]
            code = ("import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False, logging_level='ERROR'); "
                    "ray.kill(ray.get_actor(sys.argv[2], namespace='serve'), no_restart=True)")  # fmt: skip
            subprocess.run([sys.executable, "-c", code, f"127.0.0.1:{port}", replica], env=env, check=True,
                           timeout=60, capture_output=True)  # fmt: skip
            t0, tries = time.perf_counter(), 0
            while True:
                tries += 1
                r = http.post("/v1/chat/completions", json={"user": "victim", "max_tokens": 6,
                                                            "messages": [{"role": "user", "content": "And my cat?"}]})
                if r.status_code == 200:
                    break
                time.sleep(0.2)
            out["after_kill"] = {"first_answer_ms": round((time.perf_counter() - t0) * 1000, 1), "tries": tries,
                                 "moved": r.headers["x-memllm-replica"] != replica, "kv": r.json()["memllm"]["kv"]}
        server.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        out["serve_ray_exit_code"] = server.wait(timeout=60)
        out["serve_ray_stop_s"] = round(time.monotonic() - t0, 1)

        alone_log = work / "alone.log"
        alone_port = free_port()
        with open(alone_log, "wb") as log:
            alone = subprocess.Popen(
                [sys.executable, "-c", "import sys; from tests.distributed.serve_ray_fake import serve_alone; "
                 "serve_alone(sys.argv[1:])", "--port", str(alone_port), "--model", str(model), "--memory", "kv",
                 "--store", str(work / "store_alone"), "--max-tokens", "6"],
                stdout=log, stderr=subprocess.STDOUT, env={**env, "OMP_NUM_THREADS": "1"}, cwd=ROOT,
                start_new_session=True)  # fmt: skip  # one thread, as Ray gives each replica (its one CPU)
        procs.append(alone)
        t0 = time.monotonic()
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{alone_port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if alone.poll() is not None or time.monotonic() - t0 > 120:
                raise RuntimeError(alone_log.read_text(errors="replace")[-3000:])
            time.sleep(0.2)
        out["serve_alone_start_s"] = round(time.monotonic() - t0, 1)
        out["one_process"] = measure(f"http://127.0.0.1:{alone_port}")
    finally:
        for proc in reversed(procs):
            stop_group(proc, grace_s=10)
        shutil.rmtree(work, ignore_errors=True)
    json.dump(out, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
