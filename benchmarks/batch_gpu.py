"""Many memory sessions decoding at once on one GPU (issue 19, must-show 1), against full attention.

Usage (on the device machine, model folder holding the SmolLM2 GGUF and its tokenizer files):
  PYTHONPATH=/tmp/site:. python benchmarks/batch_gpu.py --model-dir /root/m --gguf smollm2.gguf \
      --out $OUT/batch.json
  python benchmarks/batch_gpu.py --quick --out /tmp/batch_quick.json   # CPU, tiny random Llama: the script's own test
  ... --device-cache 32   # each memllm row also with the device unit cache (32 units per layer and KV head)

What it measures, per length (default 32K and 128K tokens per session):
  * memllm: ONE session is read (prefill timed), then cloned N times (N = 1, 4, 16, 48): each clone
    its own window, sinks, unit index and unit count; the units already cut are shared read-only
    with the source (full host segments by reference, the last partial one copied), since decoding
    only appends units after them. The N clones decode together through memllm.engine.BatchEngine
    (one model call per step; impl "fast": steady sessions' attention stacked); after warm-up steps,
    `--steps` steps are timed: ms per step and tokens/s (N tokens per step). N = 1 is the engine's
    lone-session path (the session's own decode graph).
  * full attention: the model's own sdpa attention, one sequence prefilled (timed) and its cache
    expanded to batch B, decoded by the loop transformers' generate() runs (model call with the
    cache, greedy token), with each cache kind of --full-caches: "dynamic" (DynamicCache, what
    generate() uses by default: each step concatenates every layer's keys and values, a copy of
    the whole cache per step) and "static" (StaticCache, generate(cache_implementation="static"):
    written in place, but attention runs over the whole preallocated length under a mask). The
    largest B that fits is probed (start from free memory / bytes per sequence, shrink on
    torch.cuda.OutOfMemoryError) and timed, and the N above that fit too. Also at 8K for scale
    (SmolLM2's trained length is 8K: full attention at 32K/128K runs past it, so only its speed
    means anything there). Full attention runs first (--order), in a process nothing else ran in.
  * where a step's time goes, every timed row: before each step the previous one is waited for
    (the step begins with a host read of the last logits anyway), so `host_ms_per_step` is the time
    the host spends issuing a step (including any synchronisation inside it) and `wait_ms_per_step`
    the time the device still needed after that (host_share = host / (host + wait): near 1, the
    host bounds the step); `syncs_per_step`: synchronising CUDA calls in one more step
    (torch.cuda.set_sync_debug_mode warnings; memllm's own token read is one);
    `gpu_busy_ms_per_step`: the device time of the kernels and copies of --profile-steps more steps
    (torch.profiler), and from the same profile `profile`: kernel launches per step, the kernels with
    the most device time and the host ops with the most own host time; `host_us_per_launch`: a tiny
    kernel's launch cost measured just before, the host's speed at that moment (if it differs between rows, the process, not the code, changed).
  * correctness on the device: the first batched step's logits of 4 clones (impl "fast" and
    "reference") against one clone stepped alone: max relative error and argmax agreement.
  * `--device-cache N` (MemoryConfig.device_unit_cache, max_cached_blocks N; context/unit_cache.py):
    every memllm row runs twice, without and with the device unit cache (system "memllm-<impl>+cacheN"),
    in the same process; the cached rows report the unit cache's hit rate over the timed steps (and the
    steps after them), misses per step and the host bytes those misses read per step, and the first
    batched step with the cache is checked against a clone stepped alone without it ("fast+cache").
Prints a table last; writes everything to --out (JSON). Stops starting new work after --budget-s
seconds (default 430) so the whole run ends inside 500 s; what was skipped is recorded.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import platform
import sys
import time
import warnings
from dataclasses import replace
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


def host_probe(dev: torch.device, n: int = 2000) -> float:
    """Microseconds the host takes to issue one tiny kernel (an in-place add on one element), now."""
    x = torch.zeros(1, device=dev)
    sync(dev)
    t = time.perf_counter()
    for _ in range(n):
        x.add_(1)
    sync(dev)
    return (time.perf_counter() - t) * 1e6 / n


def timed_steps(step, steps: int, dev: torch.device) -> dict:
    """`steps` calls of step(), each after waiting for the one before: ms per step, and how much of
    it the host spent issuing the step vs. waiting for the device afterwards."""
    host = wait = 0.0
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        t = time.perf_counter()
        sync(dev)
        t1 = time.perf_counter()
        step()
        wait, host = wait + t1 - t, host + time.perf_counter() - t1
    t = time.perf_counter()
    sync(dev)
    wait += time.perf_counter() - t
    dt = time.perf_counter() - t0
    return {"ms_per_step": dt * 1000 / steps, "host_ms_per_step": host * 1000 / steps,
            "wait_ms_per_step": wait * 1000 / steps, "host_share": host / max(host + wait, 1e-12)}  # fmt: skip


def syncs_in(step, dev: torch.device) -> int | None:
    """Synchronising CUDA calls made by one step() (torch.cuda.set_sync_debug_mode warnings)."""
    if dev.type != "cuda":
        return None
    sync(dev)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def gpu_busy_ms(step, steps: int, dev: torch.device) -> tuple[float | None, dict | None]:
    """Device time (kernels and copies) per step() over `steps` steps, from torch.profiler, and where
    the time goes per step: the kernels with the most device time, the host ops with the most own
    host time and the kernel launches (runtime calls named *LaunchKernel*)."""
    if dev.type != "cuda" or steps < 1:
        return None, None
    from torch.profiler import ProfilerActivity, profile

    sync(dev)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        sync(dev)
    total, kernels, host, launches = 0.0, [], [], 0
    for evt in prof.key_averages():
        if getattr(evt, "device_type", None) == torch.autograd.DeviceType.CUDA:
            t = getattr(evt, "self_device_time_total", getattr(evt, "self_cuda_time_total", 0))
            total += t
            kernels.append((t, evt.key, evt.count))
        else:
            if "LaunchKernel" in evt.key:
                launches += evt.count
            host.append((evt.self_cpu_time_total, evt.key, evt.count))
    def top(rows):
        return [{"name": k[:120], "ms_per_step": round(t / 1000 / steps, 3), "calls_per_step": round(c / steps, 1)}
                for t, k, c in sorted(rows, reverse=True)[:25]]  # fmt: skip

    where = {"launches_per_step": launches / steps, "kernels": top(kernels), "host_ops": top(host)}
    return total / 1000 / steps, where


def where_time_goes(step, steps: int, dev: torch.device, profile_steps: int) -> dict:
    """timed_steps, then syncs_in one more step and gpu_busy_ms of profile_steps more."""
    row = {"host_us_per_launch": host_probe(dev)}
    row.update(timed_steps(step, steps, dev))
    row["syncs_per_step"] = syncs_in(step, dev)
    row["gpu_busy_ms_per_step"], row["profile"] = gpu_busy_ms(step, profile_steps, dev)
    return row


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


def cache_counts(sessions: list[Session]) -> dict[str, int]:
    """The device unit caches' hits, misses and evictions summed over sessions (one read each)."""
    got = [s.cache.unit_cache_stats().get("unit_cache", {}) for s in sessions]
    return {k: sum(g.get(k, 0) for g in got) for k in ("hits", "misses", "evictions")}


def cache_row(
    before: dict[str, int], after: dict[str, int], done: int, memory: MemoryConfig, src: Session
) -> dict:
    """What the device unit cache did over `done` steps of every session (counts: (unit, KV head) pairs)."""
    hits, misses = after["hits"] - before["hits"], after["misses"] - before["misses"]
    spec = src.cache.spec
    elem = torch.empty(0, dtype=src.cache.layers[0].store.host_dtype).element_size()
    pair_bytes = 2 * memory.block_size * spec.head_dim * elem  # one unit's K and V of one KV head
    return {"unit_cache_slots": memory.max_cached_blocks, "unit_cache_hit_rate": hits / max(hits + misses, 1),
            "unit_cache_misses_per_step": misses / done, "unit_cache_evictions_per_step": (after["evictions"] - before["evictions"]) / done,
            "unit_cache_host_bytes_per_step": misses * pair_bytes / done}  # fmt: skip


def memllm_decode(
    llm, src, memory, n, steps, warm, impl, profile_steps, graphs=False, more=None, cuts=True, churn=0, settle=None
) -> dict:
    """n clones of src decoding together; `more` (ids): clone i first reads i * block_size // n of them,
    so the clones cut their units on different steps (as sessions of a server do) instead of together.
    cuts (with graphs): BatchGraph.cuts, a row whose token completes a unit stacked and cut after the call;
    False: it stands in, taking its step alone first (GPU run 44). churn: every `churn` steps the oldest
    request leaves and a fresh clone joins (continuous batching, as a server's requests end and arrive),
    its cost inside the timed steps. settle: cuda/batch_graph.SETTLE for this row (None: the library's)."""
    from memllm.context.cuda import batch_graph
    from memllm.context.cuda.batch_graph import BatchGraph

    BatchGraph.cuts = cuts  # a class setting: this process runs one row at a time
    default_settle = batch_graph.SETTLE
    if settle is not None:
        batch_graph.SETTLE = settle
    dev = src.cache.layers[0].device
    t = time.perf_counter()
    total = warm + steps + 2 + profile_steps  # the steps made (timed, sync-counted, profiled, one more)
    spares = -(-total // churn) if churn else 0  # the clones that join as others leave
    clones = [clone_session(src, llm, memory) for _ in range(n + spares)]
    clone_s = time.perf_counter() - t
    clones, waiting = clones[:n], clones[n:]
    for i, c in enumerate(clones if more is not None else ()):
        k = i * memory.block_size // n
        if k:
            c.feed_ids(more[:k])
    engine = BatchEngine(llm, impl, graphs=graphs)
    for i, c in enumerate(waiting if more is not None else ()):  # joiners stagger as the first clones do
        k = (n + i) * memory.block_size // n % memory.block_size
        if k:
            c.feed_ids(more[:k])
    for c in clones:  # room for the timed steps, the one counting syncs, the profiled ones and one more:
        # no request ends inside the profiled steps unless churn says so (its leaving copies its windows)
        engine.join(c, max_new_tokens=total, stop=set())
    for _ in range(warm):
        engine.step()
    sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    stacked0, rows0 = engine.stacked_rows, engine.batch_rows
    cached0 = cache_counts(clones) if memory.device_unit_cache else None
    stepped = []  # the steps where_time_goes takes (timed, sync-counted and profiled ones)
    engine_step = engine.step

    changes = 0
    seen: dict[int, dict] = {}  # each batch graph's counters (a new batch, and graph, at each change)

    def step() -> None:
        nonlocal changes
        stepped.append(engine_step())
        if engine._batch is not None and engine._batch.graph is not None:
            seen[id(engine._batch)] = engine._batch.graph.counters()
        if churn and len(stepped) % churn == 0 and waiting:
            engine.leave(engine.active[0])
            joiner = waiting.pop(0)
            clones.append(joiner)
            engine.join(joiner, max_new_tokens=total, stop=set())
            changes += 1

    row = where_time_goes(step, steps, dev, profile_steps)
    done = steps + 1 + (profile_steps if dev.type == "cuda" else 0)
    if cached0 is not None:  # the counters outlive the pools, freed as the requests end
        row.update(cache_row(cached0, cache_counts(clones), len(stepped), memory, src))
    suffix = f"+cache{memory.max_cached_blocks}" if memory.device_unit_cache else ""
    suffix += ("+graph" if graphs else "") + ("+standins" if graphs and not cuts else "")
    suffix += "+staggered" if more is not None else ""
    suffix += f"+churn{churn}" if churn else ""
    suffix += f"+settle{settle}" if graphs and settle is not None else ""
    graph = engine._batch.graph if engine._batch is not None else None
    if graph is not None:  # the batch of the timed steps (its captures include the warm steps')
        row["batch_graph"] = graph.counters()
    if churn and seen:  # every batch of the timed steps, summed
        row["batch_graphs"] = {k: sum(c[k] for c in seen.values()) for k in next(iter(seen.values()))}
        row["batch_graphs"]["batches"] = len(seen)
    row.update({
        "system": f"memllm-{impl}{suffix}", "sessions": n, "steps": steps,
        "tokens_per_s": n * 1000 / row["ms_per_step"], "stacked_share": (engine.stacked_rows - stacked0) / (n * done) if n > 1 else None,
        "plain_rows_timed": (engine.batch_rows - rows0) - (engine.stacked_rows - stacked0) if n > 1 else None,
        "clone_s": clone_s, "churn": churn, "membership_changes": changes,
        "peak_gpu_bytes": torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None,
        # a clone's units: the source's full segments by reference, its own copy of the partial one
        "host_bytes_referenced_per_clone": sum(lay.store.host_bytes() for lay in clones[0].cache.layers),
        "host_bytes_owned_per_clone": sum(
            lay.store.segment_bytes() for lay in clones[0].cache.layers if lay.store.n_units % lay.store.segment_units
        ),
    })  # fmt: skip
    for c in clones + waiting:
        c.close()
    BatchGraph.cuts = True
    batch_graph.SETTLE = default_settle
    clones.clear()  # what holds the sessions' memory goes before the cache is emptied
    engine.requests.clear()
    engine._batch = None
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return row


def correctness(llm, src, memory, cached: MemoryConfig | None = None) -> dict:
    """The first batched step of 4 clones against one clone stepped alone (the same token); with
    `cached` (the device unit cache's config) also 4 clones with the cache, impl "fast"."""
    tok = int(src.last_logits.argmax())
    ref_s = clone_session(src, llm, memory)
    with attach(llm.model, cache=ref_s.cache):
        ref = prefill.step(llm.model, ref_s.cache, torch.tensor([[tok]])).float().cpu()
    out = {}
    runs = [("fast", "fast", memory), ("reference", "reference", memory)]
    for name, impl, mem in runs + ([("fast+cache", "fast", cached)] if cached is not None else []):
        clones = [clone_session(src, llm, mem) for _ in range(4)]
        engine = BatchEngine(llm, impl)
        rows = engine._feed(clones, [tok] * 4)
        errs = [float((r.float().cpu() - ref).abs().max() / ref.abs().max()) for r in rows]
        out[name] = {"max_rel_err": max(errs), "argmax_equal": all(int(r.argmax()) == int(ref.argmax()) for r in rows),
                     "stacked_rows": engine.stacked_rows}  # fmt: skip
        for c in clones:
            c.close()
    ref_s.close()
    out["fast+graph"] = graph_check(llm, src, memory)
    return out


def graph_check(llm, src, memory, n: int = 4, steps: int = 8) -> dict:
    """n clones decoding `steps` tokens through BatchEngine(graphs=True) (captured and replayed on
    CUDA) against n clones through the plain batched step: tokens and logits of every step."""
    got = {}
    for graphs in (True, False):
        clones = [clone_session(src, llm, memory) for _ in range(n)]
        engine = BatchEngine(llm, "fast", graphs=graphs)
        for c in clones:
            engine.join(c, max_new_tokens=steps + 1, stop=set())
        logits = []
        for _ in range(steps):
            engine.step()
            logits.append(torch.stack([c.last_logits.float().cpu() for c in clones]))
        got[graphs] = (torch.stack(logits), engine._batch.graph.counters() if graphs else None)
        for c in clones:
            c.close()
    a, b = got[True][0], got[False][0]
    err = float(((a - b).abs().amax(dim=-1) / b.abs().amax(dim=-1)).max())
    return {"max_rel_err": err, "argmax_equal": bool(torch.equal(a.argmax(-1), b.argmax(-1))), "steps": steps,
            **got[True][1]}  # fmt: skip


def full_attention(llm, ids, ns, steps, warm, max_batch, kind, profile_steps) -> list[dict]:
    """sdpa, one sequence prefilled, its cache expanded to batch B; kind "dynamic" (DynamicCache) or
    "static" (StaticCache of the prompt's length plus the steps decoded)."""
    from transformers import DynamicCache, StaticCache

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
    length = kv[0][0].shape[2]
    del cache, x
    tok = logits.argmax(dim=-1).view(1, 1)
    total = warm + steps + 1 + profile_steps  # tokens each row decodes
    takes_cache_position = "cache_position" in inspect.signature(model.forward).parameters

    def make(b: int):
        if kind == "dynamic":
            c = DynamicCache(config=model.config)
        else:
            c = StaticCache(config=model.config, max_cache_len=length + total)
        at = {"cache_position": torch.arange(length, device=dev)}  # read by StaticCache where it needs it
        for i, (k, v) in enumerate(kv):
            c.update(k.expand(b, -1, -1, -1).contiguous(), v.expand(b, -1, -1, -1).contiguous(), i, at)
        return c

    def run(b: int) -> dict:
        c = make(b)
        state = {"ids": tok.expand(b, 1).contiguous(), "pos": torch.full((b, 1), length, device=dev)}

        def greedy_step() -> None:
            """One full-attention decode step of the batch (generate()'s loop): the next greedy token of
            each row. Positions are passed as a device tensor advanced in place (no host read)."""
            kw = {"position_ids": state["pos"]}
            if kind == "static" and takes_cache_position:
                kw["cache_position"] = state["pos"][0]
            with torch.no_grad():
                out = model(input_ids=state["ids"], **cache_kwargs(model, c), use_cache=True, **kw)
            state["ids"] = out.logits[:, -1].argmax(-1, keepdim=True)
            state["pos"].add_(1)

        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        for _ in range(warm):
            greedy_step()
        row = where_time_goes(greedy_step, steps, dev, profile_steps)
        peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
        c = None  # the cache goes before the next run allocates its own
        state.clear()
        row.update({"system": f"full-sdpa-{kind}", "sessions": b, "steps": steps,
                    "tokens_per_s": b * 1000 / row["ms_per_step"], "peak_gpu_bytes": peak, "prefill_s": prefill_s,
                    "kv_bytes_per_sequence": per_seq})  # fmt: skip
        return row

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
        say(f"  full attention ({kind}): batch {b} does not fit")
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
    ap.add_argument("--warm", type=int, default=4)
    ap.add_argument("--impl", default="fast")
    ap.add_argument("--max-full-batch", type=int, default=1024)
    ap.add_argument("--budget-s", type=float, default=430.0)
    ap.add_argument(
        "--full-caches", default="dynamic,static", help="full attention's caches: dynamic, static"
    )
    ap.add_argument("--order", default="full,memllm", help="which runs first")
    ap.add_argument("--profile-steps", type=int, default=3, help="steps under torch.profiler per row (CUDA)")
    ap.add_argument("--quick", action="store_true", help="CPU, tiny random Llama, short lengths")
    ap.add_argument("--device-cache", type=int, default=0, metavar="N",
                    help="also run every memllm row with the device unit cache of N units per layer and KV head")  # fmt: skip
    ap.add_argument("--graphs", default="on,off",
                    help="memllm rows with the batched step replayed as a CUDA graph (on), without (off), or both; "
                         "standins: the graph with rows that complete a unit stepping alone first (before 2026-12-06)")  # fmt: skip
    ap.add_argument("--staggered", action="store_true",
                    help="the clones cut their units on different steps (each first reads a share of a block)")  # fmt: skip
    ap.add_argument("--churn", default="0",
                    help="comma-separated: 0 (the same sessions throughout) or K (every K steps a request "
                         "leaves and another joins, inside the timed steps)")  # fmt: skip
    ap.add_argument("--settle", default="",
                    help="comma-separated SETTLE values for the graph rows (steps a changed batch steps plainly "
                         "before its warm-up and capture); default: the library's")  # fmt: skip
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    settles = [int(x) for x in args.settle.split(",") if x.strip()] or [None]
    churns = [int(x) for x in args.churn.split(",") if x.strip()]
    modes = {"on": (True, True), "standins": (True, False), "off": (False, True)}  # (graphs, BatchGraph.cuts)
    graph_modes = [modes[x.strip()] for x in args.graphs.split(",") if x.strip()]

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
    cached = (
        replace(memory, device_unit_cache=True, max_cached_blocks=args.device_cache)
        if args.device_cache
        else None
    )
    memories = [memory] + ([cached] if cached is not None else [])  # each memllm row without, then with
    rows: list[dict] = []
    skipped: list[str] = []
    checks: dict[str, Any] = {}
    over = lambda: time.time() - T0 > args.budget_s  # noqa: E731
    profile_steps = args.profile_steps

    def memllm_runs() -> None:
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
            decoded = warm + steps + 1 + profile_steps
            extra = until_cut if src.cache.layers[0].cut and until_cut <= decoded + 1 else 0
            if extra:
                src.feed_ids(ids[1 : extra + 1])  # more of the same text
                say(f"read {extra} more tokens: the clones' next cut is {resolved.block_size} tokens away")
            if not checks:
                checks.update(correctness(llm, src, memory, cached))
                checks["length"] = n_tok
                say(f"correctness (batched first step vs alone): {checks}")
            more = ids[1 : resolved.block_size + 1] if args.staggered else None  # what staggered clones read
            for n, churn in [(n, k) for n in ns for k in churns]:
                for mem, (graphs, cuts), settle in [
                    (m, g, t) for m in memories for g in graph_modes for t in (settles if g[0] else [None])
                ]:
                    if (
                        graphs and n == 1 or churn and n == 1
                    ):  # one session steps alone (its own decode graph) either way
                        continue
                    if over():
                        skipped.append(
                            f"memllm at {n_tok} x {n}"
                            + (" (device cache)" if mem.device_unit_cache else "")
                            + (" (graph)" if graphs else "")
                        )
                        continue
                    row = memllm_decode(
                        llm, src, mem, n, steps, warm, args.impl, profile_steps, graphs, more, cuts, churn, settle
                    )
                    row.update(length=n_tok, prefill_s=prefill_s, extra_tokens_read=extra)
                    rows.append(row)
                    hits = (
                        f", unit cache hit rate {row['unit_cache_hit_rate']:.3f}"
                        if mem.device_unit_cache
                        else ""
                    )
                    say(f"{row['system']} {n_tok:,} x {n}: {row['ms_per_step']:.1f} ms/step, {row['tokens_per_s']:.0f} tok/s, "
                        f"host share {row['host_share']:.2f}, syncs/step {row['syncs_per_step']}{hits}")  # fmt: skip
            src.close()
            del src
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()

    def full_runs() -> None:
        for n_tok in full_lengths:
            for kind in [k.strip() for k in args.full_caches.split(",") if k.strip()]:
                if over():
                    skipped.append(f"full attention ({kind}) at {n_tok}")
                    continue
                got = full_attention(llm, make_ids(n_tok), ns, steps, warm, max_full, kind, profile_steps)
                for r in got:
                    r["length"] = n_tok
                    say(f"full ({kind}) {n_tok:,} x {r['sessions']}: {r['ms_per_step']:.1f} ms/step, "
                        f"{r['tokens_per_s']:.0f} tok/s, host share {r['host_share']:.2f}")  # fmt: skip
                rows.extend(got)

    runs = {"memllm": memllm_runs, "full": full_runs}
    order = [x.strip() for x in args.order.split(",") if x.strip()]
    if sorted(order) != sorted(runs):
        ap.error("--order names full and memllm once each")
    for name in order:
        runs[name]()
    env = {
        "device": torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": " ".join(sys.argv),
        "model": llm.name,
        "memory": resolved.to_dict(),
        "device_cache_memory": cached.resolved(llm.trained_len).to_dict() if cached is not None else None,
        "quick": args.quick,
        "wall_s": time.time() - T0,
        "skipped": skipped,
        "correctness": checks,
        "order": order,
        "transformers": __import__("transformers").__version__,
    }
    if args.out:
        Path(args.out).write_text(json.dumps({"env": env, "results": rows}, indent=1))
    print(json.dumps(env))
    print(f"{'system':18} {'length':>8} {'sessions':>8} {'ms/step':>9} {'tok/s':>9} {'peak GPU GiB':>13} "
          f"{'host ms':>8} {'wait ms':>8} {'gpu ms':>8} {'syncs':>6} {'us/launch':>9} {'hit rate':>8} {'launches':>8}")  # fmt: skip
    for r in rows:
        gpu = (r.get("peak_gpu_bytes") or 0) / 2**30
        mark = " (largest that fits)" if r.get("largest_that_fits") else ""
        busy = "-" if r.get("gpu_busy_ms_per_step") is None else f"{r['gpu_busy_ms_per_step']:.2f}"
        syncs = "-" if r.get("syncs_per_step") is None else str(r["syncs_per_step"])
        hit = "-" if r.get("unit_cache_hit_rate") is None else f"{r['unit_cache_hit_rate']:.3f}"
        launches = "-" if not r.get("profile") else f"{r['profile']['launches_per_step']:.0f}"
        print(f"{r['system']:18} {r['length']:>8} {r['sessions']:>8} {r['ms_per_step']:>9.2f} "
              f"{r['tokens_per_s']:>9.0f} {gpu:>13.3f} {r['host_ms_per_step']:>8.2f} {r['wait_ms_per_step']:>8.2f} "
              f"{busy:>8} {syncs:>6} {r['host_us_per_launch']:>9.2f} {hit:>8} {launches:>8}{mark}")  # fmt: skip


if __name__ == "__main__":
    main()
