"""FaissStore behaviour in one process: dedup, search equal to brute force, forget, export/import,
migrations, index rebuilds, errors that name the fix."""

from __future__ import annotations

import hashlib
import io
import json
import sqlite3
import subprocess

import numpy as np
import pytest

from memllm.errors import StoreError
from memllm.memory_stores import FaissStore, FakeEmbedder, IndexConfig, MemoryRecord, MemoryStore
from memllm.memory_stores.schema import SCHEMA_VERSION, migrate

from .conftest import child


def rec(text: str, ns: str = "alice", **kw) -> MemoryRecord:
    return MemoryRecord(text, namespace=ns, **kw)


def unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_store_satisfies_protocol(store):
    assert isinstance(store, MemoryStore)


def test_record_validation_names_the_fix():
    with pytest.raises(StoreError, match="non-empty text"):
        MemoryRecord("   ")
    with pytest.raises(StoreError, match="kind must be one of"):
        MemoryRecord("x", kind="note")  # type: ignore[arg-type]
    with pytest.raises(StoreError, match="importance must be between 0 and 1"):
        MemoryRecord("x", importance=2)
    with pytest.raises(StoreError, match="content_hash does not match"):
        MemoryRecord("x", content_hash="0" * 64)


def test_dedup_embeds_nothing_twice(store, embedder):
    facts = [rec("I have a dog named Rex", kind="fact"), rec("I have a dog   named Rex", kind="fact")]
    a = store.add_many([*facts, rec("I like tea", kind="fact")])
    assert a[0] == a[1] != a[2]
    assert embedder.calls == 2
    again = store.add(rec("I have a dog named Rex", kind="fact"))
    assert again == a[0] and embedder.calls == 2
    # the same text as a chunk is another record, but its embedding is reused
    chunk = store.add(rec("I have a dog named Rex", kind="chunk"))
    assert chunk != a[0] and embedder.calls == 2
    # in another namespace it is another record, embedded there (nothing is read across namespaces)
    assert store.add(rec("I have a dog named Rex", ns="bob", kind="fact")) != a[0] and embedder.calls == 3
    assert store.count("alice") == 3 and store.count() == 4


def test_turns_are_events_that_share_embeddings(store, embedder):
    """The same words said twice are two turns (both in the history), embedded once."""
    ids = store.add_many(
        [rec("yes", created_at=1.0), rec("what now?", created_at=2.0), rec("yes", created_at=3.0)]
    )
    assert len(set(ids)) == 3 and embedder.calls == 2
    assert store.add(rec("yes", created_at=4.0)) not in ids and embedder.calls == 2
    assert store.add(rec("yes", created_at=3.0)) == ids[2]  # the very same event: deduplicated
    assert [r.text for r in store.list("alice")] == ["yes", "what now?", "yes", "yes"]
    hits = store.search("yes", k=10, namespace="alice")
    assert len(hits) == 4 and {h.score for h in hits if h.record.text == "yes"} == {hits[0].score}


def test_round_trip_across_process_restart(tmp_path):
    path = tmp_path / "s"
    proc = child("ingest", str(path), "carol", "40", "7", "restart", stdout=subprocess.PIPE)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    ids = [line for line in out.splitlines() if line != "DONE"]
    assert len(ids) == 40
    with FaissStore(path, FakeEmbedder()) as s:
        assert [r.id for r in s.list("carol")] == ids
        r = s.get(ids[12])
        assert r is not None and r.text == "restart record 12 about topic12 and item12"
        assert s.search("restart record 12 item12", k=1, namespace="carol")[0].record.id == ids[12]
        assert s.index_ids("carol") == s.record_seqs("carol")
        s.update(ids[3], summary="short", importance=0.9, metadata={"role": "user"})
    proc = child("dump", str(path), "carol", stdout=subprocess.PIPE)
    dumped = json.loads(proc.communicate(timeout=60)[0])
    assert dumped["ids"] == ids and dumped["index"] == dumped["seqs"]
    with FaissStore(path, None) as s:  # no embedder: listing and getting still work
        r = s.get(ids[3])
        assert (r.summary, r.importance, r.metadata) == ("short", 0.9, {"role": "user"})
        with pytest.raises(StoreError, match="without an embedder: pass embedder"):
            s.search("x", namespace="carol")


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_search_equals_brute_force(tmp_path, kind):
    rng = np.random.default_rng(7)
    dim, n = 32, 1500
    cfg = IndexConfig(ivf_threshold=1000, ivf_nprobe=10_000)  # IVF probing every list is exact
    emb = FakeEmbedder(dim=dim)
    with FaissStore(tmp_path / "s", emb, index=cfg) as s:
        size = n if kind == "ivf" else 900
        vectors = unit(rng, size, dim)
        ids = s.add_many([rec(f"vec {i}") for i in range(size)], embeddings=vectors)
        s.add_many([rec(f"other {i}", ns="bob") for i in range(50)], embeddings=unit(rng, 50, dim))
        for q in unit(rng, 20, dim):
            got = s.search_vector(q, k=10, namespace="alice")
            scores = vectors @ q
            top = np.argsort(-scores, kind="stable")[:10]
            assert [r.record.id for r in got] == [ids[i] for i in top]
            np.testing.assert_allclose([r.score for r in got], scores[top], rtol=1e-5, atol=1e-5)
        assert s.stats().indexes["alice"]["kind"] == kind


def test_ivf_index_recall_and_filters(tmp_path):
    rng = np.random.default_rng(3)
    dim = 32
    centers = unit(rng, 40, dim)
    vectors = centers[rng.integers(0, 40, 3000)] + 0.05 * rng.standard_normal((3000, dim)).astype(np.float32)
    with FaissStore(tmp_path / "s", FakeEmbedder(dim=dim), index=IndexConfig(ivf_threshold=1000)) as s:
        ids = s.add_many(
            [rec(f"v{i}", kind="fact" if i % 3 == 0 else "turn") for i in range(3000)], embeddings=vectors
        )
        normed = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        hits = 0
        for i in rng.integers(0, 3000, 30):
            got = s.search_vector(normed[i], k=10, namespace="alice", filters={"kind": "fact"})
            assert all(r.record.kind == "fact" for r in got) and len(got) == 10
            truth = [j for j in np.argsort(-(normed @ normed[i])) if j % 3 == 0][:10]
            hits += len({r.record.id for r in got} & {ids[j] for j in truth})
        assert hits / 300 >= 0.9
        assert s.stats().indexes["alice"]["kind"] == "ivf"


def test_filters_and_listing(store):
    store.add_many(
        [
            rec("doc chunk one", kind="chunk", source="a.txt", span=(0, 13), created_at=100),
            rec("doc chunk two", kind="chunk", source="b.txt", span=(13, 26), created_at=200),
            rec("a turn about docs", created_at=300, metadata={"role": "user"}),
        ]
    )
    assert [r.text for r in store.list("alice", newest_first=True)][0] == "a turn about docs"
    assert [r.source for r in store.list("alice", filters={"kind": "chunk"})] == ["a.txt", "b.txt"]
    assert [
        r.created_at for r in store.list("alice", filters={"created_after": 100, "created_before": 300})
    ] == [200]
    assert [r.text for r in store.list("alice", filters={"metadata": {"role": "user"}})] == [
        "a turn about docs"
    ]
    assert [
        r.span
        for r in store.search("doc chunk", k=5, namespace="alice", filters={"source": "b.txt"})
        for r in [r.record]
    ] == [(13, 26)]
    assert len(store.list("alice", limit=1, offset=1)) == 1
    with pytest.raises(StoreError, match="unknown search filter.*use kind"):
        store.search("x", namespace="alice", filters={"author": "me"})


def test_forget_removes_from_sqlite_index_and_file(tmp_path, embedder):
    path = tmp_path / "s"
    with FaissStore(path, embedder) as s:
        ids = s.add_many([rec(f"secret number {i}") for i in range(20)])
        s.search("secret", namespace="alice")  # loads (and persists) the index
        victim = s.get(ids[5])
        before = s.index_ids("alice")
        assert s.delete([ids[5], "no-such-id"]) == 1
        assert s.get(ids[5]) is None
        assert len(s.index_ids("alice")) == len(before) - 1
        assert s.index_ids("alice") == s.record_seqs("alice")
        assert all(r.record.id != ids[5] for r in s.search(victim.text, k=20, namespace="alice"))
    # the index file on disk was rewritten without it: reopening does not rebuild, and lacks it
    with FaissStore(path, embedder) as s:
        assert s.index_ids("alice") == s.record_seqs("alice") and len(s.record_seqs("alice")) == 19
        assert s.rebuilds == []
    # secure_delete: the forgotten text is overwritten in the database file, not left in a free page
    raw = b"".join(p.read_bytes() for p in path.glob("memory.db*"))
    assert b"secret number 4" in raw and b"secret number 5" not in raw


def test_export_import_round_trip(tmp_path, embedder):
    with FaissStore(tmp_path / "a", embedder) as a:
        a.add_many(
            [
                rec("fact one", kind="fact", importance=0.9, metadata={"k": [1, 2]}),
                rec("chunk", kind="chunk", source="doc.pdf", span=(3, 9), summary="c"),
                rec("bob's", ns="bob"),
            ]
        )
        buf = io.StringIO()
        assert a.export_jsonl(buf, namespace="alice") == 2
        assert a.export_jsonl(tmp_path / "all.jsonl") == 3
        exported = {r.id: r.to_dict() for ns in ("alice", "bob") for r in a.list(ns)}
    with FaissStore(tmp_path / "b", FakeEmbedder(dim=64)) as b:
        ids = b.import_jsonl(tmp_path / "all.jsonl")
        assert {r.id: r.to_dict() for ns in ("alice", "bob") for r in b.list(ns)} == exported
        assert b.import_jsonl(tmp_path / "all.jsonl") == ids  # idempotent: nothing added twice
        assert b.count() == 3
        buf.seek(0)
        moved = b.import_jsonl(buf, namespace="dave")  # ids taken here: fresh ones
        assert set(moved).isdisjoint(ids) and b.count("dave") == 2
        assert b.search("fact one", k=1, namespace="dave")[0].record.text == "fact one"
        with pytest.raises(StoreError, match="line 1 .*memllm memory export"):
            b.import_jsonl(io.StringIO("{not json\n"))
        edited = json.loads((tmp_path / "all.jsonl").read_text().splitlines()[0])
        edited["text"] = "fact one, corrected"  # a hand-edited export: its content hash is recomputed
        [new] = b.import_jsonl(io.StringIO(json.dumps(edited) + "\n"))
        assert new != edited["id"] and b.get(new).text == "fact one, corrected"


def test_migration_from_version_1(tmp_path):
    path = tmp_path / "s"
    path.mkdir()
    conn = sqlite3.connect(path / "memory.db", isolation_level=None)
    assert migrate(conn, target=1) == 1
    emb = FakeEmbedder(dim=64)
    old = rec("written by an old memllm", created_at=5.0)
    conn.execute("INSERT INTO meta VALUES ('embedder', ?), ('dim', '64')", (emb.name,))
    conn.execute(
        "INSERT INTO records (id, namespace, kind, text, summary, importance, created_at, updated_at, "
        "content_hash, source, span_start, span_end, embedding) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
        (
            old.id,
            "alice",
            "turn",
            old.text,
            None,
            0.5,
            5.0,
            5.0,
            hashlib.sha256(f"turn\x00{old.text}".encode()).hexdigest(),  # v1's content hash
            None,
            None,
            None,
            emb.embed([old.text])[0].astype("<f4").tobytes(),
        ),
    )
    conn.execute("INSERT INTO namespaces VALUES ('alice', 1)")
    conn.close()
    with FaissStore(path, emb) as s:
        assert s.schema_version == SCHEMA_VERSION == 4
        got = s.get(old.id)
        assert got is not None and got.metadata == {} and got.text == old.text
        assert got.content_hash == old.content_hash  # recomputed by migration 4
        assert s.add(rec("written by an old memllm", created_at=6.0)) != old.id  # a new turn, same words
        assert s.search("old memllm", k=1, namespace="alice")[0].record.id == old.id
        s.add(rec("new", metadata={"x": 1}))
    conn = sqlite3.connect(path / "memory.db")
    conn.execute("UPDATE schema_version SET version = 99")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="newer than this memllm supports.*upgrade memllm"):
        FaissStore(path, emb)


def test_wrong_embedder_and_bad_paths_name_the_fix(tmp_path):
    FaissStore(tmp_path / "s", FakeEmbedder(dim=64)).close()
    with pytest.raises(StoreError, match="open it with the same embedder, or export it"):
        FaissStore(tmp_path / "s", FakeEmbedder(dim=32))
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="is a file: pass a directory"):
        FaissStore(tmp_path / "file", FakeEmbedder())
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "memory.db").write_bytes(b"this is no database" * 100)
    with pytest.raises(StoreError, match="not a memllm memory store"):
        FaissStore(bad, FakeEmbedder())


def test_corrupt_or_missing_index_file_is_rebuilt(tmp_path, embedder):
    path = tmp_path / "s"
    with FaissStore(path, embedder) as s:
        ids = s.add_many([rec(f"note {i} on subject{i}") for i in range(30)])
        s.search("note", namespace="alice")
    files = list((path / "index").glob("*.faiss"))
    assert len(files) == 1
    files[0].write_bytes(files[0].read_bytes()[:-40] + b"\0" * 40)
    with FaissStore(path, embedder) as s:
        assert s.search("note 7 subject7", k=1, namespace="alice")[0].record.id == ids[7]
        assert s.rebuilds == [("alice", f"index file {files[0]} does not match its recorded checksum")]
    files[0].unlink()
    with FaissStore(path, embedder) as s:
        assert s.index_ids("alice") == s.record_seqs("alice")
        assert "missing" in s.rebuilds[0][1]


def test_stale_index_catches_up_without_rebuild(tmp_path, embedder):
    path = tmp_path / "s"
    with FaissStore(path, embedder) as s:
        ids = s.add_many([rec(f"early {i}") for i in range(10)])
        s.search("early", namespace="alice")
        s.flush()
    # a second handle writes after the file was written (and never loads the index itself)
    w = FaissStore(path, embedder)
    late = w.add_many([rec(f"late {i}") for i in range(5)])
    w.delete([ids[0]])
    w._closed = True  # noqa: SLF001 -- simulate a process that dies without flushing
    w._conn.close()  # noqa: SLF001
    with FaissStore(path, embedder) as s:
        assert s.index_ids("alice") == s.record_seqs("alice") and len(s.record_seqs("alice")) == 14
        assert s.rebuilds == []  # caught up from SQLite, not rebuilt
        assert s.search("late 3", k=1, namespace="alice")[0].record.id == late[3]


def test_two_handles_see_each_others_writes(tmp_path, embedder):
    a = FaissStore(tmp_path / "s", embedder)
    b = FaissStore(tmp_path / "s", embedder)
    a.add(rec("apples are red"))
    assert b.search("apples", k=1, namespace="alice")[0].record.text == "apples are red"
    rid = b.add(rec("bananas are yellow"))
    assert a.search("bananas", k=1, namespace="alice")[0].record.id == rid
    a.delete([rid])
    assert all(r.record.id != rid for r in b.search("bananas", k=5, namespace="alice"))
    assert b.index_ids("alice") == b.record_seqs("alice")
    a.close()
    b.close()


def test_resolve_id_and_closed_store(store):
    rid = store.add(rec("hello there"))
    assert store.resolve_id(rid[:6]) == rid
    with pytest.raises(StoreError, match="memllm memory list"):
        store.resolve_id("zzzz")
    store.close()
    with pytest.raises(StoreError, match="is closed: open it again"):
        store.get(rid)


def test_hit_lookups_use_the_primary_key(store):
    """Fetching hits and catching up must not scan a namespace (a 100K-record namespace made that 26 ms)."""
    from memllm.memory_stores.faiss_store import BY_SEQ_SQL, CATCH_UP_SQL

    store.add_many([rec(f"row {i}") for i in range(50)])
    conn = store._conn  # noqa: SLF001
    conn.execute("ANALYZE")
    for sql, args in ((BY_SEQ_SQL.format(marks="?,?,?"), (1, 2, 3, "alice")), (CATCH_UP_SQL, (10, "alice"))):
        plan = " ".join(str(r[-1]) for r in conn.execute("EXPLAIN QUERY PLAN " + sql, args))
        assert "PRIMARY KEY" in plan and "records_ns" not in plan, plan
