"""Where a context-memory model call spends its time on a GPU (issue 3): a profile, not a result.

A random-weight model with SmolLM2-135M's shapes (timing does not depend on the weights), bf16:
  1. full attention (sdpa): 8K prefill and decode at 8K (medians);
  2. memllm: per-call prefill time, host time spent inside the attention function, a torch.profiler
     table of two prefill calls and of five decode steps;
  5. with --answers L: read-once answering (question feed, then tokens), profiled;
  4. with --memory: peak device memory per phase (prefill, graph decode, plain decode) per length;
  3. the Triton kernels alone on one call's shapes, over a sweep of tile configurations, against sdpa
     on the same number of query-key pairs (the ceiling).
Usage: PYTHONPATH=. python benchmarks/profile_gpu.py --tokens 128k --out $OUT/profile.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch

from memllm.compat import cache_kwargs


def smollm2_shaped(device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
        tie_word_embeddings=True, rms_norm_eps=1e-5,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(device, torch.bfloat16).eval()
    model.set_attn_implementation("sdpa")
    return model


def sync() -> None:
    torch.cuda.synchronize()


def timed(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t)
    return out


def timed_steps(model, cache, logits, n: int) -> tuple[list[float], torch.Tensor]:
    """n greedy single-token steps, each timed to the end of its device work: (seconds each, last logits)."""
    from memllm.context.prefill import step

    times = []
    for _ in range(n):
        sync()
        t = time.perf_counter()
        logits = step(model, cache, logits.argmax().view(1, 1))
        sync()
        times.append(time.perf_counter() - t)
    return times, logits


def profile_table(fn, rows: int = 25) -> dict:
    from torch.profiler import ProfilerActivity, profile

    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        sync()
    ka = prof.key_averages()
    cpu = ka.table(sort_by="self_cpu_time_total", row_limit=rows)
    cuda = ka.table(sort_by="self_cuda_time_total", row_limit=rows)
    total_cuda = sum(e.self_device_time_total for e in ka) / 1e3
    total_cpu = sum(e.self_cpu_time_total for e in ka) / 1e3
    n_launch = sum(
        e.count for e in ka if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC")
    )
    return {"cpu_table": cpu, "cuda_table": cuda, "self_cuda_ms": total_cuda, "self_cpu_ms": total_cpu,
            "launches": n_launch}  # fmt: skip


@torch.no_grad()
def full_attention(model, n: int) -> dict:
    from transformers import DynamicCache

    ids = torch.randint(100, 40000, (1, n), device="cuda")

    def prefill():
        model(
            input_ids=ids, **cache_kwargs(model, DynamicCache(config=model.config)), use_cache=True, logits_to_keep=1
        )

    pre = timed(prefill, 6)[1:]
    cache = DynamicCache(config=model.config)
    logits = model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1).logits[0, -1]
    steps = []
    for _ in range(24):
        sync()
        t = time.perf_counter()
        tok = logits.argmax().view(1, 1)
        logits = model(input_ids=tok, **cache_kwargs(model, cache), use_cache=True).logits[0, -1]
        sync()
        steps.append(time.perf_counter() - t)
    return {"prefill_s": statistics.median(pre), "tok_s": n / statistics.median(pre),
            "decode_ms": 1000 * statistics.median(steps[4:])}  # fmt: skip


@torch.no_grad()
def memllm_run(model, n_tokens: int, config, profile: bool = True) -> dict:
    from memllm.context import attach
    from memllm.context.cache import ContextMemoryLayer
    from memllm.context.prefill import step

    host = {"attend_s": 0.0, "calls": 0}
    original = ContextMemoryLayer.attend

    def attend(self, *a, **k):  # host time inside the attention function (no sync added)
        t = time.perf_counter()
        out = original(self, *a, **k)
        host["attend_s"] += time.perf_counter() - t
        host["calls"] += 1
        return out

    ContextMemoryLayer.attend = attend
    try:
        ids = torch.randint(100, 40000, (1, n_tokens), device="cuda")
        with attach(model, config) as cache:
            chunk = cache.config.chunk_size
            per_call, host_per_call = [], []
            done = 0
            cache.reserve(n_tokens)  # as prefill.feed does
            sync()
            start = time.perf_counter()
            while done < n_tokens:
                end = min(n_tokens, done + chunk - cache.seen_tokens % chunk)
                host["attend_s"] = 0.0
                sync()
                t = time.perf_counter()
                logits = step(model, cache, ids[:, done:end])
                sync()
                per_call.append(time.perf_counter() - t)
                host_per_call.append(host["attend_s"])
                done = end
            steady = per_call[4:] or per_call
            feed_s = time.perf_counter() - start  # every call synchronised: host work is not overlapped
            res = {"chunk": chunk, "calls": len(per_call), "call_ms": 1000 * statistics.median(steady),
                   "feed_s": feed_s, "feed_tok_s": n_tokens / feed_s,
                   "per_call_ms": [round(1000 * x, 1) for x in per_call],
                   "graph_after_feed": cache.decode_graph().counters() if cache.decode_graph() else None,
                   "tok_s": chunk / statistics.median(steady),
                   "attend_host_ms_per_call": 1000 * statistics.median(host_per_call[4:] or host_per_call),
                   "units_per_layer": cache.layers[0].store.n_units}  # fmt: skip
            if not profile:
                return res
            more = torch.randint(100, 40000, (1, 2 * chunk), device="cuda")
            res["prefill_profile"] = profile_table(
                lambda: (step(model, cache, more[:, :chunk]), step(model, cache, more[:, chunk:]))
            )
            steps, host_steps = [], []
            for _ in range(40):
                host["attend_s"] = 0.0
                sync()
                t = time.perf_counter()
                tok = logits.argmax().view(1, 1)
                logits = step(model, cache, tok)
                sync()
                steps.append(time.perf_counter() - t)
                host_steps.append(host["attend_s"])
            res["decode_ms"] = 1000 * statistics.median(steps[8:])
            res["decode_attend_host_ms"] = 1000 * statistics.median(host_steps[8:])
            g = cache.decode_graph()
            if g is not None:
                res["graph"] = g.counters()
            # The same decode without the graph (the plain path per token), for the ratio.
            graphs_cfg = cache.config
            cache.config = dataclasses.replace(graphs_cfg, decode_graphs=False)
            plain, logits = timed_steps(model, cache, logits, 24)
            cache.config = graphs_cfg
            res["decode_ms_no_graph"] = 1000 * statistics.median(plain[4:])

            def five():
                lg = logits
                for _ in range(5):
                    lg = step(model, cache, lg.argmax().view(1, 1))

            res["decode_profile"] = profile_table(five)
    finally:
        ContextMemoryLayer.attend = original
    return res


def memory_run(model, lengths: list[int], config) -> list[dict]:
    """Peak device memory per phase (prefill, decode with graphs, decode without) at each length, one
    session at a time in this process, and decode ms/token in steady state (graph replay)."""
    from memllm.context import attach
    from memllm.context.prefill import feed, step

    out = []
    for n in lengths:
        torch.cuda.empty_cache()
        ids = torch.randint(100, 40000, (1, n), device="cuda")
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        row: dict = {"tokens": n, "before_mib": base / 2**20}
        with attach(model, config) as cache:
            t = time.perf_counter()
            logits = feed(model, cache, ids)
            sync()
            row["prefill_s"] = time.perf_counter() - t
            row["prefill_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
            row["after_prefill_mib"] = torch.cuda.memory_allocated() / 2**20
            st = cache.stats()
            row["window_mib"] = st["device_bytes_window"] / 2**20
            row["index_mib"] = st["device_bytes_index"] / 2**20
            row["repr_capacity"] = cache.layers[0].store.repr_buffer().shape[1]
            row["units_per_layer"] = cache.layers[0].store.n_units
            torch.cuda.reset_peak_memory_stats()
            steps, logits = timed_steps(model, cache, logits, 40)
            row["decode_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
            row["after_decode_mib"] = torch.cuda.memory_allocated() / 2**20
            row["decode_ms_steady"] = 1000 * statistics.median(steps[8:])
            g = cache.decode_graph()
            row["graph"] = g.counters()
            torch.cuda.reset_peak_memory_stats()
            cache.config = dataclasses.replace(cache.config, decode_graphs=False)
            for _ in range(4):
                logits = step(model, cache, logits.argmax().view(1, 1))
            sync()
            row["plain_decode_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        del cache, logits, ids, g  # the graph holds its static buffers and pool
        print("memory", row, flush=True)
        out.append(row)
    return out


class _BareLLM:
    """What Session needs when it is given token ids only (no tokenizer)."""

    def __init__(self, model) -> None:
        self.model, self.tokenizer, self.name = model, None, "random SmolLM2-shaped"
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.trained_len = model.config.max_position_embeddings


def answer_run(model, n_tokens: int, config, question: int = 40, answer: int = 8, n: int = 12) -> dict:
    """Read-once answering, piece by piece: after n_tokens in memory, two rounds of n answers (a
    question-tokens feed, then answer-tokens generated), rolled back each time; medians per round,
    and a profile of one question feed (torch.profiler and cProfile)."""
    from memllm.session import Session

    s = Session(_BareLLM(model), config)
    s.feed_ids(torch.randint(100, 40000, (n_tokens,)).tolist())
    res: dict = {"tokens": n_tokens, "question_tokens": question, "answer_tokens": answer}
    for _ in range(2):
        feeds, per_tok = [], []
        for i in range(n):
            q = torch.randint(100, 40000, (question + i % 3,)).tolist()
            with s.answering():  # held and rolled back, as DocumentQA answers
                sync()
                t0 = time.perf_counter()
                s.feed_ids(q)
                sync()
                t1 = time.perf_counter()
                list(s.generate_ids(None, answer, stop=set()))
                sync()
                t2 = time.perf_counter()
            feeds.append(t1 - t0)
            per_tok.append((t2 - t1) / answer)
        res.setdefault("rounds", []).append({"question_feed_ms": 1000 * statistics.median(feeds[2:]),
                                             "ms_per_token": 1000 * statistics.median(per_tok[2:])})  # fmt: skip
        print("answer", res["rounds"][-1], flush=True)
    graph = s.cache.decode_graph()
    res["graph"] = graph.counters() if graph is not None else None
    # The same static steps run eagerly, so the profiler times each kernel (a replay is one graph).
    from memllm.context.cuda.graph import DecodeGraph

    s.cache._decode_graph = DecodeGraph(s.cache, capture=False)
    with s.answering():
        q = torch.randint(100, 40000, (question,)).tolist()
        res["question_eager_profile"] = profile_table(lambda: s.feed_ids(q))
        res["token_eager_profile"] = profile_table(lambda: list(s.generate_ids(None, 1, stop=set())))
    s.cache._decode_graph = graph
    q = torch.randint(100, 40000, (question,)).tolist()
    with s.answering():
        res["question_feed_profile"] = profile_table(lambda: s.feed_ids(q))
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    with s.answering():
        prof.enable()
        s.feed_ids(q)
        sync()
        prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(30)
    res["question_feed_python"] = text.getvalue()
    return res


def kernel_sweep(baseline: str | None = None) -> list[dict]:
    """The local (with received) and memory passes on one steady-state call's shapes, per tile config
    (flash.py's wrappers, the whole pass), against sdpa on the same number of query-key pairs (the
    ceiling). baseline: the path of an older flash.py, timed in the same process at its own defaults,
    with the largest difference of each output from the current default config's."""
    import importlib.util

    import torch.nn.functional as F
    import triton.testing

    from memllm.config import MemoryConfig
    from memllm.context.cuda import window as flash
    from memllm.context.plan import plan_call
    from memllm.context.window import joined_memory

    cfg = MemoryConfig().resolved(8192)
    c, W = cfg.chunk_size, cfg.n_local + cfg.block_size + 256
    plan = plan_call(200_000, W, True, 1500, c, cfg)
    heads, kvh, d = 9, 3, 64
    gen = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=gen)

    q, k, v = rand(heads, c, d), rand(kvh, W + c, d), rand(kvh, W + c, d)
    n_mb, chosen = len(plan.memory_blocks), cfg.topk
    sk, sv = rand(kvh, cfg.n_init, d), rand(kvh, cfg.n_init, d)
    uk, uv = rand(n_mb, kvh, chosen * cfg.block_size, d), rand(n_mb, kvh, chosen * cfg.block_size, d)
    want_local = flash.local_attention_cuda(q, k, v, plan, 0.125)
    out0, lse0 = want_local[0], want_local[1]

    def memory(fl, **tiles):
        out = out0.clone()
        if fl is flash:
            return fl.memory_attention_merge_cuda(q, sk, sv, uk, uv, plan, chosen, cfg.block_size, 0.125, out, lse0,
                                                  **tiles)  # fmt: skip
        km, vm = joined_memory(sk, sv, uk, uv, n_mb)
        return fl.memory_attention_merge_cuda(q, km, vm, plan, cfg.n_init, chosen, cfg.block_size, 0.125, out, lse0)

    def bench(fn) -> float:
        return triton.testing.do_bench(fn, warmup=50, rep=300)

    want_mem = memory(flash)
    res = []
    if baseline:
        spec = importlib.util.spec_from_file_location("flash_baseline", baseline)
        old = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(old)
        got = old.local_attention_cuda(q, k, v, plan, 0.125)
        row = {"config": "baseline (" + baseline + ")",
               "local_received_ms": bench(lambda: old.local_attention_cuda(q, k, v, plan, 0.125)),
               "memory_ms": bench(lambda: memory(old)),
               "max_diff": {"out": (got[0] - want_local[0]).abs().max().item(),
                            "lse": (got[1] - want_local[1]).abs().max().item(),
                            "received": ((got[2] - want_local[2]).abs().max() / want_local[2].abs().max()).item(),
                            "merged": (memory(old) - want_mem).abs().max().item()}}  # fmt: skip
        res.append(row)
        print(row, flush=True)
    # The local pass alone: the received pass at its defaults is timed once, below.
    for bm, bn, warps, stages in [(64, 64, 4, 3), (64, 64, 4, 2), (128, 64, 4, 3), (128, 64, 8, 3),
                                  (128, 64, 8, 2), (128, 128, 8, 3), (64, 128, 4, 3), (128, 32, 4, 3)]:  # fmt: skip
        tiles = {"BM": bm, "BN": bn, "num_warps": warps, "num_stages": stages}
        row = {"config": tiles}
        try:
            row["local_received_ms"] = bench(lambda t=tiles: flash.local_attention_cuda(q, k, v, plan, 0.125, local=t))
            row["memory_ms"] = bench(lambda t=tiles: memory(flash, **t))
        except Exception as e:  # noqa: BLE001 - a config that does not fit is reported, not fatal
            row["error"] = f"{type(e).__name__}: {e}"[:200]
        res.append(row)
        print(row, flush=True)
    for rb, rn, rows, warps, stages in [(64, 32, 1024, 8, 2), (64, 64, 1024, 8, 2), (64, 32, 512, 4, 2),
                                        (128, 32, 1024, 8, 2), (64, 32, 2048, 8, 3), (32, 64, 1024, 4, 2)]:  # fmt: skip
        rc = {"BM": rb, "BN": rn, "ROWS": rows, "num_warps": warps, "num_stages": stages}
        row = {"received_config": rc}
        try:
            row["received_ms"] = bench(lambda r=rc: flash.received_attention_cuda(q, k, lse0, plan, 0.125, **r))
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {e}"[:200]
        res.append(row)
        print(row, flush=True)
    keys = cfg.n_local + 512
    qq, kk = rand(1, heads, c, d), rand(1, heads, keys, d)
    res.append({"sdpa_same_pairs_ms": bench(lambda: F.scaled_dot_product_attention(qq, kk, kk)), "keys": keys})
    print(res[-1], flush=True)
    return res


@torch.no_grad()
def ab_prefill(model, n_tokens: int) -> list[dict]:
    """Prefill speed with each recent fast-path change undone in turn (patched here, in one process)."""
    from memllm.config import MemoryConfig
    from memllm.context import pinned
    from memllm.context.cuda import window as flash
    from memllm.context.positions import Rotary
    from memllm.context.window import merge

    rotated, merge_cuda, alloc = Rotary.rotated, flash.memory_attention_merge_cuda, pinned.CUDA_HOST_ALLOC

    def rope_torch(self, x, start, step, dtype, per_row=True, kernel=False):
        return rotated(self, x, start, step, dtype, per_row, False)

    def merge_torch(q, sink_k, sink_v, unit_k, unit_v, plan, n_chosen, block_size, scale, out, lse):
        out_m, lse_m = flash.memory_attention_cuda(q, sink_k, sink_v, unit_k, unit_v, plan, n_chosen, block_size, scale)
        return merge(out, lse, out_m, lse_m)

    variants = [("all", None), ("rope_torch", "rope"), ("merge_torch", "merge"), ("cudaHostAlloc", "alloc"),
                ("all_again", None)]  # fmt: skip
    rows = []
    for name, undo in variants:
        Rotary.rotated = rope_torch if undo == "rope" else rotated
        flash.memory_attention_merge_cuda = merge_torch if undo == "merge" else merge_cuda
        pinned.CUDA_HOST_ALLOC = pinned.pinned_empty if undo == "alloc" else alloc
        try:
            r = memllm_run(model, n_tokens, MemoryConfig(), profile=False)
        finally:
            Rotary.rotated, flash.memory_attention_merge_cuda, pinned.CUDA_HOST_ALLOC = (
                rotated,
                merge_cuda,
                alloc,
            )
        rows.append({"variant": name, **r})
        print(rows[-1], flush=True)
    return rows


def launch_overhead() -> dict:
    """Host microseconds per launch: a Triton kernel (the rotation) and a PyTorch op, 2000 each."""
    from memllm.context.cuda.positions import rotate

    x = torch.randn(9, 16, 64, device="cuda", dtype=torch.bfloat16)
    cos = torch.randn(100, 64, device="cuda")
    out = {}
    for name, fn in (("triton_rotate", lambda: rotate(x, 3, 1, -1, cos, cos, torch.bfloat16)),
                     ("torch_mul", lambda: x.mul(2.0)), ("torch_addcmul", lambda: torch.addcmul(x, x, x))):  # fmt: skip
        for _ in range(50):
            fn()
        sync()
        t = time.perf_counter()
        for _ in range(2000):
            fn()
        out[name + "_us"] = (time.perf_counter() - t) / 2000 * 1e6
        sync()
    print(out, flush=True)
    return out


def alloc_probe(n_tensors: int, workers: int) -> dict:
    """Seconds to allocate n_tensors registered 8 MiB host tensors (as segments are) with `workers`
    threads, then to free them; then the same again (memory the process had just freed)."""
    from concurrent.futures import ThreadPoolExecutor

    from memllm.context.pinned import registered_alloc

    out = {}
    for attempt in ("first", "again"):
        t = time.perf_counter()
        with ThreadPoolExecutor(workers) as ex:
            held = list(ex.map(lambda _: registered_alloc((4 << 20,), torch.bfloat16), range(n_tensors)))
        out[f"{attempt}_s"] = time.perf_counter() - t
        t = time.perf_counter()
        del held
        out[f"{attempt}_free_s"] = time.perf_counter() - t
    out["gib"] = n_tensors * 8 / 1024
    return out


def main() -> None:
    from memllm.bench.passkey import parse_length
    from memllm.config import MemoryConfig

    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="128k")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: full,memllm,kernels")
    ap.add_argument("--memory", default="", help="lengths for the per-phase peak memory run, e.g. 32k,1m")
    ap.add_argument("--answers", default="", help="length for the read-once answering run, e.g. 128k")
    ap.add_argument("--alloc", default="", help="registered-memory probe: tensors,workers;... e.g. 480,4;480,16")
    ap.add_argument("--baseline-flash", default=None, help="an older flash.py to time beside the kernels")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    skip = set(args.skip.split(","))
    import transformers
    import triton

    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "transformers": transformers.__version__, "triton": triton.__version__}  # fmt: skip
    print(info, flush=True)
    model = smollm2_shaped("cuda")
    res: dict = {"info": info}
    if args.alloc:
        res["alloc"] = [alloc_probe(*map(int, x.split(","))) | {"spec": x} for x in args.alloc.split(";")]
        print("alloc", res["alloc"], flush=True)
    if "kernels" not in skip:
        res["kernels"] = kernel_sweep(args.baseline_flash)
    if "ab" not in skip:
        res["launch"] = launch_overhead()
        res["ab"] = ab_prefill(model, 64 * 1024)
    if "full" not in skip:
        res["full_8k"] = full_attention(model, 8192)
        print("full 8K", res["full_8k"], flush=True)
    if args.memory:
        res["memory"] = memory_run(model, [parse_length(x) for x in args.memory.split(",")], MemoryConfig())
    if args.answers:
        res["answers"] = answer_run(model, parse_length(args.answers), MemoryConfig())
        p = res["answers"]["question_feed_profile"]
        print(f"==== question feed: self cuda {p['self_cuda_ms']:.1f} ms, self cpu {p['self_cpu_ms']:.1f} ms, "
              f"launches {p['launches']}")  # fmt: skip
        print(p["cpu_table"])
        print(res["answers"]["question_feed_python"])
        for name in ("question_eager_profile", "token_eager_profile"):
            e = res["answers"][name]
            print(f"==== {name}: self cuda {e['self_cuda_ms']:.2f} ms, launches {e['launches']}")
            print(e["cuda_table"])
    if "memllm" not in skip:
        # Graphs on (steady prefill chunks replayed), then off (every call on the plain path) for the
        # ratio; the profile tables come from the plain run (a replay is one launch to the profiler).
        n = parse_length(args.tokens)
        res["memllm_graphs"] = memllm_run(model, n, MemoryConfig(), profile=False)
        print("memllm with graphs", res["memllm_graphs"], flush=True)
        res["memllm"] = memllm_run(model, n, MemoryConfig(decode_graphs=False))
        m = res["memllm"]
        for name in ("prefill_profile", "decode_profile"):
            print(f"==== {name}: self cuda {m[name]['self_cuda_ms']:.1f} ms, self cpu {m[name]['self_cpu_ms']:.1f} ms, "
                  f"launches {m[name]['launches']}")  # fmt: skip
            print(m[name]["cpu_table"])
            print(m[name]["cuda_table"])
        print({k: v for k, v in m.items() if not k.endswith("profile")}, flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
