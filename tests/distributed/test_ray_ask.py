"""`memllm ask --each` and `memllm ask --ray ADDRESS`: each document answered alone, locally or on Ray.

The fast tests run the command in this process (the tiny random Llama, the fake embedder, a fake
clock). The cluster test starts a real local Ray head node and runs the command twice in
subprocesses, with and without Ray, on 20 documents.

How the cluster is started and stopped: tests/distributed/conftest.py (`ray_cluster`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from memllm.cli.app import app
from memllm.cli.ask import render_answer
from tests.distributed.conftest import free_port
from tests.docqa.conftest import boxes_text, library_answers

ROOT = Path(__file__).resolve().parents[2]
QUESTIONS = ["What color is box 3?", "Which shelf is box 2 on?"]
RUN_S = 150
runner = CliRunner()


def write_docs(folder: Path, n: int) -> list[str]:
    """n small documents, each different (their boxes, colours and shelves)."""
    paths = []
    for i in range(n):
        path = folder / f"doc{i:02d}.txt"
        text = boxes_text(4 + i % 7).replace("shelf", ["shelf", "rack", "table"][i % 3])
        path.write_text(f"Inventory {i}.\n\n" + text)
        paths.append(str(path))
    return paths


def alone(llm, path: str, mode: str = "kv", memory=None):
    """The answers of one document read into a DocumentQA of its own (the library, no CLI)."""
    return library_answers(llm, mode, path, QUESTIONS, memory)


def without_seconds(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


@pytest.mark.parametrize("topk", [None, 2])  # the model's memory settings; --topk 2 changed in each memory
def test_each_answers_every_document_alone(cli, tiny_llm, tmp_path, topk):
    from dataclasses import replace

    from memllm.agents.docqa import default_memory

    docs = write_docs(tmp_path, 2)
    memory = None if topk is None else replace(default_memory(tiny_llm.trained_len), topk=topk)
    expected = {d: alone(tiny_llm, d, memory=memory) for d in docs}  # kv, the hybrid selector (the fake embedder)
    args = ["ask", *docs, "--each", "-q", QUESTIONS[0], "-q", QUESTIONS[1], *(["--topk", str(topk)] if topk else [])]
    as_json = runner.invoke(app, [*args, "--json"])
    assert as_json.exit_code == 0, as_json.output
    want = [{"document": d, **a.to_dict()} for d in docs for a in expected[d]]
    assert [json.loads(line) for line in as_json.stdout.splitlines()] == want  # the fake clock: 0.25 s each
    assert [f"memllm: answered {i}/2 documents" in as_json.stderr for i in (1, 2)] == [True, True]
    as_text = runner.invoke(app, args)
    assert as_text.exit_code == 0, as_text.output
    assert as_text.stdout == "".join(f"== {d} ==\n" + "".join(map(render_answer, expected[d])) for d in docs)
    assert cli == [("smollm2-135m", "auto")] * 2  # one model per run, not one per document


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--save-memory", "m"], "error: --each reads each document into a memory of its own: drop --memory/--save-memory\n"),
        (["--ray-workers", "2"], "error: --ray-workers applies with --ray ADDRESS\n"),
        (["--ray", "nonsense"], "error: --ray takes auto or HOST:PORT of a Ray cluster's head node, got 'nonsense'\n"),
    ],
)  # fmt: skip
def test_each_and_ray_refusals_are_one_line(cli, tmp_path, extra, message):
    if "--ray" in extra:
        pytest.importorskip("ray")
    (doc,) = write_docs(tmp_path, 1)
    result = runner.invoke(app, ["ask", doc, "--each", "-q", "x?", *extra])
    assert result.exit_code == 2
    assert result.stderr == message
    assert cli == []


def test_ray_not_installed_names_the_extra(cli, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    (doc,) = write_docs(tmp_path, 1)
    result = runner.invoke(app, ["ask", doc, "-q", "x?", "--ray", "auto"])
    assert result.exit_code == 2
    assert result.stderr == "error: --ray needs Ray: pip install 'memllm[ray]'\n"
    assert result.stdout == "" and cli == []


def test_ray_without_a_cluster_there_is_one_line(cli, tmp_path):
    pytest.importorskip("ray")
    (doc,) = write_docs(tmp_path, 1)
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    result = runner.invoke(app, ["ask", doc, "-q", "x?", "--ray", address])
    assert result.exit_code == 11
    assert result.stderr.startswith(f"error: no Ray cluster at {address} (")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert cli == []


# ----------------------------------------------------------------------------------- a real cluster
def _ask(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "memllm.cli.app", "ask", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=RUN_S)  # fmt: skip


@pytest.mark.ray
def test_ray_answers_as_each_does_on_20_documents(ray_cluster, tmp_path, isolated_home):
    from tests.foundation.tiny_gguf import write_tiny_llama_gguf

    model = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    docs = write_docs(tmp_path, 20)
    args = [*docs, "-q", QUESTIONS[0], "-q", QUESTIONS[1], "--model", str(model), "--device", "cpu",
            "--mode", "kv", "--selector", "question", "--topk", "2", "--json", "--max-new-tokens", "6"]  # fmt: skip
    # Ray gives each worker OMP_NUM_THREADS=1 (its one CPU): the run without Ray gets the same, so that
    # both do the same arithmetic whatever the machine's core count (it passes without this on 2 cores)
    env = dict(os.environ, PYTHONPATH=str(ROOT), MEMLLM_HOME=str(isolated_home), OMP_NUM_THREADS="1")
    local = _ask([*args, "--each"], env)
    assert local.returncode == 0, local.stderr
    on_ray = _ask([*args, "--ray", ray_cluster], env)
    assert on_ray.returncode == 0, on_ray.stderr
    local_records = [json.loads(line) for line in local.stdout.splitlines()]
    ray_records = [json.loads(line) for line in on_ray.stdout.splitlines()]
    assert [r["document"] for r in ray_records] == [d for d in docs for _ in QUESTIONS]
    for doc in docs:  # per document, in the documents' order
        mine = [r for r in ray_records if r["document"] == doc]
        assert without_seconds(mine) == without_seconds([r for r in local_records if r["document"] == doc])
    assert without_seconds(ray_records) == without_seconds(local_records)
    progress = [line for line in on_ray.stderr.splitlines() if line.startswith("memllm: answered ")]
    assert progress == [f"memllm: answered {i}/20 documents" for i in range(1, 21)]
    assert "memllm: 2 Ray worker(s), one CPU and one model each" in on_ray.stderr.splitlines()
    assert "Traceback" not in on_ray.stderr
    # a worker's failure comes back as memllm's one-line error, with its exit code; more workers than the
    # cluster's 2 CPUs are not started (they would wait forever)
    missing = _ask([*docs[:3], "-q", "x?", "--model", "no-such-model", "--ray", ray_cluster, "--ray-workers", "5"],
                   env)  # fmt: skip
    assert missing.returncode == 3, missing.stderr
    assert "memllm: 2 Ray worker(s), one CPU and one model each" in missing.stderr.splitlines()
    assert missing.stderr.splitlines()[-1].startswith("error: model 'no-such-model' not found")
    assert "Traceback" not in missing.stderr and missing.stdout == ""
