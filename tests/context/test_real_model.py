"""Slow tier: the real default model (SmolLM2-135M, CPU, fp32) through MemLLM.session()."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from memllm.compat import cache_kwargs
from memllm.config import MemoryConfig
from memllm.context import attach, feed

pytestmark = pytest.mark.slow

FILLER = "The weather was mild and nothing happened. "
FACT = "Alice keeps her spare key under the blue flowerpot. "
TEXT = FILLER * 10 + FACT + FILLER * 30  # the fact sits past the sinks and far before the window


@pytest.fixture(scope="module")
def llm():
    from memllm.llm import MemLLM

    return MemLLM.from_pretrained("smollm2-135m", device="cpu", dtype="fp32")


def test_golden_rule_on_the_real_model(llm):
    ids = torch.tensor([llm.tokenizer(TEXT, add_special_tokens=False)["input_ids"][:300]])
    model = llm.model
    with torch.no_grad():
        want = model(ids, **cache_kwargs(model, DynamicCache(config=model.config)), use_cache=True).logits[0, -1]
    mem = MemoryConfig(n_init=16, n_local=512, block_size=32, topk=4, exc_block_size=64, chunk_size=96)
    with attach(model, mem) as cache:
        got = feed(model, cache, ids)
    assert float((got - want).abs().max() / want.abs().max()) < 1e-4


def test_session_past_the_window_answers_and_rolls_back(llm):
    mem = MemoryConfig(n_init=16, n_local=128, block_size=32, topk=4, exc_block_size=64, offload_dtype="int8")
    s = llm.session(mem)
    s.feed(TEXT)
    before = s.stats()
    assert before["units"] > 0
    fact_at = len(llm.tokenizer(FILLER * 10, add_special_tokens=False)["input_ids"])
    assert mem.n_init < fact_at and fact_at + 20 < before["tokens_seen"] - mem.n_local - mem.block_size
    answer = s.ask(" Question: where is the spare key? Answer: under the", max_new_tokens=8)
    assert "blue flowerpot" in answer
    assert s.stats()["tokens_seen"] == before["tokens_seen"] and s.stats()["units"] == before["units"]
