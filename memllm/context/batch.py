"""Many context memories in one model call: a transformers Cache over several ContextMemoryCaches.

`BatchCache(caches)` stands for B sessions (one ContextMemoryCache each: its own sinks, window,
units and plan) in a model call of batch B, one token per session (a decode step). The model runs
its linear layers once for all B rows; per layer, the attention function (attention.py) calls
`BatchLayer.attend`, which computes each session's attention by its own rule and advances its state:
  * "reference": a loop over the sessions, each through its own `ContextMemoryLayer.attend` on its
    row (the plain path a session alone takes: the same code, the same numbers);
  * "fast": the sessions whose step is a steady one (phase 2, the call cuts nothing, no re-base, the
    index holds at least topk units: `steady`) run stacked: the windows padded to the longest and
    masked, one local pass, one lookup over the representatives padded to the largest index and
    masked, every session's units gathered from its own store by one kernels call (CUDA: one
    launch over the stores' joined segment tables, cuda/gather.gather_units_stores), one memory
    pass over sinks + topk units (the same size for all), one merge; the other sessions (inside
    the window, a step that cuts a unit, a re-base) take the reference loop in the same call.
    Plain PyTorch apart from that gather; tests compare it with the reference on the CPU and CUDA.
    Host work per stacked row and layer: a few views and counters (the copies are foreach calls).
Positions: each row gets its own session's position ids (`position_ids`): past the window every
session reports n_init + n_local, so their rows share one position. After a batched step the
sessions' states are what a step alone would have left (tested: a later step alone matches).

Ragged calls (`lengths`: a prefill round, row b feeding its own number of tokens, padded to the
longest): every session through the reference loop on its own tokens, the padding never entering
any state; the linear layers run once for all rows, padding included.

Not here: stacking multi-token calls, probing (select.Probe), CUDA graphs of the batched step
(its host work grows with the number of sessions; buffers that persist across steps would be the
start), and sessions with different MemoryConfigs or models in one batch (ConfigError). Knows
nothing of text, tokens or sessions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from memllm.context.cache import ContextMemoryCache, ContextMemoryLayer
from memllm.context.lookup import combine, mask_later, select_units, unit_scores
from memllm.context.plan import CallPlan
from memllm.context.positions import Rotary
from memllm.context.window import merge
from memllm.errors import ConfigError

BATCH_IMPLS = ("fast", "reference")


@dataclass
class Steady:
    """The rows of a call that run stacked, and their host integers (the same in every layer)."""

    rows: list[int]  # batch rows (sessions) in the stacked set
    plans: list[CallPlan]  # each row's plan (one token, no cut)
    windows: list[int]  # W_b: window keys before the step
    local_rows: torch.Tensor  # (S,) long: rotation-table row, model position -> window position
    memory_rows: torch.Tensor  # (S,) long: rotation-table row, model position -> memory_distance
    window_idx: torch.Tensor  # (S,) long: W_b on the device
    units: torch.Tensor  # (S,) long: units each row's lookup chooses among
    model_starts: list[int]


def steady(layer: ContextMemoryLayer, plan: CallPlan) -> bool:
    """Whether a one-token call of `layer` (plan: its plan) is a steady step the stacked path runs:
    phase 2, one execution block with memory, nothing cut, no sinks set, no re-base, the index
    holding at least topk units, no probe and nothing deferred (host integers only)."""
    cfg = layer.config
    return (
        layer.cut
        and plan.c == 1
        and plan.n_cut == 0
        and plan.sinks_from is None
        and plan.keep_from == 0
        and len(plan.blocks) == 1
        and plan.memory_blocks == [0]
        and cfg.topk > 0
        and layer.store.n_units >= cfg.topk
        and layer.seen - layer.base < layer.spec.trained_len
        and layer.probe is None
        and layer.deferred is None
        and layer.sink_k.shape[1] == cfg.n_init
    )


class BatchLayer(CacheLayerMixin):
    """Layer `layer_idx` of every session of a BatchCache."""

    is_sliding = False
    is_croppable = False

    def __init__(self, batch: BatchCache, layer_idx: int):
        super().__init__()
        self.batch, self.layer_idx = batch, layer_idx
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None
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
        out = torch.empty_like(query)
        stacked = set(st.rows) if st is not None else set()
        for b, m in enumerate(members):  # the reference path, and the rows the stacked path leaves
            if b not in stacked:
                out[b : b + 1] = m.attend(query[b : b + 1], key[b : b + 1], value[b : b + 1], scale)
        if st is not None and st.rows:
            out[st.rows] = stacked_attend(members, st, self.batch.rotary, query, key, value, scale)
        return out


class BatchCache(Cache):
    """A Cache over ContextMemoryCaches (one per session, batch row b = caches[b]). Use through
    `attach(model, cache=batch)` with position_ids = `next_position_ids(n)`; impl "fast" or
    "reference" (see the module note)."""

    def __init__(
        self, caches: Sequence[ContextMemoryCache], impl: str = "fast", lengths: Sequence[int] | None = None
    ):
        if impl not in BATCH_IMPLS:
            raise ConfigError(f"batch impl must be one of {', '.join(map(repr, BATCH_IMPLS))}, got {impl!r}")
        caches = list(caches)
        if not caches:
            raise ConfigError("a BatchCache needs at least one session's cache")
        first = caches[0]
        for c in caches[1:]:
            if c.config != first.config or c.spec != first.spec:
                raise ConfigError(
                    "sessions batched together must share one model and one MemoryConfig: "
                    "run sessions with other settings in a batch of their own"
                )
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
        self._steady: tuple[Steady | None] | None = None  # the current call's (steady_rows)
        self.stacked_steps = 0  # rows run stacked, summed over calls (benchmarks and tests read it)

    @property
    def seen_tokens(self) -> list[int]:
        return [c.seen_tokens for c in self.caches]

    def next_position_ids(self, n: int) -> torch.Tensor:
        """(B, n) the position ids of the next call: each session's own (a ragged call's rows padded
        by repeating their last position)."""
        return self.positions(n, self.caches[0].layers[0].device, 0)

    def positions(self, n: int, device: torch.device, layer_idx: int) -> torch.Tensor:
        """(B, n) each session's next model positions as layer `layer_idx` sees them now (before it
        attends), ragged rows padded by repeating their last position."""
        lengths = self.lengths or [n] * len(self.caches)
        if max(lengths) != n:
            raise ValueError(f"a call of {n} tokens per row, but the rows feed {lengths}")
        rows = []
        for c, m in zip(self.caches, lengths, strict=True):
            pos = c.layers[layer_idx].model_positions(m, device)
            rows.append(pos if m == n else torch.cat([pos, pos[-1:].expand(n - m)]))
        return torch.stack(rows)

    def steady_rows(self, c: int, layer_idx: int) -> Steady | None:
        """The stacked rows of the current call (impl "fast", c == 1), worked out once per call, when
        layer 0 asks (before it attends, every layer is in the state layer 0 is in now)."""
        if self.impl != "fast" or c != 1 or self.lengths is not None:
            return None
        if layer_idx != 0 and self._steady is not None:
            return self._steady[0]
        rows, plans, windows, local_rows, memory_rows, units, starts = [], [], [], [], [], [], []
        rot, cfg = self.rotary, self.config
        for b, cache in enumerate(self.caches):
            layer = cache.layers[0]
            plan = layer.plans.get(layer.seen, layer.local_k.shape[1], layer.cut, layer.store.n_units, 1)
            if not steady(layer, plan):
                continue
            model_start = layer.reported_length()
            rows.append(b)
            plans.append(plan)
            windows.append(plan.window)
            local_rows.append(rot.row(layer.seen - layer.base - model_start))
            memory_rows.append(rot.row(-(model_start - cfg.memory_distance)))
            units.append(layer.store.n_units)
            starts.append(model_start)
        st = None
        if rows:
            dev = self.caches[0].layers[0].device
            as_dev = lambda xs: torch.tensor(xs, dtype=torch.long).to(dev, non_blocking=True)  # noqa: E731
            st = Steady(rows, plans, windows, as_dev(local_rows), as_dev(memory_rows), as_dev(windows),
                        as_dev(units), starts)  # fmt: skip
            self.stacked_steps += len(rows)
        self._steady = (st,)
        return st

    # ---- what transformers asks of a Cache ---------------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].get_seq_length()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "BatchCache cannot crop: roll sessions back one by one (checkpoint/rollback)"
        )


def stacked_attend(
    members: list[ContextMemoryLayer],
    st: Steady,
    rot: Rotary,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """ContextMemoryLayer.attend for one token of each stacked row, computed together: query (B, heads,
    1, d), key/value (B, kv_heads, 1, d) -> (S, heads, 1, d) in the model dtype for rows st.rows, whose
    layers advance by one token (window, scores, lookup counters and log, bounds)."""
    layers = [members[b] for b in st.rows]
    first = layers[0]
    cfg, dtype, dev = first.config, first.dtype, query.device
    S, (heads, d), kvh = len(layers), (query.shape[1], query.shape[3]), key.shape[1]
    g = heads // kvh
    rows = torch.tensor(st.rows, dtype=torch.long).to(dev, non_blocking=True) if S != query.shape[0] else None
    q = (query if rows is None else query.index_select(0, rows))[:, :, 0].float()  # (S, heads, d)
    k = (key if rows is None else key.index_select(0, rows))[:, :, 0].float()  # (S, kv_heads, d)
    v = (value if rows is None else value.index_select(0, rows))[:, :, 0].to(dtype)  # (S, kv_heads, d)
    cos_t, sin_t, _ = rot.tables(dev)
    cos_l, sin_l = cos_t[st.local_rows].unsqueeze(1), sin_t[st.local_rows].unsqueeze(1)  # (S, 1, d)
    q_loc = rot.apply(q, cos_l, sin_l)  # (S, heads, d) at window positions
    k_new = rot.apply(k, cos_l, sin_l).to(dtype)  # (S, kv_heads, d)

    # Local pass: each row over its window keys [0, W_b] (its own key at W_b), padded to the longest.
    w_max = max(st.windows) + 1
    k_pad = torch.zeros(S, kvh, w_max, d, dtype=dtype, device=dev)  # (S, kv_heads, W_max + 1, d)
    v_pad = torch.zeros_like(k_pad)
    old_score = torch.zeros(S, kvh, w_max, dtype=torch.float32, device=dev)  # (S, kv_heads, W_max + 1)
    u_max = max(lay.store.n_units for lay in layers)
    index = [lay.store.repr_keys() for lay in layers]  # (kv_heads, n_units, d) each, in the index's dtype
    reprs = torch.zeros(S, kvh, u_max, d, dtype=index[0].dtype, device=dev)  # (S, kv_heads, U_max, d)
    # Each row's window, scores and index into its place: one foreach copy of S tensors per kind.
    span = list(enumerate(st.windows))
    torch._foreach_copy_([k_pad[i, :, :w] for i, w in span], [lay.local_k for lay in layers])
    torch._foreach_copy_([v_pad[i, :, :w] for i, w in span], [lay.local_v for lay in layers])
    torch._foreach_copy_([old_score[i, :, :w] for i, w in span], [lay.local_score for lay in layers])
    torch._foreach_copy_([reprs[i, :, : r.shape[1]] for i, r in enumerate(index)], index)
    at = torch.arange(S, device=dev)
    k_pad[at, :, st.window_idx] = k_new
    v_pad[at, :, st.window_idx] = v
    logits = torch.matmul(q_loc.view(S, kvh, g, d), k_pad.float().transpose(2, 3)) * scale  # (S, kvh, g, W)
    hidden = torch.arange(w_max, device=dev)[None, :] > st.window_idx[:, None]  # (S, W_max + 1)
    logits = logits.masked_fill(hidden[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # (S, kvh, g, 1)
    p = torch.exp(logits - lse)
    out = torch.matmul(p, v_pad.float())  # (S, kvh, g, d)
    score = p.sum(dim=2) + old_score  # (S, kvh, W_max + 1): what each window key received, in all

    # Lookup: every row's representatives, padded to the largest index; slots >= its units masked.
    q_mem = rot.apply(q, cos_t[st.memory_rows].unsqueeze(1), sin_t[st.memory_rows].unsqueeze(1))
    q_mem = q_mem.view(S, kvh, g, d)
    q_sum = q_mem.sum(dim=2)  # (S, kvh, d): the block's summed query per KV head
    scores = combine(unit_scores(q_sum, reprs), cfg.lookup)  # (S, 1 or kvh, U_max) fp32
    scores = mask_later(scores, st.units)
    ids = select_units(scores, cfg.topk).expand(S, kvh, -1)  # (S, kv_heads, topk)
    forced = [i for i, lay in enumerate(layers) if lay.forced is not None and lay.forced.active]
    if forced:  # a row whose session forces units (select.ForcedUnits) reads those
        ids = ids.clone()
        for i in forced:
            ids[i] = layers[i].forced.apply(layers[i].layer_idx, ids[i : i + 1])[0]

    # Memory pass: sinks + topk units for every row (the same number of keys).
    unit_k, unit_v = first.kernels.gather_units_stores([lay.store for lay in layers], ids, dtype)
    sink_k = torch.stack([lay.sink_k for lay in layers])  # (S, kvh, n_init, d)
    sink_v = torch.stack([lay.sink_v for lay in layers])
    k_mem = torch.cat([sink_k, unit_k], dim=2).float()  # (S, kvh, n_init + topk * bs, d)
    v_mem = torch.cat([sink_v, unit_v], dim=2).float()
    logits_m = torch.matmul(q_mem, k_mem.transpose(2, 3)) * scale  # (S, kvh, g, M)
    lse_m = torch.logsumexp(logits_m, dim=-1, keepdim=True)
    out_m = torch.matmul(torch.exp(logits_m - lse_m), v_mem)
    merged = merge(out, lse.squeeze(-1), out_m, lse_m.squeeze(-1))  # (S, kvh, g, d) fp32

    # Each row's state: views of this step's tensors (never written again: checkpoints may hold
    # them), the lookups counted and logged, the bounds.
    for i, (lay, w) in enumerate(zip(layers, st.windows, strict=True)):
        lay.local_k, lay.local_v, lay.local_score = (
            k_pad[i, :, : w + 1],
            v_pad[i, :, : w + 1],
            score[i, :, : w + 1],
        )
        lay.static_views = False
        lay.count_lookups(st.plans[i], ids[i : i + 1])
        lay.account(st.plans[i], st.model_starts[i])
        lay.seen += 1
    return merged.reshape(S, heads, 1, d).to(query.dtype)
