"""Passkey retrieval workload (issue 3): prompt construction, and runs through memllm or full attention.

The prompt, exactly: segments tokenized once without special tokens and their id lists concatenated:
HEADER, n1 x FILLER, KEY, (n - n1) x FILLER, the first tokens of one more FILLER as padding, QUESTION,
where n is the number of whole fillers that fit in L - 10 tokens and n1 = round(depth * n), so the
prompt has exactly L - 10 tokens. Depths i/9 (i = 0..9); keys: rng = random.Random(1234*1000003 + L),
one rng.randint(10000, 99999) per depth in order. Greedy decoding of up to 10 tokens; correct if the
key's digits appear in the output. Knows nothing of the CLI; `llm` is a MemLLM-like object.
"""

from __future__ import annotations

import random
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from memllm.compat import cache_kwargs

HEADER = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there.\n\n"
)
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
KEY = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "\n\nWhat is the pass key? The pass key is"
ANSWER_TOKENS = 10


def parse_length(text: str) -> int:
    """'8k' -> 8192, '1m' -> 1048576, '5000' -> 5000 (k = 1024, m = 1024 * 1024)."""
    t = text.strip().lower()
    mult = {"k": 1024, "m": 1024 * 1024}.get(t[-1:], 1)
    digits = t[:-1] if mult > 1 else t
    if not digits.isdigit() or int(digits) <= 0:
        raise ValueError(
            f"bad length {text!r}: use a positive number with an optional k or m suffix (8k, 1m)"
        )
    return int(digits) * mult


def depths(count: int = 10) -> list[float]:
    """count depths evenly from 0 to 1 (i / (count - 1)); issue 3 uses 10: i/9."""
    return [0.0] if count == 1 else [i / (count - 1) for i in range(count)]


def keys_for(length: int, count: int = 10) -> list[int]:
    rng = random.Random(1234 * 1000003 + length)
    return [rng.randint(10000, 99999) for _ in range(count)]


def prompt_ids(tokenizer: Any, length: int, depth: float, key: int) -> list[int]:
    """The passkey prompt of exactly length - 10 tokens with `key` at `depth` (0..1)."""

    def enc(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    header, filler, key_ids, question = enc(HEADER), enc(FILLER), enc(KEY.format(key=key)), enc(QUESTION)
    target = length - ANSWER_TOKENS
    room = target - len(header) - len(key_ids) - len(question)
    if room < 0:
        raise ValueError(f"length {length} is too short for the passkey prompt")
    n = room // len(filler)
    n1 = round(depth * n)
    pad = room - n * len(filler)
    ids = header + filler * n1 + key_ids + filler * (n - n1) + filler[:pad] + question
    assert len(ids) == target
    return ids


@dataclass
class Trial:
    length: int
    depth: float
    key: int
    answer: str
    correct: bool
    prefill_s: float
    decode_ms_per_token: float
    static_calls: dict | None = None  # memllm on CUDA: the graph counters (graph.DecodeGraph.counters)


@dataclass
class LengthResult:
    system: str
    length: int
    trials: list[Trial] = field(default_factory=list)
    peak_gpu_bytes: int | None = None
    host_bytes: int | None = None  # unit store (memllm) at the end of the last trial
    peak_rss_bytes: int = 0

    @property
    def correct(self) -> int:
        return sum(t.correct for t in self.trials)

    def summary(self) -> dict[str, Any]:
        """Prefill tokens/s and decode ms/token are medians over the trials (the first trial of a run
        pays warm-up: kernel compilation, allocator growth), so one slow start does not skew them."""
        rates = [(t.length - ANSWER_TOKENS) / t.prefill_s for t in self.trials if t.prefill_s > 0]
        decode = [t.decode_ms_per_token for t in self.trials if t.decode_ms_per_token > 0]
        return {
            "system": self.system,
            "length": self.length,
            "correct": self.correct,
            "trials": len(self.trials),
            "prefill_tokens_per_s": statistics.median(rates) if rates else None,
            "decode_ms_per_token": statistics.median(decode) if decode else None,
            "peak_gpu_bytes": self.peak_gpu_bytes,
            "host_bytes": self.host_bytes,
            "peak_rss_bytes": self.peak_rss_bytes,
            "details": [asdict(t) for t in self.trials],
        }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _answer(llm: Any, ids: list[int]) -> str:
    return llm.tokenizer.decode(ids, skip_special_tokens=True)


def _cut_at_stop(llm: Any, ids: list[int]) -> list[int]:
    stop = set(llm.stop_ids()) if hasattr(llm, "stop_ids") else {llm.tokenizer.eos_token_id}
    for i, t in enumerate(ids):
        if t in stop:
            return ids[:i]
    return ids


def feed_and_decode(llm: Any, ids: list[int], memory: Any) -> tuple[Any, list[int], float, float]:
    """Feed the prompt into a fresh Session and decode greedily; (session, answer ids, prefill s, decode ms/token).

    Decoding keeps the tokens on the device (prefill.greedy: no host synchronisation per token) and
    cuts at the first stop token afterwards.
    """
    from memllm.context import attach
    from memllm.context.prefill import greedy
    from memllm.session import Session

    session = Session(llm, memory)
    device = session.cache.layers[0].device
    sync(device)
    t0 = time.perf_counter()
    session.feed_ids(ids)
    sync(device)
    t1 = time.perf_counter()
    with attach(llm.model, cache=session.cache):
        out, _ = greedy(llm.model, session.cache, session.last_logits, ANSWER_TOKENS)
    sync(device)
    t2 = time.perf_counter()
    return session, _cut_at_stop(llm, out.tolist()), t1 - t0, (t2 - t1) * 1000 / ANSWER_TOKENS


def ask_after_feed(
    llm: Any, ids: list[int], memory: Any, selector: str, embedder: Any = None
) -> tuple[Any, list[int], float, float]:
    """The haystack (the prompt less its question) fed, then the question asked as `ask` asks it
    (Session.generate_ids with `selector`: the question is probed, the chosen units read by every
    layer); (session, answer ids, prefill s, ms per answer token including the question's probe)."""
    from memllm.session import Session

    session = Session(llm, memory, embedder=embedder)
    q = len(llm.tokenizer(QUESTION, add_special_tokens=False)["input_ids"])
    device = session.cache.layers[0].device
    sync(device)
    t0 = time.perf_counter()
    session.feed_ids(ids[:-q])
    sync(device)
    t1 = time.perf_counter()
    out = list(session.generate_ids(ids[-q:], ANSWER_TOKENS, selector=selector))
    sync(device)
    return session, out, t1 - t0, (time.perf_counter() - t1) * 1000 / max(1, len(out))


def run_memllm(
    llm: Any, ids: list[int], memory: Any, selector: str | None = None, embedder: Any = None
) -> tuple[list[int], float, float, int, dict | None]:
    """`feed_and_decode` (or, with a selector, `ask_after_feed`), keeping the unit store's host bytes
    (and the text index's) and the graph counters (None without graphs): (answer ids, prefill s,
    decode ms/token, host bytes, counters)."""
    if selector is None:
        session, out, prefill_s, decode_ms = feed_and_decode(llm, ids, memory)
    else:
        session, out, prefill_s, decode_ms = ask_after_feed(llm, ids, memory, selector, embedder)
    graph = session.cache.decode_graph()
    counters = graph.counters() if graph is not None else None
    host = session.stats()["host_bytes_stored"]
    if session.text_index is not None:
        host += session.text_index.nbytes()
    return out, prefill_s, decode_ms, host, counters


@torch.no_grad()
def run_full_attention(llm: Any, ids: list[int]) -> tuple[list[int], float, float]:
    """Plain transformers attention (the model's own implementation, e.g. sdpa) with a DynamicCache."""
    from transformers import DynamicCache

    model = llm.model
    device = next(model.parameters()).device
    cache = DynamicCache(config=model.config)
    x = torch.tensor([ids], device=device)
    sync(device)
    t0 = time.perf_counter()
    logits = model(input_ids=x, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1).logits[0, -1]
    sync(device)
    t1 = time.perf_counter()
    toks = []
    for _ in range(ANSWER_TOKENS):
        tok = logits.argmax().view(1, 1)
        toks.append(tok)
        logits = model(input_ids=tok, **cache_kwargs(model, cache), use_cache=True).logits[0, -1]
    sync(device)
    t2 = time.perf_counter()
    out = torch.cat(toks).view(-1).tolist()
    return _cut_at_stop(llm, out), t1 - t0, (t2 - t1) * 1000 / ANSWER_TOKENS


def run_passkey(
    llm: Any,
    lengths: list[int],
    n_depths: int = 10,
    memory: Any = None,
    system: str = "memllm",
    progress: Callable[[str], None] | None = None,
    only: list[int] | None = None,
    selector: str | None = None,
    embedder: Any = None,
) -> list[LengthResult]:
    """Run the passkey benchmark; system is "memllm" (context memory) or "full" (plain attention).

    `only`: indices of the depths to run (keys stay those of the full depth list); selector (memllm):
    the question is asked after the haystack is read, through that selector (ask_after_feed), with
    `embedder` for the text index of the selectors that read one (config.TEXT_SELECTORS)."""
    device = next(llm.model.parameters()).device
    results = []
    for length in lengths:
        res = LengthResult(system=system, length=length)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        for i, (depth, key) in enumerate(zip(depths(n_depths), keys_for(length, n_depths), strict=True)):
            if only is not None and i not in only:
                continue
            ids = prompt_ids(llm.tokenizer, length, depth, key)
            counters = None
            if system == "full":
                out, prefill_s, decode_ms = run_full_attention(llm, ids)
            else:
                out, prefill_s, decode_ms, res.host_bytes, counters = run_memllm(llm, ids, memory, selector, embedder)
            answer = _answer(llm, out)
            trial = Trial(length, depth, key, answer, str(key) in answer, prefill_s, decode_ms, counters)
            res.trials.append(trial)
            if progress is not None:
                mark = "ok" if trial.correct else "miss"
                progress(
                    f"{system} {length} depth {depth:.2f}: {mark} ({answer.strip()!r}, prefill {prefill_s:.2f}s)"
                )
        if device.type == "cuda":
            res.peak_gpu_bytes = torch.cuda.max_memory_allocated(device)
        res.peak_rss_bytes = _peak_rss()
        results.append(res)
    return results
