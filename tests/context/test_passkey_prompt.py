"""Passkey prompt builder: exact length L - 10, the key at the requested depth, keys as issue 3 fixes them."""

from __future__ import annotations

import random

import pytest

from memllm.bench.passkey import FILLER, HEADER, KEY, QUESTION, depths, keys_for, parse_length, prompt_ids
from tests.context.helpers import CharTokenizer


def test_lengths_and_depths():
    assert parse_length("8k") == 8192 and parse_length("1m") == 1 << 20 and parse_length("5000") == 5000
    with pytest.raises(ValueError):
        parse_length("k")
    assert depths(10) == [i / 9 for i in range(10)]
    rng = random.Random(1234 * 1000003 + 8192)
    assert keys_for(8192) == [rng.randint(10000, 99999) for _ in range(10)]


@pytest.mark.parametrize("length", [600, 1000, 4096])
def test_prompt_exact_length_and_key_depth(length):
    tok = CharTokenizer()
    for depth, key in zip(depths(10), keys_for(length), strict=True):
        ids = prompt_ids(tok, length, depth, key)
        assert len(ids) == length - 10
        text = tok.decode(ids)
        key_text = KEY.format(key=key)
        assert text.startswith(HEADER) and text.endswith(QUESTION) and text.count(key_text) == 1
        n = (length - 10 - len(HEADER) - len(key_text) - len(QUESTION)) // len(FILLER)
        before = text[len(HEADER) : text.index(key_text)]
        assert before == FILLER * round(depth * n)
        after = text[text.index(key_text) + len(key_text) : -len(QUESTION)]
        pad = length - 10 - len(HEADER) - len(key_text) - len(QUESTION) - n * len(FILLER)
        assert after == FILLER * (n - round(depth * n)) + FILLER[:pad]


@pytest.mark.slow
def test_prompt_with_the_default_tokenizer():
    from memllm.llm import MemLLM

    tok = MemLLM.from_pretrained("smollm2-135m", device="cpu").tokenizer
    for depth, key in zip(depths(3), keys_for(8192, 3), strict=True):
        ids = prompt_ids(tok, 8192, depth, key)
        assert len(ids) == 8182
        assert str(key) in tok.decode(ids)


def test_ask_after_feed_reads_as_ask_does():
    """The passkey asked after the read (the selector's path): while the stream fits the window it is
    the single-pass run's answer (no units to choose); with units cut, the question selector chose
    exactly topk units and the host bytes count the store."""
    from memllm.bench.passkey import ask_after_feed, feed_and_decode, run_passkey
    from tests.context.helpers import FakeLLM, small_memory, tiny_model

    llm = FakeLLM(tiny_model(trained=4096), CharTokenizer())
    ids = prompt_ids(llm.tokenizer, 300, 0.5, 12345)
    wide = small_memory(n_local=512)
    _, whole, _, _ = feed_and_decode(llm, ids, wide)
    _, asked, _, _ = ask_after_feed(llm, ids, wide, "question")
    assert asked == whole

    mem = small_memory()
    session, _, prefill_s, _ = ask_after_feed(llm, ids, mem, "question")
    assert prefill_s > 0 and session.cache.layers[0].store.n_units > mem.topk
    assert len(session.last_selection["units"]) == mem.topk
    (res,) = run_passkey(llm, [300], 2, memory=mem, system="ask:question", selector="question")
    assert len(res.trials) == 2 and res.host_bytes > 0
