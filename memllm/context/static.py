"""Short calls through every context-memory layer with static shapes: the steps a CUDA graph replays.

A call that cuts nothing (one decode token, or a few rows: a question) follows the same rule as
`ContextMemoryLayer.attend` (cache.py), but its state lives in fixed buffers and its changing numbers
in device scalars, so the kernels it launches, their shapes and their addresses are the same from
one call to the next:
  * per layer, the window is a buffer of `capacity` keys (k, v in the model dtype, received scores
    fp32), zero beyond what was ever written; the new key is written at index W (a device scalar);
  * local attention over keys [0, W], masked by W; the received attention is added to the scores;
  * the lookup scores every slot of the unit index buffer (its capacity) and masks slots >= the
    number of units (a device scalar); ids of empty slots are clamped to a real unit (their keys are
    masked out, so no uninitialised memory is ever multiplied);
  * memory attention over sinks + the chosen units, masked beyond sinks + min(topk, units) * block_size;
  * one merge. The step itself changes no host state: `advance_host` does that afterwards.
Computed in fp32. The window pass, memory pass and merge are `step_attention` (PyTorch, the
reference) or, on CUDA with impl "fast", cuda/static.step_attention_cuda (two Triton launches, the
same contract, tested against it); the lookup is lookup.choose_units (cuda/lookup.py on CUDA
with impl "fast"); the gather is kernels.gather_selected (through the device unit cache when it is
on: its slot table and counters are device tensors written in place, so a graph replays it too).

Calls of more than one token ("rows"): padded to a fixed number of rows T (`rows_bucket`), the first
n (a device scalar) real. Row t is key W + t (causal); padded rows write keys past W + n that no
real row sees and the next call overwrites, and add nothing to the scores. As T <= exc_block_size,
the rows span at most two execution blocks; each block gets its own lookup, as on the plain path.
How many blocks is part of the step's shape (`blocks`, a graph per count); where the boundary
falls is a device scalar (tokens seen modulo exc_block_size). `rows_attention`
(PyTorch) is their window pass, memory pass and merge, on every device.

Calls that cut units (`cut_shape`, `attend_cut`): in phase 2, once the index holds topk units, a call
whose plan cuts units (a prefill chunk: cuda/graph.py sends no call short enough for a rows step) runs ContextMemoryLayer.
attend's own pieces (local_pass, cut_units, attend_memory) on the buffers: the window is read from
them (re-based by a rotation fixed for the shape) and written back; the cut units go to the store at
the device unit count (ContextMemoryLayer.write_cut_units: one kernel on CUDA, else UnitStore.write_at), the lookup scores the whole index masked by each block's
candidate count (the plan's mb_units, rewritten on the device). Everything else about the call (its
plan, angles, window lengths) is host integers fixed by the shape's key, so equal keys launch the
same kernels. int8 units (quantized on the plain path only) and calls under a lookup log are not.

When a rows or decode step would re-base positions or outgrow the buffer, or a call fits neither kind,
the caller takes the plain path instead (`eligible`, `cut_shape`); the next static step copies the
plain path's state back in (`sync`).
The stacked rows of a batched decode step (stacked.py: one token per session, their windows in shared
buffers) have their references here too, `stacked_inputs` and `stacked_attention` (their CUDA kernels
are beside the static step's, in cuda/static.py).
Knows nothing of CUDA graphs (cuda/graph.py) or of models.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from memllm.context.lookup import block_query_sums
from memllm.context.plan import CallPlan, cuts_first_unit, held_limit
from memllm.context.positions import Rotary
from memllm.context.window import merge

MAX_ROWS = 128  # rows of the largest multi-token static call


@dataclass
class CutShape:
    """What a static cutting call (a steady prefill chunk) bakes in: equal keys, the same launches.

    plan: the first call of this shape's plan, kept alive with its device tables (a graph reads
    them); its mb_units is rewritten on the device from the unit count by every step. rel (memory
    blocks,) long: each block's candidate count minus the units before the call."""

    key: tuple
    plan: CallPlan
    rel: torch.Tensor
    rebase: int  # rotation of the window before the call (0: none)
    angle: int  # model position -> window position of the call's queries and keys
    first: int  # window position of window key 0 (after the re-base)
    model_start: int
    window_after: int


def rows_bucket(n: int, exc_block_size: int) -> int | None:
    """Rows a call of n tokens is padded to (1 for one token; powers of two from min(16,
    exc_block_size)), or None when it is too long for a static call."""
    if n == 1:
        return 1
    rows = max(1 << (n - 1).bit_length(), min(16, exc_block_size))
    return rows if rows <= min(MAX_ROWS, exc_block_size) else None


def masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hidden: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (kvh, r, d), k/v (kvh, n, d) fp32, hidden (n,) or (r, n) bool: keys left out -> out (kvh, r, d),
    lse (kvh, r, 1), the attention weights (kvh, r, n). At least one key must be visible."""
    logits = torch.matmul(q, k.transpose(1, 2)) * scale
    logits = logits.masked_fill(hidden, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    p = torch.exp(logits - lse)
    return split_matmul(p, v), lse, p


def split_matmul(p: torch.Tensor, v: torch.Tensor, parts: int = 8) -> torch.Tensor:
    """p (b, m, n) @ v (b, n, d) with n cut into `parts` products summed afterwards (when n divides):
    on the H100 cuBLAS ran (3, 192, 4736) @ (3, 4736, 64) in fp32 as one 84 us kernel of 36 tiles
    (torch.profiler, profile run 6); cut, the long n no longer serialises the work."""
    b, m, n = p.shape
    if n % parts or n < 8 * parts:
        return torch.matmul(p, v)
    pp = p.reshape(b, m, parts, n // parts).transpose(1, 2)  # (b, parts, m, n / parts)
    return torch.matmul(pp, v.reshape(b, parts, n // parts, v.shape[2])).sum(dim=1)


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
    """One token's attention over its window buffer and its memory, merged: rows_attention for one row
    (the reference path; the CUDA kernels of cuda/static.step_attention_cuda follow the same contract).

    q_loc / q_mem (kvh, g, d): the queries at the window position and at the fixed distance;
    win_k / win_v (kvh, cap, d), keys [0, window] visible; score (kvh, cap) fp32 gets the attention
    each window key received added in place; sinks (kvh, n_sinks, d); unit_k / unit_v
    (kvh, topk * block_size, d), the first min(units, topk) * block_size visible. -> (kvh, g, d) fp32."""
    one = torch.ones_like(window)  # the one row is real, in execution block 0
    out = rows_attention(
        q_loc.unsqueeze(2), q_mem.unsqueeze(2), win_k, win_v, score, window, one, one - 1, sink_k, sink_v,
        unit_k.unsqueeze(0), unit_v.unsqueeze(0), units, topk, block_size, scale,
    )  # fmt: skip
    return out.squeeze(2)


def rows_attention(
    q_loc: torch.Tensor,
    q_mem: torch.Tensor,
    win_k: torch.Tensor,
    win_v: torch.Tensor,
    score: torch.Tensor,
    window: torch.Tensor,
    n_valid: torch.Tensor,
    row_block: torch.Tensor,
    sink_k: torch.Tensor,
    sink_v: torch.Tensor,
    unit_k: torch.Tensor,
    unit_v: torch.Tensor,
    units: torch.Tensor,
    topk: int,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """T rows' attention over the window buffer and their memory, merged (step_attention for T rows).

    q_loc / q_mem (kvh, g, T, d); row t sees window keys [0, window + t]; the attention of the first
    n_valid rows is added to score (kvh, cap) fp32; row_block (T,) long: the execution block (0 or 1)
    of each row, whose gathered units unit_k / unit_v (blocks, kvh, topk * block_size, d), blocks 1 or
    2, it attends to (the first min(units, topk) * block_size visible) besides the sinks.
    -> (kvh, g, T, d) fp32."""
    kvh, g, rows, d = q_loc.shape
    dev = q_loc.device
    t = torch.arange(rows, device=dev)
    hidden = torch.arange(win_k.shape[1], device=dev)[None, :] > (window + t)[:, None]  # (T, cap)
    flat = (kvh, g * rows, d)  # row r of a group is row r % T
    out, lse, p = masked_attention(
        q_loc.reshape(flat), win_k.float(), win_v.float(), hidden.repeat(g, 1), scale
    )
    real = (t < n_valid).to(p.dtype)
    score += (p.reshape(kvh, g, rows, -1) * real[:, None]).sum(dim=(1, 2))
    limit = sink_k.shape[1] + torch.clamp(units, max=topk) * block_size
    cols = torch.arange(sink_k.shape[1] + unit_k.shape[2], device=dev)
    per_block = [
        masked_attention(
            q_mem.reshape(flat),
            torch.cat([sink_k, unit_k[b]], dim=1).float(),
            torch.cat([sink_v, unit_v[b]], dim=1).float(),
            cols >= limit,
            scale,
        )
        for b in range(unit_k.shape[0])
    ]
    out_m, lse_m = per_block[0][:2]
    if len(per_block) == 2:
        second = (row_block == 1).repeat(g)[None, :, None]
        out_m = torch.where(second, per_block[1][0], out_m)
        lse_m = torch.where(second, per_block[1][1], lse_m)
    return merge(out, lse.squeeze(-1), out_m, lse_m.squeeze(-1)).reshape(kvh, g, rows, d)


class StaticWindow:
    """One layer's window buffers."""

    def __init__(self, kv_heads: int, capacity: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        self.k = torch.zeros(kv_heads, capacity, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.score = torch.zeros(kv_heads, capacity, dtype=torch.float32, device=device)
        self.ids: torch.Tensor | None = None  # the last step's chosen unit ids (blocks, kv_heads, topk)
        self.views: tuple[torch.Tensor, ...] | None = None  # what the layer's local_k/v/score were set to


class StaticDecode:
    """Static buffers and device scalars of one ContextMemoryCache, and its single-token step."""

    def __init__(self, cache) -> None:
        self._cache = weakref.ref(cache)  # owned by the cache's DecodeGraph: no reference cycle
        cfg = cache.config
        layer = cache.layers[0]
        self.device = layer.device
        # A phase-2 window holds < n_local + block_size keys before a call, a held one (plan.py) up
        # to held_limit after it; a static call must fit, padded rows included.
        self.capacity = held_limit(cfg)
        self.windows = [
            StaticWindow(layer.spec.kv_heads, self.capacity, layer.spec.head_dim, layer.dtype, self.device)
            for layer in cache.layers
        ]
        self.window = torch.zeros(1, dtype=torch.long, device=self.device)  # W: keys before the step
        self.row = torch.zeros(1, dtype=torch.long, device=self.device)  # rotation-table row: model -> window
        self.units = torch.zeros(1, dtype=torch.long, device=self.device)  # units the lookup chooses among
        self.seen = torch.zeros(1, dtype=torch.long, device=self.device)  # tokens seen before the step
        self.n_valid = torch.zeros(1, dtype=torch.long, device=self.device)  # real rows of a rows step
        self.blocks = 1  # execution blocks of the rows step being run (a graph's shape: set by cuda/graph.py)
        self.cut: CutShape | None = None  # set by cuda/graph.py while a static cutting call runs
        self.synced_seen = -1

    @property
    def cache(self):
        return self._cache()

    # ---- host side -----------------------------------------------------------------------------
    def plan(self, n: int = 1) -> CallPlan:
        layer = self.cache.layers[0]
        return layer.plans.get(layer.seen, layer.local_k.shape[1], layer.cut, layer.store.n_units, n)

    def eligible(self, plan: CallPlan, rows: int = 1, cutting: bool = False) -> bool:
        """Whether the next call (plan.c tokens padded to `rows`) is a static step: phase 2, nothing
        cut, no re-base, at most two execution blocks, fits the buffers and the trained length.
        cutting: instead a one-token call that is such a step but for cutting the window's first unit
        (the token completes it): the static step attends over the whole window, the unit included,
        as ContextMemoryLayer.attend's cutting call does, and `cut_after` cuts the unit after it."""
        layer, cfg = self.cache.layers[0], self.cache.config
        cut_ok = rows == 1 and cuts_first_unit(plan, cfg) if cutting else plan.n_cut == 0
        return (
            layer.cut
            and cut_ok
            and plan.sinks_from is None
            and len(plan.memory_blocks) == len(plan.blocks) <= (1 if rows == 1 else 2)
            and cfg.topk > 0
            and layer.store.n_units > 0
            and layer.store.repr_buffer().shape[1] >= cfg.topk
            and layer.seen >= cfg.n_init + cfg.n_local
            and layer.seen + plan.c - 1 - layer.base < layer.spec.trained_len
            and layer.reported_length() + rows <= layer.spec.trained_len
            and plan.window + rows <= self.capacity
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
            sw.views = (sw.k[:, :w], sw.v[:, :w], sw.score[:, :w])
            lay.local_k, lay.local_v, lay.local_score = sw.views
            lay.static_views = True
        self.set_scalars()

    def set_scalars(self) -> None:
        """The device scalars from the host state (plain fills: no host synchronisation)."""
        layer = self.cache.layers[0]
        w = layer.local_k.shape[1]
        self.window.fill_(w)
        self.row.fill_(layer.rotary.row(layer.seen - layer.base - layer.reported_length()))
        self.units.fill_(layer.store.n_units)
        self.seen.fill_(layer.seen)
        self.synced_seen = layer.seen

    def advance_device(self, rows: int) -> None:
        """The device scalars after a step of `rows` rows (part of the step, so a graph replays it)."""
        step = 1 if rows == 1 else self.n_valid
        self.window += step
        self.row += step
        self.seen += step

    def advance_host(self, plan: CallPlan, rows: int = 1) -> None:
        """The layers' host state after one static step (views of the buffers; counters; lookup log)."""
        cfg = self.cache.config
        w = plan.window + plan.c
        blocks = len(plan.memory_blocks)
        for sw, layer in zip(self.windows, self.cache.layers, strict=True):
            model_start = layer.reported_length()
            sw.views = (sw.k[:, :w], sw.v[:, :w], sw.score[:, :w])
            layer.local_k, layer.local_v, layer.local_score = sw.views
            layer.static_views = True
            valid = min(cfg.topk, layer.store.n_units)
            layer.lookups += blocks
            layer.units_fetched += layer.spec.kv_heads * valid * blocks
            if layer.lookup_log is not None and sw.ids is not None:
                layer.lookup_log += [
                    (layer.layer_idx, sw.ids[b, :, :valid].reshape(-1).clone()) for b in range(blocks)
                ]
            layer.account(plan, model_start)
            layer.max_position = max(layer.max_position, model_start + rows - 1)  # padded rows too
            layer.seen += plan.c
        self.synced_seen = self.cache.layers[0].seen

    def cut_after(self, plan: CallPlan) -> None:
        """After a static step of a cutting one-token call (eligible(cutting=True)) and advance_host: what
        ContextMemoryLayer.attend does after its local pass, on the buffers' window (the step's key and
        scores in it): the first unit (keys rotated back, representatives by received score) appended to
        each layer's store, the keys after it the layer's own window (the next static step copies them
        back into the buffers: `sync`)."""
        n = plan.window + plan.c
        for sw, layer in zip(self.windows, self.cache.layers, strict=True):
            layer.cut_after(plan, sw.k[:, :n].clone(), sw.v[:, :n].clone(), sw.score[:, :n].clone())
            sw.views = None

    def cut_shape(self, plan: CallPlan, known: dict[tuple, CutShape] | None = None) -> CutShape | None:
        """The static shape of a call that cuts units (a prefill chunk in phase 2), or None when it must
        take the plain path: sinks to set, a block without memory, fewer units than topk, int8 units,
        a lookup log, or a window that outgrows the buffers. `known`: shapes already made, by key; one
        whose key matches is returned (the same launches, the same plan tables)."""
        layer, cfg = self.cache.layers[0], self.cache.config
        n_units = layer.store.n_units
        if not (
            layer.cut
            and plan.n_cut > 0
            and plan.sinks_from is None
            and len(plan.memory_blocks) == len(plan.blocks)
            and cfg.topk > 0
            and n_units >= cfg.topk
            and cfg.offload_dtype != "int8"
            and layer.lookup_log is None
            and plan.window <= self.capacity
            and plan.window + plan.c - plan.keep_from <= self.capacity
            and layer.reported_length() + plan.c <= layer.spec.trained_len
        ):
            return None
        base = layer.base
        if layer.seen + plan.c - 1 - base >= layer.spec.trained_len:
            base = layer.seen - plan.window  # as ContextMemoryLayer.attend re-bases
        model_start = layer.reported_length()
        rel = tuple(b.units_before - n_units for b in plan.blocks)
        angle, first = layer.seen - base - model_start, plan.seen - plan.window - base
        key = (plan.window, plan.c, tuple((b.q0, b.q1, b.lo) for b in plan.blocks), rel, plan.cut_start,
               plan.n_cut, plan.keep_from, layer.base - base, angle, first, model_start)  # fmt: skip
        prev = (known or {}).get(key)
        if prev is not None:
            return prev
        tables = plan.tensors(self.device)  # made now (pinned, asynchronous), outside any capture
        return CutShape(
            key=key,
            plan=plan,
            rel=tables["mb_units"] - n_units,  # on the device: a tensor from a list would synchronise
            rebase=layer.base - base,
            angle=angle,
            first=first,
            model_start=model_start,
            window_after=plan.window + plan.c - plan.keep_from,
        )

    def prepare_cut(self, plan: CallPlan) -> None:
        """Host work before a static cutting call: room in every store for the units it cuts."""
        for layer in self.cache.layers:
            layer.store.ensure_room(layer.store.n_units + plan.n_cut, layer.dtype)

    def advance_host_cut(self, plan: CallPlan, shape: CutShape) -> None:
        """The layers' host state after a static cutting call (what ContextMemoryLayer.attend changes)."""
        w = shape.window_after
        for sw, layer in zip(self.windows, self.cache.layers, strict=True):
            layer.base -= shape.rebase  # as ContextMemoryLayer.attend re-bases
            sw.views = (sw.k[:, :w], sw.v[:, :w], sw.score[:, :w])
            layer.local_k, layer.local_v, layer.local_score = sw.views
            layer.static_views = True
            layer.store.advance(plan.n_cut)
            layer.count_lookups(plan, None)
            layer.account(plan, shape.model_start)
            layer.seen += plan.c
        self.set_scalars()

    # ---- the step (device work only) -----------------------------------------------------------
    def attend_cut(
        self, layer, shape: CutShape, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """ContextMemoryLayer.attend for a call of `shape`, on the buffers: the window read from them and
        written back, units written at the device unit count, the lookup over the whole index.
        -> (1, heads, c, d). Changes no host state (advance_host_cut does)."""
        sw = self.windows[layer.layer_idx]
        plan, w0, keep = shape.plan, shape.plan.window, shape.plan.keep_from
        q, k, v = query[0], key[0], value[0].to(layer.dtype)
        out, lse, k_all, v_all, score = layer.local_pass(
            q, k, v, plan, shape.angle, scale, sw.k[:, :w0], sw.v[:, :w0], sw.score[:, :w0], shape.rebase
        )  # shape.rebase: as ContextMemoryLayer._rebase
        layer.write_cut_units(plan, k_all, v_all, score, shape.first, self.units)
        torch.add(shape.rel, self.units, out=plan.tensors(query.device)["mb_units"])
        out = layer.attend_memory(q, plan, shape.model_start, scale, out, lse, whole_index=True)
        w1 = shape.window_after
        sw.k[:, :w1].copy_(k_all[:, keep:])
        sw.v[:, :w1].copy_(v_all[:, keep:])
        sw.score[:, :w1].copy_(score[:, keep:])
        sw.score[:, w1:].zero_()  # keys a later step appends start from nothing, as after sync
        return out.unsqueeze(0).to(query.dtype)

    def attend(
        self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """query (1, heads, T, d), key/value (1, kv_heads, T, d) as the model rotated them: T = 1 a decode
        token, T > 1 a rows step (the first n_valid rows real) -> (1, heads, T, d)."""
        sw = self.windows[layer.layer_idx]
        cfg, rot, store = layer.config, layer.rotary, layer.store
        dev = query.device
        heads, rows, d = query.shape[1], query.shape[2], query.shape[3]
        kvh = key.shape[1]
        g = heads // kvh
        cos_t, sin_t, _ = rot.tables(dev)
        cos, sin = cos_t.index_select(0, self.row), sin_t.index_select(0, self.row)  # one angle, all rows
        q = query[0].float()  # (heads, T, d)
        t = torch.arange(rows, device=dev) if rows > 1 else None
        slots = self.window if t is None else self.window + t
        sw.k.index_copy_(1, slots, rot.apply(key[0].float(), cos, sin).to(sw.k.dtype))
        sw.v.index_copy_(1, slots, value[0].to(sw.v.dtype))
        q_loc = rot.apply(q, cos, sin).reshape(kvh, g, rows, d)
        # Memory: queries at the fixed distance memory_distance (row t from model position reported + t),
        # sinks + chosen units at 0.
        cos_m, sin_m = rot.cos_sin(layer.reported_length() - cfg.memory_distance, rows, -1, dev)
        q_mem = rot.apply(q, cos_m, sin_m).reshape(kvh, g, rows, d)
        if t is None:
            nb, q_sum = 1, q_mem.sum(dim=1).reshape(1, kvh, d)
        else:
            e, nb = cfg.exc_block_size, self.blocks
            block = torch.div(self.seen % e + t, e, rounding_mode="floor") if nb == 2 else torch.zeros_like(t)
            row_block = torch.where(t < self.n_valid, block, -1)
            q_sum = block_query_sums(q_mem.reshape(heads, rows, d), row_block, nb, kvh)
        reprs = store.repr_buffer()  # (kvh, capacity, d)
        ids = layer.kernels.choose_units(q_sum, reprs, self.units, cfg.lookup, cfg.topk)
        if layer.forced is not None:  # a device select: graphs obey later forcing (select.ForcedUnits)
            ids = layer.forced.apply(layer.layer_idx, ids, static=True)
        ids = torch.minimum(ids, self.units - 1).expand(nb, kvh, -1)  # empty slots read a real unit
        sw.ids = ids
        uk, uv = layer.kernels.gather_selected(store, ids, layer.dtype)
        if t is None:
            args = (q_loc[:, :, 0], q_mem[:, :, 0], sw.k, sw.v, sw.score, self.window, layer.sink_k,
                    layer.sink_v, uk[0], uv[0], self.units, cfg.topk, cfg.block_size, scale)  # fmt: skip
            merged = layer.kernels.step_attention(*args)  # step_attention, or cuda/static.py's kernel
        else:
            merged = rows_attention(
                q_loc, q_mem, sw.k, sw.v, sw.score, self.window, self.n_valid, row_block, layer.sink_k,
                layer.sink_v, uk, uv, self.units, cfg.topk, cfg.block_size, scale,
            )  # fmt: skip
        return merged.reshape(1, heads, rows, d).to(query.dtype)


# ---- the stacked rows of a batched decode step (stacked.py): their references -------------------------
def stacked_inputs(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    rows: torch.Tensor | None,
    angles: torch.Tensor,
    win_k: torch.Tensor,
    win_v: torch.Tensor,
    window: torch.Tensor,
    slots: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The stacked rows' inputs of one token: query (B, heads, 1, d), key / value (B, kv_heads, 1, d) of the
    batch (rows (S,): the stacked rows among them; None: all) -> q_loc, q_mem (S, heads, d) fp32, the
    queries rotated to their window positions and to the memory distance (angles (4, S, d) fp32: cos and
    sin to the window position, then to the memory distance: Rows.rotations); each row's key rotated to
    its window position and its value are written, in the buffers' dtype, at window[s] of row s of win_k
    / win_v (kv_heads, S, cap, d) (slots: the same places in the flat (S * cap) keys). The reference;
    cuda/static.stacked_inputs_cuda is one launch (stacked.py calls both through kernels.py)."""
    if rows is not None:
        query, key, value = (t.index_select(0, rows) for t in (query, key, value))
    kvh, n_rows, cap, d = win_k.shape
    cos_l, sin_l, cos_m, sin_m = angles.unsqueeze(2)  # (S, 1, d) each
    q = query[:, :, 0].float()  # (S, heads, d)
    k_new = Rotary.apply(key[:, :, 0].float(), cos_l, sin_l).to(win_k.dtype)  # (S, kv_heads, d)
    win_k.view(kvh, n_rows * cap, d).index_copy_(1, slots, k_new.transpose(0, 1))
    win_v.view(kvh, n_rows * cap, d).index_copy_(1, slots, value[:, :, 0].to(win_v.dtype).transpose(0, 1))
    return Rotary.apply(q, cos_l, sin_l), Rotary.apply(q, cos_m, sin_m)


def stacked_attention(
    q_loc: torch.Tensor,
    q_mem: torch.Tensor,
    win_k: torch.Tensor,
    win_v: torch.Tensor,
    score: torch.Tensor,
    window: torch.Tensor,
    hidden: torch.Tensor,
    sink_k: torch.Tensor,
    sink_v: torch.Tensor,
    unit_k: torch.Tensor,
    unit_v: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of each stacked row: q_loc / q_mem (S, kv_heads, g, d) fp32 at the window position and
    at the memory distance; win_k / win_v (kv_heads, S, cap, d) the window buffers (row s's keys
    [0, window[s]] visible: hidden (S, cap) bool is the rest); score (kv_heads, S, cap) fp32 the keys'
    received attention so far; sinks (S, kv_heads, n_init, d), unit_k / unit_v (S, kv_heads, topk *
    block_size, d) the gathered units (all visible). Returns the merged attention (S, kv_heads, g, d)
    fp32 and the received scores with this token's added, a NEW tensor (kv_heads, S, cap): score is
    not written (views of it may be held). The reference; cuda/static.stacked_attention_cuda is the
    same contract in two launches (it reads `window`, this `hidden`)."""
    q_h = q_loc.transpose(0, 1)  # (kvh, S, g, d)
    logits = torch.matmul(q_h, win_k.float().transpose(2, 3)) * scale  # (kvh, S, g, cap)
    logits = logits.masked_fill(hidden[None, :, None, :], float("-inf"))
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # (kvh, S, g, 1)
    p = torch.exp(logits - lse)
    out = torch.matmul(p, win_v.float())  # (kvh, S, g, d)
    received = p.sum(dim=2) + score  # (kvh, S, cap): what each window key received, in all
    k_mem = torch.cat([sink_k, unit_k], dim=2).float()  # (S, kvh, n_init + topk * bs, d)
    v_mem = torch.cat([sink_v, unit_v], dim=2).float()
    logits_m = torch.matmul(q_mem, k_mem.transpose(2, 3)) * scale  # (S, kvh, g, M)
    lse_m = torch.logsumexp(logits_m, dim=-1, keepdim=True)
    out_m = torch.matmul(torch.exp(logits_m - lse_m), v_mem)
    merged = merge(out.transpose(0, 1), lse.squeeze(-1).transpose(0, 1), out_m, lse_m.squeeze(-1))
    return merged, received
