"""Property: no search, in any sequence of adds, deletes, searches and reopenings, made through two
handles on one store (so that each catches up with the other's writes), returns another namespace's
record; and a search asking for every record of a namespace returns exactly its live records."""

from __future__ import annotations

import tempfile

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memllm.memory_stores import FaissStore, FakeEmbedder, MemoryRecord

NAMESPACES = ("alice", "bob", "carol")
WORDS = ("dog", "cat", "paris", "tea", "blue", "piano", "rex", "lyon", "42", "birthday")

text = st.lists(st.sampled_from(WORDS), min_size=1, max_size=4).map(" ".join)
handle = st.integers(0, 1)
op = st.one_of(
    st.tuples(st.just("add"), handle, st.sampled_from(NAMESPACES), st.lists(text, min_size=1, max_size=4)),
    st.tuples(st.just("delete"), handle, st.sampled_from(NAMESPACES), st.integers(0, 10)),
    st.tuples(st.just("search"), handle, st.sampled_from(NAMESPACES), text),
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(op, min_size=1, max_size=25), reopen_at=st.integers(0, 25))
def test_search_never_crosses_namespaces(ops, reopen_at):
    emb = FakeEmbedder(dim=32)
    with tempfile.TemporaryDirectory() as tmp:
        stores = [FaissStore(tmp, emb, persist_min=1), FaissStore(tmp, emb, persist_min=1)]
        live: dict[str, set[str]] = {ns: set() for ns in NAMESPACES}
        try:
            for step, (kind, which, ns, arg) in enumerate(ops):
                if step == reopen_at:
                    stores[0].close()
                    stores[0] = FaissStore(tmp, emb, persist_min=1)
                store = stores[which]
                if kind == "add":
                    live[ns].update(store.add_many([MemoryRecord(t, namespace=ns) for t in arg]))
                elif kind == "delete" and live[ns]:
                    victim = sorted(live[ns])[arg % len(live[ns])]
                    assert store.delete([victim]) == 1
                    live[ns].discard(victim)
                elif kind == "search":
                    hits = store.search(arg, k=50, namespace=ns)
                    assert all(h.record.namespace == ns for h in hits)
                    assert {h.record.id for h in hits} == live[ns]
                    assert np.all(np.diff([h.score for h in hits]) <= 1e-6)
            for store in stores:
                for ns in NAMESPACES:
                    assert {r.id for r in store.list(ns)} == live[ns]
                    assert store.index_ids(ns) == store.record_seqs(ns)
        finally:
            for store in stores:
                store.close()
