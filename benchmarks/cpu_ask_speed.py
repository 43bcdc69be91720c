"""kv `ask` on a document that fits the window against plain transformers on the same text and
answer length, on the CPU (issue 20: "while the stream fits the window, kv mode runs at
plain-attention speed"). Same process, same weights (memllm's cached ones), greedy answers of
--new tokens; memllm's CPU local pass both ways: impl "fast" (window.local_attention_fused) and
impl "reference" (the loop it is tested against).

    python benchmarks/cpu_ask_speed.py --tokens 3500 --reps 2 --out benchmarks/results/cpu_ask_speed.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import replace

import torch

from memllm.agents.docqa import DocumentQA, default_memory
from memllm.bench.ruler import essay_sentences
from memllm.compat import cache_kwargs
from memllm.llm import MemLLM

QUESTION = "What is the main point of the essay?"


def essay(tok, tokens: int) -> str:
    text = ""
    for s in essay_sentences():
        text += s + " "
        if len(tok(text, add_special_tokens=False)["input_ids"]) >= tokens:
            return text
    return text


@torch.no_grad()
def plain(llm, text: str, new: int) -> dict:
    from transformers import DynamicCache

    ids = llm.tokenizer.apply_chat_template([{"role": "user", "content": text + "\n\n" + QUESTION}],
                                            add_generation_prompt=True, return_tensors="pt")  # fmt: skip
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    t0 = time.perf_counter()
    cache = DynamicCache(config=llm.model.config)
    out = llm.model(input_ids=ids, use_cache=True, logits_to_keep=1, **cache_kwargs(llm.model, cache))
    nxt, pos = out.logits[0, -1].argmax(), ids.shape[1]
    for _ in range(new - 1):
        out = llm.model(input_ids=nxt.view(1, 1), position_ids=torch.tensor([[pos]]), use_cache=True,
                        **cache_kwargs(llm.model, cache))  # fmt: skip
        nxt, pos = out.logits[0, -1].argmax(), pos + 1
    return {"prompt_tokens": int(ids.shape[1]), "seconds": time.perf_counter() - t0}


def kv(llm, text: str, new: int, impl: str) -> dict:
    memory = replace(default_memory(llm.trained_len), impl=impl)
    t0 = time.perf_counter()
    qa = DocumentQA(llm, "kv", memory=memory, max_new_tokens=new)
    qa.read(text, name="essay.txt")
    t1 = time.perf_counter()
    answer = qa.ask(QUESTION)
    t2 = time.perf_counter()
    units = qa.session.stats()["units_per_layer"]
    qa.close()
    return {"read_s": t1 - t0, "ask_s": t2 - t1, "seconds": t2 - t0, "units": units, "answer": answer.text}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=3500)
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    llm = MemLLM.from_pretrained(args.model, device="cpu")
    text = essay(llm.tokenizer, args.tokens)
    runs = []
    for rep in range(args.reps):  # interleaved: the shared CPU's noise falls on all three alike
        row = {"rep": rep, "plain": plain(llm, text, args.new)}
        for impl in ("fast", "reference"):
            row[f"kv_{impl}"] = kv(llm, text, args.new, impl)
        runs.append(row)
        p = row["plain"]["seconds"]
        print(f"rep {rep}: plain {p:.2f}s | kv fast {row['kv_fast']['seconds']:.2f}s ({row['kv_fast']['seconds'] / p:.2f}x) "
              f"| kv reference {row['kv_reference']['seconds']:.2f}s ({row['kv_reference']['seconds'] / p:.2f}x) "
              f"| units {row['kv_fast']['units']}", flush=True)  # fmt: skip
    env = {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
           "model": args.model, "tokens": args.tokens, "new": args.new}  # fmt: skip
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"env": env, "runs": runs}, fh, indent=1)


if __name__ == "__main__":
    main()
