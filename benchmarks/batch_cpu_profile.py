"""Host work of one batched decode step (memllm.engine.BatchEngine, impl "fast"), on the CPU: a profile.

A random-weight Llama with SmolLM2-135M's head counts (9 heads, 3 KV heads) but tiny heads (--hidden
72: head_dim 8), few layers, a small MLP, vocabulary and window, fp32 on the CPU: little arithmetic
is left, so a step's time is mostly its Python and dispatch work, which is what bounds the GPU step
when its kernels are small; `torch_calls` (calls of torch functions and tensor methods per step)
stands for the kernel launches. One session
reads --tokens tokens, then is cloned B times (benchmarks/batch_gpu.clone_session: the GPU
benchmark's clones); the clones decode together, steps that cut nothing timed (ms per step), then
the same number of steps under cProfile: the functions with the most own time, and the cumulative
time of the batched attention's pieces. Also counts, over one steady step, the host reads of tensors
(item, tolist, __bool__, __int__, __float__, nonzero) and tensors built from Python data
(torch.tensor) after layer 0: on a GPU each of those is an upload or a synchronisation.
A profile, not a result: CPU timings are noisy; compare ratios within one run.

  PYTHONPATH=. python benchmarks/batch_cpu_profile.py --sessions 4,16,48 --out /tmp/prof.json
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import pstats
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from batch_gpu import QuickTokenizer, clone_session  # noqa: E402

from memllm.config import MemoryConfig  # noqa: E402
from memllm.engine import BatchEngine  # noqa: E402
from memllm.session import Session  # noqa: E402

WATCH = ("stacked_attend", "steady_rows", "attend", "gather_units_stores", "positions", "forward", "step")


class CpuLLM:
    """What Session needs: a random Llama with SmolLM2-135M's attention shapes, fp32 on the CPU."""

    def __init__(self, layers: int, hidden: int) -> None:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                          num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048)  # fmt: skip
        self.model = LlamaForCausalLM(cfg).eval()
        self.tokenizer = QuickTokenizer()
        self.name, self.device, self.dtype, self.trained_len = (
            "cpu-random-llama",
            torch.device("cpu"),
            torch.float32,
            2048,
        )


def host_reads(engine: BatchEngine) -> dict[str, int]:
    """One engine step with the tensor methods that read device data on the host counted (calls made
    while layers after the first attend: what a steady step repeats per layer), and torch.tensor."""
    from memllm.context import batch as batch_mod

    counts: Counter[str] = Counter()
    layer = {"i": -1}
    names = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy")
    saved = {n: getattr(torch.Tensor, n) for n in names}
    saved_tensor = torch.tensor
    saved_attend = batch_mod.BatchLayer.attend

    def wrap(name, fn):
        def counted(self, *a, **k):
            if layer["i"] > 0:
                counts[name] += 1
            return fn(self, *a, **k)

        return counted

    def tensor(*a, **k):
        if layer["i"] > 0:
            counts["torch.tensor"] += 1
        return saved_tensor(*a, **k)

    def attend(self, *a, **k):
        layer["i"] = self.layer_idx
        try:
            return saved_attend(self, *a, **k)
        finally:
            layer["i"] = -1

    try:
        for n in names:
            setattr(torch.Tensor, n, wrap(n, saved[n]))
        torch.tensor = tensor
        batch_mod.BatchLayer.attend = attend
        engine.step()
    finally:
        for n in names:
            setattr(torch.Tensor, n, saved[n])
        torch.tensor = saved_tensor
        batch_mod.BatchLayer.attend = saved_attend
    return dict(counts)


def run(llm, src, memory, n: int, steps: int, warm: int, top: int) -> dict:
    clones = [clone_session(src, llm, memory) for _ in range(n)]
    engine = BatchEngine(llm, "fast")
    for c in clones:
        engine.join(c, max_new_tokens=warm + 2 * steps + 2, stop=set())
    for _ in range(warm):
        engine.step()
    stacked0 = engine.stacked_rows
    t = time.perf_counter()
    for _ in range(steps):
        engine.step()
    ms = (time.perf_counter() - t) * 1000 / steps
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        engine.step()
    prof.disable()
    reads = host_reads(engine)
    stats = pstats.Stats(prof)
    rows, pieces = [], []
    gather_calls = 0.0  # torch calls made by the CPU gather (memllm/context/gather.py): CUDA's is one launch
    for (file, line, name), (_cc, calls, tt, ct, callers) in stats.stats.items():
        if file.startswith("~") and "torch" in name:
            gather_calls += sum(
                c[1] for (cf, _l, _n), c in callers.items() if cf.endswith("context/gather.py")
            )
        row = {"function": f"{Path(file).name}:{line}({name})", "calls_per_step": calls / steps,
               "own_ms_per_step": tt * 1000 / steps, "cum_ms_per_step": ct * 1000 / steps}  # fmt: skip
        rows.append(row)
        if name in WATCH and ("memllm" in file or "modeling_llama" in file):
            pieces.append(row)
    own = sorted(rows, key=lambda r: -r["own_ms_per_step"])[:top]
    watch = sorted(pieces, key=lambda r: -r["cum_ms_per_step"])[:top]
    profiled_ms = sum(r["own_ms_per_step"] for r in rows)
    torch_calls = sum(
        r["calls_per_step"] for r in rows if r["function"].startswith("~") and "torch" in r["function"]
    )
    out = {"sessions": n, "ms_per_step": ms, "profiled_ms_per_step": profiled_ms, "torch_calls": torch_calls,
           "torch_calls_outside_cpu_gather": torch_calls - gather_calls / steps,
           "stacked_share": (engine.stacked_rows - stacked0) / (n * (2 * steps + 1)),
           "host_reads_after_layer0": reads, "top_own": own, "pieces": watch}  # fmt: skip
    del clones, engine
    gc.collect()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sessions", default="4,16,48")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=72, help="9 heads: head_dim = hidden / 9")
    ap.add_argument("--tokens", type=int, default=1200)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warm", type=int, default=2)
    ap.add_argument("--top", type=int, default=14)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    llm = CpuLLM(args.layers, args.hidden)
    memory = MemoryConfig(n_init=4, n_local=64, block_size=32, repr_topk=4, topk=4, exc_block_size=32,
                          chunk_size=64, offload_dtype="fp32", selector="infllm")  # fmt: skip
    ids = torch.randint(0, 512, (args.tokens,), generator=torch.Generator().manual_seed(1)).tolist()
    src = Session(llm, memory)
    src.feed_ids(ids)
    # The timed and profiled steps cut nothing: read up to the next cut's distance of a block first.
    lay = src.cache.layers[0]
    need = 2 * args.steps + args.warm + 3
    until_cut = memory.n_local + memory.block_size - lay.local_k.shape[1]
    if until_cut <= need:
        src.feed_ids(ids[1 : until_cut + 1])
    if memory.n_local + memory.block_size - lay.local_k.shape[1] <= need:
        ap.error("--steps too large for one block between cuts")
    results = []
    for n in [int(x) for x in args.sessions.split(",")]:
        r = run(llm, src, memory, n, args.steps, args.warm, args.top)
        results.append(r)
        print(f"\nB={n}: {r['ms_per_step']:.1f} ms/step (profiled {r['profiled_ms_per_step']:.1f}), "
              f"torch calls {r['torch_calls']:.0f} ({r['torch_calls_outside_cpu_gather']:.0f} outside the CPU gather), "
              f"stacked share {r['stacked_share']:.2f}, host reads after layer 0: {r['host_reads_after_layer0']}")  # fmt: skip
        print(f"  {'own ms':>8} {'cum ms':>8} {'calls':>8}  function (per step)")
        for row in r["top_own"]:
            print(
                f"  {row['own_ms_per_step']:8.2f} {row['cum_ms_per_step']:8.2f} {row['calls_per_step']:8.0f}  {row['function']}"
            )
        print("  pieces (cumulative):")
        for row in r["pieces"]:
            print(
                f"  {row['own_ms_per_step']:8.2f} {row['cum_ms_per_step']:8.2f} {row['calls_per_step']:8.0f}  {row['function']}"
            )
    if args.out:
        Path(args.out).write_text(
            json.dumps({"args": vars(args), "torch": torch.__version__, "results": results}, indent=1)
        )


if __name__ == "__main__":
    main()
