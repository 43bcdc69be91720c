"""Child process for the multi-process store tests (run as a script, not collected by pytest).

python store_child.py ingest PATH NAMESPACE COUNT BATCH PREFIX   prints each id once its add returned
python store_child.py dump PATH NAMESPACE                        prints {"ids": [...], "index": [...]}
"""

from __future__ import annotations

import json
import sys

from memllm.memory_stores import FaissStore, FakeEmbedder, MemoryRecord


def ingest(path: str, namespace: str, count: int, batch: int, prefix: str) -> None:
    # persist_min=1: index files are rewritten often, so a kill can land in the middle of one
    store = FaissStore(path, FakeEmbedder(), persist_min=1, persist_fraction=0.0)
    for start in range(0, count, batch):
        records = [
            MemoryRecord(f"{prefix} record {i} about topic{i % 17} and item{i}", namespace=namespace)
            for i in range(start, min(count, start + batch))
        ]
        ids = store.add_many(records)
        print("\n".join(ids), flush=True)
        if (start // batch) % 5 == 0:
            store.search(f"{prefix} record {start}", k=3, namespace=namespace)  # keeps the index loaded
    store.close()
    print("DONE", flush=True)


def dump(path: str, namespace: str) -> None:
    store = FaissStore(path, FakeEmbedder())
    ids = [r.id for r in store.list(namespace)]
    print(
        json.dumps(
            {
                "ids": ids,
                "index": sorted(store.index_ids(namespace)),
                "seqs": sorted(store.record_seqs(namespace)),
            }
        )
    )
    store.close()


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    if mode == "ingest":
        ingest(args[0], args[1], int(args[2]), int(args[3]), args[4])
    elif mode == "dump":
        dump(args[0], args[1])
    else:
        raise SystemExit(f"unknown mode {mode!r}")
