"""Text memory store benchmark: add throughput (real MiniLM embeddings included) and search latency at
10K, 100K and 1M records, on this machine's CPU.

What it does, exactly:
1. Takes `--real` record texts and `--queries` query texts from the utterances of the chitchat-dataset
   package (real human dialogue; distinct, >= 5 words, shuffled with a fixed seed). The real
   all-MiniLM-L6-v2 embedder (packaged, offline) embeds them all.
2. Add throughput, embeddings included: the `--real` records through `FaissStore.add_many` in batches of
   `--batch` (records/s), then `--single` records through `add` one at a time (the chat case).
3. For each size N: a fresh store holds the real records with their real embeddings plus N - real
   "filler" records whose vectors are real embeddings plus Gaussian noise (cosine ~0.78 to their
   parent; `--filler random` uses uniform random unit vectors instead), all in one namespace, ingested
   with precomputed embeddings (store-only records/s). The first search builds the index from SQLite
   (flat below 50K vectors, IVF above; build time reported). Then search latency over the embedded
   queries: `search_vector` (index + SQLite fetch of the hits; p50/p95/p99, k=10) and `search` from
   text (MiniLM query embedding included), recall@10 of the store against exact brute force over all
   N vectors, and the time to reopen the store and answer a first search (index file read + checksum).

    python benchmarks/store_bench.py --sizes 10000,100000,1000000 --out benchmarks/results/store_bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sqlite3
import time
from pathlib import Path

import numpy as np

from memllm.memory_stores import FaissStore, MemoryRecord, SentenceTransformerEmbedder


def chitchat_utterances(seed: int) -> list[str]:
    """Distinct utterances of at least 5 words from the chitchat-dataset package (real human dialogue),
    shuffled with `seed`."""
    from chitchat_dataset import Dataset  # pip install chitchat-dataset (MIT; bundled JSON, no download)

    seen: set[str] = set()
    out = []
    for conv in Dataset().values():
        for message in conv["messages"]:
            for utterance in message:
                text = " ".join(utterance["text"].split())
                if len(text.split()) >= 5 and text.lower() not in seen:
                    seen.add(text.lower())
                    out.append(text)
    order = np.random.default_rng(seed).permutation(len(out))
    return [out[i] for i in order]


def pct(samples: list[float]) -> dict[str, float]:
    ms = np.array(samples) * 1000.0
    return {p: round(float(np.percentile(ms, q)), 3) for p, q in (("p50", 50), ("p95", 95), ("p99", 99))}


def stored_vectors(path: Path, dim: int) -> np.ndarray:
    conn = sqlite3.connect(path / FaissStore.DB_NAME)
    blobs = [r[0] for r in conn.execute("SELECT embedding FROM records ORDER BY seq")]
    conn.close()
    return np.frombuffer(b"".join(blobs), dtype="<f4").reshape(len(blobs), dim).copy()


def bench_adds(
    work: Path, emb: SentenceTransformerEmbedder, texts: list[str], batch: int, extra: list[str]
) -> dict:
    path = work / "adds"
    shutil.rmtree(path, ignore_errors=True)
    store = FaissStore(path, emb)
    emb.embed(texts[:8])  # load the model outside the timing
    start, cpu = time.perf_counter(), time.process_time()
    for i in range(0, len(texts), batch):
        store.add_many([MemoryRecord(t, namespace="bench", kind="turn") for t in texts[i : i + batch]])
    batched, batched_cpu = time.perf_counter() - start, time.process_time() - cpu
    times = []
    for t in extra:
        s = time.perf_counter()
        store.add(MemoryRecord(t, namespace="single"))
        times.append(time.perf_counter() - s)
    store.close()
    return {
        "batched_records": len(texts),
        "batch": batch,
        "batched_s": round(batched, 2),
        "batched_records_per_s": round(len(texts) / batched, 1),
        # CPU seconds this process got: on a shared machine, records per CPU-second shows the cost
        # independently of how much of the CPU other processes took
        "batched_cpu_s": round(batched_cpu, 2),
        "batched_records_per_cpu_s": round(len(texts) / batched_cpu, 1),
        "single_records": len(extra),
        "single_records_per_s": round(len(extra) / sum(times), 1),
        "single_add_ms": pct(times),
    }


def bench_size(
    work: Path,
    emb,
    size: int,
    texts: list[str],
    real: np.ndarray,
    queries: list[str],
    qvec: np.ndarray,
    filler: str,
    seed: int,
) -> dict:
    path = work / f"s{size}"
    shutil.rmtree(path, ignore_errors=True)
    rng = np.random.default_rng(seed)
    dim = real.shape[1]
    n_real = min(size, len(texts))
    store = FaissStore(path, emb)
    ingest_s = 0.0
    chunk = 10_000
    vectors = np.empty((size, dim), np.float32)
    vectors[:n_real] = real[:n_real]
    for start in range(0, size, chunk):
        stop = min(size, start + chunk)
        if stop <= n_real:
            batch_texts, batch_vecs = texts[start:stop], real[start:stop]
        else:
            lo = max(start, n_real)
            if filler == "random":
                noise = rng.standard_normal((stop - lo, dim)).astype(np.float32)
            else:
                parents = real[rng.integers(0, len(real), stop - lo)]
                noise = parents + 0.8 * rng.standard_normal((stop - lo, dim)).astype(np.float32) / np.sqrt(
                    dim
                )
            noise /= np.linalg.norm(noise, axis=1, keepdims=True)
            vectors[lo:stop] = noise
            batch_texts = texts[start:n_real] + [
                f"filler record {i} {rng.integers(1 << 30)}" for i in range(lo, stop)
            ]
            batch_vecs = vectors[start:stop]
        records = [
            MemoryRecord(t, namespace="bench", created_at=1.7e9 + i) for i, t in enumerate(batch_texts, start)
        ]
        s = time.perf_counter()
        store.add_many(records, embeddings=batch_vecs)
        ingest_s += time.perf_counter() - s
    s = time.perf_counter()
    store.search_vector(qvec[0], k=10, namespace="bench")  # first search: builds the index from SQLite
    build_s = time.perf_counter() - s
    kind = store.stats().indexes["bench"]["kind"]
    for q in qvec[:10]:  # warm-up
        store.search_vector(q, k=10, namespace="bench")
    lat, hits = [], []
    for q in qvec:
        s = time.perf_counter()
        res = store.search_vector(q, k=10, namespace="bench")
        lat.append(time.perf_counter() - s)
        hits.append([r.record.created_at - 1.7e9 for r in res])  # created_at encodes the row number
    truth = np.concatenate(
        [np.argpartition(-(vectors @ qvec[i : i + 50].T), 10, axis=0)[:10].T for i in range(0, len(qvec), 50)]
    )
    recall = float(
        np.mean([len(set(np.round(h).astype(int)) & set(t)) / 10 for h, t in zip(hits, truth, strict=True)])
    )
    e2e = []
    for text in queries[:50]:
        s = time.perf_counter()
        store.search(text, k=10, namespace="bench")
        e2e.append(time.perf_counter() - s)
    store.close()
    s = time.perf_counter()
    store = FaissStore(path, emb)
    store.search_vector(qvec[1], k=10, namespace="bench")
    reopen_s = time.perf_counter() - s
    rebuilt = bool(store.rebuilds)
    store.close()
    disk = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    shutil.rmtree(path, ignore_errors=True)
    return {
        "records": size,
        "real_embedded_records": n_real,
        "filler": filler if size > n_real else None,
        "ingest_records_per_s_precomputed": round(size / ingest_s, 1),
        "index_kind": kind,
        "index_build_s": round(build_s, 2),
        "search_vector_ms": pct(lat),
        "search_text_ms": pct(e2e),
        "recall_at_10_vs_exact": round(recall, 4),
        "reopen_first_search_s": round(reopen_s, 2),
        "reopen_rebuilt_index": rebuilt,
        "disk_mb": round(disk / 1e6, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000,1000000", help='"" measures adds only')
    ap.add_argument("--real", type=int, default=10_000, help="records embedded with the real model")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--single", type=int, default=100)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--filler", choices=["perturbed", "random"], default="perturbed")
    ap.add_argument("--workdir", default="/tmp/memllm-store-bench")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import faiss
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    emb = SentenceTransformerEmbedder()
    utterances = chitchat_utterances(seed=1)
    texts = utterances[: args.real]
    queries = utterances[args.real : args.real + args.queries]
    single = utterances[args.real + args.queries : args.real + args.queries + args.single]
    result: dict = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "faiss_threads": faiss.omp_get_max_threads(),
            "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        },
        "embedder": {"name": emb.name, "precision": None},
        "texts": f"chitchat-dataset utterances of >= 5 words: {len(texts)} records, {len(queries)} queries",
    }
    result["adds"] = bench_adds(work, emb, texts, args.batch, single)
    result["embedder"]["precision"] = emb.precision
    print(json.dumps(result, indent=1), flush=True)
    real = stored_vectors(work / "adds", emb.dim)[: len(texts)]
    qvec = emb.embed(queries)
    result["sizes"] = []
    for size in (int(s) for s in args.sizes.split(",") if s):
        r = bench_size(work, emb, size, texts, real, queries, qvec, args.filler, seed=size)
        result["sizes"].append(r)
        print(json.dumps(r, indent=1), flush=True)
    result["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    shutil.rmtree(work / "adds", ignore_errors=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["machine"]))


if __name__ == "__main__":
    main()
