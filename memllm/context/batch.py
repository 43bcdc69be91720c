"""Many context memories in one model call: a transformers Cache over several ContextMemoryCaches.

`BatchCache(caches)` stands for B sessions (one ContextMemoryCache each: its own sinks, window,
units and plan) in a model call of batch B, one token per session (a decode step). The model runs
its linear layers once for all B rows; per layer, the attention function (attention.py) calls
`BatchLayer.attend`, which computes each session's attention by its own rule and advances its state:
  * "reference": a loop over the sessions, each through its own `ContextMemoryLayer.attend` on its
    row (the plain path a session alone takes: the same code, the same numbers);
  * "fast": the sessions whose step is a steady one (phase 2, the call cuts nothing, or only the
    window's first unit, cut from the buffers after the call; no re-base, the index holds at least
    topk units) run stacked (context/stacked.py: their windows, indexes and
    sinks in padded buffers kept across the calls of one BatchCache, one local pass, one lookup,
    one gather over every session's store, one memory pass, one merge; a fixed number of launches
    per layer whatever the number of sessions, no host synchronisation); the other sessions (inside
    the window, the first cut, a re-base) take the reference loop in the same call.
    On CUDA the local pass, memory pass and merge are two Triton launches for every row
    (cuda/static.stacked_attention_cuda, tested against static.stacked_attention), the gather one;
    elsewhere plain PyTorch. Tests compare the path with the reference on the CPU and CUDA.
A BatchCache may be called again and again for the same sessions (BatchEngine keeps one while its
sessions stay): the stacked buffers then carry over, and only rows whose state changed in between
are copied in again. Host work per call: the rows' plans and one upload of their indexes (layer 0
works them out for every layer); per layer and stacked row, identity checks and counters.
Positions: each row gets its own session's position ids (`position_ids`): past the window every
session reports n_init + n_local, so their rows share one position. After a batched step the
sessions' states are what a step alone would have left (tested: a later step alone matches).

Ragged calls (`lengths`: a prefill round, row b feeding its own number of tokens, padded to the
longest): every session through the reference loop on its own tokens, the padding never entering
any state; the linear layers run once for all rows, padding included.

A step whose every row is stacked can be replayed as a CUDA graph (cuda/batch_graph.py: the rows
given to every layer (`given_rows`), the scores written in place, the rows' host state advanced
after the call).
Not here: stacking multi-token calls, probing (select.Probe), and sessions with
different MemoryConfigs or models in one batch (ConfigError). Knows nothing of text, tokens or sessions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from memllm.context.cache import ContextMemoryCache, ContextMemoryLayer
from memllm.context.positions import Rotary
from memllm.context.prefill import upload
from memllm.context.stacked import Rows, StackedLayer, plan_rows
from memllm.errors import ConfigError

BATCH_IMPLS = ("fast", "reference")


class BatchLayer(CacheLayerMixin):
    """Layer `layer_idx` of every session of a BatchCache."""

    is_sliding = False
    is_croppable = False

    def __init__(self, batch: BatchCache, layer_idx: int):
        super().__init__()
        self.batch, self.layer_idx = batch, layer_idx
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self.stacked: StackedLayer | None = None  # the stacked rows' buffers (impl "fast"), made at first use
        self.is_initialized = True

    @property
    def members(self) -> list[ContextMemoryLayer]:
        return [c.layers[self.layer_idx] for c in self.batch.caches]

    # ---- CacheLayerMixin -------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Record the new (rotated) K/V (B, kv_heads, c, d) for the attention function."""
        self.pending = (key_states, value_states)
        return key_states, value_states

    def get_seq_length(self) -> int:
        return max(m.reported_length() for m in self.members)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def model_positions(self, n: int, device: torch.device) -> torch.Tensor:
        """(B, n): each session's next model positions (its own ContextMemoryLayer's), a row of a
        ragged call (`BatchCache.lengths`) padded by repeating its last position."""
        return self.batch.positions(n, device, self.layer_idx)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("BatchCache holds independent sessions: beam search is not supported")

    def offload(self):
        pass

    def prefetch(self):
        pass

    # ---- the rule ------------------------------------------------------------------------------
    def attend(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """query (B, heads, c, d), key/value (B, kv_heads, c, d) as the model rotated them, row b at
        session b's positions -> (B, heads, c, d) in the model dtype; every session advances by c."""
        members = self.members
        if query.shape[0] != len(members):
            raise ValueError(f"a BatchCache of {len(members)} sessions got a batch of {query.shape[0]}")
        lengths = self.batch.lengths
        if (
            lengths is not None
        ):  # a ragged call: row b's first lengths[b] tokens are its own, the rest padding
            if len(lengths) != len(members) or max(lengths) != query.shape[2]:
                raise ValueError(f"a ragged call of lengths {lengths} got {query.shape[2]} tokens per row")
            out = torch.zeros_like(query)  # padded rows: zeros, never part of any session's state
            for b, (m, n) in enumerate(zip(members, lengths, strict=True)):
                part = [t[b : b + 1, :, :n].contiguous() for t in (query, key, value)]
                out[b : b + 1, :, :n] = m.attend(*part, scale)
            return out
        st = self.batch.steady_rows(query.shape[2], self.layer_idx)
        if st is not None and len(st.rows) == len(members):  # every row stacked
            return self.stacked_attend(members, st, query, key, value, scale)
        out = torch.empty_like(query)
        stacked = set(st.rows) if st is not None else set()
        for b, m in enumerate(members):  # the reference path, and the rows the stacked path leaves
            if b not in stacked:
                out[b : b + 1] = m.attend(query[b : b + 1], key[b : b + 1], value[b : b + 1], scale)
        if st is not None:
            out.index_copy_(0, st.rows_dev, self.stacked_attend(members, st, query, key, value, scale))
        return out

    def stacked_attend(
        self, members: list[ContextMemoryLayer], st: Rows, query: torch.Tensor, key: torch.Tensor,
        value: torch.Tensor, scale: float,
    ) -> torch.Tensor:  # fmt: skip
        """The stacked rows' attention (S, heads, c, d) (stacked.StackedLayer.attend)."""
        layers = members if st.rows_dev is None else [members[b] for b in st.rows]
        return self.stacked_layer().attend(layers, st, self.batch.rotary, query, key, value, scale)

    def stacked_layer(self) -> StackedLayer:
        """The stacked rows' buffers of this layer (made at first use)."""
        if self.stacked is None:
            self.stacked = StackedLayer(self.members[0].kernels)
        return self.stacked


def _check_batched_with(first: ContextMemoryCache, cache: ContextMemoryCache) -> None:
    """ConfigError unless `cache` may share a batch with `first` (one model, one MemoryConfig)."""
    if cache.config != first.config or cache.spec != first.spec:
        raise ConfigError(
            "sessions batched together must share one model and one MemoryConfig: "
            "run sessions with other settings in a batch of their own"
        )


class BatchCache(Cache):
    """A Cache over ContextMemoryCaches (one per session, batch row b = caches[b]). Use through
    `attach(model, cache=batch)` with position_ids = `next_position_ids(n)`; impl "fast" or
    "reference" (see the module note)."""

    def __init__(
        self,
        caches: Sequence[ContextMemoryCache],
        impl: str = "fast",
        lengths: Sequence[int] | None = None,
        previous: BatchCache | None = None,
    ):
        if impl not in BATCH_IMPLS:
            raise ConfigError(f"batch impl must be one of {', '.join(map(repr, BATCH_IMPLS))}, got {impl!r}")
        caches = list(caches)
        if not caches:
            raise ConfigError("a BatchCache needs at least one session's cache")
        first = caches[0]
        for c in caches[1:]:
            _check_batched_with(first, c)
        if len({id(c) for c in caches}) != len(caches):
            raise ConfigError("a session's cache appears twice in one batch")
        super().__init__(layers=[BatchLayer(self, i) for i in range(len(first.layers))])
        self.caches = caches
        self.impl = impl
        # A ragged call (a prefill round): row b feeds lengths[b] tokens, padded to the longest; each
        # session's attention runs alone on its own tokens (the reference loop). None: c tokens each.
        self.lengths = None if lengths is None else [int(n) for n in lengths]
        if self.lengths is not None and (len(self.lengths) != len(caches) or min(self.lengths) < 1):
            raise ConfigError(f"a ragged call needs one length >= 1 per session, got {self.lengths}")
        self.config, self.spec = first.config, first.spec
        self.rotary: Rotary = first.rotary
        self.static = None  # the attention function checks this (no static step for a batch)
        self._steady: tuple[Rows | None] | None = None  # the current call's (steady_rows)
        # Rows a graph step (cuda/batch_graph.py) worked out before its call: every layer takes these.
        self.given_rows: Rows | None = None
        self.graph = None  # its BatchGraph (memllm.engine makes it on CUDA), kept with this batch
        self.stacked_steps = 0  # rows run stacked, summed over calls (benchmarks and tests read it)
        if previous is not None and previous.impl == impl and len(previous.layers) == len(self.layers):
            # another batch of (some of) the same sessions: its stacked buffers carry over (rows
            # whose layers still hold their views are moved, not copied from their sessions again)
            for new, old in zip(self.layers, previous.layers, strict=True):
                new.stacked = old.stacked

    def swap(self, row: int, cache: ContextMemoryCache) -> None:
        """Row `row` now stands for `cache` (a session that joined as another left): the rows, the stacked
        buffers and a graph stay; the next call copies the newcomer's window, index and sinks into its row
        (StackedLayer.prepare), in place for a graph step."""
        _check_batched_with(self.caches[0], cache)
        if any(c is cache for c in self.caches):
            raise ConfigError("a session's cache appears twice in one batch")
        if self.lengths is not None:
            raise ConfigError("a ragged call's rows are not swapped")
        self.caches[row] = cache
        self._steady = None

    @property
    def seen_tokens(self) -> list[int]:
        return [c.seen_tokens for c in self.caches]

    def next_position_ids(self, n: int) -> torch.Tensor:
        """(B, n) the position ids of the next call: each session's own (a ragged call's rows padded
        by repeating their last position)."""
        return self.positions(n, self.caches[0].layers[0].device, 0)

    def positions(self, n: int, device: torch.device, layer_idx: int) -> torch.Tensor:
        """(B, n) each session's next model positions as layer `layer_idx` sees them now (before it
        attends), ragged rows padded by repeating their last position. Host integers, one upload."""
        lengths = self.lengths or [n] * len(self.caches)
        if max(lengths) != n:
            raise ValueError(f"a call of {n} tokens per row, but the rows feed {lengths}")
        starts = []
        for c, m in zip(self.caches, lengths, strict=True):
            layer = c.layers[layer_idx]
            layer.check_positions(m)
            starts.append(layer.reported_length())
        steps = torch.arange(n)[None, :]
        if self.lengths is not None:
            steps = torch.minimum(steps, torch.tensor(lengths)[:, None] - 1)
        return upload(torch.tensor(starts)[:, None] + steps, device)

    def plan_rows(self, **kwargs) -> Rows | None:
        """stacked.plan_rows over this batch's sessions (a graph step's: cuda/batch_graph.py)."""
        return plan_rows(self.caches, self.rotary, **kwargs)

    def steady_rows(self, c: int, layer_idx: int) -> Rows | None:
        """The stacked rows of the current call (impl "fast", c == 1), worked out once per call, when
        layer 0 asks (before it attends, every layer is in the state layer 0 is in)."""
        if self.given_rows is not None:
            return self.given_rows
        if self.impl != "fast" or c != 1 or self.lengths is not None:
            return None
        if layer_idx != 0 and self._steady is not None:
            return self._steady[0]
        st = plan_rows(self.caches, self.rotary, cuts=True)
        if st is not None:
            self.stacked_steps += len(st.rows)
        self._steady = (st,)
        return st

    # ---- what transformers asks of a Cache ---------------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].get_seq_length()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "BatchCache cannot crop: roll sessions back one by one (checkpoint/rollback)"
        )
