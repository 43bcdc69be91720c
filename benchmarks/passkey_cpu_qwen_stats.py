"""Memory statistics for one 8K passkey prompt on qwen2.5-coder-0.5b (CPU), with the settings of
`memllm bench passkey --model qwen2.5-coder-0.5b --lengths 8k --depths 3 --device cpu --n-local 2048`.

The CLI reports accuracy and speed; this shows that the 8K prompt really goes past the attention window
(units offloaded, lookups made, at most n_init + topk*block_size + n_local + ... keys per query).
Usage: python benchmarks/passkey_cpu_qwen_stats.py [depth index 0..2, default 1] > out.json
"""

import json
import sys

from memllm.bench.passkey import depths, feed_and_decode, keys_for, prompt_ids
from memllm.config import MemoryConfig
from memllm.llm import MemLLM

LENGTH, N_DEPTHS = 8192, 3
index = int(sys.argv[1]) if len(sys.argv) > 1 else 1
depth, key = depths(N_DEPTHS)[index], keys_for(LENGTH, N_DEPTHS)[index]

llm = MemLLM.from_pretrained("qwen2.5-coder-0.5b", device="cpu")
memory = MemoryConfig(n_local=2048, topk=16, offload_dtype="bf16")
ids = prompt_ids(llm.tokenizer, LENGTH, depth, key)
session, out, prefill_s, _ = feed_and_decode(llm, ids, memory)
answer = llm.tokenizer.decode(out, skip_special_tokens=True)
json.dump(
    {
        "model": "qwen2.5-coder-0.5b",
        "length": LENGTH,
        "prompt_tokens": len(ids),
        "depth": depth,
        "key": key,
        "answer": answer,
        "correct": str(key) in answer,
        "prefill_s": prefill_s,
        "memory": session.config.to_dict(),
        "stats": session.stats(),
    },
    sys.stdout,
    indent=1,
)
sys.stdout.write("\n")
