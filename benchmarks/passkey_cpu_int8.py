import json
import time

import torch

from memllm.bench.passkey import run_passkey
from memllm.config import MemoryConfig
from memllm.llm import MemLLM

torch.set_num_threads(2)
llm = MemLLM.from_pretrained("smollm2-135m", device="cpu")
out = {}
for dt in ("bf16", "int8"):
    mem = MemoryConfig(
        n_init=64, n_local=512, block_size=64, repr_topk=4, topk=4, exc_block_size=256, offload_dtype=dt
    )
    t = time.time()
    res = run_passkey(llm, [4096], 10, memory=mem, system="memllm", progress=print, only=[1, 3, 5, 7])
    s = res[0].summary()
    out[dt] = {
        "correct": s["correct"],
        "trials": s["trials"],
        "host_bytes": s["host_bytes"],
        "answers": [d["answer"] for d in s["details"]],
        "seconds": time.time() - t,
    }
    print(dt, out[dt], flush=True)
json.dump(out, open("/tmp/int8cpu.json", "w"), indent=1)
