"""Single-token model calls through a ContextMemoryCache, replayed as one CUDA graph.

Decoding one token is ~2,400 small launches (30 layers; measured with torch.profiler on the H100),
so the host, not the GPU, sets its speed. The static step (static.py) makes every launch of a
cut-free token identical, so the whole model call is captured once and replayed per token:
  * the first static step after the graph's inputs changed runs eagerly on a side stream (warm-up:
    Triton compiles, cuBLAS workspaces), the next one is captured, then replayed;
  * inputs baked into a graph: the buffers of static.py, each layer's sinks, unit index buffer and
    gather table; a change of any (a unit index that grew, sinks after a rollback) means a new capture;
  * tokens that cut a unit or re-base positions (one in block_size) take the plain path, and the
    next static step copies the state back into the buffers.
`DecodeGraph(cache, capture=False)` runs the same static step without a graph (any device): the
path tests compare with the plain one. Replay makes no host synchronisation. Knows nothing of text.
"""

from __future__ import annotations

import weakref

import torch

from memllm.context.static import StaticDecode

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


class DecodeGraph:
    """`step(model, ids)` for ids (1, 1): the next logits (vocab,) fp32, or None when the plain path must run."""

    def __init__(self, cache, capture: bool = True):
        # A weak reference: the cache owns this object, and a cycle would keep the graph's memory
        # pool (and the cache's buffers) on the device until Python's cycle collector ran.
        self._cache = weakref.ref(cache)
        self.capture = capture and cache.layers[0].device.type == "cuda"
        self.static: StaticDecode | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.signature: tuple | None = None
        self.warm: tuple | None = None  # signature the last eager warm-up ran with
        self.tok: torch.Tensor | None = None
        self.pos: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None
        self.steps = 0  # static steps taken (replayed, captured-and-replayed, warm-up or eager)
        self.captures = 0
        self.replays = 0

    @property
    def cache(self):
        return self._cache()

    def counters(self) -> dict[str, int]:
        """Graphs captured, replays, and static steps taken (benchmarks report these)."""
        return {"captures": self.captures, "replays": self.replays, "static_steps": self.steps}

    def step(self, model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor | None:
        cache = self.cache
        if self.static is None:
            self.static = StaticDecode(cache)
        st = self.static
        plan = st.plan()
        if not st.eligible(plan):
            return None
        if not st.in_sync():
            st.sync()
        dev = st.device
        if self.tok is None:
            self.tok = torch.zeros(1, 1, dtype=torch.long, device=dev)
            self.pos = torch.zeros(1, 1, dtype=torch.long, device=dev)
        self.tok.copy_(ids.reshape(1, 1), non_blocking=True)
        self.pos.fill_(cache.layers[0].reported_length())
        if not self.capture:
            logits = self._forward(model)
        else:
            logits = self._graph_step(model)
        st.advance_host(plan)
        self.steps += 1
        return logits

    # ---- internals -------------------------------------------------------------------------------
    def _forward(self, model: torch.nn.Module) -> torch.Tensor:
        """One model call on the static inputs, every layer through the static step."""
        cache, st = self.cache, self.static
        cache.static = st
        try:
            out = model(
                input_ids=self.tok,
                past_key_values=cache,
                position_ids=self.pos,
                use_cache=True,
                logits_to_keep=1,
            )
        finally:
            cache.static = None
        st.advance_device()
        return out.logits[0, -1].float()

    def _signature(self) -> tuple:
        """What a captured graph has baked in besides static.py's buffers (addresses and shapes)."""
        parts: list = [self.cache.layers[0].reported_length()]
        for layer in self.cache.layers:
            reprs = layer.store.repr_buffer()
            tables = layer.store.kernel_state
            table_ptrs = tuple(t.data_ptr() for t in tables.dev.values()) if tables is not None else ()
            parts.append(
                (
                    layer.sink_k.data_ptr(),
                    layer.sink_v.data_ptr(),
                    reprs.data_ptr(),
                    reprs.shape[1],
                    table_ptrs,
                )
            )
        return tuple(parts)

    def _refresh_tables(self) -> None:
        """Segments written by plain steps since: their addresses go into the (stable) gather tables."""
        for layer in self.cache.layers:
            tables = layer.store.kernel_state
            if tables is not None:
                tables.refresh(layer.store)

    def _graph_step(self, model: torch.nn.Module) -> torch.Tensor:
        self._refresh_tables()
        sig = self._signature()
        if self.graph is not None and sig == self.signature:
            self.graph.replay()
            self.replays += 1
            return self.logits.clone()
        if self.warm != sig:
            # Eager warm-up on a side stream (this token's real step), as graph capture requires.
            side = side_stream(self.static.device)
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                logits = self._forward(model)
            torch.cuda.current_stream().wait_stream(side)
            logits.record_stream(torch.cuda.current_stream())
            self._refresh_tables()
            self.warm = self._signature()
            return logits
        self.graph = None
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side_stream(self.static.device)):
            self.logits = self._forward(model)
        self.graph, self.signature = graph, sig
        self.captures += 1
        graph.replay()
        self.replays += 1
        return self.logits.clone()
