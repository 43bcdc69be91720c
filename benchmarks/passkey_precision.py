"""One passkey trial under several kernel sets and precisions: the answer and, per answer token, the
gap between the top two logits (is a miss a rounding coin-flip, or what the rule computes?).

Variants: this tree's kernels and an older flash.py (--old-flash, e.g. `git show 5d64533:memllm/
context/flash.py > /tmp/flash_old.py`), each with the model in bf16 and in fp32 (units fp32 too).
Usage (device machine, model folder as for passkey_gpu.py):
  PYTHONPATH=/tmp/site:.:benchmarks python3 benchmarks/passkey_precision.py --model-dir /root/m \
      --gguf smollm2.gguf --length 32k --depths 2 --old-flash /tmp/flash_old.py --out $OUT/precision.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json

import torch
from passkey_gpu import DeviceLLM

from memllm.bench.passkey import depths, keys_for, parse_length, prompt_ids
from memllm.config import MemoryConfig
from memllm.context import attach
from memllm.context.cuda import window as flash
from memllm.context.prefill import step
from memllm.context.window import joined_memory
from memllm.session import Session


def load_model(model_dir: str, gguf: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=gguf, dtype=dtype).cuda().eval()
    model.set_attn_implementation("sdpa")
    return model


def old_kernels(path: str):
    """(local_attention_cuda, memory_attention_merge_cuda) of an older flash.py, adapted to this tree's
    calls (the older memory pass took sinks and units joined)."""
    spec = importlib.util.spec_from_file_location("flash_old", path)
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)

    def local(q, k, v, plan, scale, **_):
        return old.local_attention_cuda(q, k, v, plan, scale)

    def merge(q, sk, sv, uk, uv, plan, n_chosen, block_size, scale, out, lse):
        km, vm = joined_memory(sk, sv, uk, uv, len(plan.memory_blocks))
        chosen = n_chosen if uk is not None else 0
        return old.memory_attention_merge_cuda(q, km, vm, plan, sk.shape[1], chosen, block_size, scale, out, lse)

    return local, merge


@torch.no_grad()
def trial(model, tok, ids: list[int], dtype_name: str, answer_tokens: int = 6) -> dict:
    s = Session(DeviceLLM(model, tok, "x"), MemoryConfig(offload_dtype=dtype_name))
    s.feed_ids(torch.tensor(ids, device="cuda"))
    logits, out, gaps = s.last_logits, [], []
    with attach(model, cache=s.cache):
        for _ in range(answer_tokens):
            top = logits.topk(2)
            gaps.append(round(float(top.values[0] - top.values[1]), 3))
            out.append(int(top.indices[0]))
            logits = step(model, s.cache, torch.tensor([[out[-1]]], device="cuda"))
    return {"answer": tok.decode(out), "top2_gaps": gaps}


def main() -> None:
    from transformers import AutoTokenizer

    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--length", default="32k")
    ap.add_argument("--depths", default="2", help="depth indices of the 10 (comma list)")
    ap.add_argument("--old-flash", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    n = parse_length(args.length)
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    current = (flash.local_attention_cuda, flash.memory_attention_merge_cuda)
    kernel_sets = [("this tree", current)] + ([("old", old_kernels(args.old_flash))] if args.old_flash else [])
    res = {"length": n, "trials": []}
    for dtype, dtype_name in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        model = load_model(args.model_dir, args.gguf, dtype)
        for di in [int(x) for x in args.depths.split(",")]:
            key = keys_for(n, 10)[di]
            ids = prompt_ids(tok, n, depths(10)[di], key)
            for name, (local, merge) in kernel_sets:
                flash.local_attention_cuda, flash.memory_attention_merge_cuda = local, merge
                try:
                    row = {"depth": di, "key": key, "kernels": name, "dtype": dtype_name, **trial(model, tok, ids, dtype_name)}
                finally:
                    flash.local_attention_cuda, flash.memory_attention_merge_cuda = current
                res["trials"].append(row)
                print(row, flush=True)
        del model
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
