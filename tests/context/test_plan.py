"""A call's plan equals the per-block rule applied step by step (the eviction loop written plainly)."""

from __future__ import annotations

import random

import pytest

from memllm.config import MemoryConfig
from memllm.context.plan import plan_call


def stepwise(seen, window, cut, n_units, c, cfg):
    """The rule block by block: (per block (q0, q1, lo, cut, units)), cut spans, final window start."""
    e, bs = cfg.exc_block_size, cfg.block_size
    ws, start, blocks, spans = 0, 0, [], []
    while start < c:
        end = min(c, start + e - (seen + start) % e)
        blocks.append((start, end, ws, cut, n_units))
        while True:
            head = 0 if cut else cfg.n_init
            if window + end - ws - head - bs < cfg.n_local:
                break
            spans.append(ws + head)
            ws, cut, n_units = ws + head + bs, True, n_units + 1
        start = end
    return blocks, spans, ws


@pytest.mark.parametrize("seed", range(40))
def test_plan_equals_stepwise_rule(seed):
    rng = random.Random(seed)
    cfg = MemoryConfig(n_init=rng.choice([0, 4]), n_local=48, block_size=8, repr_topk=2, topk=3,
                       exc_block_size=rng.choice([8, 16, 64]), chunk_size=200, offload_dtype="fp32")  # fmt: skip
    cut = rng.random() < 0.7
    window = rng.randint(48, 48 + 7) if cut else rng.randint(0, cfg.n_init + 48 + 7)
    seen = window + (rng.randint(0, 500) if cut else 0)
    c = rng.choice([1, 3, rng.randint(1, 200)])
    plan = plan_call(seen, window, cut, 5 if cut else 0, c, cfg)
    blocks, spans, keep = stepwise(seen, window, cut, 5 if cut else 0, c, cfg)
    assert [(b.q0, b.q1, b.lo, b.cut_before, b.units_before) for b in plan.blocks] == blocks
    # Units cut during the call are one contiguous span, in order.
    assert spans == [plan.cut_start + i * cfg.block_size for i in range(plan.n_cut)]
    assert plan.keep_from == keep
    assert (plan.sinks_from is not None) == (not cut and plan.n_cut > 0)
    # The window after the call stays within its bound.
    assert window + c - keep < cfg.n_init * (not (cut or plan.n_cut)) + cfg.n_local + cfg.block_size


@pytest.mark.parametrize("seed", range(30))
def test_held_plan_cuts_nothing_within_the_limit_else_follows_the_rule(seed):
    """A held call (an answer that will be rolled back) that fits n_local + block_size + exc_block_size
    past the protected head cuts nothing and keeps its keys in the window; one that does not fit is
    planned exactly as an unheld call."""
    from memllm.context.plan import held_limit

    rng = random.Random(1000 + seed)
    cfg = MemoryConfig(n_init=rng.choice([0, 4]), n_local=48, block_size=8, repr_topk=2, topk=3,
                       exc_block_size=rng.choice([8, 16, 64]), chunk_size=200, offload_dtype="fp32")  # fmt: skip
    cut = rng.random() < 0.7
    head = 0 if cut else cfg.n_init
    window = rng.randint(48, 48 + 7) if cut else rng.randint(0, cfg.n_init + 48 + 7)
    seen = window + (rng.randint(0, 500) if cut else 0)
    c = rng.randint(1, 150)
    held = plan_call(seen, window, cut, 5, c, cfg, hold=True)
    plain = plan_call(seen, window, cut, 5, c, cfg)
    if window + c - head <= held_limit(cfg):
        assert held.n_cut == 0 and held.keep_from == 0 and held.sinks_from is None
        assert [(b.q0, b.q1, b.lo, b.cut_before) for b in held.blocks] == [
            (b.q0, b.q1, 0, cut) for b in plain.blocks
        ]
        # Keys per query stay within cache.py's bound.
        assert window + c <= cfg.n_init + cfg.n_local + cfg.block_size + cfg.exc_block_size
    else:
        assert (held.blocks, held.n_cut, held.keep_from, held.cut_start) == (
            plain.blocks,
            plain.n_cut,
            plain.keep_from,
            plain.cut_start,
        )
