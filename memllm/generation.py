"""Token generation over any transformers Cache: sampling, stop tokens, streaming detokenization.

One decode loop (`decode`) serves plain chat (DynamicCache) and memory sessions (Session.generate_ids): it feeds
the prompt, then one token at a time, and yields token ids. Knows nothing of chat templates or memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch

from memllm.compat import cache_kwargs
from memllm.errors import ConfigError


class RepetitionGuard:
    """Keeps a decode loop from looping: `penalty` > 1 divides the positive logits (multiplies the
    negative ones) of tokens already generated in this answer (CTRL's rule, as transformers'
    repetition_penalty, but over the answer only: copying a fact from the prompt is not penalised);
    `no_repeat_ngram` > 0 forbids a token that would repeat an n-gram of the answer. Both off by default
    (penalty 1.0, n-gram 0)."""

    def __init__(self, penalty: float = 1.0, no_repeat_ngram: int = 0) -> None:
        if not penalty >= 1.0:
            raise ConfigError(f"repetition_penalty must be >= 1.0 (1.0 is off), got {penalty}")
        if not isinstance(no_repeat_ngram, int) or no_repeat_ngram < 0:
            raise ConfigError(f"no_repeat_ngram must be an integer >= 0 (0 is off), got {no_repeat_ngram!r}")
        self.penalty = float(penalty)
        self.n = no_repeat_ngram

    @property
    def active(self) -> bool:
        return self.penalty > 1.0 or self.n > 0

    def apply(self, logits: torch.Tensor, generated: Sequence[int]) -> torch.Tensor:
        """Logits (batch, vocab) adjusted for the tokens `generated` so far in this answer."""
        if not generated or not self.active:
            return logits
        logits = logits.clone()
        if self.penalty > 1.0:
            idx = torch.tensor(sorted(set(generated)), device=logits.device)
            vals = logits[:, idx]
            logits[:, idx] = torch.where(vals > 0, vals / self.penalty, vals * self.penalty)
        n = self.n
        if n > 0 and len(generated) >= n:
            prefix = tuple(generated[len(generated) - n + 1 :]) if n > 1 else ()
            banned = {
                generated[i + n - 1]
                for i in range(len(generated) - n + 1)
                if tuple(generated[i : i + n - 1]) == prefix
            }
            if banned:
                logits[:, sorted(banned)] = float("-inf")
        return logits


def sample_next(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """Next token ids (batch,) from last-position logits (batch, vocab): greedy at temperature 0."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def decode(
    logits: torch.Tensor,
    step: Callable[[Any], torch.Tensor],
    max_new_tokens: int,
    *,
    stop_ids: Iterable[int] = (),
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
    guard: RepetitionGuard | None = None,
    feed_last: bool = False,
    on_device: bool = False,
    logprobs: list[float] | None = None,
) -> Iterator[Any]:
    """The decode loop of every generation path (plain attention: generate_ids; context memory:
    Session.generate_ids; the benchmarks' timing path: context/prefill.greedy): from next-token
    `logits` ((vocab,) or (1, vocab)), choose a token (the guard's adjustment for the tokens chosen so
    far, then greedy or sampled), stop before a stop id, feed the token with `step(token) -> next
    logits`, then yield it: a caller that keeps a stream (Session) holds every token it has yielded.
    The last token is fed only with `feed_last` (a session continues from its logits; a one-off call
    needs none). `on_device`: tokens stay (1, 1) device tensors, never read on the host (no host
    synchronisation per token), so there are no stop ids, no guard and no sampling. `logprobs` (a
    diagnostic): each yielded token's log-probability under the model's logits (before the guard) is
    appended to it before the token is yielded."""
    if on_device and (stop_ids or guard is not None or temperature > 0 or logprobs is not None):
        raise ConfigError("on-device decoding is greedy, without stop ids, a repetition guard or log-probabilities")
    stops = set(stop_ids)
    generated: list[int] = []
    for i in range(max_new_tokens):
        model_row = row = logits.reshape(1, -1)
        if guard is not None and generated:
            row = guard.apply(row, generated)
        chosen = sample_next(row, temperature, generator)
        if on_device:
            token: Any = chosen.view(1, 1)
        else:
            token = int(chosen.item())
            if token in stops:
                return
            generated.append(token)
            if logprobs is not None:
                logprobs.append(float(torch.log_softmax(model_row[0].float(), dim=-1)[token]))
        if feed_last or i + 1 < max_new_tokens:
            logits = step(token)
        yield token


@torch.inference_mode()
def generate_ids(
    model: Any,
    input_ids: torch.Tensor,
    *,
    cache: Any,
    max_new_tokens: int,
    temperature: float = 0.0,
    stop_ids: Iterable[int] = (),
    generator: torch.Generator | None = None,
    start_position: int = 0,
    guard: RepetitionGuard | None = None,
) -> Iterator[int]:
    """Yield up to max_new_tokens ids after `input_ids` (1, seq) with the model's own attention over
    `cache`; stops before yielding a stop id (the loop: `decode`).

    `start_position` is the absolute position of input_ids[0, 0] (tokens already in `cache`).
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must have shape (1, seq), got {tuple(input_ids.shape)}")
    pos = start_position

    def call(ids: torch.Tensor) -> torch.Tensor:
        nonlocal pos
        n = ids.shape[1]
        positions = torch.arange(pos, pos + n, device=ids.device).unsqueeze(0)
        out = model(
            input_ids=ids, **cache_kwargs(model, cache), use_cache=True, position_ids=positions, logits_to_keep=1
        )
        pos += n
        return out.logits[:, -1, :]

    def step(token: int) -> torch.Tensor:
        return call(torch.tensor([[token]], device=input_ids.device))

    yield from decode(call(input_ids), step, max_new_tokens, stop_ids=stop_ids, temperature=temperature,
                      generator=generator, guard=guard)  # fmt: skip


def decode_stream(tokenizer: Any, tokens: Iterable[int]) -> Iterator[str]:
    """Text pieces of a token stream, as they become whole characters (then whatever is left)."""
    decoder = StreamDecoder(tokenizer)
    for token in tokens:
        piece = decoder.push(token)
        if piece:
            yield piece
    rest = decoder.flush()
    if rest:
        yield rest


class StreamDecoder:
    """Turns a growing list of token ids into text pieces, never splitting a multi-byte character."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return ""
        piece = text[self.emitted :]
        self.emitted = len(text)
        return piece

    def flush(self) -> str:
        """What is left once the stream ends (an incomplete character is shown as it decodes)."""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        piece = text[self.emitted :]
        self.emitted = len(text)
        return piece


class StopScanner:
    """Cuts a text stream at the first occurrence of any stop sequence.

    push(piece) -> (text safe to emit now, whether a stop sequence was reached); flush() -> the text
    held back at the end of the stream. Only a suffix that is a prefix of some stop sequence is held."""

    def __init__(self, stops: Sequence[str] | None) -> None:
        self.stops = [s for s in (stops or ()) if s]
        self.buffer = ""
        self.stopped = False
        self.matched: str | None = None

    def push(self, piece: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        if not self.stops:
            return piece, False
        self.buffer += piece
        first: tuple[int, str] | None = None
        for stop in self.stops:
            at = self.buffer.find(stop)
            if at >= 0 and (first is None or at < first[0]):
                first = (at, stop)
        if first is not None:
            out = self.buffer[: first[0]]
            self.buffer, self.stopped, self.matched = "", True, first[1]
            return out, True
        hold = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.buffer)), hold, -1):
                if self.buffer.endswith(stop[:n]):
                    hold = n
                    break
        out = self.buffer[: len(self.buffer) - hold]
        self.buffer = self.buffer[len(self.buffer) - hold :]
        return out, False

    def flush(self) -> str:
        out, self.buffer = self.buffer, ""
        return out
