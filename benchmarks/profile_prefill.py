"""Where a steady prefill call's GPU time goes (issue 3, must-show 3): a profile, not a result.

The real model (or SmolLM2's shapes with random weights, without --model-dir) reads a passkey prompt
(depth 0.5) of --tokens tokens through memllm with graphs, as the passkey benchmark does; then, with
that memory:
  1. replayed steady chunks: GPU time per call (CUDA events) and wall time per call;
  2. the same static step run eagerly (DecodeGraph(capture=False)) under torch.profiler: per kernel;
  3. one plain call under record_lookups: how many distinct units the call's execution blocks chose
     (what the deduplicated gather reads from host memory) against blocks x topk.
Usage: PYTHONPATH=. python benchmarks/profile_prefill.py --model-dir /root/m --gguf smollm2.gguf \
           --tokens 1m --out $OUT/profile_prefill.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from profile_gpu import profile_table, smollm2_shaped, sync


def load(model_dir: str | None, gguf: str | None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model_dir is None:
        return smollm2_shaped("cuda"), None
    tok = AutoTokenizer.from_pretrained(model_dir)
    kw = {"gguf_file": gguf} if gguf else {}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, **kw).cuda().eval()
    model.set_attn_implementation("sdpa")
    return model, tok


@torch.no_grad()
def main() -> None:
    from memllm.bench.passkey import keys_for, parse_length, prompt_ids
    from memllm.config import MemoryConfig
    from memllm.context import attach
    from memllm.context.cuda.graph import DecodeGraph
    from memllm.context.prefill import feed, step

    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--gguf", default=None)
    ap.add_argument("--tokens", default="1m")
    ap.add_argument("--calls", type=int, default=12, help="steady calls timed after the feed")
    ap.add_argument("--stacks", action="store_true", help="also: one eager step's ops by input shape")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    n = parse_length(args.tokens)
    model, tok = load(args.model_dir, args.gguf)
    cfg = MemoryConfig()
    chunk = cfg.resolved(model.config.max_position_embeddings).chunk_size
    extra = (args.calls + 3 + args.stacks) * chunk
    if tok is not None:
        ids = prompt_ids(tok, n + extra, 0.5, keys_for(n, 2)[1])
    else:
        ids = torch.randint(100, 40000, (n + extra,)).tolist()
    ids = torch.tensor([ids], device="cuda")
    res: dict = {"tokens": n, "chunk": chunk, "real_model": tok is not None}
    with attach(model, cfg) as cache:
        t = time.perf_counter()
        feed(model, cache, ids[:, :n])
        sync()
        res["feed_s"] = time.perf_counter() - t
        res["feed_tok_s"] = n / res["feed_s"]
        graph = cache.decode_graph()
        res["graph_after_feed"] = graph.counters()
        at = n
        gpu_ms, wall_ms = [], []
        for _ in range(args.calls):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            sync()
            t = time.perf_counter()
            start.record()
            step(model, cache, ids[:, at : at + chunk])
            end.record()
            sync()
            wall_ms.append(1000 * (time.perf_counter() - t))
            gpu_ms.append(start.elapsed_time(end))
            at += chunk
        res["replay"] = {"gpu_ms": gpu_ms, "wall_ms": wall_ms, "gpu_ms_median": statistics.median(gpu_ms),
                         "wall_ms_median": statistics.median(wall_ms), "counters": graph.counters()}  # fmt: skip
        print("replayed calls", res["replay"], flush=True)
        cache._decode_graph = DecodeGraph(cache, capture=False)
        step(model, cache, ids[:, at : at + chunk])  # eager static step, once before profiling
        at += chunk
        res["eager_static"] = profile_table(lambda: step(model, cache, ids[:, at : at + chunk]), rows=40)
        at += chunk
        print(res["eager_static"]["cuda_table"], flush=True)
        if args.stacks:  # where the small kernels come from: one more eager step, ops by input shape
            from torch.profiler import ProfilerActivity, profile

            sync()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
                step(model, cache, ids[:, at : at + chunk])
                sync()
            at += chunk
            res["eager_by_shape"] = prof.key_averages(group_by_input_shape=True).table(
                sort_by="self_cuda_time_total", row_limit=60, max_name_column_width=60
            )
        cache._decode_graph = graph
        with cache.record_lookups() as log:  # a lookup log makes the call take the plain path
            step(model, cache, ids[:, at : at + chunk])
            sync()
        per_layer: dict[int, list[list[int]]] = {}
        for layer, chosen in log:
            per_layer.setdefault(layer, []).append(chosen.tolist())
        distinct = [len({u for block in blocks for u in block}) for blocks in per_layer.values()]
        chosen_all = [sum(len(set(b)) for b in blocks) for blocks in per_layer.values()]
        res["lookup"] = {"blocks_per_call": len(next(iter(per_layer.values()))), "distinct_per_layer": distinct,
                         "chosen_per_layer": chosen_all,
                         "distinct_fraction": sum(distinct) / max(1, sum(chosen_all))}  # fmt: skip
        print("lookup", res["lookup"], flush=True)
    print(f"feed {res['feed_tok_s']:,.0f} tok/s; replay gpu {res['replay']['gpu_ms_median']:.1f} ms, wall "
          f"{res['replay']['wall_ms_median']:.1f} ms per {chunk}-token call; eager static self cuda "
          f"{res['eager_static']['self_cuda_ms']:.1f} ms; distinct units {res['lookup']['distinct_fraction']:.2f}")  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
