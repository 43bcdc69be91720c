"""The converted-weight cache in fp32 (today) against bf16 (a candidate, issue 20): size on disk, load time
into fp32 on the CPU, the first answer's time, greedy answers to five prompts and the largest weight
difference. Each load runs in a fresh process, alternating, `--reps` times.

    python benchmarks/weight_cache_dtype.py --reps 2 --out benchmarks/results/weight_cache_dtype.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

PROMPTS = ["What is the capital of France? Answer in one word.", "My dog is called Biscuit. What is my dog called?",
           "Write a haiku about the sea.", "What is 12 times 7?", "Name three colours."]  # fmt: skip

LOAD = r"""
import json, sys, time, torch
t0 = time.perf_counter()
from transformers import AutoModelForCausalLM, AutoTokenizer
path, prompts = sys.argv[1], json.loads(sys.argv[2])
t1 = time.perf_counter()
m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
tok = AutoTokenizer.from_pretrained(path)
t2 = time.perf_counter()
answers, first = [], None
with torch.no_grad():
    for p in prompts:
        ids = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, return_tensors="pt")
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        t3 = time.perf_counter()
        out = m.generate(ids, max_new_tokens=24, do_sample=False)
        first = first if first is not None else time.perf_counter() - t3
        answers.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "first_answer_s": first, "answers": answers}))
"""


def size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from memllm import models

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    fp32 = Path(models.weights_location(models.resolve(args.model)))
    with tempfile.TemporaryDirectory() as tmp:
        bf16 = Path(tmp) / "bf16"
        AutoModelForCausalLM.from_pretrained(fp32, dtype=torch.float32).to(torch.bfloat16).save_pretrained(bf16)
        AutoTokenizer.from_pretrained(fp32).save_pretrained(bf16)
        a, b = load_file(str(fp32 / "model.safetensors")), load_file(str(bf16 / "model.safetensors"))
        diff = max((a[k] - b[k].float()).abs().max().item() for k in a)
        runs: dict[str, list[dict]] = {"fp32": [], "bf16": []}
        for _ in range(args.reps):
            for name, path in (("fp32", fp32), ("bf16", bf16)):
                out = subprocess.run([sys.executable, "-c", LOAD, str(path), json.dumps(PROMPTS)], capture_output=True,
                                     text=True, check=True).stdout  # fmt: skip
                runs[name].append(json.loads(out.strip().splitlines()[-1]))
        sizes = {"fp32": size(fp32), "bf16": size(bf16)}
    same = [r["answers"] for r in runs["fp32"]][0] == [r["answers"] for r in runs["bf16"]][0]
    result = {"model": args.model, "sizes": sizes, "max_weight_diff": diff, "same_answers": same, "runs": runs,
              "torch": torch.__version__}  # fmt: skip
    print("| cache | size MB | load s | first answer s |\n|---|---|---|---|")
    for name in ("fp32", "bf16"):
        rs = runs[name]
        load = " / ".join(f"{r['load_s']:.2f}" for r in rs)
        first = " / ".join(f"{r['first_answer_s']:.2f}" for r in rs)
        print(f"| {name} | {sizes[name] / 1e6:.0f} | {load} | {first} |")
    print(f"largest weight difference {diff:.3g}; the five greedy answers {'identical' if same else 'differ'}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
