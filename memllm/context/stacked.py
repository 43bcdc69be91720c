"""The stacked rows of a batched decode step (context/batch.py, impl "fast"), with buffers kept across calls.

A row is stacked when its session's step is a steady one (`steady`: phase 2, one token, nothing cut,
no re-base, the index holding at least topk units), or one that is steady but for cutting the window's
first unit (its token completes a unit; `Rows.cuts`): stacked the same way, its local pass over the
whole window (the unit to cut included, as ContextMemoryLayer.attend's cutting call reads it), then the
unit cut from the buffers after the call (`StackedLayer._cut_row`; before, such a row took the
reference loop, and inside a graph step a whole model call of its own). Host work is done once per call
and once per change of the rows' state, not per layer and step:
  * `plan_rows` (once per call, when layer 0 asks: every layer is in the state layer 0 is in): the
    rows' host integers (plans, windows, counters, bounds) and their device indexes (rotation rows,
    window lengths, unit counts) uploaded in ONE copy (pinned, asynchronous on CUDA);
  * `StackedLayer` (one per layer of a BatchCache, kept across its calls): the rows' windows in one
    zero-padded buffer (kv_heads, S, capacity, head_dim) whose slices ARE the sessions' windows
    (each layer's local_k/v are views of it), the last received scores, the rows' unit indexes
    stacked (S, kv_heads, units, head_dim) and their sinks. A step writes each row's new key after
    its window in place (past every view handed out before, so a checkpoint holding one is
    untouched), computes fresh scores, and hands each layer its row of the buffers again
    (ContextMemoryLayer.hand_window: the views are made only if the window is read, so a session
    that goes on stepping in the batch costs no views per layer and step; making 6 views per row
    and layer was most of the per-row host time, GPU run 39). Before a layer attends, a row whose
    layer no longer holds the row handed out last (it stepped alone, cut, rolled back), whose store
    was written (UnitStore.edits) or whose sinks changed is copied in again, into NEW buffers (the
    others moved there in one copy per buffer): no buffer a view was handed out of is ever rewritten.
  * the gather of every row's units from its own store is the kernels' `stores_gather()` (CUDA: one
    launch over the stores' joined segment tables, kept while the stores' segments are unchanged);
    with the device unit cache on, each row through its store's cache (unit_cache.py: one planning
    over the rows' stacked slot tables, then the same one launch, hits read from the pools).
  * the rows' inputs (queries rotated to the window and to the memory distance; each row's rotated key
    and value written after its window) are static.stacked_inputs, on CUDA cuda/static.stacked_inputs_cuda
    (one launch), with the rotation angles gathered once per call (`Rows.rotations`);
  * the local pass, memory pass and merge of every row are static.stacked_attention (PyTorch, the reference)
    or, on CUDA, cuda/static.stacked_attention_cuda (two Triton launches, the window buffers read in the
    model dtype: no fp32 copy of them; the same contract, tested against it); every row's lookup over
    its own index is lookup.choose_units, on CUDA cuda/lookup.choose_units_stacked_cuda (two or three
    launches for all rows).
Per layer the device work is a fixed number of launches whatever S, no host synchronisation; the host
work per row and layer is a few identity checks and attribute updates. Each layer's state after a
call is what ContextMemoryLayer.attend would have left (tests/context/test_batch.py).

Knows nothing of models, sessions or text.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from memllm.context.cache import ContextMemoryCache, ContextMemoryLayer
from memllm.context.kernels import TorchKernels
from memllm.context.plan import CallPlan, cuts_first_unit
from memllm.context.positions import Rotary
from memllm.context.prefill import upload


def steady(layer: ContextMemoryLayer, plan: CallPlan, cutting: bool = False) -> bool:
    """Whether a one-token call of `layer` (plan: its plan) is a steady step the stacked path runs:
    phase 2, one execution block with memory, nothing cut, no sinks set, no re-base, the index
    holding at least topk units, no probe and nothing deferred (host integers only). cutting: instead
    a step that is steady but for cutting the window's first unit (its token completes a unit), which
    the stacked path runs and then cuts (StackedLayer.advance: `Rows.cuts`)."""
    cfg = layer.config
    cut_ok = cuts_first_unit(plan, cfg) if cutting else plan.n_cut == 0 and plan.keep_from == 0
    return (
        layer.cut
        and plan.c == 1
        and cut_ok
        and plan.sinks_from is None
        and len(plan.blocks) == 1
        and plan.memory_blocks == [0]
        and cfg.topk > 0
        and layer.store.n_units >= cfg.topk
        and layer.seen - layer.base < layer.spec.trained_len
        and layer.probe is None
        and layer.deferred is None
        and layer.sink_k.shape[1] == cfg.n_init
    )


@dataclass
class Rows:
    """The stacked rows of one call and what every layer needs of them (worked out once per call)."""

    rows: list[int]  # batch rows (sessions), ascending
    rows_dev: torch.Tensor | None  # (S,) long on the device; None when every row of the batch is stacked
    plans: list[CallPlan]  # each row's plan (one token, no cut)
    windows: list[int]  # W_b: window keys before the step
    local_rows: torch.Tensor  # (S,) long: rotation-table row, model position -> window position
    memory_rows: torch.Tensor  # (S,) long: rotation-table row, model position -> memory_distance
    window_idx: torch.Tensor  # (S,) long: W_b on the device (where the new key goes)
    units: torch.Tensor  # (S,) long: units each row's lookup chooses among
    at: torch.Tensor  # (S,) long: 0..S-1
    valid: list[int]  # ids each row's lookup yields that count (min(topk, units))
    keys: list[int]  # ContextMemoryLayer.bounds of the call: keys per query
    positions: list[int]  # ... and the largest position
    forced: list[int]  # stacked indexes whose session forces units (select.ForcedUnits)
    grow: int  # room for this many more keys per row when the window buffers are made
    # capacity -> (S, capacity) bool: the keys each row does not see (past its window and new key),
    # and (S,) long: where each row's new key goes in a buffer's (S * capacity) keys
    by_capacity: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    angles: torch.Tensor | None = None  # (4, S, head_dim): Rows.rotations
    # A graph step (cuda/batch_graph.py): the scores written back into their buffer, and the rows' host
    # state advanced after the whole call (StackedLayer.advance), not by each layer's attend.
    in_place: bool = False
    advance_here: bool = True
    # Stacked indexes of stand-in rows (plan_rows(stand_ins=True)): sessions that take this step alone
    # (not steady: a re-base, ...); their rows are computed and thrown away, their layers neither read nor
    # advanced.
    stand_ins: list[int] = field(default_factory=list)
    # Stacked indexes of rows whose token completes a unit (plan_rows(cuts=True)): attended as steady rows
    # over their whole window (the unit to cut included, as ContextMemoryLayer.attend's local pass reads
    # it), then the unit is cut from the buffers after the call (StackedLayer.advance).
    cuts: list[int] = field(default_factory=list)
    grow_units: int = 0  # room for this many more units per row when a graph step makes the index buffer

    def rotations(self, rot: Rotary) -> torch.Tensor:
        """(4, S, head_dim) fp32: each row's cos and sin to its window position, then to the memory distance,
        the same for every layer (gathered once per call)."""
        if self.angles is None:
            cos_t, sin_t, _ = rot.tables(self.local_rows.device)
            self.angles = torch.stack([cos_t[self.local_rows], sin_t[self.local_rows],
                                       cos_t[self.memory_rows], sin_t[self.memory_rows]])  # fmt: skip
        return self.angles

    def at_capacity(self, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden, slots) for window buffers of `capacity` keys per row (made once per call)."""
        if capacity not in self.by_capacity:
            keys = torch.arange(capacity, device=self.window_idx.device)
            self.by_capacity[capacity] = (
                keys[None, :] > self.window_idx[:, None],
                self.at * capacity + self.window_idx,
            )
        return self.by_capacity[capacity]


def can_stand_in(layer: ContextMemoryLayer) -> bool:
    """Whether a session whose step is not steady can keep its row in a graph step as a stand-in (its
    lookup and gather read only units it has: phase 2, at least topk units, its sinks set)."""
    cfg = layer.config
    return (layer.cut and cfg.topk > 0 and layer.store.n_units >= cfg.topk and layer.probe is None
            and layer.sink_k.shape[1] == cfg.n_init)  # fmt: skip


def plan_rows(
    caches: Sequence[ContextMemoryCache], rotary: Rotary, into: torch.Tensor | None = None,
    extra: Sequence[Sequence[int]] = (), stand_ins: bool = False, cuts: bool = False,
) -> Rows | None:  # fmt: skip
    """The stacked rows of a one-token call of `caches` (batch row b = caches[b]), from their layer 0;
    None when no row is steady. One upload of the rows' device indexes: into a new tensor, or, when
    every row is steady, into `into` ((5 + len(extra), B) long: a graph step's fixed buffer; the rows
    of `extra`, B host integers each, go after the rows' five). stand_ins (with `into`): a row that is
    not steady but can_stand_in is kept as a stand-in (Rows.stand_ins) instead; None when a row can
    neither be stacked nor stand in. cuts: a row whose step is steady but for cutting a unit
    (steady(cutting=True)) is stacked too, and listed in Rows.cuts (the caller cuts after the call)."""
    rows, plans, windows, local_rows, memory_rows, units = [], [], [], [], [], []
    valid, keys, positions, forced, standing, cutting = [], [], [], [], [], []
    cfg = caches[0].config
    for b, cache in enumerate(caches):
        layer = cache.layers[0]
        plan = layer.plans.get(layer.seen, layer.window_length(), layer.cut, layer.store.n_units, 1)
        is_steady = steady(layer, plan)
        if not is_steady and cuts and steady(layer, plan, cutting=True):
            cutting.append(len(rows))  # stacked as a steady row below
        elif not is_steady:
            if stand_ins and can_stand_in(layer):  # window 0, any rotation: its outputs are thrown away
                standing.append(len(rows))
                rows.append(b)
                plans.append(plan)
                windows.append(0)
                local_rows.append(0)
                memory_rows.append(0)
                units.append(layer.store.n_units)
                valid.append(0)
                keys.append(0)
                positions.append(0)
            continue
        model_start = layer.reported_length()
        if layer.forced is not None and layer.forced.active:
            forced.append(len(rows))
        rows.append(b)
        plans.append(plan)
        windows.append(plan.window)
        local_rows.append(rotary.row(layer.seen - layer.base - model_start))
        memory_rows.append(rotary.row(-(model_start - cfg.memory_distance)))
        units.append(layer.store.n_units)
        valid.append(min(cfg.topk, plan.blocks[0].units_before))
        k, p = layer.bounds(plan, model_start)
        keys.append(k)
        positions.append(p)
    if len(rows) == len(standing):
        return None
    s = len(rows)
    every = s == len(caches)
    dev = caches[0].layers[0].device
    host = local_rows + memory_rows + windows + units + list(range(s)) + ([] if every else rows)
    if into is not None:
        if not every:
            return None
        for more in extra:
            host += list(more)
        src = torch.tensor(host, dtype=torch.long).view(-1, s)
        idx = into
        idx.copy_(src.pin_memory() if dev.type == "cuda" else src, non_blocking=True)
    else:
        idx = upload(torch.tensor(host, dtype=torch.long), dev).view(-1, s)
    return Rows(rows, None if every else idx[5], plans, windows, idx[0], idx[1], idx[2], idx[3], idx[4],
                valid, keys, positions, forced, cfg.block_size, stand_ins=standing, cuts=cutting)  # fmt: skip


def _holds_row(layer: ContextMemoryLayer, row: tuple | None) -> bool:
    """Whether layer's window is still the buffer row handed to it last (ContextMemoryLayer.hand_window)."""
    return row is not None and layer.window_from is row


def _assemble(
    old: torch.Tensor | None,
    shape: tuple[int, ...],
    dim: int,
    keep: list[tuple[int, int]],
    fill: Callable[[torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]],
    like: torch.Tensor,
) -> torch.Tensor:
    """A new zero tensor of `shape` (rows along `dim`, dtype and device of `like`): row dst is old's
    row src for (src, dst) in keep (along dim 2 up to the shorter of the two), then fill(new)'s
    (destination, source) pairs are copied (one foreach copy)."""
    new = torch.zeros(shape, dtype=like.dtype, device=like.device)
    if keep and old is not None:
        src, dst = (upload(torch.tensor(x, dtype=torch.long), like.device) for x in zip(*keep, strict=True))
        n = min(shape[2], old.shape[2])
        new.narrow(2, 0, n).index_copy_(dim, dst, old.narrow(2, 0, n).index_select(dim, src))
    pairs = fill(new)
    if pairs:
        torch._foreach_copy_([d for d, _ in pairs], [s for _, s in pairs])
    return new


class StackedLayer:
    """One layer's stacked rows across the calls of a BatchCache (see the module note)."""

    def __init__(self, kernels: TorchKernels):
        self.gather = kernels.stores_gather()  # (stores, ids, dtype) -> unit K, V
        self.inputs = kernels.stacked_inputs  # the rows' rotated queries; new keys and values written
        self.lookup = kernels.choose_units_stacked  # every row's lookup over its own index
        self.attention = kernels.stacked_attention  # static.stacked_attention, or its CUDA kernels
        self.layers: list[ContextMemoryLayer] = []  # the rows' layers the buffers were made for
        self.k: torch.Tensor | None = None  # (kv_heads, S, capacity, head_dim) model dtype
        self.v: torch.Tensor | None = None
        self.score: torch.Tensor | None = None  # (kv_heads, S, capacity) fp32: 0 past each window
        # per row: the buffer row handed out (ContextMemoryLayer.hand_window; current while its layer's
        # window_from is it)
        self.rows: list[tuple | None] = []
        self.reprs: torch.Tensor | None = None  # (S, kv_heads, units, head_dim): each row's index
        self.index_keys: list[tuple[int, int, int]] = []  # per row: (id(store), store.edits, n_units) reprs was copied at
        self.sink_k: torch.Tensor | None = None  # (S, kv_heads, n_init, head_dim)
        self.sink_v: torch.Tensor | None = None
        self.sinks: list[tuple[torch.Tensor, torch.Tensor]] = []  # per row: the sink tensors copied
        self.rebuilds = 0  # times any buffer was made again (tests and benchmarks read it)
        # Whether no row of the windows was handed out as an immutable window since the buffers were
        # made (a graph step writes rows in place: with one that was, the buffers are made anew first,
        # so a checkpoint holding its views keeps them).
        self.writable = False
        self.copied = 0  # rows copied in place (tests and benchmarks read it)
        self.cut_rows = 0  # rows whose unit was cut from the buffers after a step (Rows.cuts)

    # ---- keeping the buffers current (host work only when a row's state changed) ---------------
    def prepare(self, layers: list[ContextMemoryLayer], st: Rows) -> None:
        """The buffers made current for `layers` (the rows' layers, in order). A row whose layer no longer
        holds the row handed out last, whose index or sinks changed, is copied in again: into new buffers
        (the rows kept moved there), or, for a graph step (st.in_place) over the same layers with room,
        into its own row in place (no buffer a graph baked in changes) when no row of the windows was
        handed out as an immutable window since they were made (`writable`)."""
        same = len(layers) == len(self.layers) and all(map(operator.is_, layers, self.layers))
        # a graph step over as many rows, some of them another session's now (BatchCache.swap): those
        # rows are copied in place, as a row whose state changed, and no buffer is made again
        rows_stay = same or (st.in_place and len(layers) == len(self.layers) and self.k is not None)
        slot = {} if same else {id(lay): j for j, lay in enumerate(self.layers)}
        src = list(range(len(layers))) if same else [slot.get(id(lay), -1) for lay in layers]
        need = max(st.windows) + 1
        fits = rows_stay and self.k.shape[2] >= need
        if not (same and fits and all(map(_holds_row, layers, self.rows))) or (st.in_place and not self.writable):
            if st.in_place and fits and self.writable:
                self._copy_rows(layers)
            else:
                self._windows(layers, st, src, need)
        # the index kept per row: its store (a swapped row's is another) and what it held
        index = [(id(lay.store), lay.store.edits, lay.store.n_units) for lay in layers]
        if not (same and index == self.index_keys and self.reprs.shape[2] >= max(n for *_, n in index)):
            if st.in_place and rows_stay and self.reprs.shape[2] >= max(n for *_, n in index):
                for i, lay in enumerate(layers):
                    if index[i] != self.index_keys[i]:
                        self.reprs[i, :, : index[i][2]].copy_(lay.store.repr_keys())
                self.index_keys = index
            else:
                self._index(layers, src, index, st.grow_units if st.in_place else 0)
        sinks = [(lay.sink_k, lay.sink_v) for lay in layers]
        if not (same and all(a[0] is b[0] and a[1] is b[1] for a, b in zip(sinks, self.sinks, strict=True))):
            if st.in_place and rows_stay:
                for i, (k, v) in enumerate(sinks):
                    if not (k is self.sinks[i][0] and v is self.sinks[i][1]):
                        self.sink_k[i].copy_(k)
                        self.sink_v[i].copy_(v)
                self.sinks = sinks
            else:
                self._sinks(layers, src, sinks)
        self.layers = layers

    def _copy_rows(self, layers: list[ContextMemoryLayer]) -> None:
        """The rows whose layer does not hold its row: their window copied into their own row of the
        buffers, the rest of the row zeroed (a graph step's in-place path)."""
        for i, lay in enumerate(layers):
            if _holds_row(lay, self.rows[i]):
                continue
            n = lay.window_length()
            own = [lay.local_k, lay.local_v, lay.local_score]
            bufs = (self.k, self.v, self.score)
            # a window still viewing these buffers (its session stepped alone without leaving its views)
            # is copied out first: an overlapping copy in place would shift it over itself
            own = [t.clone() if t.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() else t
                   for t, b in zip(own, bufs, strict=True)]  # fmt: skip
            torch._foreach_copy_([self.k[:, i, :n], self.v[:, i, :n], self.score[:, i, :n]], own)
            for buf in (self.k, self.v, self.score):
                buf[:, i, n:].zero_()
            self.copied += 1

    def _windows(self, layers: list[ContextMemoryLayer], st: Rows, src: list[int], need: int) -> None:
        first = layers[0]
        kvh, d = first.spec.kv_heads, first.spec.head_dim
        keep, own = [], []
        for i, (lay, j) in enumerate(zip(layers, src, strict=True)):
            (keep if j >= 0 and _holds_row(lay, self.rows[j]) else own).append((j, i))
        shape = (kvh, len(layers), need + st.grow, d)
        like = first.local_k if self.k is None else self.k

        def fill(name: str) -> Callable[[torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]]:
            """The rows not kept: their layer's own tensor `name` into their place in `new`."""
            return lambda new: [
                (new[:, i, : getattr(layers[i], name).shape[1]], getattr(layers[i], name)) for _, i in own
            ]

        self.k = _assemble(self.k, shape, 1, keep, fill("local_k"), like)
        self.v = _assemble(self.v, shape, 1, keep, fill("local_v"), like)
        self.score = _assemble(self.score, shape[:3], 1, keep, fill("local_score"), first.local_score)
        self.rows = [None] * len(layers)  # until this call hands its rows out
        self.writable = True
        self.rebuilds += 1

    def _index(
        self, layers: list[ContextMemoryLayer], src: list[int], index: list[tuple[int, int]], room: int = 0
    ) -> None:
        first = layers[0]
        keep = [(j, i) for i, j in enumerate(src) if j >= 0 and self.index_keys[j] == index[i]]
        kept = {i for _, i in keep}
        reprs = [lay.store.repr_keys() for lay in layers]
        units = max(r.shape[1] for r in reprs) + room  # room: units a graph step's rows may add in place
        shape = (len(layers), first.spec.kv_heads, units, first.spec.head_dim)
        self.reprs = _assemble(
            self.reprs, shape, 0, keep,
            lambda new: [(new[i, :, : r.shape[1]], r) for i, r in enumerate(reprs) if i not in kept],
            reprs[0],
        )  # fmt: skip
        self.index_keys = index
        self.rebuilds += 1

    def _sinks(
        self, layers: list[ContextMemoryLayer], src: list[int], sinks: list[tuple[torch.Tensor, ...]]
    ) -> None:
        keep = [(j, i) for i, j in enumerate(src) if j >= 0 and self.sinks[j][0] is sinks[i][0]
                and self.sinks[j][1] is sinks[i][1]]  # fmt: skip
        kept = {i for _, i in keep}
        shape = (len(layers), *sinks[0][0].shape)
        for n, name in enumerate(("sink_k", "sink_v")):
            made = _assemble(
                getattr(self, name), shape, 0, keep,
                lambda new, n=n: [(new[i], s[n]) for i, s in enumerate(sinks) if i not in kept],
                sinks[0][n],
            )  # fmt: skip
            setattr(self, name, made)
        self.sinks = sinks
        self.rebuilds += 1

    # ---- the step --------------------------------------------------------------------------------
    def attend(
        self,
        layers: list[ContextMemoryLayer],
        st: Rows,
        rot: Rotary,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        """ContextMemoryLayer.attend for one token of each stacked row (layers: the rows' layers),
        computed together: query (B, heads, 1, d), key/value (B, kv_heads, 1, d) -> (S, heads, 1, d) in
        the model dtype for rows st.rows, whose layers advance by one token (window, scores, lookup
        counters and log, bounds)."""
        first = layers[0]
        cfg, dtype = first.config, first.dtype
        S, (heads, d), kvh = len(layers), (query.shape[1], query.shape[3]), key.shape[1]
        g = heads // kvh
        if st.advance_here:  # a graph step made the buffers current before its call (nothing to capture)
            self.prepare(layers, st)
        # The rows' queries rotated to their window positions and to the memory distance; each row's new
        # key (rotated) and value written at W_b of its window (layout (kv_heads, S, ...): the buffers' own).
        cap = self.k.shape[2]
        hidden, slots = st.at_capacity(cap)
        q_loc, q_mem = self.inputs(query, key, value, st.rows_dev, st.rotations(rot), self.k, self.v, st.window_idx,
                                   slots)  # fmt: skip
        q_loc, q_mem = q_loc.view(S, kvh, g, d), q_mem.view(S, kvh, g, d)

        # Lookup: every row's representatives, padded to the largest index; slots >= its units masked.
        q_sum = q_mem.sum(dim=2)  # (S, kvh, d): the block's summed query per KV head
        ids = self.lookup(q_sum, self.reprs, st.units, cfg.lookup, cfg.topk)  # (S, 1 or kvh, topk)
        ids = ids.expand(S, kvh, -1)
        if st.forced:  # a row whose session forces units (select.ForcedUnits) reads those
            ids = ids.clone()
            for i in st.forced:
                ids[i] = layers[i].forced.apply(layers[i].layer_idx, ids[i : i + 1])[0]

        # The local pass (each row over its window keys [0, W_b]), the memory pass (sinks + topk units
        # for every row: the same number of keys) and their merge: stacked_attention or its kernels.
        unit_k, unit_v = self.gather([lay.store for lay in layers], ids, dtype)
        merged, score = self.attention(
            q_loc, q_mem, self.k, self.v, self.score, st.window_idx, hidden,
            self.sink_k, self.sink_v, unit_k, unit_v, scale,
        )  # fmt: skip

        if st.in_place:  # a graph step (cuda/batch_graph.py): the scores stay in the buffer it replays with
            self.score.copy_(score)
        else:
            self.score = score
        if st.advance_here:
            self.advance(layers, st, ids)
        return merged.reshape(S, heads, 1, d).to(query.dtype)

    def advance(self, layers: list[ContextMemoryLayer], st: Rows, ids: torch.Tensor | None) -> None:
        """The rows' host state after a step (what ContextMemoryLayer.attend leaves): each layer handed
        its row of the buffers (views made only when read), its counters, lookup log (ids: the step's
        (S, kv_heads, topk), None when no row logs) and bounds. A graph step (st.in_place) runs it after
        its replay; its buffers are written in place, so the layers hold static views (a checkpoint
        copies them). A row of st.cuts instead has its first unit cut from the buffers (_cut_row)."""
        k_buf, v_buf, score = self.k, self.v, self.score
        kvh = k_buf.shape[0]
        rows = self.rows = [(k_buf, v_buf, score, i, w + 1) for i, w in enumerate(st.windows)]
        self.writable = self.writable and st.in_place
        standing, cutting = set(st.stand_ins), set(st.cuts)
        for i, lay in enumerate(layers):
            if i in standing:  # stepped alone: its row is copied in again when it is stacked next
                rows[i] = None
                continue
            if i in cutting:  # its first unit cut from the buffers; the rest, its own, copied in again next
                self._cut_row(lay, st.plans[i], i, st.windows[i] + 1)
                rows[i] = None
            else:
                lay.hand_window(rows[i])
                lay.static_views = st.in_place
            if lay.probe is None:  # steady rows have none; as count_lookups
                lay.lookups += 1
                lay.units_fetched += kvh * st.valid[i]
                if lay.lookup_log is not None:
                    lay.lookup_log.append((lay.layer_idx, ids[i, :, : st.valid[i]].reshape(-1)))
            if st.keys[i] > lay.max_keys_per_query:
                lay.max_keys_per_query = st.keys[i]
            if st.positions[i] > lay.max_position:
                lay.max_position = st.positions[i]
            lay.seen += 1

    def _cut_row(self, layer: ContextMemoryLayer, plan: CallPlan, i: int, n: int) -> None:
        """What ContextMemoryLayer.attend does after its local pass in a call that cuts the window's first
        unit, on row i's n keys of the buffers (the window and the step's key, its scores): the unit
        (keys rotated back to position 0, representatives by received score) appended to the store, the
        keys after it the layer's own window."""
        # copies (contiguous, as the plain path's joined window): the buffers are written in place later
        layer.cut_after(plan, *(t[:, i, :n].contiguous() for t in (self.k, self.v, self.score)))
        self.cut_rows += 1
