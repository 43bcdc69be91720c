"""Fixtures of the distributed tests: the tiny random Llama and the CLI fixture of the document QA tests,
the fake LLM of the CLI tests (`fake_llm`), and a real local Ray head node (`ray_cluster`).

How the cluster is started and stopped: `ray start --head --block` in a subprocess of its own
session (process group), bound to 127.0.0.1 on a free port, 2 CPUs, its own short --temp-dir, no
dashboard, no usage stats; it is ready when it prints "Ray runtime started". Stopping it sends
SIGTERM to that `ray start` (with --block it stops the processes it started), then SIGKILL to its
process group (the GCS, raylet and the workers it forked): only processes the test started, never
`ray stop`, which would stop every Ray cluster of the user on the machine. A subprocess rather than
`ray.init()` in the test process: the command under test connects from its own process (as a user's
would), and the workers import memllm from the PYTHONPATH given to the cluster.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.docqa.conftest import cli, tiny_llm, tiny_path  # noqa: F401
from tests.foundation.conftest import fake_llm  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_START_S = 90


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_group(proc: subprocess.Popen, grace_s: float = 20) -> None:
    """SIGTERM to `proc`, then SIGKILL to its process group (what it started) after `grace_s`."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


@pytest.fixture
def ray_cluster(isolated_home):
    """A local Ray head node (127.0.0.1, 2 CPUs) whose workers import this checkout's memllm and use
    this test's MEMLLM_HOME; yields its address."""
    pytest.importorskip("ray")
    ray_bin = Path(sys.executable).with_name("ray")
    if not ray_bin.exists():
        pytest.skip("the ray command is not installed beside this Python")
    temp = Path(tempfile.mkdtemp(prefix="mray", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), MEMLLM_HOME=str(isolated_home), RAY_USAGE_STATS_ENABLED="0")
    log = open(temp / "start.log", "wb")  # closed in the finally below
    proc = subprocess.Popen(
        [str(ray_bin), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--num-cpus=2", "--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats",
         "--object-store-memory=100000000", f"--temp-dir={temp}"],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=temp, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + CLUSTER_START_S
        while b"Ray runtime started" not in (temp / "start.log").read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("ray start failed:\n" + (temp / "start.log").read_text(errors="replace")[-3000:])
            time.sleep(0.5)
        yield f"127.0.0.1:{port}"
    finally:
        stop_group(proc)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)
