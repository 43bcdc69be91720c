"""Typed configuration, validated once at construction (ConfigError, a ValueError, never assert).

MemoryConfig holds the context-memory (InfLLM-style) knobs. Fields left as None are derived from the
model's trained context by `MemoryConfig.resolved(trained_len)`. Knows nothing of torch or models.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from memllm import validate
from memllm.errors import ConfigError

OFFLOAD_DTYPES = ("bf16", "fp16", "fp32", "int8")
IMPLS = ("fast", "reference")
LOOKUPS = ("shared", "per_head")
SELECTORS = ("question", "hybrid", "text", "infllm", "lexical")
TEXT_SELECTORS = ("hybrid", "text", "lexical")  # those that read the text index
_DEVICE = re.compile(r"[a-z]+(:[0-9]+)?")  # what torch.device accepts as a string: "cpu", "cuda", "cuda:1"
# Units a lexical hit's paragraph is followed into on each side (MemoryConfig.paragraph_reach): a SQuAD paragraph is
# 2-4 units of 128 tokens, and the sentence that answers often holds none of the question's words. Chosen by the
# model-free replay benchmarks/lexical_paragraph_signal.py (RESULTS, "The paragraph of the question's words").
PARAGRAPH_REACH = 2
# Where sinks and retrieved units sit from every query unless MemoryConfig.memory_distance says (or the window is
# shorter): Qwen2.5-Coder-0.5B with its 4,096 window answered 14 more of 400 QA questions with them at 512 than at the
# window's end (InfLLM's rule), 35 better and 21 worse, the 128K needles tied (run 61, H100); reading at 512 too did no
# worse on the CPU (16K, 24 questions: 9 against 8). SmolLM2-135M reads near units far better (runs 31-32).
MEMORY_DISTANCE = 512


def _one_of(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(
            f"MemoryConfig.{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}"
        )


@dataclass(frozen=True)
class MemoryConfig:
    """Context memory configuration.

    n_init: sink tokens kept on the device.  n_local: local window (exact relative positions).
    block_size: tokens per memory unit.  repr_topk: representative keys per unit.
    topk: units retrieved per execution block.  exc_block_size: queries sharing one lookup.
    chunk_size: tokens per model call during prefill.  max_cached_blocks: device unit cache size (units
    per layer and KV head; default 2 * topk), used only with device_unit_cache.
    device_unit_cache: keep recently read units on the model's device, an LRU of max_cached_blocks
    units per (session, layer) (context/unit_cache.py): a lookup's gather reads a cached unit there and
    host memory only on a miss. Off by default (opt-in until measured on a GPU): units are read from
    host memory (pinned on a GPU) at every lookup.
    offload_dtype: how unit K/V are kept on the host.  device: where attention runs (None: the model's).
    impl: "fast" (device-side lookup and gathers; on the CPU, PyTorch's fused attention for the window and
    the window keys' received scores deferred until a cut needs them) or "reference" (plain PyTorch, what
    tests compare with).
    lookup: "shared" (the same units for all KV heads, scores summed: InfLLM's) or "per_head".
    selector: which units a question and its answer read. "question": the question is probed first,
    every layer scoring all its units by the attention mass the question gives them, and the best
    units (fused over layers, with neighbours) are read by every layer (context/select.py); "hybrid":
    as "question", with the cosine of a text index over short windows of the units'
    text (memllm/unit_text.py): where the text does not support the attention's best unit, the log
    of the attention mass and the cosine, each standardised, summed (select.hybrid); that ranking's
    best units and their neighbours fill 3/4 of topk, the question's attention the rest (the units every
    question looks at, not the evidence's near-duplicates: select.evidence_then_attention); a Session keeps
    the index with the packaged MiniLM unless given another embedder; "text": the text index's
    units alone (a measured candidate); "infllm": each layer's own lookup per execution block, as
    during prefill; "lexical" (the default): as "hybrid", with the units that hold the question's rare
    words best (memllm/unit_lexical.py) and their neighbours taken first as evidence (first the neighbour
    each one's words lie against: a sentence cut across a unit border is read whole; then up to two units
    the paragraph holding those words goes on into, before a neighbour across a blank line), and where they hold
    every rare word of the question, the question's attention filling the rest (select.lexical_evidence;
    on an H200 with Qwen2.5-Coder-0.5B above "hybrid" at 32K and 128K: benchmarks/RESULTS.md).
    select_neighbours: units read on either side of each unit the question selector picks.
    paragraph_reach: with "lexical", units read on into the paragraph of each lexical tier unit's words on
    either side, before the neighbours across a blank line (0: none; UnitTextIndex.paragraph_reach). Needs
    select_neighbours > 0.
    memory_distance: the one distance at which sinks and retrieved units sit from every query (None:
    MEMORY_DISTANCE, 512, or n_local where the window is shorter; InfLLM's rule is n_local, just past the
    local window). Small models read retrieved units better near (benchmarks/RESULTS.md, runs 31-32 and 61).
    At most n_local.
    decode_graphs: on CUDA with impl "fast", run static calls by replaying captured CUDA graphs
    (context/graph.py): single tokens and short calls (up to 128 tokens, e.g. a question) that cut
    nothing, and prefill chunks that cut units once the memory holds topk units (int8 units excepted).
    """

    n_init: int = 128
    n_local: int | None = None
    block_size: int = 128
    repr_topk: int = 4
    topk: int = 16
    exc_block_size: int = 512
    chunk_size: int | None = None
    max_cached_blocks: int | None = None
    offload_dtype: str = "bf16"
    device: str | None = None
    impl: str = "fast"
    lookup: str = "shared"
    decode_graphs: bool = True
    selector: str = "lexical"
    select_neighbours: int = 1
    paragraph_reach: int = PARAGRAPH_REACH
    memory_distance: int | None = None
    device_unit_cache: bool = False

    def __post_init__(self) -> None:
        def positive(
            name: str, value: int | None, allow_none: bool = False, allow_zero: bool = False
        ) -> None:
            if value is None and allow_none:
                return
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"MemoryConfig.{name} must be an integer, got {value!r}")
            if value < 0 or (value == 0 and not allow_zero):
                raise ConfigError(f"MemoryConfig.{name} must be > 0, got {value}")

        positive("n_init", self.n_init, allow_zero=True)
        positive("n_local", self.n_local, allow_none=True)
        positive("block_size", self.block_size)
        positive("repr_topk", self.repr_topk)
        positive("topk", self.topk, allow_zero=True)
        positive("exc_block_size", self.exc_block_size)
        positive("chunk_size", self.chunk_size, allow_none=True)
        positive("max_cached_blocks", self.max_cached_blocks, allow_none=True)
        positive("memory_distance", self.memory_distance, allow_none=True)
        if self.repr_topk > self.block_size:
            raise ConfigError(
                f"MemoryConfig.repr_topk ({self.repr_topk}) cannot exceed block_size ({self.block_size})"
            )
        if self.n_local is not None and self.n_local < self.block_size:
            raise ConfigError(
                f"MemoryConfig.n_local ({self.n_local}) must be at least block_size ({self.block_size})"
            )
        _one_of("offload_dtype", self.offload_dtype, OFFLOAD_DTYPES)
        _one_of("impl", self.impl, IMPLS)
        _one_of("lookup", self.lookup, LOOKUPS)
        if self.device is not None and not (isinstance(self.device, str) and _DEVICE.fullmatch(self.device)):
            raise ConfigError(
                f"MemoryConfig.device must be None (the model's device) or a device name such as 'cpu', 'cuda' "
                f"or 'cuda:0', got {self.device!r}"
            )
        _one_of("selector", self.selector, SELECTORS)
        positive("select_neighbours", self.select_neighbours, allow_zero=True)
        positive("paragraph_reach", self.paragraph_reach, allow_zero=True)
        if not isinstance(self.decode_graphs, bool):
            raise ConfigError(f"MemoryConfig.decode_graphs must be True or False, got {self.decode_graphs!r}")
        if not isinstance(self.device_unit_cache, bool):
            raise ConfigError(
                f"MemoryConfig.device_unit_cache must be True or False, got {self.device_unit_cache!r}"
            )
        if self.max_cached_blocks is not None and self.topk > 0 and self.max_cached_blocks < self.topk:
            raise ConfigError(
                f"MemoryConfig.max_cached_blocks ({self.max_cached_blocks}) must be at least topk ({self.topk})"
            )

    def resolved(self, trained_len: int) -> MemoryConfig:
        """Fill the None fields from the model's trained context length, and check the budget fits it.

        Positions the model sees: a call's window frame up to n_init + n_local + block_size + chunk_size
        (the window before the call plus the call's tokens, see memllm/context/plan.py), memory queries at
        distance memory_distance (at most n_local), model calls at cache-reported positions below n_init + n_local + chunk_size.
        All must stay below `trained_len`.
        """
        # The default leaves room in the trained window for sinks, retrieved units and one execution block.
        default_local = max(self.block_size, min(4096, trained_len // 2))
        n_local = self.n_local if self.n_local is not None else default_local
        room = trained_len - self.n_init - n_local - self.block_size
        if room < 1:
            raise ConfigError(
                f"MemoryConfig.n_local ({n_local}) leaves no room in the model's trained context ({trained_len}) "
                f"beside n_init ({self.n_init}) and a unit ({self.block_size}): lower it (the default for this "
                f"model: {default_local})"
            )
        chunk = self.chunk_size
        if chunk is None:
            # Not capped by n_local: a chunk longer than the window is cut block by block as it goes
            # (plan.py), and a 512-token window read 32K in 2.8 s at chunk 512 against 0.5 s at the 4,096
            # window's 3,584 (SmolLM2-135M, H200, run 32).
            chunk = min(4096, room)
            if chunk >= self.exc_block_size:
                chunk -= chunk % self.exc_block_size
        if chunk < 1 or chunk > room:
            raise ConfigError(
                f"MemoryConfig.chunk_size ({chunk}) must be between 1 and trained context - n_init - n_local "
                f"- block_size ({room}): lower chunk_size or n_local"
            )
        cached = self.max_cached_blocks if self.max_cached_blocks is not None else max(2 * self.topk, 1)
        distance = self.memory_distance if self.memory_distance is not None else min(n_local, MEMORY_DISTANCE)
        if distance > n_local:
            raise ConfigError(
                f"MemoryConfig.memory_distance ({distance}) must be at most n_local ({n_local}): retrieved units "
                "sit no farther than the local window's end"
            )
        out = replace(self, n_local=n_local, chunk_size=chunk, max_cached_blocks=cached, memory_distance=distance)
        span = out.n_init + out.topk * out.block_size + n_local + out.block_size + out.exc_block_size
        if span > trained_len:
            raise ConfigError(
                f"memory window n_init + topk*block_size + n_local + block_size + exc_block_size = {span} "
                f"exceeds the model's trained context ({trained_len}): lower n_local or topk"
            )
        return out

    def exact_tokens(self) -> int:
        """Tokens a session of this (resolved) config holds before its first cut (memllm/context/plan.py):
        in its window, all attended to exactly."""
        if self.n_local is None:
            raise ConfigError("MemoryConfig.exact_tokens needs a resolved config (n_local set): call resolved()")
        return self.n_init + self.n_local + self.block_size - 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MemoryConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown MemoryConfig fields: {validate.names(unknown)}")
        return cls(**data)
