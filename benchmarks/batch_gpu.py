"""Many memory sessions decoding at once on one GPU (issue 19, must-show 1), against full attention.

Usage (on the device machine, model folder holding the SmolLM2 GGUF and its tokenizer files):
  PYTHONPATH=/tmp/site:. python benchmarks/batch_gpu.py --model-dir /root/m --gguf smollm2.gguf \
      --out $OUT/batch.json
  python benchmarks/batch_gpu.py --quick --out /tmp/batch_quick.json   # CPU, tiny random Llama: the script's own test

What it measures, per length (default 32K and 128K tokens per session):
  * memllm: ONE session is read (prefill timed), then cloned N times (N = 1, 4, 16, 48): each clone
    its own window, sinks, unit index and unit count; the units already cut are shared read-only
    with the source (full host segments by reference, the last partial one copied), since decoding
    only appends units after them. The N clones decode together through memllm.engine.BatchEngine
    (one model call per step; impl "fast": steady sessions' attention stacked); after warm-up steps,
    `--steps` steps are timed: ms per step and tokens/s (N tokens per step). N = 1 is the engine's
    lone-session path (the session's own decode graph).
  * full attention: the model's own sdpa attention with transformers' DynamicCache, one sequence
    prefilled (timed) and its cache expanded to batch B; the largest B that fits is probed (start
    from free memory / bytes per sequence, shrink on torch.cuda.OutOfMemoryError) and timed, and
    the N above that fit too. Also at 8K for scale (SmolLM2's trained length is 8K: full attention
    at 32K/128K runs past it, so only its speed means anything there).
  * correctness on the device: the first batched step's logits of 4 clones (impl "fast" and
    "reference") against one clone stepped alone: max relative error and argmax agreement.
Prints a table last; writes everything to --out (JSON). Stops starting new work after --budget-s
seconds (default 430) so the whole run ends inside 500 s; what was skipped is recorded.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memllm.bench.passkey import depths, keys_for, parse_length, prompt_ids, sync  # noqa: E402
from memllm.compat import cache_kwargs  # noqa: E402
from memllm.config import MemoryConfig  # noqa: E402
from memllm.context import prefill  # noqa: E402
from memllm.context.attach import attach  # noqa: E402
from memllm.engine import BatchEngine  # noqa: E402
from memllm.session import Session  # noqa: E402

T0 = time.time()


def say(msg: str) -> None:
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


class QuickTokenizer:
    """Token ids as characters (the --quick model's vocabulary)."""

    eos_token_id = 0
    bos_token_id = None

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) % 512 for c in text]}

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(32 + i % 90) for i in ids)


class QuickLLM:
    """A tiny random-weight Llama on the CPU, fp32 (what --quick runs)."""

    def __init__(self) -> None:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)  # fmt: skip
        self.model = LlamaForCausalLM(cfg).eval()
        self.model.set_attn_implementation("sdpa")
        self.tokenizer = QuickTokenizer()
        self.name, self.device, self.dtype, self.trained_len = (
            "tiny-random-llama",
            torch.device("cpu"),
            torch.float32,
            512,
        )


def clone_session(src: Session, llm: Any, memory: MemoryConfig) -> Session:
    """A session in the state of `src`: its own sinks, window, scores, unit index and unit count;
    the units already cut shared read-only (full host segments by reference, the partial last one
    copied: decoding appends after it). Not a library feature: a rollback below the shared units
    would write into the source's segments (the benchmark never rolls back)."""
    dst = Session(llm, memory)
    for sl, dl in zip(src.cache.layers, dst.cache.layers, strict=True):
        sl.flush_scores()
        s, d = sl.store, dl.store
        full = s.n_units // s.segment_units
        segs = list(s.segments[:full])
        if full < len(s.segments):
            if s.pin:
                from memllm.context.pinned import default_host_alloc

                alloc = default_host_alloc()
                segs.append({k: alloc(tuple(v.shape), v.dtype).copy_(v) for k, v in s.segments[full].items()})
            else:
                segs.append({k: v.clone() for k, v in s.segments[full].items()})
        d.segments = segs
        d.version += 1
        d._repr = None if s._repr is None else s._repr.clone()
        d.n_units = s.n_units
        dl.sink_k, dl.sink_v = sl.sink_k.clone(), sl.sink_v.clone()
        dl.local_k, dl.local_v = sl.local_k.contiguous().clone(), sl.local_v.contiguous().clone()
        dl.local_score = sl.local_score.clone()
        dl.seen, dl.cut, dl.base, dl.deferred, dl.static_views = sl.seen, sl.cut, sl.base, None, False
    dst.last_logits = src.last_logits.clone()
    return dst


def memllm_decode(llm, src, memory, n, steps, warm, impl) -> dict:
    dev = src.cache.layers[0].device
    t = time.perf_counter()
    clones = [clone_session(src, llm, memory) for _ in range(n)]
    clone_s = time.perf_counter() - t
    engine = BatchEngine(llm, impl)
    for c in clones:
        engine.join(c, max_new_tokens=warm + steps, stop=set())
    for _ in range(warm):
        engine.step()
    sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    stacked0, rows0 = engine.stacked_rows, engine.batch_rows
    t = time.perf_counter()
    for _ in range(steps):
        engine.step()
    sync(dev)
    dt = time.perf_counter() - t
    row = {
        "system": f"memllm-{impl}", "sessions": n, "steps": steps, "ms_per_step": dt * 1000 / steps,
        "tokens_per_s": n * steps / dt, "stacked_share": (engine.stacked_rows - stacked0) / (n * steps) if n > 1 else None,
        "plain_rows_timed": (engine.batch_rows - rows0) - (engine.stacked_rows - stacked0) if n > 1 else None,
        "clone_s": clone_s,
        "peak_gpu_bytes": torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None,
        # a clone's units: the source's full segments by reference, its own copy of the partial one
        "host_bytes_referenced_per_clone": sum(lay.store.host_bytes() for lay in clones[0].cache.layers),
        "host_bytes_owned_per_clone": sum(
            lay.store.segment_bytes() for lay in clones[0].cache.layers if lay.store.n_units % lay.store.segment_units
        ),
    }  # fmt: skip
    for c in clones:
        c.close()
    del clones, engine
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return row


def correctness(llm, src, memory) -> dict:
    """The first batched step of 4 clones against one clone stepped alone (the same token)."""
    tok = int(src.last_logits.argmax())
    ref_s = clone_session(src, llm, memory)
    with attach(llm.model, cache=ref_s.cache):
        ref = prefill.step(llm.model, ref_s.cache, torch.tensor([[tok]])).float().cpu()
    out = {}
    for impl in ("fast", "reference"):
        clones = [clone_session(src, llm, memory) for _ in range(4)]
        engine = BatchEngine(llm, impl)
        rows = engine._feed(clones, [tok] * 4)
        errs = [float((r.float().cpu() - ref).abs().max() / ref.abs().max()) for r in rows]
        out[impl] = {"max_rel_err": max(errs), "argmax_equal": all(int(r.argmax()) == int(ref.argmax()) for r in rows),
                     "stacked_rows": engine.stacked_rows}  # fmt: skip
        for c in clones:
            c.close()
    ref_s.close()
    return out


def full_attention(llm, ids, ns, steps, warm, max_batch) -> list[dict]:
    """sdpa + DynamicCache: one sequence prefilled, its cache expanded to batch B."""
    from transformers import DynamicCache

    model = llm.model
    dev = next(model.parameters()).device
    x = torch.tensor([ids], device=dev)
    cache = DynamicCache(config=model.config)
    sync(dev)
    t = time.perf_counter()
    with torch.no_grad():
        logits = model(input_ids=x, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1).logits[
            :, -1
        ]
    sync(dev)
    prefill_s = time.perf_counter() - t
    kv = [(lay.keys, lay.values) for lay in cache.layers]  # (1, kv_heads, L, d) each
    per_seq = sum(k.numel() * k.element_size() * 2 for k, _ in kv)
    del cache, x
    tok = logits.argmax(dim=-1).view(1, 1)

    def greedy_step(ids: torch.Tensor, c: DynamicCache) -> torch.Tensor:
        """One full-attention decode step of the batch: the next greedy token of each row (B, 1)."""
        return model(input_ids=ids, **cache_kwargs(model, c), use_cache=True).logits[:, -1].argmax(-1, keepdim=True)

    def run(b: int) -> dict:
        c = DynamicCache(config=model.config)
        for i, (k, v) in enumerate(kv):
            c.update(k.expand(b, -1, -1, -1).contiguous(), v.expand(b, -1, -1, -1).contiguous(), i)
        ids_b = tok.expand(b, 1).contiguous()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        with torch.no_grad():
            for _ in range(warm):
                ids_b = greedy_step(ids_b, c)
            sync(dev)
            t = time.perf_counter()
            for _ in range(steps):
                ids_b = greedy_step(ids_b, c)
            sync(dev)
        dt = time.perf_counter() - t
        peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
        del c
        return {"system": "full-sdpa", "sessions": b, "steps": steps, "ms_per_step": dt * 1000 / steps,
                "tokens_per_s": b * steps / dt, "peak_gpu_bytes": peak, "prefill_s": prefill_s,
                "kv_bytes_per_sequence": per_seq}  # fmt: skip

    rows = []
    if dev.type == "cuda":
        free = torch.cuda.mem_get_info(dev)[0]
        b = max(1, min(max_batch, int(0.85 * free / per_seq)))
    else:
        b = max_batch
    largest = None
    tried = []
    while b >= 1:
        fits = True
        try:
            largest = run(b)
        except torch.cuda.OutOfMemoryError:
            fits = False  # freed below, once the exception (its traceback holds the cache) is gone
        if fits:
            break
        say(f"  full attention: batch {b} does not fit")
        tried.append(b)
        gc.collect()
        torch.cuda.empty_cache()
        b = int(b * 0.8) if b > 1 else 0
    if largest is not None:
        largest["largest_that_fits"] = True
        largest["batches_that_did_not_fit"] = tried
        rows.append(largest)
        for n in ns:
            if n < largest["sessions"]:
                rows.append(run(n))
    kv.clear()
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--gguf", default=None)
    ap.add_argument("--weights-cache", default=None)
    ap.add_argument("--lengths", default="32k,128k")
    ap.add_argument("--full-lengths", default="8k,32k,128k")
    ap.add_argument("--sessions", default="1,4,16,48")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--warm", type=int, default=3)
    ap.add_argument("--impl", default="fast")
    ap.add_argument("--max-full-batch", type=int, default=1024)
    ap.add_argument("--budget-s", type=float, default=430.0)
    ap.add_argument("--quick", action="store_true", help="CPU, tiny random Llama, short lengths")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    if args.quick:
        llm = QuickLLM()
        memory = MemoryConfig(n_init=4, n_local=48, block_size=8, repr_topk=2, topk=3, exc_block_size=8,
                              chunk_size=32, offload_dtype="fp32", selector="infllm")  # fmt: skip
        lengths, full_lengths = [300, 700], [300]
        ns = [1, 4, 8]
        steps, warm = min(args.steps, 6), min(args.warm, 2)
        make_ids = lambda n: torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(n)).tolist()  # noqa: E731
        max_full = 8
    else:
        sys.path.insert(0, str(Path(__file__).parent))
        from passkey_gpu import load_llm

        if not args.model_dir:
            ap.error("--model-dir is required (or --quick)")
        llm = load_llm(
            args.model_dir, args.gguf, "SmolLM2-135M-Instruct (GGUF dequantized, bf16)", args.weights_cache
        )
        memory = MemoryConfig(offload_dtype="bf16", selector="infllm")
        lengths = [parse_length(x) for x in args.lengths.split(",") if x.strip()]
        full_lengths = [parse_length(x) for x in args.full_lengths.split(",") if x.strip()]
        ns = [int(x) for x in args.sessions.split(",")]
        steps, warm = args.steps, args.warm
        make_ids = lambda n: prompt_ids(llm.tokenizer, n, depths(2)[1], keys_for(n, 2)[1])  # noqa: E731
        max_full = args.max_full_batch
    say(f"model ready: {llm.name}")
    resolved = memory.resolved(llm.trained_len)
    rows: list[dict] = []
    skipped: list[str] = []
    checks: dict[str, Any] = {}
    over = lambda: time.time() - T0 > args.budget_s  # noqa: E731
    for n_tok in lengths:
        if over():
            skipped.append(f"memllm at {n_tok}")
            continue
        ids = make_ids(n_tok)
        src = Session(llm, memory)
        dev = src.cache.layers[0].device
        sync(dev)
        t = time.perf_counter()
        src.feed_ids(ids)
        sync(dev)
        prefill_s = time.perf_counter() - t
        say(
            f"memllm read {n_tok:,} tokens in {prefill_s:.1f}s ({src.cache.layers[0].store.n_units} units per layer)"
        )
        # Clones of one state cut their units on the same step (all at once, each through its own
        # plain path): read up to the source's next cut first, so the timed steps cut nothing and
        # measure the steady step (cuts: one per block_size tokens per session; reported apart).
        until_cut = resolved.n_local + resolved.block_size - src.cache.layers[0].local_k.shape[1]
        extra = until_cut if src.cache.layers[0].cut and until_cut <= warm + steps + 1 else 0
        if extra:
            src.feed_ids(ids[1 : extra + 1])  # more of the same text
            say(f"read {extra} more tokens: the clones' next cut is {resolved.block_size} tokens away")
        if not checks:
            checks = correctness(llm, src, memory)
            checks["length"] = n_tok
            say(f"correctness (batched first step vs alone): {checks}")
        for n in ns:
            if over():
                skipped.append(f"memllm at {n_tok} x {n}")
                continue
            row = memllm_decode(llm, src, memory, n, steps, warm, args.impl)
            row.update(length=n_tok, prefill_s=prefill_s, extra_tokens_read=extra)
            rows.append(row)
            say(f"memllm {n_tok:,} x {n}: {row['ms_per_step']:.1f} ms/step, {row['tokens_per_s']:.0f} tok/s")
        src.close()
        del src
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    for n_tok in full_lengths:
        if over():
            skipped.append(f"full attention at {n_tok}")
            continue
        got = full_attention(llm, make_ids(n_tok), ns, steps, warm, max_full)
        for r in got:
            r["length"] = n_tok
            say(
                f"full {n_tok:,} x {r['sessions']}: {r['ms_per_step']:.1f} ms/step, {r['tokens_per_s']:.0f} tok/s"
            )
        rows += got
    env = {
        "device": torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": " ".join(sys.argv),
        "model": llm.name,
        "memory": resolved.to_dict(),
        "quick": args.quick,
        "wall_s": time.time() - T0,
        "skipped": skipped,
        "correctness": checks,
    }
    if args.out:
        Path(args.out).write_text(json.dumps({"env": env, "results": rows}, indent=1))
    print(json.dumps(env))
    print(f"{'system':16} {'length':>8} {'sessions':>8} {'ms/step':>9} {'tok/s':>9} {'peak GPU GiB':>13}")
    for r in rows:
        gpu = (r.get("peak_gpu_bytes") or 0) / 2**30
        mark = " (largest that fits)" if r.get("largest_that_fits") else ""
        print(f"{r['system']:16} {r['length']:>8} {r['sessions']:>8} {r['ms_per_step']:>9.2f} "
              f"{r['tokens_per_s']:>9.0f} {gpu:>13.3f}{mark}")  # fmt: skip


if __name__ == "__main__":
    main()
