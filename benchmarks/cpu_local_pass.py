"""The CPU local pass per layer (SmolLM2-135M's heads: 9 query, 3 KV, head dim 64): the loop
(window.local_attention, impl "reference"), the fused pass (window.local_attention_fused, with the
received scores) and plain SDPA, for a call of c tokens after a window of W keys; how FUSED_CPU_MIN
(context/kernels.py) was chosen.

    python benchmarks/cpu_local_pass.py
"""

from __future__ import annotations

import time

import torch

from memllm.config import MemoryConfig
from memllm.context.plan import plan_call
from memllm.context.window import local_attention, local_attention_fused

HEADS, KV_HEADS, DIM = 9, 3, 64


def timed(f, n: int = 3) -> float:
    f()
    t0 = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - t0) / n


def main() -> None:
    torch.manual_seed(0)
    g = HEADS // KV_HEADS
    cfg = MemoryConfig().resolved(8192)
    print("| window W | call c | loop ms | fused ms | plain sdpa ms |\n|---|---|---|---|---|")
    for W, c in [(0, 3584), (3584, 1), (3584, 30), (3584, 64), (3584, 128), (3584, 512)]:
        plan = plan_call(W, W, False, 0, c, cfg)
        q, k, v = torch.randn(HEADS, c, DIM), torch.randn(KV_HEADS, W + c, DIM), torch.randn(KV_HEADS, W + c, DIM)
        args = (q, k, v, plan, DIM**-0.5, torch.float32)
        loop = timed(lambda a=args: local_attention(*a))
        fused = timed(lambda a=args: local_attention_fused(*a))
        kk, vv = k.repeat_interleave(g, 0)[None], v.repeat_interleave(g, 0)[None]
        sdpa = timed(lambda q=q, kk=kk, vv=vv, causal=W == 0: torch.nn.functional.scaled_dot_product_attention(
            q[None], kk, vv, is_causal=causal))  # fmt: skip
        print(f"| {W} | {c} | {loop * 1e3:.1f} | {fused * 1e3:.1f} | {sdpa * 1e3:.1f} |", flush=True)


if __name__ == "__main__":
    main()
