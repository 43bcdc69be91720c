"""FaissStore across processes: a writer killed with SIGKILL mid-ingest, and two concurrent writers."""

from __future__ import annotations

import json
import signal
import subprocess
import time

from memllm.memory_stores import FaissStore, FakeEmbedder

from .conftest import child


def test_sigkill_mid_ingest_keeps_every_returned_add(tmp_path):
    path = tmp_path / "s"
    proc = child("ingest", str(path), "dora", "20000", "10", "kill", stdout=subprocess.PIPE)
    returned: list[str] = []
    deadline = time.monotonic() + 60
    assert proc.stdout is not None
    while len(returned) < 1500 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        assert line, "the child died before the kill"
        returned.append(line.strip())
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    returned.extend(line.strip() for line in proc.stdout.read().splitlines())  # printed before the kill
    assert proc.returncode == -signal.SIGKILL and "DONE" not in returned
    assert len(returned) >= 1500
    with FaissStore(path, FakeEmbedder()) as s:
        stored = {r.id for r in s.list("dora")}
        assert set(returned) <= stored
        assert len(stored) - len(returned) < 10 + 1  # at most the batch whose add had not returned
        assert s.index_ids("dora") == s.record_seqs("dora")  # index caught up or rebuilt from SQLite
        for i in (0, 777, len(returned) - 1):
            text = s.get(returned[i]).text
            assert s.search(text, k=1, namespace="dora")[0].record.id == returned[i]


def test_two_processes_adding_concurrently_lose_nothing(tmp_path):
    path = tmp_path / "s"
    FaissStore(path, FakeEmbedder()).close()
    procs = [
        child("ingest", str(path), "eve", "400", "4", f"writer{w}", stdout=subprocess.PIPE) for w in (1, 2)
    ]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    ids = [[line for line in out.splitlines() if line != "DONE"] for out in outs]
    assert len(ids[0]) == len(ids[1]) == 400 and not set(ids[0]) & set(ids[1])
    proc = child("dump", str(path), "eve", stdout=subprocess.PIPE)
    dumped = json.loads(proc.communicate(timeout=60)[0])
    assert sorted(dumped["ids"]) == sorted(ids[0] + ids[1])
    assert dumped["index"] == dumped["seqs"] and len(dumped["seqs"]) == 800
