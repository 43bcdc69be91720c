"""Passkey on a GPU: plain full attention (sdpa) and memllm context memory, in one run (issue 3).

Usage (on the device machine, model folder holding the SmolLM2 GGUF and its tokenizer files):
  PYTHONPATH=/tmp/site:. python benchmarks/passkey_gpu.py --model-dir /root/m --gguf smollm2.gguf \
      --full 4k,8k --lengths 8k,32k,128k --depths 10 --out $OUT/passkey.json
Prints a table last (prefill and decode: medians over a length's trials); writes every trial to --out.
`--sync-check 32k` reads that length once more with torch.cuda.set_sync_debug_mode("error") over 3
steady prefill chunks (graph replays; one feed_ids call of host ids, uploaded by prefill.upload) and, after 3 tokens (which warm up and capture the decode graph),
over 10 decode steps: any host synchronisation in them raises.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from memllm.bench.passkey import depths, keys_for, parse_length, prompt_ids, run_memllm, run_passkey
from memllm.config import TEXT_SELECTORS, MemoryConfig


class DeviceLLM:
    def __init__(self, model, tokenizer, name: str):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.trained_len = model.config.max_position_embeddings

    def stop_ids(self) -> list[int]:
        ids = {self.tokenizer.eos_token_id}
        for tok in ("<|im_end|>", "<|endoftext|>"):
            tid = self.tokenizer.convert_tokens_to_ids(tok)
            if isinstance(tid, int) and tid != self.tokenizer.unk_token_id:
                ids.add(tid)
        return sorted(i for i in ids if i is not None)


def load_llm(model_dir: str, gguf: str | None, name: str, cache: str | None = None) -> DeviceLLM:
    """The model on the GPU in bf16 with sdpa attention. A GGUF is dequantized on the CPU (with its
    tokenizer ~47-52 s a call for the 0.5B model on the device machine, run 50): with `cache`, the first
    call saves the loaded model there (weights_cache.save: a model loaded from a GGUF, its logits'
    fingerprint) and later calls on the same (warm) machine load it from there, checked against it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(Path(__file__).parent))
    import weights_cache

    if weights_cache.ready(cache):
        model, tok = weights_cache.load(cache, torch.bfloat16)
    else:
        kw = {"gguf_file": gguf} if gguf else {}
        tok = AutoTokenizer.from_pretrained(model_dir, **kw)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, **kw)
        if cache:
            why = weights_cache.save(model, tok, cache)
            if why:
                print(f"weights not cached: {why}", flush=True)
    model = model.cuda().eval()
    model.set_attn_implementation("sdpa")
    return DeviceLLM(model, tok, name)


def lengths(text: str) -> list[int]:
    return [parse_length(x) for x in text.split(",") if x.strip()]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--gguf", default=None)
    ap.add_argument("--full", default="4k,8k")
    ap.add_argument("--lengths", default="8k,32k,128k,512k,1m")
    ap.add_argument("--depths", type=int, default=10)
    ap.add_argument("--offload-dtype", default="bf16")
    ap.add_argument("--int8", default="", help="lengths to run again with int8 units (accuracy cost)")
    ap.add_argument("--sync-check", default=None)
    ap.add_argument("--only", default=None, help="comma-separated depth indices (0..depths-1) for memllm")
    ap.add_argument("--memory-distance", type=int, default=None, help="MemoryConfig.memory_distance (default 512, or n_local if shorter)")
    ap.add_argument("--n-local", type=int, default=None, help="MemoryConfig.n_local (default: the model's)")
    ap.add_argument("--topk", type=int, default=None, help="MemoryConfig.topk (default 16)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--selector", default=None, help="also ask after the read through this selector (config.SELECTORS)")
    ap.add_argument("--selector-lengths", default=None, help="lengths for --selector (default: --lengths)")
    ap.add_argument("--embedder", default=None, help="sentence-transformers dir for a --selector that reads the text index (hybrid, lexical)")
    ap.add_argument("--weights-cache", default=None, help="a folder: the loaded model saved there, loaded from there")
    args = ap.parse_args()

    t = time.time()
    llm = load_llm(args.model_dir, args.gguf, "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized, bf16)", args.weights_cache)
    model, tok = llm.model, llm.tokenizer
    print(f"model loaded in {time.time() - t:.1f}s", flush=True)
    window = {k: v for k, v in (("n_local", args.n_local), ("topk", args.topk)) if v is not None}
    memory = MemoryConfig(offload_dtype=args.offload_dtype, memory_distance=args.memory_distance, **window)
    say = lambda m: print(m, flush=True)  # noqa: E731
    results = []
    if args.full:
        results += run_passkey(llm, lengths(args.full), args.depths, system="full", progress=say)
    sync = None
    if args.sync_check:
        n = parse_length(args.sync_check)
        ids = prompt_ids(tok, n, depths(2)[1], keys_for(n, 2)[1])
        run_memllm(llm, ids, memory)  # warm-up (kernels compiled, pinned memory cached)
        from memllm.context import attach
        from memllm.context.prefill import greedy
        from memllm.session import Session

        s = Session(llm, memory)
        g = None
        try:
            # Prefill: all but the last 4 chunks, then 3 chunks under the check (by then the steady
            # chunk's graph is captured: these are replays), then the rest.
            chunk = s.cache.config.chunk_size
            ids_host = torch.tensor(ids)  # host ids, as users feed them (prefill.upload moves them)
            m = (len(ids) // chunk - 4) * chunk
            s.cache.reserve(len(ids))  # the index's final size now: no growth (a new capture) later
            s.feed_ids(ids_host[:m])
            torch.cuda.synchronize()
            before = s.cache.decode_graph().counters()
            t0 = time.perf_counter()
            torch.cuda.set_sync_debug_mode("error")
            s.feed_ids(ids_host[m : m + 3 * chunk])
            torch.cuda.set_sync_debug_mode(0)
            torch.cuda.synchronize()
            prefill_ms = (time.perf_counter() - t0) * 1000 / 3
            checked = s.cache.decode_graph().counters()
            s.feed_ids(ids_host[m + 3 * chunk :])
            torch.cuda.synchronize()
            with attach(model, cache=s.cache):
                # The first eligible tokens warm up and capture the decode graph (capture synchronises
                # once per graph); the check covers the steps after it.
                _, logits = greedy(model, s.cache, s.last_logits, 3)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                torch.cuda.set_sync_debug_mode("error")
                greedy(model, s.cache, logits, 10)
                torch.cuda.set_sync_debug_mode(0)
                torch.cuda.synchronize()
                steady_ms = (time.perf_counter() - t0) * 100
            g = s.cache.decode_graph()
            sync = {
                "length": n,
                "prefill_host_syncs": "none: set_sync_debug_mode('error') raised nothing in 3 chunks",
                "steady_prefill_ms_per_chunk": prefill_ms,
                "prefill_chunk": chunk,
                "replays_in_check": checked["replays"] - before["replays"],
                "decode_host_syncs": "none: set_sync_debug_mode('error') raised nothing in 10 steps",
                "steady_decode_ms_per_token": steady_ms,
                "graph": None if g is None else g.counters(),
            }
        except RuntimeError as exc:
            sync = {"length": n, "host_syncs": f"FOUND: {str(exc).splitlines()[0]}"}
        finally:
            torch.cuda.set_sync_debug_mode(0)
        print("sync check:", sync, flush=True)
        del (
            s,
            g,
        )  # their memory (the session; the graph's buffers and pool) must not count in the trials' peak
        import gc

        gc.collect()
        torch.cuda.empty_cache()
    only = [int(x) for x in args.only.split(",")] if args.only else None
    results += run_passkey(
        llm, lengths(args.lengths), args.depths, memory=memory, system="memllm", progress=say, only=only
    )
    if args.selector:  # the question asked after the read, as `ask` asks it (peak memory includes the index)
        embedder = None
        if args.selector in TEXT_SELECTORS:  # they read the units' text index (MiniLM windows)
            from memllm.memory_stores.embeddings import SentenceTransformerEmbedder

            embedder = SentenceTransformerEmbedder(args.embedder, device="cuda", batch_size=128)  # as shared_embedder: fp16
        results += run_passkey(
            llm, lengths(args.selector_lengths or args.lengths), args.depths, memory=memory,
            system=f"ask:{args.selector}", progress=say, selector=args.selector, embedder=embedder,
        )  # fmt: skip
    if args.int8:
        int8 = MemoryConfig(offload_dtype="int8")
        results += run_passkey(llm, lengths(args.int8), args.depths, memory=int8, system="int8", progress=say)
    rows = [r.summary() for r in results]
    import transformers
    import triton

    env = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "command": " ".join(sys.argv),
        "memory": memory.resolved(llm.trained_len).to_dict(),
        "sync_check": sync,
    }
    if args.out:
        Path(args.out).write_text(json.dumps({"env": env, "results": rows}, indent=1))
    print(json.dumps(env))
    print(
        f"{'system':12} {'length':>8} {'acc':>6} {'prefill tok/s':>14} {'decode ms/tok':>14} {'peak GPU GiB':>13} {'host B/tok':>11}"
    )
    for r in rows:
        tps = r["prefill_tokens_per_s"] or 0
        dec = r["decode_ms_per_token"] or 0
        gpu = (r["peak_gpu_bytes"] or 0) / 2**30
        host = (r["host_bytes"] or 0) / max(r["length"] - 10, 1)
        print(
            f"{r['system']:12} {r['length']:>8} {r['correct']:>3}/{r['trials']:<2} {tps:>14,.0f} {dec:>14.2f} {gpu:>13.3f} {host:>11,.0f}"
        )


if __name__ == "__main__":
    main()
