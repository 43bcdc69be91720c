"""generation.decode's log-probabilities (a diagnostic): each yielded token's, under the model's logits."""

from __future__ import annotations

import pytest
import torch

from memllm.errors import ConfigError
from memllm.generation import RepetitionGuard, decode


def _steps(n: int, vocab: int = 11, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, vocab, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("guarded", [False, True])
def test_each_yielded_token_has_its_log_probability_under_the_models_logits(guarded):
    table = _steps(6)
    fed: list[int] = []

    def step(tok: int) -> torch.Tensor:
        fed.append(tok)
        return table[len(fed)]

    logprobs: list[float] = []
    guard = RepetitionGuard(penalty=3.0) if guarded else None
    out = list(decode(table[0], step, 5, guard=guard, logprobs=logprobs))
    assert len(out) == len(logprobs) == 5
    for i, (tok, lp) in enumerate(zip(out, logprobs, strict=True)):
        assert lp == pytest.approx(float(torch.log_softmax(table[i], dim=-1)[tok]), abs=1e-6)
    if not guarded:
        assert out == [int(table[i].argmax()) for i in range(5)]


def test_a_stop_token_adds_no_log_probability():
    table = _steps(4)
    stop = int(table[1].argmax())
    logprobs: list[float] = []
    out = list(decode(table[0], lambda tok: table[1], 3, stop_ids={stop}, logprobs=logprobs))
    assert len(out) == len(logprobs) == 1


def test_on_device_decoding_refuses_log_probabilities():
    with pytest.raises(ConfigError, match="log-probabilities"):
        list(decode(_steps(1)[0], lambda tok: _steps(1)[0], 2, on_device=True, logprobs=[]))
