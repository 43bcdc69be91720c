"""Issue 24, reproduced through the CLI: no user reads another's memory, no command destroys a file it
was not asked to write, memory limits hold before the memory is spent, kv chat memory survives.

Each test is one reproduction from the issue, run as a user would (CliRunner with the tiny random
Llama, or a child process where a real process is needed), asserting the fixed behaviour.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from memllm.cli.app import app
from memllm.paths import disk_key, keyed
from tests.security.conftest import ROOT, child, child_env

runner = CliRunner()
COLLIDING = ["a b", "a_b", "a/b", "a:b", "张三", "李四", "José", "Josè", "o'brien", "o brien", "x" * 300]
SECRET = "My secret code is 4711"


def chat(store: Path, user: str, model: Path, lines: list[str], *extra: str):
    res = runner.invoke(
        app,
        ["chat", "--user", user, "--store", str(store), "--memory", "kv", "--model", str(model),
         "--max-new-tokens", "4", "--json", *extra],
        input="".join(f"{line}\n" for line in lines),
    )  # fmt: skip
    return res


def kv_manifest(store: Path, user: str) -> dict:
    return json.loads((keyed(store / "kv", f"user:{user}") / "manifest.json").read_text())


# ---------------------------------------------------------------------------------------- 1. users
def test_colliding_names_never_share_a_kv_folder_and_never_read_each_other(cli, tiny_gguf, tmp_path):
    store = tmp_path / "mem"
    assert len({disk_key(f"user:{n}") for n in COLLIDING}) == len(COLLIDING)
    first = chat(store, "a b", tiny_gguf, [SECRET])
    assert first.exit_code == 0, first.output
    # (a question whose answer is not kept leaves nothing in the kv stream: a statement follows it)
    asked = ["What is my secret code?", "I like tea."]
    fresh = chat(tmp_path / "alone", "nobody", tiny_gguf, asked)
    alone = json.loads((next((tmp_path / "alone" / "kv").glob("*/manifest.json"))).read_text())["tokens"]
    for name in COLLIDING[1:]:
        res = chat(store, name, tiny_gguf, asked)
        assert res.exit_code == 0, res.output
        assert "4711" not in json.loads(res.stdout.splitlines()[0])["answer"]
        assert "kv memory of" not in res.stderr  # nothing restored: a new, empty kv memory
        # its kv stream holds its own turn only: as many tokens as a user alone in a fresh store
        assert kv_manifest(store, name)["tokens"] == alone, name
        assert kv_manifest(store, name)["namespace"] == f"user:{name}"
    assert fresh.exit_code == 0
    folders = [p for p in (store / "kv").iterdir() if p.is_dir()]
    assert len(folders) == len(COLLIDING)
    labels = {json.loads((p / "name.json").read_text())["name"] for p in folders}
    assert labels == {f"user:{n}" for n in COLLIDING}
    assert all(len(p.name) == 32 for p in folders)  # bounded: the 300-character name too
    # the first user's stream was never appended to by the others
    again = chat(store, "a b", tiny_gguf, ["and again"])
    assert "kv memory of a b: " in again.stderr and ", 1 turns" in again.stderr


# ---------------------------------------------------------------------------------------- 2. --save-memory
def test_save_memory_refuses_a_folder_it_did_not_write(cli, tiny_gguf, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text("The box is red.\n\nThe key is under the mat.\n")
    target = tmp_path / "out"
    (target / "store").mkdir(parents=True)
    (target / "store" / "important.txt").write_text("keep me")
    (target / "documents.json").write_text("mine")
    args = ["ask", str(doc), "--model", str(tiny_gguf), "--save-memory", str(target), "-q", "Where?"]
    res = runner.invoke(app, args)
    assert res.exit_code == 5
    assert res.stderr.count("\n") == 1 and "is not a memllm snapshot (it holds " in res.stderr
    assert (target / "store" / "important.txt").read_text() == "keep me"
    assert (target / "documents.json").read_text() == "mine"
    # a real document memory is replaced whole; a file memllm did not write inside it is refused
    saved = tmp_path / "saved"
    for mode in ("kv", "text"):
        ok = runner.invoke(app, [*args[:4], "--save-memory", str(saved), "--mode", mode, "-q", "Where?"])
        assert ok.exit_code == 0, ok.output
    assert json.loads((saved / "docqa.json").read_text())["mode"] == "text"
    (saved / "store" / "notes.txt").write_text("mine too")
    res = runner.invoke(app, [*args[:4], "--save-memory", str(saved), "-q", "Where?"])
    assert res.exit_code == 5 and "also holds store/notes.txt, which memllm did not write" in res.stderr
    assert (saved / "store" / "notes.txt").read_text() == "mine too"
    # a context snapshot is another kind
    ctx = tmp_path / "ctx"
    s = cli[str(tiny_gguf)].session()
    s.feed("hello there")
    s.save(ctx)
    res = runner.invoke(app, [*args[:4], "--save-memory", str(ctx), "-q", "Where?"])
    assert res.exit_code == 5 and "holds a memllm context memory snapshot (Session.save)" in res.stderr


# ---------------------------------------------------------------------------------------- 3. export
def test_export_never_touches_x_tmp_nor_writes_through_a_symlink(cli, tmp_path):
    store = str(tmp_path / "mem")
    assert runner.invoke(app, ["chat", "--user", "u", "--store", store], input="hello\n").exit_code == 0
    x = tmp_path / "x.jsonl"
    Path(f"{x}.tmp").write_text("the user's own x.tmp")
    res = runner.invoke(app, ["memory", "export", str(x), "--user", "u", "--store", store])
    assert res.exit_code == 0 and len(x.read_text().splitlines()) == 2
    assert Path(f"{x}.tmp").read_text() == "the user's own x.tmp"
    victim = tmp_path / "victim.txt"
    victim.write_text("untouched")
    y = tmp_path / "y.jsonl"
    Path(f"{y}.tmp").symlink_to(victim)
    assert runner.invoke(app, ["memory", "export", str(y), "--user", "u", "--store", store]).exit_code == 0
    assert victim.read_text() == "untouched" and Path(f"{y}.tmp").is_symlink()
    z = tmp_path / "z.jsonl"
    z.symlink_to(victim)
    res = runner.invoke(app, ["memory", "export", str(z), "--user", "u", "--store", store])
    assert res.exit_code == 6 and "is a symbolic link" in res.stderr and res.stderr.count("\n") == 1
    assert victim.read_text() == "untouched" and z.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == [
        "x.jsonl.tmp",
        "y.jsonl.tmp",
    ]


# ---------------------------------------------------------------------------------------- 4. limits
def _timed(cmd: list[str], stdin=None) -> tuple[subprocess.CompletedProcess, float]:
    env = child_env(Path(os.environ["MEMLLM_HOME"]))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "memllm.cli.app", *cmd], stdin=stdin, capture_output=True,
                          text=True, timeout=60, cwd=ROOT, env=env)  # fmt: skip
    return proc, time.perf_counter() - start


def test_dev_zero_and_endless_stdin_are_refused_at_once():
    proc, seconds = _timed(["ask", "/dev/zero", "-q", "x"])
    assert proc.returncode == 7 and proc.stdout == ""
    assert proc.stderr == (
        "error: /dev/zero looks binary (a NUL byte at offset 0), not text: give a .txt, .md, .html or .pdf file\n"
    )
    assert seconds < 3.0  # the interpreter's start included; measured 0.3 s
    with open("/dev/zero", "rb") as zero:
        proc, seconds = _timed(["ask", "-", "-q", "x"], stdin=zero)
    assert proc.returncode == 7 and proc.stderr.count("\n") == 1 and seconds < 3.0
    yes = subprocess.Popen(["yes", "an endless line of text"], stdout=subprocess.PIPE)
    try:
        proc, seconds = _timed(["ask", "-", "-q", "x"], stdin=yes.stdout)
    finally:
        yes.kill()
        yes.wait()
    assert proc.returncode == 8 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error: <stdin> is more than ") and "split the document" in proc.stderr
    assert seconds < 5.0  # reads up to the bound (at most 512 MiB, less under a smaller limit), no more


def test_kv_budget_is_checked_from_the_size_before_tokenising(cli, tiny_gguf, tmp_path, monkeypatch):
    from memllm import limits

    budget = limits.MemoryBudget(
        64 * 1024**2 + limits.RESERVE_BYTES, 4 * 1024**3, "container memory limit (cgroup v1)"
    )
    monkeypatch.setattr(limits, "memory_budget", lambda: budget)
    big = tmp_path / "big.txt"
    big.write_text("The quick brown fox jumps over the lazy dog. " * 40_000)  # 1.8 MB
    calls = []
    tok = cli[str(tiny_gguf)].tokenizer
    real = type(tok).__call__
    monkeypatch.setattr(
        type(tok),
        "__call__",
        lambda self, text, *a, **k: calls.append(len(text)) or real(self, text, *a, **k),
    )
    res = runner.invoke(app, ["ask", str(big), "--model", str(tiny_gguf), "-q", "x"])
    assert res.exit_code == 8 and res.stderr.count("\n") == 1
    assert "needs about" in res.stderr and "container memory limit (cgroup v1) of 4.00 GiB" in res.stderr
    assert max(calls) <= 65536  # only a sample was tokenised


def test_kv_chat_and_feed_stop_before_the_limit(cli, tiny_gguf, tmp_path, monkeypatch):
    from memllm import limits
    from memllm.errors import MemoryLimitError

    store = tmp_path / "mem"
    assert chat(store, "kim", tiny_gguf, ["hello"]).exit_code == 0
    budget = limits.MemoryBudget(
        limits.RESERVE_BYTES + 1000, 4 * 1024**3, "container memory limit (cgroup v2)"
    )
    monkeypatch.setattr(limits, "memory_budget", lambda: budget)
    res = chat(store, "kim", tiny_gguf, ["a turn that does not fit"])
    assert res.exit_code == 8 and res.stderr.splitlines()[-1].startswith("error: ")
    assert "container memory limit (cgroup v2) of 4.00 GiB" in res.stderr and "--memory text" in res.stderr
    assert kv_manifest(store, "kim")["extra"]["turns"] == 1  # the kv memory is kept as it was
    s = cli[str(tiny_gguf)].session()
    with pytest.raises(MemoryLimitError, match="more tokens of context memory"):
        s.feed("many words " * 10_000)
    assert s.cache.seen_tokens == 0


def test_overlong_chat_line_is_refused(cli, tmp_path):
    res = runner.invoke(app, ["chat"], input="y" * 70_000 + "\n")
    assert res.exit_code == 7 and "longer than 65,536 characters" in res.stderr


# ---------------------------------------------------------------------------------------- 5. kv snapshots
def test_torn_or_foreign_kv_snapshot_warns_and_rebuilds_from_text(cli, tiny_gguf, other_gguf, tmp_path):
    store = tmp_path / "mem"
    assert chat(store, "ann", tiny_gguf, ["first turn", "second turn"]).exit_code == 0
    folder = keyed(store / "kv", "user:ann")
    manifest = kv_manifest(store, "ann")
    assert manifest["extra"]["turns"] == 2 and manifest["fingerprint"]
    head = folder / next(f["name"] for f in manifest["files"] if f["kind"] == "head")
    head.write_bytes(head.read_bytes()[:-7])  # torn: a write cut short
    res = chat(store, "ann", tiny_gguf, ["third turn"])
    assert res.exit_code == 0, res.output
    warn = [line for line in res.stderr.splitlines() if "warning:" in line]
    assert (
        len(warn) == 1 and "does not match its checksum" in warn[0] and "rebuilding the kv memory" in warn[0]
    )
    assert kv_manifest(store, "ann")["extra"]["turns"] == 3  # 2 rebuilt from text + the new one
    res = chat(store, "ann", other_gguf, ["fourth turn"])  # same shapes, other weights
    warn = [line for line in res.stderr.splitlines() if "warning:" in line]
    assert res.exit_code == 0 and len(warn) == 1 and "was written with model" in warn[0]
    assert kv_manifest(store, "ann")["extra"]["turns"] == 4
    res = chat(store, "ann", other_gguf, ["fifth turn"])
    assert "warning" not in res.stderr and "4 turns" in res.stderr


def test_session_restore_refuses_torn_foreign_and_legacy_mismatched(cli, tiny_gguf, other_gguf, tmp_path):
    from memllm.errors import SnapshotError
    from memllm.session import Session

    llm, other = cli[str(tiny_gguf)], cli[str(other_gguf)]
    s = llm.session()
    s.feed("some text to remember " * 30)
    snap = s.save(tmp_path / "snap", namespace="user:ann")
    assert Session.restore(llm, snap).cache.seen_tokens == s.cache.seen_tokens
    with pytest.raises(SnapshotError, match="was written with model"):
        Session.restore(other, snap)
    with pytest.raises(SnapshotError, match="belongs to 'user:ann', not 'user:bob'"):
        Session.restore(llm, snap, namespace="user:bob")
    manifest = json.loads((snap / "manifest.json").read_text())
    manifest["layers"][0]["seen"] += 34  # the torn pair: manifest and state disagree
    (snap / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SnapshotError, match="is altered: the layers' seen differ"):
        Session.restore(llm, snap)
    manifest["layers"][0]["seen"] -= 34
    # a manifest changed by hand still names files with checksums: the head is checked, counts too
    manifest["files"][0]["sha256"] = "0" * 64
    (snap / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SnapshotError, match="torn or altered"):
        Session.restore(llm, snap)
    # `save` refuses a folder that is not a snapshot
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "a.txt").write_text("x")
    with pytest.raises(SnapshotError, match="not a memllm snapshot"):
        s.save(tmp_path / "mine")
    assert (tmp_path / "mine" / "a.txt").read_text() == "x"


def test_concurrent_kv_chats_of_one_user_wait_and_keep_every_turn(tiny_gguf, tmp_path):
    home, store = tmp_path / "home", str(tmp_path / "mem")
    base = ["chat", "--user", "u", "--store", store, "--memory", "kv", "--model", str(tiny_gguf),
            "--max-new-tokens", "3", "--json"]  # fmt: skip
    first = child(base, home)
    first.stdin.write("one from the first\n")
    first.stdin.flush()
    assert json.loads(first.stdout.readline())["user"] == "one from the first"
    second = child(base, home)
    second.stdin.write("one from the second\ntwo from the second\n")
    second.stdin.close()
    deadline = time.time() + 60
    line = ""
    while "waiting" not in line and time.time() < deadline:
        line = second.stderr.readline()
    assert "the kv memory of u is in use by another memllm process: waiting for it to finish" in line
    first.stdin.write("two from the first\n")
    first.stdin.close()
    assert first.wait(60) == 0 and second.wait(60) == 0
    assert len(second.stdout.read().splitlines()) == 2
    manifest = json.loads((keyed(Path(store) / "kv", "user:u") / "manifest.json").read_text())
    assert manifest["extra"]["turns"] == 4  # every turn of both, in one stream


# ---------------------------------------------------------------------------------------- 6. forget
def test_stale_index_temp_files_are_removed_at_open(cli, tmp_path):
    store = tmp_path / "mem"
    assert runner.invoke(app, ["chat", "--user", "u", "--store", str(store)], input="hi\n").exit_code == 0
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = store / "index" / f".{'a' * 32}.faiss.{dead.pid}.x1y2.tmp"
    stale.write_bytes(b"vectors of forgotten records")
    live = store / "index" / f".{'b' * 32}.faiss.{os.getpid()}.x1y2.tmp"
    live.write_bytes(b"a live writer's file")
    assert runner.invoke(app, ["memory", "list", "--user", "u", "--store", str(store)]).exit_code == 0
    assert not stale.exists() and live.exists()


def test_forget_says_when_another_reader_keeps_the_text(cli, tmp_path):
    store = tmp_path / "mem"
    runner.invoke(app, ["chat", "--user", "u", "--store", str(store)], input="my pin is XYZZY-314\n")
    listed = json.loads(
        runner.invoke(app, ["memory", "list", "--user", "u", "--store", str(store), "--json"]).stdout
    )
    rid = listed["records"][0]["id"]

    def on_disk() -> bool:
        return any(b"XYZZY-314" in p.read_bytes() for p in store.glob("memory.db*"))

    reader = sqlite3.connect(store / "memory.db", isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM records").fetchone()  # a chat in the middle of a read
    res = runner.invoke(app, ["memory", "forget", rid[:8], "--user", "u", "--store", str(store)])
    assert res.exit_code == 0 and res.stdout.startswith("forgot 1 record(s) of u; their text stays in ")
    assert "memory.db-wal until the other process" in res.stdout
    reader.execute("COMMIT")
    reader.close()
    rid2 = listed["records"][1]["id"]
    res = runner.invoke(app, ["memory", "forget", rid2[:8], "--user", "u", "--store", str(store)])
    assert res.stdout == "forgot 1 record(s) of u\n"
    assert not on_disk()


def test_sigterm_during_ask_removes_the_private_document_store(tiny_gguf, tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    doc = tmp_path / "doc.txt"
    doc.write_text("\n\n".join(f"Paragraph {i} says the box number {i} is blue." for i in range(3000)))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp / f"memllm-docqa-{dead.pid}-abc"
    (stale / "store").mkdir(parents=True)  # left by a process killed with -9
    proc = child(["ask", str(doc), "--mode", "text", "--model", str(tiny_gguf), "-q", "Which box?"],
                 tmp_path / "home", env={"TMPDIR": str(tmp)})  # fmt: skip
    deadline = time.time() + 60
    mine: list[Path] = []
    while not mine and time.time() < deadline and proc.poll() is None:
        mine = [p for p in tmp.glob(f"memllm-docqa-{proc.pid}-*") if (p / "store" / "memory.db").exists()]
        time.sleep(0.02)
    assert mine, proc.communicate()
    assert (mine[0].stat().st_mode & 0o777) == 0o700
    assert not stale.exists()  # removed when the new one was made
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 143
    assert not list(tmp.glob("memllm-docqa-*"))


# ---------------------------------------------------------------------------------------- 7. imports
def _export_lines(n: int, start: int = 0) -> list[dict]:
    return [{"id": f"{i:032x}", "text": f"record number {i}", "kind": "fact", "created_at": 1.7e9 + i}
            for i in range(start, start + n)]  # fmt: skip


def test_import_is_all_or_nothing_and_counts_what_it_stored(cli, tmp_path):
    store = str(tmp_path / "mem")
    rows = _export_lines(300)
    rows[290]["created_at"] = "Infinity"
    f = tmp_path / "bad.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = runner.invoke(app, ["memory", "import", str(f), "--user", "u", "--store", store])
    assert res.exit_code == 6 and "line 291 of the import" in res.stderr and "year 3000" in res.stderr
    assert (
        json.loads(runner.invoke(app, ["memory", "list", "--user", "u", "--store", store, "--json"]).stdout)[
            "count"
        ]
        == 0
    )
    rows = _export_lines(300)
    for i in range(260, 300):  # ids that repeat in the second batch of 256
        rows[i]["id"] = rows[i - 200]["id"]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = runner.invoke(app, ["memory", "import", str(f), "--user", "u", "--store", store])
    assert res.exit_code == 0 and res.stdout == "imported 300 record(s) for u\n"
    res = runner.invoke(app, ["memory", "import", str(f), "--user", "u", "--store", store])
    assert res.stdout == "imported 0 record(s) for u (300 already there)\n"
    big = tmp_path / "big.jsonl"
    big.write_text(json.dumps({"text": "w" * 300_000, "kind": "fact"}) + "\n")
    res = runner.invoke(app, ["memory", "import", str(big), "--user", "u", "--store", store])
    assert res.exit_code == 6 and "over the limit of 262,144" in res.stderr


def test_concurrent_imports_into_two_users_sharing_ids(tmp_path):
    store = str(tmp_path / "mem")
    f = tmp_path / "shared.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in _export_lines(300)))
    procs = [child(["memory", "import", str(f), "--user", u, "--store", store, "--json"], tmp_path / "home")
             for u in ("ann", "bob")]  # fmt: skip
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert sorted(json.loads(o[0])["imported"] for o in outs) == [300, 300]
