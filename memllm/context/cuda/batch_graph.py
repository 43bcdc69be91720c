"""The batched decode step (context/batch.py, stacked.py), replayed as a CUDA graph.

At 128K with 4 to 48 sessions on an H100 a batched step was 1,411 launches and 76-85 ms of host time
against 9-61 ms on the GPU (GPU run 40): the host sets its speed, as it did for one session's decode
(graph.py). A step whose rows are all stacked launches the same kernels, with the same shapes and
addresses, as the step before it as long as the rows' buffers stay the same, so the whole model call
is captured once and replayed:
  * before the call, the rows are worked out (stacked.plan_rows) and their device indexes, the tokens
    and the positions go into one fixed buffer (one upload); every layer's stacked buffers are made
    current (StackedLayer.prepare, host checks: a row whose window, index or sinks changed is copied
    back into its own row in place), the window buffers with room for the longest window a steady step
    has and the index buffer with room for GROW_UNITS more units a row, so they are not made again as
    windows and indexes grow;
  * a session whose token completes a unit (one of B every block_size / B steps when sessions cut on
    different steps, as a server's do) is stacked as the others (stacked.py, `Rows.cuts`: the unit is
    cut from the buffers after the call) and the rest of its window, now its own, goes back into its
    row in place at the next step (before, such a session stood in as below: a whole B=1 model call
    per cut, 76 against 44 ms a step at N = 48 in GPU run 44);
  * a session whose step is otherwise not steady but can stand in (a re-base) takes that step alone
    first (the caller's `alone`: its windows made its own, its own model call) and stands in for its
    row: computed and thrown away;
  * the call: every layer takes the rows given (BatchCache.given_rows) and writes the window scores
    back into their buffer (Rows.in_place);
  * after it, each layer's rows advance on the host (StackedLayer.advance: the counters, the handed
    windows, now static views: a checkpoint copies them, and a session leaving the batch gets its own);
  * a session that joins as another leaves takes its row (BatchEngine, BatchCache.swap): its window,
    index and sinks are copied into that row in place, the joined gather tables and the unit caches'
    stacked address tables written in place (StoresGather._join, gather.stacked_addresses), so the
    graph stays (before: a new BatchCache and graph, three steps' worth per change at N = 48 with a
    change every 4 steps, GPU run 47);
  * what a graph has baked in (`signature`): every layer's buffers and the tensors of the joined tables
    and address tables. A change (fewer or more sessions: a new BatchCache and graph; tables or an
    index past their room) means a step run as the plain one would, then (the buffers unchanged for
    SETTLE steps) an eager warm-up, then a capture. Measured: GPU runs 42-47 (benchmarks/RESULTS.md;
    run 43 before stand-ins and in-place rows: a capture at every cut).
A step with a row that can neither be stacked nor stand in, forced units or a lookup log takes the
plain batched path. `BatchGraph(batch, capture=False)` runs the same steps without a graph (any device):
the path tests compare with the plain one. Knows nothing of sessions or text.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from memllm.compat import cache_kwargs
from memllm.context.cuda.graph import run_captured

if TYPE_CHECKING:
    from memllm.context.stacked import Rows

ROWS = 5  # the device rows plan_rows writes (then the positions and the tokens)
# Steps the buffers must have stayed the same before a warm-up (then a capture) is tried: a graph made
# for buffers that change at the next cut is a capture that never pays back (GPU run 43).
SETTLE = 1
GROW_UNITS = 64  # room for units per row in the index buffer a graph step makes (filled in place)


class BatchGraph:
    """`step(model, tokens)`: one token per session of `batch` -> logits (B, vocab) fp32, or None when
    the plain batched call must run. Call it under attach(model, cache=batch)."""

    # Whether a row whose token completes a unit is stacked and its unit cut after the call (else it
    # stands in, taking its step alone first, as in GPU run 44; tests compare the two).
    cuts = True

    def __init__(self, batch, capture: bool = True):
        # A weak reference: the BatchCache owns this object (a cycle would keep the graph's pool alive).
        self._batch = weakref.ref(batch)
        layer = batch.caches[0].layers[0]
        self.device = layer.device
        self.capture = capture and self.device.type == "cuda"
        n = len(batch.caches)
        self.inputs = torch.zeros(ROWS + 2, n, dtype=torch.long, device=self.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.signature: tuple | None = None
        self.warm: tuple | None = None
        self.logits: torch.Tensor | None = None
        self.rows: Rows | None = None  # the current step's
        self.last: tuple | None = None  # the last step's signature, and steps it has held since it changed
        self.settled = 0
        self.steps = self.captures = self.replays = 0
        self.alone = 0  # sessions that took a graph step's token alone (stand-ins)
        self.cut = 0  # rows whose token completed a unit, stacked and cut after the call (Rows.cuts)

    @property
    def batch(self):
        return self._batch()

    def counters(self) -> dict[str, int]:
        return {"graph_steps": self.steps, "captures": self.captures, "replays": self.replays,
                "stood_in": self.alone, "cut_rows": self.cut}  # fmt: skip

    def step(
        self, model: torch.nn.Module, tokens: Sequence[int], alone: Callable[[int], torch.Tensor] | None = None
    ) -> torch.Tensor | None:
        """tokens[b] into session b. A session whose step is not steady (nor steady but for cutting its
        window's first unit: stacked, Rows.cuts) but can stand in (stacked.can_stand_in) takes its step
        first through alone(b) -> its logits (vocab,); its row of the graph step is computed and thrown
        away. None: the plain batched call must run."""
        batch = self.batch
        caches = batch.caches
        if any(c.layers[0].lookup_log is not None for c in caches):
            return None
        positions = batch.positions(1, torch.device("cpu"), 0).view(-1).tolist()
        st = batch.plan_rows(into=self.inputs, extra=(positions, tokens), stand_ins=alone is not None,
                             cuts=self.cuts)  # fmt: skip
        if st is None or st.forced:
            return None
        cfg = batch.config
        # room for the longest window a steady step has (n_local + block_size keys, then a cut), and
        # for units the rows cut later
        st.grow = max(cfg.block_size, cfg.n_local + 2 * cfg.block_size - max(st.windows))
        st.grow_units = GROW_UNITS
        st.in_place, st.advance_here = True, False
        self.rows = st
        own = {b: alone(b) for b in (st.rows[i] for i in st.stand_ins)}  # before their rows are copied in
        for bl in batch.layers:  # host work: the buffers made current before the call (and the signature)
            bl.stacked_layer().prepare(bl.members, st)
        sig = None
        if self.capture:
            self._refresh()
            sig = self._signature()
        if sig is not None and sig != self.signature:
            self.settled = self.settled + 1 if sig == self.last else 0
        self.last = sig
        if sig is None or (sig != self.signature and self.settled < SETTLE):
            # no graph, or the buffers just made (again): this step on the current stream, as the plain
            # batched step would run it
            logits = self._forward(model)
        else:
            logits, done = run_captured(self, sig, self.device, lambda: self._forward(model), self._after_warm_up)
            self.captures += done == "capture"
            self.replays += done != "warm"
        for bl in batch.layers:
            bl.stacked.advance(bl.members, st, None)
        batch.stacked_steps += len(st.rows) - len(st.stand_ins)
        for b, row in own.items():
            logits[b] = row
        self.steps += 1
        self.alone += len(own)
        self.cut += len(st.cuts)
        return logits

    def _forward(self, model: torch.nn.Module) -> torch.Tensor:
        batch = self.batch
        batch.given_rows = self.rows
        try:
            out = model(input_ids=self.inputs[ROWS + 1].view(-1, 1), **cache_kwargs(model, batch),
                        position_ids=self.inputs[ROWS].view(-1, 1), use_cache=True, logits_to_keep=1)  # fmt: skip
        finally:
            batch.given_rows = None
        return out.logits[:, -1].float()

    def _refresh(self) -> None:
        """What a graph reads, made current now on the current stream (not in a warm-up on the side one),
        in place where it can be (a replay reads the new values): the stores' joined gather tables, their
        unit caches' pools and the pools' stacked address tables. Only where graphs are captured (CUDA)."""
        from memllm.context.cuda.gather import stacked_addresses  # Triton: imported only here

        for bl in self.batch.layers:
            stores = [m.store for m in bl.members]
            gather = bl.stacked.gather
            current = getattr(gather, "current", None)  # StoresGather's
            if current is not None:
                current(stores, self.device)
            caches = [s.unit_cache for s in stores]
            for c in caches:
                if c is not None:
                    c.ensure(bl.members[0].dtype)
            if len(caches) > 1 and all(c is not None for c in caches) and hasattr(gather, "kept"):
                stacked_addresses(caches, gather.kept)

    def _after_warm_up(self) -> tuple:
        self._refresh()
        return self._signature()

    def _signature(self) -> tuple:
        """What a captured graph has baked in besides the fixed inputs (addresses and shapes)."""
        parts: list = []
        for bl in self.batch.layers:
            sl = bl.stacked
            # the joined gather tables and the unit caches' stacked address tables are written in place
            # while they fit (StoresGather._join, stacked_addresses): their tensors, not the stores or
            # sessions behind them, are what the graph baked in
            kept = getattr(sl.gather, "kept", {})
            addresses = tuple(kept[k].data_ptr() for k in ("tables", "pools") if k in kept)
            parts.append((
                sl.rebuilds, sl.k.data_ptr(), sl.k.shape, sl.v.data_ptr(), sl.score.data_ptr(),
                sl.reprs.data_ptr(), sl.reprs.shape, sl.sink_k.data_ptr(), sl.sink_v.data_ptr(),
                getattr(sl.gather, "made", None), addresses,
            ))  # fmt: skip
        return tuple(parts)
