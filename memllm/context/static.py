"""One decode token through every context-memory layer with static shapes: the step a CUDA graph replays.

A single-token call that cuts nothing follows the same rule as `ContextMemoryLayer.attend` (cache.py),
but its state lives in fixed buffers and its changing numbers in device scalars, so the kernels it
launches, their shapes and their addresses are the same from one token to the next:
  * per layer, the window is a buffer of `capacity` keys (k, v in the model dtype, received scores
    fp32), zero beyond what was ever written; the new key is written at index W (a device scalar);
  * local attention over keys [0, W], masked by W; the received attention is added to the scores;
  * the lookup scores every slot of the unit index buffer (its capacity) and masks slots >= the
    number of units (a device scalar); ids of empty slots are clamped to a real unit (their keys are
    masked out, so no uninitialised memory is ever multiplied);
  * memory attention over sinks + the chosen units, masked beyond sinks + min(topk, units) * block_size;
  * one merge. The step itself changes no host state: `advance_host` does that afterwards.
Computed in fp32. The window pass, memory pass and merge are `step_attention` (PyTorch, the
reference) or, on CUDA with impl "fast", decode_cuda.step_attention_cuda (two Triton launches, the
same contract, tested against it); the lookup is PyTorch either way.

When a step would cut a unit, re-base positions, or outgrow the buffer, the caller takes the plain
path instead (`eligible`); the next static step copies the plain path's state back in (`sync`).
Knows nothing of CUDA graphs (graph.py) or of models.
"""

from __future__ import annotations

import weakref

import torch

from memllm.context.gather import gather_units
from memllm.context.lookup import combine, select_units, unit_scores
from memllm.context.plan import CallPlan
from memllm.context.window import merge


def masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hidden: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (kvh, g, d), k/v (kvh, n, d) fp32, hidden (n,) bool: keys left out -> out (kvh, g, d),
    lse (kvh, g, 1), the attention weights (kvh, g, n). At least one key must be visible."""
    logits = torch.matmul(q, k.transpose(1, 2)) * scale
    logits = logits.masked_fill(hidden, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    p = torch.exp(logits - lse)
    return torch.matmul(p, v), lse, p


def step_attention(
    q_loc: torch.Tensor,
    q_mem: torch.Tensor,
    win_k: torch.Tensor,
    win_v: torch.Tensor,
    score: torch.Tensor,
    window: torch.Tensor,
    sink_k: torch.Tensor,
    sink_v: torch.Tensor,
    unit_k: torch.Tensor,
    unit_v: torch.Tensor,
    units: torch.Tensor,
    topk: int,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """One token's attention over its window buffer and its memory, merged (the reference path; the
    CUDA kernels of decode_cuda.step_attention_cuda follow the same contract, see there).

    q_loc / q_mem (kvh, g, d): the queries at the window position and at the fixed distance;
    win_k / win_v (kvh, cap, d), keys [0, window] visible; score (kvh, cap) fp32 gets the attention
    each window key received added in place; sinks (kvh, n_sinks, d); unit_k / unit_v
    (kvh, topk * block_size, d), the first min(units, topk) * block_size visible. -> (kvh, g, d) fp32."""
    dev = q_loc.device
    slots = torch.arange(win_k.shape[1], device=dev)
    out, lse, p = masked_attention(q_loc, win_k.float(), win_v.float(), slots > window, scale)
    score += p.sum(dim=1)
    k_mem = torch.cat([sink_k, unit_k], dim=1).float()
    v_mem = torch.cat([sink_v, unit_v], dim=1).float()
    limit = sink_k.shape[1] + torch.clamp(units, max=topk) * block_size
    cols = torch.arange(k_mem.shape[1], device=dev)
    out_m, lse_m, _ = masked_attention(q_mem, k_mem, v_mem, cols >= limit, scale)
    return merge(out, lse.squeeze(-1), out_m, lse_m.squeeze(-1))


class StaticWindow:
    """One layer's window buffers."""

    def __init__(self, kv_heads: int, capacity: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        self.k = torch.zeros(kv_heads, capacity, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.score = torch.zeros(kv_heads, capacity, dtype=torch.float32, device=device)
        self.ids: torch.Tensor | None = None  # the last step's chosen unit ids (1, kv_heads, topk)
        self.views: tuple[torch.Tensor, ...] | None = None  # what the layer's local_k/v/score were set to


class StaticDecode:
    """Static buffers and device scalars of one ContextMemoryCache, and its single-token step."""

    def __init__(self, cache) -> None:
        self._cache = weakref.ref(cache)  # owned by the cache's DecodeGraph: no reference cycle
        cfg = cache.config
        layer = cache.layers[0]
        self.device = layer.device
        # A phase-2 window holds < n_local + block_size keys before a call; one token more fits.
        self.capacity = cfg.n_local + cfg.block_size + 1
        self.windows = [
            StaticWindow(layer.spec.kv_heads, self.capacity, layer.spec.head_dim, layer.dtype, self.device)
            for layer in cache.layers
        ]
        self.window = torch.zeros(1, dtype=torch.long, device=self.device)  # W: keys before the step
        self.row = torch.zeros(1, dtype=torch.long, device=self.device)  # rotation-table row: model -> window
        self.units = torch.zeros(1, dtype=torch.long, device=self.device)  # units the lookup chooses among
        self.synced_seen = -1

    @property
    def cache(self):
        return self._cache()

    # ---- host side -----------------------------------------------------------------------------
    def plan(self) -> CallPlan:
        layer = self.cache.layers[0]
        return layer.plans.get(layer.seen, layer.local_k.shape[1], layer.cut, layer.store.n_units, 1)

    def eligible(self, plan: CallPlan) -> bool:
        """Whether the next single-token call is a static step: phase 2, nothing cut, no re-base, fits."""
        layer, cfg = self.cache.layers[0], self.cache.config
        return (
            layer.cut
            and plan.n_cut == 0
            and plan.sinks_from is None
            and bool(plan.memory_blocks)
            and cfg.topk > 0
            and layer.store.n_units > 0
            and layer.store.repr_buffer().shape[1] >= cfg.topk
            and layer.seen >= cfg.n_init + cfg.n_local
            and layer.seen - layer.base < layer.spec.trained_len
            and plan.window + 1 <= self.capacity
        )

    def in_sync(self) -> bool:
        layers = self.cache.layers
        return self.synced_seen == layers[0].seen and all(
            sw.views is not None and sw.views[0] is layer.local_k and sw.views[2] is layer.local_score
            for sw, layer in zip(self.windows, layers, strict=True)
        )

    def sync(self) -> None:
        """Copy the layers' current windows into the buffers and set the device scalars (plain launches)."""
        layers = self.cache.layers
        layer = layers[0]
        w = layer.local_k.shape[1]
        for sw, lay in zip(self.windows, layers, strict=True):
            sw.k[:, :w].copy_(lay.local_k)
            sw.v[:, :w].copy_(lay.local_v)
            sw.score.zero_()
            sw.score[:, :w].copy_(lay.local_score)
        self.window.fill_(w)
        self.row.fill_(layer.rotary._row(layer.seen - layer.base - layer.reported_length()))
        self.units.fill_(layer.store.n_units)
        self.synced_seen = layer.seen

    def advance_device(self) -> None:
        """The device scalars after one token (part of the step, so a graph replays it)."""
        self.window += 1
        self.row += 1

    def advance_host(self, plan: CallPlan) -> None:
        """The layers' host state after one static step (views of the buffers; counters; lookup log)."""
        cfg = self.cache.config
        w = plan.window + 1
        for sw, layer in zip(self.windows, self.cache.layers, strict=True):
            model_start = layer.reported_length()
            sw.views = (sw.k[:, :w], sw.v[:, :w], sw.score[:, :w])
            layer.local_k, layer.local_v, layer.local_score = sw.views
            layer.static_views = True
            valid = min(cfg.topk, layer.store.n_units)
            layer.lookups += 1
            layer.units_fetched += layer.spec.kv_heads * valid
            if layer.lookup_log is not None and sw.ids is not None:
                layer.lookup_log.append((layer.layer_idx, sw.ids[0, :, :valid].reshape(-1).clone()))
            layer._account(plan, model_start)
            layer.seen += 1
        self.synced_seen = self.cache.layers[0].seen

    # ---- the step (device work only) -----------------------------------------------------------
    def attend(
        self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """query (1, heads, 1, d), key/value (1, kv_heads, 1, d) as the model rotated them -> (1, heads, 1, d)."""
        sw = self.windows[layer.layer_idx]
        cfg, rot, store = layer.config, layer.rotary, layer.store
        dev = query.device
        heads, d = query.shape[1], query.shape[3]
        kvh = key.shape[1]
        g = heads // kvh
        cos_t, sin_t, _ = rot.tables(dev)
        cos, sin = cos_t.index_select(0, self.row), sin_t.index_select(0, self.row)  # (1, d)
        q = query[0].float()  # (heads, 1, d)
        q_loc = rot.apply(q, cos, sin)
        k_loc = rot.apply(key[0].float(), cos, sin).to(sw.k.dtype)
        sw.k.index_copy_(1, self.window, k_loc)
        sw.v.index_copy_(1, self.window, value[0].to(sw.v.dtype))
        # Memory: queries at the fixed distance n_local, sinks + chosen units at 0.
        cos_m, sin_m = rot.cos_sin(layer.reported_length() - cfg.n_local, 1, -1, dev)
        q_mem = rot.apply(q, cos_m, sin_m).reshape(kvh, g, d)
        reprs = store.repr_buffer()  # (kvh, capacity, d)
        scores = combine(unit_scores(q_mem.sum(dim=1).unsqueeze(0), reprs), cfg.lookup)
        later = torch.arange(reprs.shape[1], device=dev) >= self.units
        ids = select_units(scores.masked_fill(later, float("-inf")), cfg.topk)
        ids = torch.minimum(ids, self.units - 1).expand(1, kvh, -1)  # empty slots read a real unit
        sw.ids = ids
        uk, uv = gather_units(store, ids, layer.dtype, cfg.impl)
        args = (q_loc.reshape(kvh, g, d), q_mem, sw.k, sw.v, sw.score, self.window, layer.sink_k,
                layer.sink_v, uk[0], uv[0], self.units, cfg.topk, cfg.block_size, scale)  # fmt: skip
        if cfg.impl == "fast" and dev.type == "cuda":
            from memllm.context.decode_cuda import step_attention_cuda

            merged = step_attention_cuda(*args)
        else:
            merged = step_attention(*args)
        return merged.reshape(1, heads, 1, d).to(query.dtype)
