"""Issue 22: every bad input gets one clear line and an exit code, never a traceback; a full disk
loses nothing that was there; a torn kv memory can be rebuilt (`memllm memory repair`).

The cases listed in the issue are each a test; hypothesis then throws generated import rows, edited
snapshot manifests and CLI option values at the same commands.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from memllm.cli.app import app
from memllm.paths import keyed
from tests.security.conftest import ROOT, child_env

runner = CliRunner()
FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


def one_line_error(res, code: int) -> str:
    """The result failed with `code`, printed one line on stderr, and raised nothing but its exit."""
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert res.exit_code == code, (res.exit_code, res.output)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    return lines[0]


def no_traceback(res) -> None:
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output


# ---------------------------------------------------------------------------------------- saved memories
@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_llm, other_llm, tiny_gguf):
    """A document memory saved with --save-memory (kv mode), to copy and break."""
    from memllm.memory_stores.embeddings import FakeEmbedder

    root = tmp_path_factory.mktemp("hostile")
    doc = root / "doc.txt"
    doc.write_text("The red door is number 13. The blue door is number 7. " * 150)
    mp = pytest.MonkeyPatch()
    mp.setattr("memllm.cli.common.load_llm", lambda model, device, dtype=None: tiny_llm)
    mp.setattr("memllm.cli.common.load_embedder", lambda: FakeEmbedder(dim=64))
    try:
        res = runner.invoke(app, ["ask", str(doc), "--save-memory", str(root / "m"), "--mode", "kv"])
    finally:
        mp.undo()
    assert res.exit_code == 0, res.output
    return root / "m"


def _copy(saved: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(saved, dst)
    return dst


def _edit_manifest(folder: Path, fn) -> None:
    path = folder / "kv" / "manifest.json"
    manifest = json.loads(path.read_text())
    fn(manifest)
    path.write_text(json.dumps(manifest))


def _head(folder: Path) -> Path:
    return next((folder / "kv").glob("head-*.safetensors"))


def _rewrite_head_without(folder: Path, key: str) -> None:
    """Drop one tensor from the head file and fix its checksum in the manifest: altered, consistent."""
    from safetensors.torch import load_file, save_file

    from memllm.snapshot import file_sha256

    head = _head(folder)
    tensors = load_file(str(head))
    del tensors[key]
    save_file(tensors, str(head))

    def fix(m):
        entry = next(f for f in m["files"] if f["name"] == head.name)
        entry["sha256"], entry["bytes"] = file_sha256(head), head.stat().st_size

    _edit_manifest(folder, fix)


def _seen_everywhere(m: dict) -> None:
    """Every layer's seen and the token count moved together: the manifest agrees with itself, not with the
    tensors it names."""
    for layer in m["layers"]:
        layer["seen"] += 5
    m["tokens"] += 5


CORRUPTIONS = {
    "header too large": lambda d: _head(d).write_bytes(b"\xff" * 8 + b"{}"),
    "invalid header length": lambda d: _head(d).write_bytes(b"\x05\x00"),
    "empty file": lambda d: _head(d).write_bytes(b""),
    "missing file": lambda d: _head(d).unlink(),
    "missing tensor": lambda d: _rewrite_head_without(d, "layer0.local_k"),
    "fewer layers": lambda d: _edit_manifest(d, lambda m: m.update(layers=m["layers"][:1])),
    "seen huge": lambda d: _edit_manifest(d, lambda m: m["layers"][0].update(seen=10**30)),
    "seen a string": lambda d: _edit_manifest(d, lambda m: m["layers"][0].update(seen="12")),
    "seen off in one layer": lambda d: _edit_manifest(d, lambda m: m["layers"][0].update(seen=27)),
    "seen off in every layer": lambda d: _edit_manifest(d, _seen_everywhere),
    "cut false in every layer": lambda d: _edit_manifest(d, lambda m: [x.update(cut=False) for x in m["layers"]]),
    "cut a string": lambda d: _edit_manifest(d, lambda m: m["layers"][0].update(cut="true")),
    "files not a list": lambda d: _edit_manifest(d, lambda m: m.update(files={"a": 1})),
    "manifest torn": lambda d: (d / "kv" / "manifest.json").write_text('{"format": "memllm-con'),
    "document table wrong shape": lambda d: (d / "documents.json").write_text(json.dumps({"docs": [[1, 2]]})),
    "document ids not numbers": lambda d: (d / "documents.json").write_text(
        json.dumps([{**json.loads((d / "documents.json").read_text())[0], "ids": ["a"]}])
    ),
    "docqa.json torn": lambda d: (d / "docqa.json").write_text("[1, 2"),
    "docqa mode unknown": lambda d: (d / "docqa.json").write_text(
        json.dumps({**json.loads((d / "docqa.json").read_text()), "mode": "kvv"})
    ),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupt_saved_memory_is_refused_in_one_line(cli, saved, tmp_path, case):
    folder = _copy(saved, tmp_path)
    CORRUPTIONS[case](folder)
    line = one_line_error(runner.invoke(app, ["ask", "--memory", str(folder), "-q", "Which door?"]), 5)
    assert str(folder) in line


def test_the_saved_memory_answers_when_intact(cli, saved, tmp_path):
    res = runner.invoke(app, ["ask", "--memory", str(_copy(saved, tmp_path)), "-q", "Which door?"])
    assert res.exit_code == 0, res.output


@FUZZ
@given(field=st.sampled_from(["layers", "spec", "files", "tokens", "memory", "namespace", "fingerprint",
                              "generation", "extra", "version", "seen", "cut", "base", "units"]),
       value=JSON)  # fmt: skip
def test_fuzzed_manifests_never_give_a_traceback(cli, saved, tmp_path_factory, field, value):
    folder = _copy(saved, tmp_path_factory.mktemp("fuzz"))

    def edit(m):
        if field in ("seen", "cut", "base", "units"):
            m["layers"][0][field] = value
        else:
            m[field] = value

    _edit_manifest(folder, edit)
    res = runner.invoke(app, ["ask", "--memory", str(folder), "-q", "Which door?"])
    no_traceback(res)
    if res.exit_code != 0:
        one_line_error(res, 5)


# ---------------------------------------------------------------------------------------- imports
BAD_ROWS = {
    "id a list": {"id": [1], "text": "x"},
    "source a dict": {"text": "x", "source": {"a": 1}},
    "summary a list": {"text": "x", "summary": [1]},
    "text a list": {"text": ["x"]},
    "importance text": {"text": "x", "importance": "high"},
    "span of words": {"text": "x", "span": ["a", "b"]},
    "span of three": {"text": "x", "span": [1, 2, 3]},
    "metadata nested deep": {"text": "x", "metadata": json.loads('{"a":' * 200 + "1" + "}" * 200)},
    "metadata not JSON": {"text": "x", "metadata": {"a": float("inf")}},
    "created Infinity": {"text": "x", "created_at": "Infinity"},
    "created huge": {"text": "x", "created_at": 1e300},
    "kind a dict": {"text": "x", "kind": {"turn": 1}},
    "unknown field": {"text": "x", "colour": "red"},
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_import_rows_of_the_wrong_type_are_refused_in_one_line(cli, tmp_path, case):
    src = tmp_path / "rows.jsonl"
    good = {"text": "a good row first"}
    src.write_text(json.dumps(good) + "\n" + json.dumps(BAD_ROWS[case], allow_nan=True) + "\n")
    store = str(tmp_path / "s")
    line = one_line_error(runner.invoke(app, ["memory", "import", str(src), "--user", "u", "--store", store]), 6)
    assert "line 2" in line
    listed = runner.invoke(app, ["memory", "list", "--user", "u", "--store", store, "--json"])
    assert listed.exit_code == 0 and json.loads(listed.stdout)["records"] == []  # all or nothing


FIELDS = ["id", "namespace", "kind", "text", "summary", "importance", "created_at", "updated_at", "source",
          "span", "metadata", "content_hash"]  # fmt: skip
ROW = st.one_of(
    st.dictionaries(st.sampled_from(FIELDS), JSON | st.text(min_size=1, max_size=30), max_size=6),
    st.fixed_dictionaries(  # a row with text, most of whose other fields are plausible
        {"text": st.text(min_size=1, max_size=40)},
        optional={"kind": st.sampled_from(["turn", "fact", "chunk", "summary", "note"]),
                  "importance": st.floats(-1, 2) | JSON, "created_at": st.floats(-10, 4e10) | JSON,
                  "span": st.lists(st.integers(-5, 50), max_size=3), "summary": st.text(max_size=10) | JSON,
                  "metadata": st.dictionaries(st.text(max_size=5), JSON, max_size=3)},
    ),
)  # fmt: skip


@FUZZ
@given(rows=st.lists(ROW, min_size=1, max_size=3))
def test_fuzzed_import_rows_never_give_a_traceback(cli, tmp_path_factory, rows):
    tmp = tmp_path_factory.mktemp("rows")
    src = tmp / "rows.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    store = str(tmp / "s")
    res = runner.invoke(app, ["memory", "import", str(src), "--user", "u", "--store", store])
    no_traceback(res)
    if res.exit_code != 0:
        one_line_error(res, 6)
    listed = runner.invoke(app, ["memory", "list", "--user", "u", "--store", store, "--json"])
    assert listed.exit_code == 0, listed.output  # whatever was stored, it can be listed
    if res.exit_code != 0:
        assert json.loads(listed.stdout)["records"] == []  # all or nothing


# ---------------------------------------------------------------------------------------- options and names
OPTION_VALUES = st.one_of(st.integers(-(2**40), 2**40).map(str), st.text(max_size=12), st.just("1e9"))


@FUZZ
@given(
    cmd=st.sampled_from([
        ["memory", "list", "--limit"], ["memory", "search", "q", "--k"], ["memory", "show", "--user", "u"],
        ["chat", "--max-new-tokens"], ["chat", "--user"], ["chat", "--memory"], ["chat", "--memory-tokens"],
        ["ask", "-", "-q", "x", "--max-new-tokens"], ["ask", "-", "-q", "x", "--mode"],
    ]),
    value=OPTION_VALUES,
)  # fmt: skip
def test_fuzzed_cli_options_never_give_a_traceback(cli, tmp_path_factory, cmd, value):
    store = ["--store", str(tmp_path_factory.mktemp("opt") / "s")]
    args = [*cmd, value]
    if cmd[0] == "memory" and "--user" not in args:
        args += ["--user", "u"]
    if cmd[0] in ("memory", "chat"):
        args += store
    res = runner.invoke(app, args, input="hello\n")
    no_traceback(res)


def test_memory_config_typos_are_refused():
    from memllm.config import MemoryConfig
    from memllm.errors import ConfigError

    with pytest.raises(ConfigError, match="impl must be one of"):
        MemoryConfig(impl="fsat")
    with pytest.raises(ConfigError, match="lookup must be one of"):
        MemoryConfig(lookup="perhead")


# ---------------------------------------------------------------------------------------- full disk
def _limited(nbytes: int):
    def apply() -> None:  # in the child: writes past nbytes fail with EFBIG (the signal is ignored)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))

    return apply


def _run(args: list[str], home: Path, limit: int | None = None, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tests.security.cli_child", *args], cwd=ROOT, env=child_env(home), input=stdin,
        capture_output=True, text=True, timeout=300, preexec_fn=_limited(limit) if limit else None,
    )  # fmt: skip


def _stderr_error(proc: subprocess.CompletedProcess, code: int) -> str:
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def test_a_full_disk_gives_one_line_and_keeps_the_previous_memory(tiny_gguf, tmp_path):
    home, model = tmp_path / "home", str(tiny_gguf)
    doc = tmp_path / "doc.txt"
    doc.write_text("The red door is number 13. " * 400)
    target = tmp_path / "saved"
    first = _run(["ask", str(doc), "--model", model, "--save-memory", str(target)], home)  # also converts
    assert first.returncode == 0, first.stderr
    before = {p.name: p.read_bytes() for p in target.rglob("*") if p.is_file()}
    doc.write_text("The blue door is number 7. " * 800)
    proc = _run(["ask", str(doc), "--model", model, "--save-memory", str(target)], home, limit=20_000)
    line = _stderr_error(proc, 10)
    assert "could not write" in line and "File too large" in line and "the previous version is kept" in line
    assert {p.name: p.read_bytes() for p in target.rglob("*") if p.is_file()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".saved")]  # no half-written swap folder
    # a kv chat whose save fails: one line; the next run restores the last good snapshot
    chat = ["chat", "--user", "u", "--store", str(tmp_path / "s"), "--memory", "kv", "--model", model,
            "--max-new-tokens", "3"]  # fmt: skip
    assert _run(chat, home, stdin="hello there\n").returncode == 0
    proc = _run(chat, home, limit=60_000, stdin="my code is 4711 " * 20 + "\n")
    assert "could not write" in _stderr_error(proc, 10)
    again = _run(chat, home, stdin="and now?\n")
    assert again.returncode == 0 and "warning" not in again.stderr
    assert "kv memory of u: " in again.stderr and ", 1 turns" in again.stderr


# ---------------------------------------------------------------------------------------- repair
def test_memory_repair_rebuilds_a_torn_kv_memory_from_text(cli, tiny_gguf, tmp_path):
    store = str(tmp_path / "mem")
    chat = ["chat", "--user", "ann", "--store", store, "--memory", "kv", "--model", str(tiny_gguf),
            "--max-new-tokens", "3", "--json"]  # fmt: skip
    assert runner.invoke(app, chat, input="first turn\nsecond turn\n").exit_code == 0
    folder = keyed(Path(store) / "kv", "user:ann")
    for f in folder.glob("units-*.safetensors"):
        f.write_bytes(os.urandom(64))
    res = runner.invoke(app, ["memory", "repair", "--user", "ann", "--store", store, "--model", str(tiny_gguf)])
    assert res.exit_code == 0, res.output
    assert "rebuilt the kv memory of ann: 2 turns" in res.stdout
    res = runner.invoke(app, chat, input="third turn\n")
    assert res.exit_code == 0 and "warning" not in res.stderr and "2 turns" in res.stderr
    bad = runner.invoke(app, ["memory", "repair", "--user", "x" * 70_000, "--store", store])
    no_traceback(bad)


# ---------------------------------------------------------------------------------------- interrupted answers
def test_an_answer_interrupted_mid_forward_rolls_the_kv_stream_back(cli, tiny_gguf, tmp_path):
    """SIGTERM/Ctrl-C arrive inside a forward pass: the layers disagree until the turn is rolled back,
    and the half answer is neither kept in the kv stream, nor saved, nor stored as text."""
    from memllm.agents.chat import ChatAgent
    from memllm.memory_stores.embeddings import FakeEmbedder
    from memllm.memory_stores.faiss_store import FaissStore

    llm = cli[str(tiny_gguf)]
    store = FaissStore(tmp_path / "mem", FakeEmbedder(dim=64))
    agent = ChatAgent(llm, store, user="ann", memory="kv", max_new_tokens=4)
    agent.chat("first turn")
    seen, turns = agent.session.cache.seen_tokens, agent.kv_turns
    manifest = (agent.snapshot_path() / "manifest.json").read_text()
    real = agent.session.generate

    def cut_short(*args, **kwargs):
        gen = real(*args, **kwargs)
        yield next(gen)
        next(gen)  # one more step, then it is interrupted (as a signal would be)
        raise KeyboardInterrupt

    agent.session.generate = cut_short
    with pytest.raises(KeyboardInterrupt):
        agent.chat("second turn")
    del agent.session.generate
    assert agent.session.cache.seen_tokens == seen and agent.kv_turns == turns
    assert (agent.snapshot_path() / "manifest.json").read_text() == manifest
    roles = [r.metadata.get("role") for r in store.list("user:ann", filters={"kind": "turn"})]
    assert roles == ["user", "assistant", "user"]  # the question is kept, the half answer is not
    agent.chat("third turn")
    assert agent.kv_turns == turns + 1
    agent.close()
