"""Where a question's time goes after a long read (issue 25: the suite's cost is its questions).

The suite's runs spend ~1 s per question at 1M tokens against ~0.2 s at 32K whatever the answer's
length (run 38: 6 or 48 new tokens, the same time), so something per question scales with the units.
This script reads one stream per length, then asks the same question several times (each rolled back,
Session.answering) and times, with the device synchronised around each piece:
  question = the whole call; select = select_prompt (the probe's feed and the choice); scan = the
  probe's unit_mass in every layer (inside select); feed = the question fed again with the forced
  units; decode = the rest (the new tokens).
Per scan (--scans): `chunked:MB`, the reference scan (select.unit_lse: the units' keys and values
gathered in chunks of MB of logits, a matmul and a log-sum-exp per chunk; on CUDA the path before
cuda/select.py, kept as the fallback), and `kernel` (or `kernel:ieee`, `kernel:tf32x3`: its products' precision), the library's own
(on CUDA one Triton launch per layer). The units each scan chose are compared with the first scan's (same question, same read).

  PYTHONPATH=/tmp/site:. python benchmarks/question_latency.py --model-dir /root/m --gguf smollm2.gguf \\
      --lengths 128k,1m --scans chunked:16,chunked:64,kernel:ieee,kernel:tf32x3 --out $OUT/question_latency.json
  PYTHONPATH=. python benchmarks/question_latency.py --random smollm2 --lengths 128k,1m ...   # no weights to carry
  python benchmarks/question_latency.py --quick      # CPU, tiny random Llama: the script's own check

--random smollm2|qwen0.5b: random weights in bf16 with SmolLM2-135M's or Qwen2.5-0.5B's shapes (layers, heads, KV
heads, head_dim, vocabulary): a question's time does not depend on the weights' values (every unit is scanned,
the same number of units is read whatever is chosen, the answer runs its --new-tokens with no stop).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any
from unittest.mock import patch

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.passkey_gpu import lengths, load_llm  # noqa: E402
from memllm.config import MemoryConfig  # noqa: E402
from memllm.context import cache as cache_mod  # noqa: E402
from memllm.context import select  # noqa: E402
from memllm.session import Session  # noqa: E402

SHAPES = {  # the models' config.json shapes
    "smollm2": ("llama", dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                             num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                             rope_theta=100000.0, tie_word_embeddings=True)),
    "qwen0.5b": ("qwen2", dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                              num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                              rope_theta=1000000.0, tie_word_embeddings=True)),
}  # fmt: skip


def random_model(name: str) -> torch.nn.Module:
    """Random weights in bf16 on CUDA with `name`'s shapes (SHAPES)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    kind, shape = SHAPES[name]
    config = (LlamaConfig if kind == "llama" else Qwen2Config)(**shape)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = (LlamaForCausalLM if kind == "llama" else Qwen2ForCausalLM)(config)
    model = model.to(torch.bfloat16).eval()
    model.set_attn_implementation("sdpa")
    return model


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@contextmanager
def timers(session: Session, took: dict[str, float]):
    """Times select_prompt, feed_ids (outside select) and the probe's unit_mass, restoring all after."""
    real_select, real_feed, real_mass = session.select_prompt, session.feed_ids, cache_mod.unit_mass
    inside = {"select": False}

    def timed(name, f):
        def wrapper(*a, **k):
            sync()
            t = time.perf_counter()
            out = f(*a, **k)
            sync()
            took[name] += time.perf_counter() - t
            return out

        return wrapper

    def select_prompt(*a, **k):
        inside["select"] = True
        try:
            return timed("select", real_select)(*a, **k)
        finally:
            inside["select"] = False

    def feed_ids(*a, **k):
        return (real_feed if inside["select"] else timed("feed", real_feed))(*a, **k)

    session.select_prompt, session.feed_ids = select_prompt, feed_ids
    cache_mod.unit_mass = timed("scan", real_mass)
    try:
        yield
    finally:
        del session.select_prompt, session.feed_ids
        cache_mod.unit_mass = real_mass


@contextmanager
def scan_path(mb: int | None, precision: str | None = None):
    """mb: the reference scan with chunks of mb MB of logits (the CUDA kernel refused for the while);
    None: the library's own scan (on CUDA with the kernel's products in `precision` if given)."""
    with ExitStack() as stack:
        select_cuda = None
        if torch.cuda.is_available():
            from memllm.context.cuda import select as select_cuda
        if mb is not None:
            stack.enter_context(patch.object(select, "SCAN_BYTES", mb << 20))
            if select_cuda is not None:
                stack.enter_context(patch.object(select_cuda, "supports", lambda store: False))
        elif precision is not None and select_cuda is not None:
            stack.enter_context(patch.object(select_cuda, "PRECISION", precision))
        yield


def ask(session: Session, prompt: list[int], new_tokens: int) -> int:
    with session.answering():
        gen = session.generate_ids(prompt, new_tokens, stop=set())
        n = sum(1 for _ in gen)
    return n


def measure(session: Session, prompt: list[int], new_tokens: int, repeats: int) -> dict[str, Any]:
    ask(session, prompt, new_tokens)  # warm-up: kernels compiled, graphs captured
    rows = []
    for _ in range(repeats):
        took: dict[str, float] = defaultdict(float)
        with timers(session, took):
            sync()
            t = time.perf_counter()
            n = ask(session, prompt, new_tokens)
            sync()
            took["question"] = time.perf_counter() - t
        took["decode"] = took["question"] - took["select"] - took["feed"]
        took["new_tokens"] = n
        rows.append(dict(took))
    keys = ("question", "select", "scan", "feed", "decode")
    return {"median_s": {k: statistics.median(r[k] for r in rows) for k in keys}, "runs": rows}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir")
    ap.add_argument("--gguf")
    ap.add_argument("--weights-cache")
    ap.add_argument("--lengths", default="128k,1m")
    ap.add_argument("--scans", default="chunked:16,chunked:64,kernel")
    ap.add_argument("--prompt-tokens", type=int, default=120)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--random", choices=sorted(SHAPES))
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.quick:
        from tests.context.helpers import CharTokenizer, FakeLLM, tiny_model

        llm = FakeLLM(tiny_model("llama", layers=2, trained=1 << 20), CharTokenizer())
        memory = MemoryConfig(selector="question", offload_dtype="fp32", n_local=512, block_size=32, topk=4,
                              chunk_size=512, exc_block_size=64, n_init=16)  # fmt: skip
        todo, vocab = [8192], (1, 128)
    elif args.random:
        from tests.context.helpers import CharTokenizer, FakeLLM

        llm = FakeLLM(random_model(args.random), CharTokenizer(), f"random weights, {args.random}'s shapes (bf16)")
        memory = MemoryConfig(selector="question")
        todo, vocab = lengths(args.lengths), (100, 40000)
    else:
        llm = load_llm(args.model_dir, args.gguf, "SmolLM2-135M-Instruct (GGUF dequantized, bf16)", args.weights_cache)
        memory = MemoryConfig(selector="question")
        todo, vocab = lengths(args.lengths), (100, 40000)
    scans = [x.strip() for x in args.scans.split(",") if x.strip()]
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(*vocab, (args.prompt_tokens,), generator=g).tolist()
    result: dict[str, Any] = {"env": env(args), "rows": []}
    for n in todo:
        s = Session(llm, memory)
        ids = torch.randint(*vocab, (n,), generator=g).tolist()
        sync()
        t = time.perf_counter()
        s.feed_ids(ids)
        sync()
        read_s = time.perf_counter() - t
        units = s.cache.layers[0].store.n_units
        first_units = None
        for scan in scans:
            mb = int(scan.split(":")[1]) if scan.startswith("chunked:") else None
            precision = scan.split(":")[1] if scan.startswith("kernel:") else None
            with scan_path(mb, precision):
                if torch.cuda.is_available():
                    torch.cuda.reset_peak_memory_stats()
                got = measure(s, prompt, args.new_tokens, args.repeats)
                peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
            units_read = s.last_selection["units"] if s.last_selection else None
            first_units = units_read if first_units is None else first_units
            row = {"length": n, "units": units, "read_s": read_s, "scan": scan, "peak_gib": peak,
                   "chosen": units_read, "same_units_as_first": units_read == first_units, **got}  # fmt: skip
            result["rows"].append(row)
            med = got["median_s"]
            print(f"{n:>8} units {units:>5} {scan:>11}: " + " ".join(f"{k} {v * 1e3:7.1f}" for k, v in med.items())
                  + (f" ms, peak {peak:.3f} GiB" if peak is not None else " ms")
                  + f", same units as {scans[0]}: {units_read == first_units}", flush=True)  # fmt: skip
        s.close()
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    if args.quick:
        r = result["rows"][0]
        assert r["runs"][0]["new_tokens"] == args.new_tokens and r["median_s"]["scan"] > 0, r
        assert all(row["same_units_as_first"] for row in result["rows"]), result["rows"]
        print("quick check ok")


def env(args: argparse.Namespace) -> dict[str, Any]:
    import transformers

    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"device": dev, "torch": torch.__version__, "transformers": transformers.__version__, "triton": triton_version,
            "python": sys.version.split()[0], "command": " ".join(sys.argv)}  # fmt: skip


if __name__ == "__main__":
    main()
