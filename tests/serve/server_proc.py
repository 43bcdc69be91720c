"""Start and stop a `memllm serve` process for tests: 127.0.0.1, a free port, bounded waits, stopped by pid."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], *, fake: bool, env: dict[str, str] | None = None, timeout: float = 120) -> tuple[
        subprocess.Popen, str]:
    """Run `memllm serve ARGS --port P` (the fake model and embedder when `fake`); wait for /healthz."""
    port = free_port()
    mod = ["-m", "tests.serve.serve_fake"] if fake else ["-m", "memllm.cli.app", "serve"]
    proc = subprocess.Popen([sys.executable, *mod, *args, "--port", str(port)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.3)
    stop(proc)
    raise RuntimeError(f"memllm serve did not answer /healthz within {timeout} s (exit {proc.returncode})")


def stop(proc: subprocess.Popen, timeout: float = 15) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout` seconds."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=timeout)
