"""ContextMemoryCache: a transformers Cache of per-layer context memories (InfLLM-style).

Per layer (ContextMemoryLayer); see positions.py for how rotations are undone and redone:
  sinks   (kv_heads, n_init, head_dim)   first n_init tokens, un-rotated, fixed distance once cutting began
  local   (kv_heads, L, head_dim)        the window, keys rotated at (j - base): exact relative positions;
                                         re-rotated ("rebased") before a position would reach the trained length
  units   UnitStore                      cut blocks of block_size tokens, K/V off the device

The rule, per execution block of queries (aligned to absolute multiples of exc_block_size; plan.py):
  * phase 1 (nothing cut yet): local holds every token, sinks included: plain causal attention.
  * phase 2: each query attends to the local window (exact positions, causal) and to sinks + the
    topk units chosen by lookup.py for the block (shared by all KV heads, or per KV head), keys at
    position 0 and queries at memory_distance (config.MEMORY_DISTANCE by default); one softmax over both (window.merge).
  * after each block, while the window minus a block still holds n_local tokens, its oldest
    block_size tokens become a unit whose representatives are the repr_topk keys that received most
    attention (softmax over the window's keys) while in the window; in phase 1 the first n_init
    tokens become the sinks then.
Keys attended per query <= n_init + topk*block_size + n_local + block_size + exc_block_size.
While answering (`hold_cuts`, used by Session.answering), calls that fit cut nothing (plan.py).

How a call is computed (all execution blocks of a call at once, a fixed number of launches per layer):
the call's keys join the window; one local pass gives every query's window output, its log-sum-exp
and each window key's received attention; the units the call cuts are written; one batched lookup
and gather give each block its units; one memory pass; one merge. On CUDA the passes are Triton
kernels (cuda/window.py), elsewhere and with impl="reference" the loops of window.py; the choice is
made once per cache (kernels.kernels_for) and the layer calls it through `self.kernels`.

`update` only records the new K/V; the attention function (attention.py) calls `layer.attend`,
which computes the outputs and advances the state. get_seq_length() reports
min(tokens seen, n_init + n_local), so model positions stay bounded; `seen_tokens` is the truth.
Not supported: batch size > 1, beam search, crop (use checkpoint()/rollback()), HF `generate()`
(its position bookkeeping assumes a plain cache; use memllm.context.prefill or Session). Units are
read from host memory (pinned on a GPU; the CUDA gather reads them there, each distinct unit once
per call) at every lookup, unless MemoryConfig.device_unit_cache is on: then each layer's store keeps
an LRU of max_cached_blocks units per KV head on the device (unit_cache.py), which a lookup's gather
(`kernels.gather_selected`) reads first, host memory only on a miss; prefill chunks of several
execution blocks and the question selector's scan bypass it. static.py runs the same pieces (local_pass, cut_units, attend_memory) on fixed buffers. Knows nothing of the model
beyond ModelSpec.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from memllm.config import MemoryConfig
from memllm.context.kernels import FUSED_CPU_MIN, TorchKernels, kernels_for, unit_writer
from memllm.context.lookup import block_query_sums
from memllm.context.plan import CallPlan, plan_call
from memllm.context.positions import Rotary
from memllm.context.select import ForcedUnits, Probe, unit_mass
from memllm.context.support import ModelSpec
from memllm.context.unit_cache import UnitCache, counts
from memllm.context.units import UnitStore
from memllm.context.window import received_scores
from memllm.errors import ConfigError


class PlanMemo:
    """The latest call's plan, shared by the layers of one cache (they are all in the same state)."""

    def __init__(self, config: MemoryConfig):
        self.config = config
        self.hold = False  # calls are held (plan.py): set by ContextMemoryCache.hold_cuts
        self.key: tuple | None = None
        self.plan: CallPlan | None = None

    def get(self, seen: int, window: int, cut: bool, n_units: int, c: int) -> CallPlan:
        key = (seen, window, cut, n_units, c, self.hold)
        if key != self.key or self.plan is None:
            self.key, self.plan = key, plan_call(seen, window, cut, n_units, c, self.config, self.hold)
        return self.plan


class _WindowPart:
    """One of a layer's window tensors (local_k, local_v, local_score). Reading or setting it first makes
    the views of a window handed over by a stacked step (ContextMemoryLayer.hand_window); setting it
    ends window_from."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.slot = "_" + name

    def __get__(self, layer: Any, owner: type | None = None) -> Any:
        if layer is None:
            return self
        if layer._window_row is not None:
            layer._take_window()
        return getattr(layer, self.slot)

    def __set__(self, layer: Any, t: torch.Tensor) -> None:
        if layer._window_row is not None:
            layer._take_window()
        setattr(layer, self.slot, t)
        layer.window_from = None


class ContextMemoryLayer(CacheLayerMixin):
    """One layer's sinks, window, window scores and units."""

    is_sliding = False
    is_croppable = False
    local_k = _WindowPart()  # (kv_heads, L, head_dim) the window's keys, rotated at j - base
    local_v = _WindowPart()  # (kv_heads, L, head_dim)
    local_score = _WindowPart()  # (kv_heads, L) fp32: the attention each window key received

    def __init__(
        self,
        spec: ModelSpec,
        config: MemoryConfig,
        rotary: Rotary,
        layer_idx: int,
        plans: PlanMemo | None = None,
        kernels: TorchKernels | None = None,
    ):
        super().__init__()
        self.spec, self.config, self.rotary, self.layer_idx = spec, config, rotary, layer_idx
        self.device = spec.device
        self.dtype = spec.dtype
        # The CUDA kernels (impl "fast" on CUDA) or the PyTorch paths: chosen here, once (kernels.py).
        self.kernels = kernels if kernels is not None else kernels_for(config.impl, self.device)
        self.store = UnitStore(
            spec.kv_heads,
            config.block_size,
            spec.head_dim,
            config.repr_topk,
            config.offload_dtype,
            self.device,
            device_writer=unit_writer(self.device),
            unit_cache=self._unit_cache() if config.device_unit_cache else None,
        )
        h, d = spec.kv_heads, spec.head_dim
        empty = torch.empty(h, 0, d, dtype=self.dtype, device=self.device)
        self.sink_k, self.sink_v = empty, empty
        # A batch's stacked step (stacked.py) leaves the window as a row of its buffers, made into
        # views only when read (`hand_window`); window_from: the row the window came from, until set.
        self._window_row: tuple | None = None
        self.window_from: tuple | None = None
        self.local_k, self.local_v = empty, empty
        self.local_score = torch.empty(h, 0, dtype=torch.float32, device=self.device)  # (kv_heads, L)
        self.seen = 0
        self.base = 0  # absolute index of window position 0: local key j is kept rotated at j - base
        self.cut = False  # phase 2 once a unit has been cut
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None
        # Calls whose received scores are not yet in local_score (kernels.defers_scores, before the first
        # cut): per call, q (heads, c, d) fp32 at window positions first.., lse (heads, c), first, scale.
        self.deferred: tuple[tuple[torch.Tensor, torch.Tensor, int, float], ...] | None = None
        self.plans = (
            plans if plans is not None else PlanMemo(config)
        )  # shared by all layers: one schedule per call
        self.lookup_log: list[tuple[int, torch.Tensor]] | None = None  # see ContextMemoryCache.record_lookups
        self.probe: Probe | None = None  # see ContextMemoryCache.probing
        self.forced: ForcedUnits | None = None  # shared by the cache's layers (select.py)
        self.static_views = False  # local_k/v/score are views of static.py's buffers (written in place)
        self.lookups = 0
        self.units_fetched = 0
        self.max_keys_per_query = 0
        self.max_position = 0
        self.is_initialized = True

    # ---- the window: local_k (kv_heads, L, d), local_v, local_score (kv_heads, L) fp32 --------------
    def hand_window(self, row: tuple) -> None:
        """The window is row i's first n keys of a stacked step's buffers: row = (k, v, score, i, n),
        k, v (kv_heads, S, capacity, d), score (kv_heads, S, capacity). Views are made when it is read
        (a session that goes on stepping in the batch never reads it: no per-row views per step)."""
        self._window_row = self.window_from = row
        self._local_k = self._local_v = self._local_score = None

    def window_length(self) -> int:
        """L, the window's keys (without making a handed window's views)."""
        row = self._window_row
        return row[4] if row is not None else self._local_k.shape[1]

    def _take_window(self) -> None:
        k, v, score, i, n = self._window_row
        self._local_k, self._local_v, self._local_score = k[:, i, :n], v[:, i, :n], score[:, i, :n]
        self._window_row = None

    def _unit_cache(self) -> UnitCache:
        """The device cache of this layer's units (MemoryConfig.device_unit_cache; unit_cache.py)."""
        cfg = self.config
        slots = cfg.max_cached_blocks or max(2 * cfg.topk, 1)
        return UnitCache(self.spec.kv_heads, cfg.block_size, self.spec.head_dim, slots, self.device)

    # ---- CacheLayerMixin -------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Record the new (rotated) K/V for the attention function; the state advances in `attend`."""
        self.pending = (key_states, value_states)
        return key_states, value_states

    def reported_length(self) -> int:
        return min(self.seen, self.config.n_init + self.config.n_local)

    def model_positions(self, n: int, device: torch.device) -> torch.Tensor:
        """(n,) the positions the model rotates the next n tokens at (reported length + arange)."""
        self.check_positions(n)
        start = self.reported_length()
        return torch.arange(start, start + n, device=device)

    def check_positions(self, n: int) -> None:
        """Refuse a model call whose positions would reach the trained length (host integers only)."""
        start = self.reported_length()
        if start + n > self.spec.trained_len:
            raise RuntimeError(
                f"position {start + n - 1} is beyond the model's trained length ({self.spec.trained_len}): "
                f"feed at most {self.spec.trained_len - start} tokens per call (memllm.context.prefill.feed does)"
            )

    def get_seq_length(self) -> int:
        return self.reported_length()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.reported_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.restore_checkpoint(self.empty_checkpoint())

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("ContextMemoryCache holds one sequence: beam search is not supported")

    def offload(self):
        pass

    def prefetch(self):
        pass

    # ---- the rule ------------------------------------------------------------------------------
    def attend(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """query (1, heads, c, d), key/value (1, kv_heads, c, d) rotated by the model at the positions
        `model_positions(c)` gives (what the cache reported: HF's default position ids).

        Returns (1, heads, c, d) in the model dtype and advances the state by c tokens.
        """
        if query.shape[0] != 1:
            raise ValueError("ContextMemoryCache supports batch size 1 only")
        c = query.shape[2]
        model_start = self.reported_length()
        self.check_positions(c)
        n_prev = self.local_k.shape[1]
        plan = self.plans.get(self.seen, n_prev, self.cut, self.store.n_units, c)
        rebase = self.seen + c - 1 - self.base >= self.spec.trained_len
        # Received scores may stay deferred while nothing reads them and no window key moves or leaves;
        # a short call (a decoded token) adds its own at once, beside the deferred ones (a sum).
        can_defer = (
            getattr(self.kernels, "defers_scores", False) and not self.cut and not rebase and plan.n_cut == 0
            and plan.sinks_from is None and not plan.memory_blocks and plan.keep_from == 0
            and all(b.lo == 0 for b in plan.blocks)
        )  # fmt: skip
        if not can_defer:
            self.flush_scores()
        defer = can_defer and c >= FUSED_CPU_MIN
        if rebase:
            self._rebase(self.seen - n_prev)
        q, k, v = query[0], key[0], value[0].to(self.dtype)
        # Model position -> window position: one angle for the whole call.
        angle = self.seen - self.base - model_start
        if defer:
            out, lse, k_all, v_all, score = self.local_pass_deferred(q, k, v, plan, angle, scale)
        else:
            out, lse, k_all, v_all, score = self.local_pass(
                q, k, v, plan, angle, scale, self.local_k, self.local_v, self.local_score
            )
        first = plan.seen - plan.window - self.base  # position of window key 0
        if plan.n_cut:
            self.store.append_many(*self.cut_units(plan, k_all, v_all, score, first))
        if plan.sinks_from is not None:
            self._set_sinks(plan, k_all, v_all, first)
        if plan.memory_blocks:
            out = self.attend_memory(q, plan, model_start, scale, out, lse)
        self.account(plan, model_start)
        keep = plan.keep_from
        # Compact copies when cutting: a slice would pin the old storage.
        self.local_k = k_all[:, keep:].contiguous() if keep else k_all
        self.local_v = v_all[:, keep:].contiguous() if keep else v_all
        self.local_score = score[:, keep:].contiguous() if keep else score
        self.static_views = False
        self.seen += c
        return out.unsqueeze(0).to(query.dtype)

    def _rebase(self, new_base: int) -> None:
        """Re-rotate the window so that its positions count from `new_base` (keeps them < trained length)."""
        self.local_k = self.kernels.rotated(
            self.rotary, self.local_k, self.base - new_base, 1, self.dtype, per_row=False
        )
        self.base = new_base

    def local_pass(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        plan: CallPlan,
        angle: int,
        scale: float,
        local_k: torch.Tensor,
        local_v: torch.Tensor,
        local_score: torch.Tensor,
        rebase: int = 0,
    ) -> tuple[torch.Tensor, ...]:
        """The call's keys joined to the window (local_k/v/score: its keys, rotated at j - base + rebase
        (rebase: how far the window's frame moves first, as _rebase), values and received scores) and
        the local attention over them; q, k (model rotation, `angle` positions short of the window
        frame), v in the model dtype.

        Returns out (heads, c, d) fp32, lse (heads, c), k_all / v_all (kv_heads, W + c, d) and score
        (kv_heads, W + c) fp32: what each key received, the window's earlier scores included."""
        rot = self.rotary
        k_all = self.kernels.join_keys(rot, local_k, k, rebase, angle, self.dtype)
        v_all = torch.cat([local_v, v], dim=1)
        out, lse, received = self.kernels.local_attention(
            rot, q, angle, k_all, v_all, plan, scale, self.dtype
        )
        score = received  # a fresh tensor: the window's earlier scores are added in place
        score[:, : local_score.shape[1]] += local_score
        return out, lse, k_all, v_all, score

    def local_pass_deferred(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: CallPlan, angle: int, scale: float
    ) -> tuple[torch.Tensor, ...]:
        """local_pass without the received scores: the call's queries join `deferred` (their scores are
        added by flush_scores, before anything reads them: a cut, a rebase, a snapshot). Exact: the keys
        a deferred query saw are all still in the window, unmoved, until that flush."""
        rot = self.rotary
        k_all = self.kernels.join_keys(rot, self.local_k, k, 0, angle, self.dtype)
        v_all = torch.cat([self.local_v, v], dim=1)
        out, lse, q_loc = self.kernels.local_attention_deferred(
            rot, q, angle, k_all, v_all, plan, scale, self.dtype
        )
        pad = torch.zeros(
            self.local_score.shape[0], plan.c, dtype=torch.float32, device=self.local_score.device
        )
        score = torch.cat([self.local_score, pad], dim=1)
        self.deferred = (*(self.deferred or ()), (q_loc, lse, plan.window, scale))  # a new tuple: checkpoints
        return out, lse, k_all, v_all, score

    def flush_scores(self) -> None:
        """Add the deferred queries' received scores to local_score (a new tensor: checkpoints hold the old)."""
        if self.deferred is None:
            return
        score = self.local_score.clone()
        for q, lse, first, scale in self.deferred:
            score += received_scores(q, lse, self.local_k, first, scale)
        self.local_score = score
        self.deferred = None

    def cut_units(
        self, plan: CallPlan, k_all: torch.Tensor, v_all: torch.Tensor, score: torch.Tensor, first: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The units the plan cuts during this call (window key 0 at position `first`): k, v
        (n, kv_heads, block_size, head_dim) and representatives (n, kv_heads, repr_topk, head_dim).

        Units keep keys rotated at position 0: rotated back by their window positions. Representatives:
        the repr_topk keys that received the most attention while in the window."""
        cfg, rot = self.config, self.rotary
        bs, n = cfg.block_size, plan.n_cut
        kvh, _, d = k_all.shape
        span = slice(plan.cut_start, plan.cut_start + n * bs)
        k_blk = self.kernels.rotated(rot, k_all[:, span], first + plan.cut_start, -1, self.dtype)
        k_blk = k_blk.reshape(kvh, n, bs, d)
        v_blk = v_all[:, span].reshape(kvh, n, bs, d)
        top = torch.topk(score[:, span].reshape(kvh, n, bs), cfg.repr_topk, dim=2).indices
        repr_k = torch.gather(k_blk, 2, top.unsqueeze(-1).expand(-1, -1, -1, d))  # (kv_heads, n, r, d)
        return k_blk.transpose(0, 1), v_blk.transpose(0, 1), repr_k.transpose(0, 1)

    def cut_after(self, plan: CallPlan, k_all: torch.Tensor, v_all: torch.Tensor, score: torch.Tensor) -> None:
        """What `attend` does with a cutting call's window after its local pass, for a call attended
        elsewhere (a batch's stacked rows, the static step): k_all, v_all, score (the window and the
        call's keys, their received scores; this layer's own tensors, not views of shared buffers) ->
        the cut units appended to the store, the keys after them the window."""
        first = plan.seen - plan.window - self.base  # position of window key 0
        self.store.append_many(*self.cut_units(plan, k_all, v_all, score, first))
        keep = plan.keep_from
        self.local_k, self.local_v = k_all[:, keep:].contiguous(), v_all[:, keep:].contiguous()
        self.local_score = score[:, keep:].contiguous()
        self.static_views = False

    def write_cut_units(
        self,
        plan: CallPlan,
        k_all: torch.Tensor,
        v_all: torch.Tensor,
        score: torch.Tensor,
        first: int,
        at: torch.Tensor,
    ) -> None:
        """cut_units, written at units at, at + 1, ... (a device scalar: UnitStore.write_at; static.py).
        With the kernels and bf16/fp16/fp32 units, one launch (cuda/cut.cut_units_cuda) does both."""
        self.kernels.write_cut(self, plan, k_all, v_all, score, first, at)

    def _set_sinks(self, plan: CallPlan, k_all: torch.Tensor, v_all: torch.Tensor, first: int) -> None:
        """The first cut (phase 1 -> 2; window key 0 at position `first`): the sinks, keys rotated back
        to position 0."""
        sinks = slice(plan.sinks_from, plan.sinks_from + self.config.n_init)
        self.sink_k = self.kernels.rotated(
            self.rotary, k_all[:, sinks], first + plan.sinks_from, -1, self.dtype
        )
        self.sink_v = v_all[:, sinks].clone()
        self.cut = True

    def attend_memory(
        self,
        q: torch.Tensor,
        plan: CallPlan,
        model_start: int,
        scale: float,
        out: torch.Tensor,
        lse: torch.Tensor,
        whole_index: bool = False,
    ) -> torch.Tensor:
        """Memory blocks' queries (at distance memory_distance) over sinks + their chosen units, merged with `out`
        -> (heads, c, d): fp32, or with the kernels, when every row has memory, in the model dtype (a
        view of a (c, heads, d) tensor: the attention function's layout).

        whole_index (a static call, static.py): score every slot of the unit index buffer, the blocks'
        candidate counts (plan.tensors' mb_units) already written on the device, and leave the
        counters and the lookup log to the caller (it needs n_units >= topk)."""
        cfg, rot = self.config, self.rotary
        dev = q.device
        kvh = self.spec.kv_heads
        t = plan.tensors(dev)
        n_mb = len(plan.memory_blocks)
        # Queries at memory_distance - (model_start + t) more than where the model put them: distance
        # memory_distance (MEMORY_DISTANCE, or n_local where shorter, unless configured).
        start = model_start - cfg.memory_distance
        # With the kernels one launch: the queries in the model dtype and their per-block sums.
        q_mem, q_sum = self.kernels.memory_queries(rot, q, start, plan, t, kvh, self.dtype)
        uk = uv = None
        chosen = 0
        if self.probe is not None and self.store.n_units > 0:  # select.py: the question's unit masses
            q_probe = rot.rotated(q, start, -1, torch.float32)
            self.probe.add(
                self.layer_idx,
                unit_mass(q_probe, lse, self.sink_k, self.store, scale, partial(self.kernels.scan_units, dtype=self.dtype)),
            )
        if self.store.n_units > 0 and cfg.topk > 0:
            if q_sum is None:
                q_sum = block_query_sums(q_mem, t["row_block"], n_mb, kvh)
            reprs = self.store.repr_buffer() if whole_index else self.store.repr_keys()
            ids = self.kernels.choose_units(q_sum, reprs, t["mb_units"], cfg.lookup, cfg.topk)
            if self.forced is not None:
                ids = self.forced.apply(self.layer_idx, ids, static=whole_index)
            ids = ids.expand(n_mb, kvh, -1)  # (memory blocks, kv_heads, chosen)
            chosen = ids.shape[-1]
            # a probe's call is rolled back and its lookups uncounted: it leaves the unit cache alone
            gather = self.kernels.gather_units if self.probe is not None else self.kernels.gather_selected
            uk, uv = gather(self.store, ids, self.dtype)
            if not whole_index:
                self.count_lookups(plan, ids)
        return self.kernels.memory_attention(self, q, q_mem, uk, uv, plan, chosen, scale, out, lse)

    def count_lookups(self, plan: CallPlan, ids: torch.Tensor | None) -> None:
        """Counters (and the lookup log, from ids (memory blocks, kv_heads, chosen)) of a call's lookups;
        a probe's (ContextMemoryCache.probing) are not counted: it is rolled back, its scan is not a lookup."""
        if self.probe is not None:
            return
        valid = [min(self.config.topk, plan.blocks[i].units_before) for i in plan.memory_blocks]
        self.lookups += len(valid)
        self.units_fetched += self.spec.kv_heads * sum(valid)
        if self.lookup_log is not None and ids is not None:  # one entry per block's lookup
            self.lookup_log += [(self.layer_idx, ids[i, :, :n].reshape(-1)) for i, n in enumerate(valid)]

    def account(self, plan: CallPlan, model_start: int) -> None:
        """Bounds the tests check: keys per query, positions (host integers only)."""
        keys, position = self.bounds(plan, model_start)
        self.max_keys_per_query = max(self.max_keys_per_query, keys)
        self.max_position = max(self.max_position, position)

    def bounds(self, plan: CallPlan, model_start: int) -> tuple[int, int]:
        """What a call of `plan` (its first query at model position model_start) adds to the bounds:
        the most keys a query attends to, the largest position any rotation reaches (host integers)."""
        cfg = self.config
        keys = 0
        for b in plan.blocks:
            n_mem = cfg.n_init + min(cfg.topk, b.units_before) * cfg.block_size if b.cut_before else 0
            keys = max(keys, n_mem + plan.window + b.q1 - b.lo)
        in_window = plan.seen + plan.c - 1 - self.base  # the call's last query, window frame
        memory = cfg.memory_distance if plan.memory_blocks else 0
        return keys, max(model_start + plan.c - 1, in_window, memory)

    # ---- checkpoints, accounting, snapshots ------------------------------------------------------------
    def checkpoint(self) -> dict:
        local = (self.local_k, self.local_v, self.local_score)
        if self.static_views:  # the static decode buffers are written in place: keep a copy
            local = tuple(t.clone() for t in local)
        return {
            "sink_k": self.sink_k, "sink_v": self.sink_v, "local_k": local[0], "local_v": local[1],
            "local_score": local[2], "seen": self.seen, "cut": self.cut, "n_units": self.store.n_units,
            "base": self.base, "deferred": self.deferred,
        }  # fmt: skip

    def empty_checkpoint(self) -> dict:
        h, d = self.spec.kv_heads, self.spec.head_dim
        empty = torch.empty(h, 0, d, dtype=self.dtype, device=self.device)
        score = torch.empty(h, 0, dtype=torch.float32, device=self.device)
        return {"sink_k": empty, "sink_v": empty, "local_k": empty, "local_v": empty, "local_score": score,
                "seen": 0, "cut": False, "n_units": 0, "base": 0}  # fmt: skip

    def restore_checkpoint(self, cp: dict) -> None:
        """Roll back to a checkpoint taken earlier (tensors are never modified in place, units only appended)."""
        self.sink_k, self.sink_v = cp["sink_k"], cp["sink_v"]
        self.local_k, self.local_v, self.local_score = cp["local_k"], cp["local_v"], cp["local_score"]
        self.seen, self.cut, self.base = cp["seen"], cp["cut"], cp["base"]
        self.deferred = cp.get("deferred")
        self.static_views = False
        self.store.truncate(cp["n_units"])

    def device_bytes(self) -> dict[str, int]:
        window = sum(
            t.numel() * t.element_size() for t in (self.sink_k, self.sink_v, self.local_k, self.local_v)
        )
        window += self.local_score.numel() * 4
        for q, lse, _, _ in self.deferred or ():
            window += q.numel() * q.element_size() + lse.numel() * lse.element_size()
        return {"window": window, "index": self.store.device_bytes()}

    def state(self) -> dict[str, torch.Tensor]:
        self.flush_scores()
        out = {name: t.to("cpu").contiguous() for name, t in self.checkpoint().items() if torch.is_tensor(t)}
        out.update({f"units.{name}": t for name, t in self.store.state().items()})
        return out

    def load_state(self, state: dict[str, torch.Tensor], seen: int, cut: bool, base: int) -> None:
        dev = self.device
        self.sink_k, self.sink_v = state["sink_k"].to(dev), state["sink_v"].to(dev)
        self.local_k, self.local_v = state["local_k"].to(dev), state["local_v"].to(dev)
        self.local_score = state["local_score"].to(dev)
        self.deferred = None
        self.seen, self.cut, self.base = seen, cut, base
        self.static_views = False
        self.store.load_state({k[len("units.") :]: t for k, t in state.items() if k.startswith("units.")})


# The MemoryConfig fields ContextMemoryCache.configured may change for a block of calls.
VARIANT_FIELDS = ("memory_distance",)


class ContextMemoryCache(Cache):
    """A Cache of ContextMemoryLayer, one per decoder layer. Use through `attach` (attach.py)."""

    def __init__(self, spec: ModelSpec, config: MemoryConfig):
        resolved = config.resolved(spec.trained_len)
        if resolved.device is not None and torch.device(resolved.device) != spec.device:
            raise ConfigError(
                f"MemoryConfig.device ({resolved.device}) must be where the model is ({spec.device}): "
                "move the model, or leave device unset"
            )
        rotary = Rotary(spec.rotary, spec.trained_len, spec.head_dim)
        plans = PlanMemo(resolved)
        kernels = kernels_for(resolved.impl, spec.device)  # one choice for every layer
        layers = [
            ContextMemoryLayer(spec, resolved, rotary, i, plans, kernels) for i in range(spec.num_layers)
        ]
        super().__init__(layers=layers)
        self.spec, self.config, self.rotary = spec, resolved, rotary
        self.static = None  # the StaticDecode whose step the attention function runs (set by cuda/graph.py)
        self._decode_graph = None
        self.forced = ForcedUnits(len(layers), resolved.topk, spec.device) if resolved.topk > 0 else None
        for layer in layers:
            layer.forced = self.forced
        self.is_probing = False  # prefill.step runs no decode graph while probing
        self.variant = False  # nor inside `configured`

    def decode_graph(self):
        """The DecodeGraph single tokens go through (CUDA, impl "fast", config.decode_graphs), else None."""
        if not self.config.decode_graphs:
            return None
        if self._decode_graph is None:
            self._decode_graph = self.layers[0].kernels.decode_graph(self)
        return self._decode_graph

    def reserve(self, n_tokens: int) -> None:
        """Room in every layer's unit index for the units the next n_tokens will cut, so a long feed grows
        each index at most once, without growth slack. When it must grow, one call's worth of units
        more is added for what follows (answers), so short feeds after it do not grow it again."""
        cfg = self.config
        units = self.units_after(n_tokens)
        for lay in self.layers:
            if lay.store.repr_buffer().shape[1] < units:
                lay.store.reserve(units + cfg.chunk_size // cfg.block_size, lay.dtype)

    def units_after(self, n_tokens: int) -> int:
        """Units per layer once n_tokens more tokens are read (what their cuts leave in the stores)."""
        cfg = self.config
        layer = self.layers[0]
        head = 0 if layer.cut else cfg.n_init
        window = layer.window_length()
        return layer.store.n_units + max(0, window + n_tokens - head - cfg.n_local) // cfg.block_size

    def host_bytes_for(self, n_tokens: int) -> int:
        """Host bytes (pinned on a GPU) the stores would allocate to read n_tokens more tokens."""
        return self.host_bytes_for_units(self.units_after(n_tokens))

    def host_bytes_for_units(self, units: int) -> int:
        """Host bytes (pinned on a GPU) the stores would allocate to hold `units` units per layer in all."""
        return sum(lay.store.host_bytes_for(units) for lay in self.layers)

    @contextmanager
    def hold_cuts(self) -> Iterator[None]:
        """Within the block, calls that fit the held limit cut no units (plan.py): for tokens that will be
        rolled back (a question and its answer), which then stay in the window at exact positions."""
        plans = self.layers[0].plans
        before = plans.hold
        plans.hold = True
        try:
            yield
        finally:
            plans.hold = before

    @property
    def seen_tokens(self) -> int:
        return self.layers[0].seen

    def next_position_ids(self, n: int) -> torch.Tensor:
        """(1, n) position ids the model should be called with next (what HF derives by default)."""
        return self.layers[0].model_positions(n, self.layers[0].device).unsqueeze(0)

    @contextmanager
    def record_lookups(self) -> Iterator[list[tuple[int, torch.Tensor]]]:
        """Within the block, every block's lookup appends (layer index, the unit ids it chose, flat, on the device):
        read-only, and no host synchronisation is added (read the ids after the block)."""
        log: list[tuple[int, torch.Tensor]] = []
        for layer in self.layers:
            layer.lookup_log = log
        try:
            yield log
        finally:
            for layer in self.layers:
                layer.lookup_log = None

    @contextmanager
    def configured(self, **changes: Any) -> Iterator[MemoryConfig]:
        """Within the block, the cache and every layer under its config with `changes` (validated) and calls
        run eagerly (no decode graph): a measurement's variant on one read. Only VARIANT_FIELDS, the settings
        the layers read at each call (the stored state, plans and buffers depend on the others)."""
        other = sorted(set(changes) - set(VARIANT_FIELDS))
        if other:
            raise ConfigError(
                f"ContextMemoryCache.configured changes only {', '.join(VARIANT_FIELDS)}, not {', '.join(other)}"
            )
        saved = self.config
        changed = replace(saved, **changes).resolved(self.spec.trained_len)
        self.config, self.variant = changed, True
        for layer in self.layers:
            layer.config = changed
        try:
            yield changed
        finally:
            self.config, self.variant = saved, False
            for layer in self.layers:
                layer.config = saved

    @contextmanager
    def probing(self) -> Iterator[Probe]:
        """Within the block, every layer's memory pass also scores all its units by the attention mass
        the call's queries give them (select.unit_mass), into the Probe yielded; calls run eagerly (no
        decode graph) and their lookups are not logged (record_lookups)."""
        probe = Probe(len(self.layers), self.layers[0].store.n_units)
        logs = [layer.lookup_log for layer in self.layers]
        self.is_probing = True
        for layer in self.layers:
            layer.probe, layer.lookup_log = probe, None
        try:
            yield probe
        finally:
            self.is_probing = False
            for layer, log in zip(self.layers, logs, strict=True):
                layer.probe, layer.lookup_log = None, log

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("ContextMemoryCache cannot crop: use checkpoint()/rollback()")

    def checkpoint(self) -> list[dict]:
        return [layer.checkpoint() for layer in self.layers]

    def rollback(self, checkpoint: list[dict]) -> None:
        for layer, cp in zip(self.layers, checkpoint, strict=True):
            layer.restore_checkpoint(cp)

    def stats(self) -> dict:
        dev = [layer.device_bytes() for layer in self.layers]
        return {
            "tokens_seen": self.seen_tokens,
            "units": sum(layer.store.n_units for layer in self.layers),
            "units_per_layer": self.layers[0].store.n_units,
            "device_bytes_window": sum(d["window"] for d in dev),
            "device_bytes_index": sum(d["index"] for d in dev),
            "host_bytes": sum(layer.store.host_bytes() for layer in self.layers),
            "host_bytes_stored": sum(layer.store.stored_bytes() for layer in self.layers),
            "lookups": sum(layer.lookups for layer in self.layers),
            "units_fetched": sum(layer.units_fetched for layer in self.layers),
            "max_keys_per_query": max(layer.max_keys_per_query for layer in self.layers),
            "max_position": max(layer.max_position for layer in self.layers),
        } | self.unit_cache_stats()

    def unit_caches(self) -> list[UnitCache]:
        """The layers' device unit caches (MemoryConfig.device_unit_cache), [] when off."""
        return [layer.store.unit_cache for layer in self.layers if layer.store.unit_cache is not None]

    def unit_cache_stats(self) -> dict:
        """With the device unit cache on: its counters summed over layers (unit_cache.counts: distinct
        (unit, KV head) pairs), the hit rate (None before any lookup) and its device bytes; {} when off
        (one read from the device)."""
        caches = self.unit_caches()
        if not caches:
            return {}
        got = counts(caches)
        looked = got["hits"] + got["misses"]
        got["hit_rate"] = got["hits"] / looked if looked else None
        return {"unit_cache": got, "device_bytes_unit_cache": sum(c.device_bytes() for c in caches)}

    def release_unit_caches(self) -> None:
        """Free the device unit caches' pools (a session leaving a batch); the next lookups start cold."""
        for c in self.unit_caches():
            c.release()
