"""The RULER-style suite (memllm.bench.ruler) on a GPU: full attention, InfLLM's rule, the question
selector and the oracle, on haystacks built beforehand (issue 25).

Haystacks are built on the CPU machine (the data packages live there) and travel as gzipped JSON:
  python benchmarks/ruler_gpu.py build --tokenizer ~/.cache/memllm/models/qwen2.5-coder-0.5b/weights \
      --lengths 32k,128k,1m --questions 50 --out .gpu/suite_qwen.json.gz
On the device machine (model folder holding the GGUF):
  PYTHONPATH=/tmp/site:. python benchmarks/ruler_gpu.py run --model-dir /root/m --gguf qwen.gguf \
      --suite .gpu/suite_qwen.json.gz --lengths 32k,128k --systems full,infllm,question,oracle \
      --questions 24 --out $OUT/ruler.json
Prints a table last (per length, family and system: score, questions from memory, the share of them
whose gold units every layer read, mean per-layer gold recall); writes every answer to --out.
"""

from __future__ import annotations

import argparse
import gzip
import json
import platform
import sys
import time
from pathlib import Path

import torch

from memllm.bench import ruler, ruler_run
from memllm.bench.passkey import parse_length
from memllm.config import MemoryConfig


def build(args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    fams = args.families.split(",")
    suite = {}
    for n in (parse_length(x) for x in args.lengths.split(",")):
        t = time.time()
        hays = ruler.build_suite(tok, n, fams, args.questions, seed=args.seed)
        suite[str(n)] = [h.to_dict() for h in hays]
        print(f"{n}: {len(hays)} haystacks, {sum(len(h.questions) for h in hays)} questions, {time.time() - t:.1f}s")
    with gzip.open(args.out, "wt") as fh:
        json.dump(suite, fh)


def load_suite(paths: str) -> dict[str, list]:
    """Gzipped suites (`build`), comma-separated (lengths built separately) -> {length: haystacks as dicts}."""
    suite: dict[str, list] = {}
    for path in paths.split(","):
        with gzip.open(path, "rt") as fh:
            suite.update(json.load(fh))
    return suite


def subsample(hays: list[ruler.Haystack], per_family: int) -> list[ruler.Haystack]:
    """At most per_family questions of each family, taken haystack by haystack (whole reads first)."""
    taken: dict[str, int] = {}
    out = []
    for h in hays:
        qs = []
        for q in h.questions:
            if taken.get(q.family, 0) < per_family:
                taken[q.family] = taken.get(q.family, 0) + 1
                qs.append(q)
        if qs:
            out.append(ruler.Haystack(h.kind, h.length, h.seed, h.ids, qs))
    return out


def run(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from passkey_gpu import load_llm

    t = time.time()
    llm = load_llm(args.model_dir, args.gguf, args.gguf, args.weights_cache)
    print(f"model loaded in {time.time() - t:.1f}s", flush=True)
    suite = load_suite(args.suite)
    memory = MemoryConfig(n_local=args.n_local, topk=args.topk, block_size=args.block_size,
                          decode_graphs=not args.no_graphs, memory_distance=args.memory_distance)  # fmt: skip
    systems = args.systems.split(",")
    embedder = None
    if set(ruler_run.TEXT_SYSTEMS) & set(systems):
        from memllm.memory_stores.embeddings import SentenceTransformerEmbedder

        embedder = SentenceTransformerEmbedder(args.embedder, device="cuda", batch_size=128)  # as shared_embedder: fp16
    families = set(args.families.split(",")) if args.families else None
    memory_from = parse_length(args.memory_from) if args.memory_from else 0
    rows = []
    out_path = Path(args.out) if args.out else None
    for n in (parse_length(x) for x in args.lengths.split(",")):
        hays = [ruler.Haystack.from_dict(h) for h in suite[str(n)]]
        if families:
            hays = [ruler.Haystack(h.kind, h.length, h.seed, h.ids, [q for q in h.questions if q.family in families])
                    for h in hays]  # fmt: skip
            hays = [h for h in hays if h.questions]
        hays = subsample(hays, args.questions)
        # full attention where the model was trained that long; memory's systems where the stream is longer
        # than --memory-from (below the window they read what full attention reads: tests/context golden)
        sys_n = [s for s in systems if (n <= llm.trained_len if s == "full" else n >= memory_from)]
        t = time.time()
        torch.cuda.reset_peak_memory_stats()
        for h in hays:  # one haystack at a time, written after each: a timeout keeps what was measured
            rows += ruler_run.run(llm, [h], sys_n, memory, progress=lambda m: print(m, flush=True), embedder=embedder,
                                  log_scores=args.log_scores)
            if out_path:
                _write(out_path, {"env": env(args, memory, llm), "rows": rows})
            print(ruler_run.table(ruler_run.summary([r for r in rows if r["length"] == h.length])), flush=True)
        peak = torch.cuda.max_memory_allocated() / 2**30
        print(f"length {n}: {time.time() - t:.1f}s, peak GPU memory {peak:.3f} GiB (reads and questions)", flush=True)
    items = ruler_run.summary(rows)
    if out_path:
        _write(out_path, {"env": env(args, memory, llm), "summary": items, "rows": rows})
    print(json.dumps(env(args, memory, llm)))
    print(ruler_run.table(items))


def _write(path: Path, obj: dict) -> None:
    """JSON, gzipped when the name ends in .gz (--log-scores at 512K makes files the device cannot return)."""
    text = json.dumps(obj, default=str)
    if path.suffix == ".gz":
        with gzip.open(path, "wt") as fh:
            fh.write(text)
    else:
        path.write_text(text)


def env(args: argparse.Namespace, memory: MemoryConfig, llm) -> dict:
    import transformers
    import triton

    return {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "transformers": transformers.__version__, "triton": triton.__version__,
        "python": platform.python_version(), "command": " ".join(sys.argv),
        "memory": memory.resolved(llm.trained_len).to_dict(),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--tokenizer", required=True)
    b.add_argument("--lengths", default="32k,128k,1m")
    b.add_argument("--questions", type=int, default=50)
    b.add_argument("--families", default=",".join(ruler.FAMILIES))
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--out", required=True)
    r = sub.add_parser("run")
    r.add_argument("--model-dir", required=True)
    r.add_argument("--gguf", required=True)
    r.add_argument("--suite", required=True, help="one or more gzipped suites, comma-separated")
    r.add_argument("--lengths", default="32k")
    r.add_argument("--systems", default="full,infllm,question,oracle")
    r.add_argument("--families", default=None)
    r.add_argument("--questions", type=int, default=24, help="per family and length")
    r.add_argument("--n-local", type=int, default=4096)
    r.add_argument("--topk", type=int, default=16)
    r.add_argument("--block-size", type=int, default=128)
    r.add_argument("--memory-distance", type=int, default=None, help="MemoryConfig.memory_distance (default 512, or n_local if shorter)")
    r.add_argument("--no-graphs", action="store_true")
    r.add_argument("--memory-from", default=None, help="run memory's systems only at lengths >= this (e.g. 32k)")
    r.add_argument("--log-scores", action="store_true", help="hybrid rows keep both unit scores in full")
    r.add_argument("--embedder", default=None, help="sentence-transformers dir (default: the packaged MiniLM)")
    r.add_argument("--out", default=None)
    r.add_argument("--weights-cache", default=None, help="a folder: the loaded model saved there, loaded from there")
    args = ap.parse_args()
    build(args) if args.cmd == "build" else run(args)


if __name__ == "__main__":
    main()
