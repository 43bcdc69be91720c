"""Static model calls through a ContextMemoryCache (a token, a question, a prefill chunk), replayed as CUDA graphs.

Decoding one token is ~2,400 small launches (30 layers; measured with torch.profiler on the H100),
so the host, not the GPU, sets its speed; a 40-token question fed as a plain call is ~1,760 launches
(60 ms, of which 8.7 ms on the GPU). The static step (static.py) makes every launch of a cut-free
call of a given padded size identical, so the whole model call is captured once per size ("rows":
1 for a token, static.rows_bucket for more; and one or two execution blocks) and replayed:
  * the first static step after the graph's inputs changed runs eagerly on a side stream (warm-up:
    Triton compiles, cuBLAS workspaces), the next one is captured, then replayed;
  * inputs baked into a graph: the buffers of static.py, each layer's sinks, unit index buffer and
    gather table, and with the device unit cache its pools' address table (unit_cache.py: its slot
    table and counters are written in place by the replays); a change of any (a unit index that grew,
    sinks after a rollback, pools made again after a release) means a new capture;
  * a call too long for a rows step that cuts units in phase 2 (a steady prefill chunk;
    static.cut_shape) is a static step of its own shape: captured the second time that shape comes
    with the same inputs, replayed after
    (at most MAX_CUT_SLOTS shapes kept). Before each, the host makes room in every store for the
    units it cuts (segments, index slots), since the graph writes them at the device unit count;
    at 1M tokens on the H100 a steady 3,584-token chunk took 31.7 ms of GPU time replayed, against
    ~96 ms of wall time on the plain path (benchmarks/profile_prefill.py, profile_gpu.py);
  * a token that completes a unit (one in block_size while decoding) is the one-token step, replayed
    as any other, and the unit is then cut on the host from the buffers' window (StaticDecode.cut_after:
    what ContextMemoryLayer.attend does after its local pass; a few launches a layer, no model call);
    the next step copies the window back into the buffers;
  * other calls (phase 1, the first cut, a question that completes a unit, int8 units in a cutting
    chunk, a lookup log, a too-large window) take the plain path, and the next static step copies the
    state back into the buffers;
  * a rows step returns the logits of its last real row (logits_to_keep as a device index).
`DecodeGraph(cache, capture=False)` runs the same static steps without a graph (any device): the
path tests compare with the plain one. Replay makes no host synchronisation. Knows nothing of text.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable

import torch

from memllm.compat import cache_kwargs
from memllm.context.static import CutShape, StaticDecode, rows_bucket

MAX_CUT_SLOTS = 2  # cutting-call shapes kept (a steady prefill chunk has one; a feed's last chunk another)

_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def side_stream(device: torch.device) -> torch.cuda.Stream:
    """One side stream per device for every warm-up and capture, made at first use. PyTorch keeps a
    cuBLAS workspace (32 MiB on the H100) for each stream a matmul ran on, for the life of the
    process: a new stream per graph leaked one per session (measured: +32 MiB allocated per session,
    after the session and its graph were freed)."""
    device = torch.device(device)
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device=device)
    return _SIDE_STREAMS[device]


class _Slot:
    """One padded call size (or one cutting call's shape): its input buffers and its captured graph."""

    def __init__(self, rows: int, device: torch.device, cut: CutShape | None = None):
        self.rows = rows
        self.cut = cut
        self.tok = torch.zeros(1, rows, dtype=torch.long, device=device)
        self.pos = torch.zeros(rows, dtype=torch.long, device=device)
        self.keep = torch.zeros(1, dtype=torch.long, device=device)  # the row whose logits are returned
        self.graph: torch.cuda.CUDAGraph | None = None
        self.signature: tuple | None = None
        self.warm: tuple | None = None  # signature the last eager warm-up ran with
        self.logits: torch.Tensor | None = None
        self.ids: list[torch.Tensor | None] = []  # per layer: the unit ids tensor its last run wrote


class DecodeGraph:
    """`step(model, ids)` for ids (1, n): the last position's logits (vocab,) fp32, or None when the
    plain path must run (a cut, a re-base, n too long for a static call)."""

    def __init__(self, cache, capture: bool = True):
        # A weak reference: the cache owns this object, and a cycle would keep the graph's memory
        # pool (and the cache's buffers) on the device until Python's cycle collector ran.
        self._cache = weakref.ref(cache)
        self.capture = capture and cache.layers[0].device.type == "cuda"
        self.static: StaticDecode | None = None
        self.slots: dict[tuple, _Slot] = {}  # by (rows, execution blocks), or ("cut", CutShape.key)
        self.cut_shapes: dict[tuple, CutShape] = {}
        self.steps = 0  # static steps taken (replayed, captured-and-replayed, warm-up or eager)
        self.row_steps = 0  # of which multi-token (rows) steps
        self.cut_steps = 0  # of which cutting calls (prefill chunks)
        self.cut_after_steps = 0  # of which one-token steps that completed a unit, cut after the step
        self.captures = 0
        self.replays = 0

    @property
    def cache(self):
        return self._cache()

    def counters(self) -> dict[str, int]:
        """Graphs captured, replays, and static steps taken (benchmarks report these)."""
        return {"captures": self.captures, "replays": self.replays, "static_steps": self.steps,
                "row_steps": self.row_steps, "cut_steps": self.cut_steps,
                "cut_after_steps": self.cut_after_steps}  # fmt: skip

    def step(self, model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor | None:
        cache = self.cache
        n = ids.shape[1]
        if self.static is None:
            self.static = StaticDecode(cache)
        st = self.static
        plan = st.plan(n)
        rows = rows_bucket(n, cache.config.exc_block_size)
        cut_after = False
        if rows is not None and st.eligible(plan, rows):
            shape, cut = (rows, len(plan.blocks)), None
        elif rows == 1 and st.eligible(plan, 1, cutting=True):
            # a token that completes a unit: the one-token static step, then the unit cut on the host
            shape, cut, cut_after = (1, len(plan.blocks)), None, True
        else:
            # Only calls too long for a rows step (prefill chunks): a question that completes a unit
            # takes the plain path, so decoding makes no new shapes (and captures).
            cut = self._cut_shape(plan) if rows is None else None
            if cut is None:
                return None
            shape, rows = ("cut", cut.key), n
        if not st.in_sync():
            st.sync()
        if cut is not None:
            st.prepare_cut(plan)
        slot = self.slots.get(shape)
        if slot is None:
            slot = self.slots[shape] = _Slot(rows, st.device, cut)
        st.blocks = len(plan.blocks)
        slot.tok[:, :n].copy_(ids.reshape(1, n), non_blocking=True)
        start = cache.layers[0].reported_length()
        torch.arange(start, start + rows, out=slot.pos)
        if rows > 1 and cut is None:
            st.n_valid.fill_(n)
            slot.keep.fill_(n - 1)
        logits = self._graph_step(model, slot) if self.capture else self._forward(model, slot)
        if cut is not None:
            st.advance_host_cut(plan, cut)
            self.cut_steps += 1
        else:
            for sw, ids in zip(st.windows, slot.ids, strict=True):
                sw.ids = ids  # a replay writes the ids tensors of its own capture
            st.advance_host(plan, rows)
            self.row_steps += rows > 1
            if cut_after:
                st.cut_after(plan)
                self.cut_after_steps += 1
        self.steps += 1
        return logits

    def _cut_shape(self, plan) -> CutShape | None:
        """The static shape of a cutting call (known shapes reused: their plan tables stay alive), keeping
        at most MAX_CUT_SLOTS of them and their graphs."""
        cut = self.static.cut_shape(plan, self.cut_shapes)
        if cut is None or cut.key in self.cut_shapes:
            return cut
        while len(self.cut_shapes) >= MAX_CUT_SLOTS:
            old = next(iter(self.cut_shapes))
            del self.cut_shapes[old]
            self.slots.pop(("cut", old), None)
        self.cut_shapes[cut.key] = cut
        return cut

    # ---- internals -------------------------------------------------------------------------------
    def _forward(self, model: torch.nn.Module, slot: _Slot) -> torch.Tensor:
        """One model call on the slot's inputs, every layer through the static step."""
        cache, st = self.cache, self.static
        cache.static, st.cut = st, slot.cut
        try:
            out = model(
                input_ids=slot.tok,
                **cache_kwargs(model, cache),
                position_ids=slot.pos.view(1, -1),
                use_cache=True,
                logits_to_keep=slot.keep if slot.rows > 1 and slot.cut is None else 1,
            )
        finally:
            cache.static, st.cut = None, None
        if slot.cut is None:
            slot.ids = [sw.ids for sw in st.windows]
            st.advance_device(slot.rows)
        return out.logits[0, -1].float()

    def _signature(self) -> tuple:
        """What a captured graph has baked in besides static.py's buffers (addresses and shapes)."""
        parts: list = [self.cache.layers[0].reported_length()]
        for layer in self.cache.layers:
            reprs = layer.store.repr_buffer()
            tables = layer.store.kernel_state
            table_ptrs = tuple(t.data_ptr() for t in tables.dev.values()) if tables is not None else ()
            cache = layer.store.unit_cache  # its tables stay; its pools are made again after a release
            pools = cache.pool_ptrs if cache is not None else None
            pool_ptrs = (pools.data_ptr(),) if pools is not None else ()
            parts.append(
                (
                    layer.sink_k.data_ptr(),
                    layer.sink_v.data_ptr(),
                    reprs.data_ptr(),
                    reprs.shape[1],
                    table_ptrs,
                    pool_ptrs,
                )
            )
        return tuple(parts)

    def _refresh_tables(self) -> None:
        """Segments written by plain steps since: their addresses go into the (stable) gather tables. The
        device unit caches' pools are made here, on the current stream, not in a warm-up on the side one."""
        for layer in self.cache.layers:
            tables = layer.store.kernel_state
            if tables is not None:
                tables.refresh(layer.store)
            if layer.store.unit_cache is not None:
                layer.store.unit_cache.ensure(layer.dtype)

    def _graph_step(self, model: torch.nn.Module, slot: _Slot) -> torch.Tensor:
        self._refresh_tables()
        logits, done = run_captured(slot, self._signature(), self.static.device,
                                    lambda: self._forward(model, slot), self._after_warm_up)  # fmt: skip
        self.captures += done == "capture"
        self.replays += done != "warm"
        return logits

    def _after_warm_up(self) -> tuple:
        self._refresh_tables()
        return self._signature()


def run_captured(
    slot, sig: tuple, device: torch.device, forward: Callable[[], torch.Tensor], after_warm_up: Callable[[], tuple]
) -> tuple[torch.Tensor, str]:
    """One static call through `slot` (its graph, signature, warm and logits attributes): replayed when
    its graph was captured with signature `sig`; else run eagerly on the side stream (a warm-up, as
    capture requires) when the last warm-up was not with `sig` (slot.warm becomes after_warm_up(): what
    the call left); else captured and replayed. -> (the call's output, a copy; "replay", "warm" or
    "capture"). DecodeGraph and cuda/batch_graph.BatchGraph use it."""
    if slot.graph is not None and sig == slot.signature:
        slot.graph.replay()
        return slot.logits.clone(), "replay"
    side = side_stream(device)
    if slot.warm != sig:
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            logits = forward()
        torch.cuda.current_stream().wait_stream(side)
        logits.record_stream(torch.cuda.current_stream())
        slot.warm = after_warm_up()
        return logits, "warm"
    slot.graph = None
    graph = torch.cuda.CUDAGraph()
    # No cyclic garbage collection inside the capture: an unreachable object that holds a captured graph
    # (an engine's replaced BatchCache and its BatchGraph, a cycle) freed there resets that graph, which
    # the capture does not permit, and the capture fails (GPU run 46, sessions joining and leaving).
    collecting = gc.isenabled()
    gc.disable()
    try:
        with torch.cuda.graph(graph, stream=side):
            slot.logits = forward()
    finally:
        if collecting:
            gc.enable()
    slot.graph, slot.signature = graph, sig
    graph.replay()
    return slot.logits.clone(), "capture"
