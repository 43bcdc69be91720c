"""The kernels a ContextMemoryLayer runs, chosen once per layer: `kernels_for(impl, device)`.

TorchKernels: the plain-PyTorch paths (impl "reference" anywhere; impl "fast" off CUDA). CudaKernels:
impl "fast" on CUDA, the Triton kernels of memllm.context.cuda with the same contracts (each cuda/ module
is tested against the reference module of the same name). Both have the same methods; the cache, the
static step (static.py) and the unit store call them instead of branching on the device. This is the one
module that imports memllm.context.cuda (lazily: Triton is needed only where CUDA is used). Knows
nothing of the model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from memllm.context import gather, lookup, select, unit_cache
from memllm.context.plan import CallPlan
from memllm.context.positions import Rotary
from memllm.context.units import UnitStore
from memllm.context.window import (
    joined_memory,
    local_attention,
    local_attention_fused,
    memory_attention,
    merge,
)


def unit_writer(device: torch.device) -> Callable[..., None] | None:
    """How UnitStore.write_at writes units at a device index on `device`: on CUDA the device-side write
    of cuda/gather.py (whatever the impl: no host synchronisation), elsewhere None (the host copy)."""
    if torch.device(device).type == "cuda":
        from memllm.context.cuda.gather import write_units_uva

        return write_units_uva
    return None


# Calls of at least this many tokens take the fused CPU local pass (window.local_attention_fused); shorter
# ones the loop. At a 3,584-key window, per layer (SmolLM2's heads): 1 token 1.3 vs 0.8 ms for the loop,
# 30 tokens 7.2 vs 6.4, 64 tokens 12.8 vs 12.6, 512 tokens 94 vs 226 (benchmarks/results/cpu_local_pass.md).
FUSED_CPU_MIN = 64


class TorchKernels:
    """The plain-PyTorch paths (the reference the CUDA kernels are tested against, and the CPU path)."""

    fast = False

    def __init__(self, impl: str = "reference", device: torch.device | str = "cpu"):
        self.impl = impl
        # CPU "fast": the window keys' received scores may be deferred (cache.flush_scores), as plain
        # attention never computes them: a stream within the window costs what plain attention costs.
        self.defers_scores = impl == "fast" and torch.device(device).type == "cpu"

    def rotated(
        self, rot: Rotary, x: torch.Tensor, start: int, step: int, dtype: torch.dtype, per_row: bool = True
    ) -> torch.Tensor:
        """Rotary.rotated(x, start, step, dtype, per_row)."""
        return rot.rotated(x, start, step, dtype, per_row=per_row)

    def join_keys(
        self, rot: Rotary, local_k: torch.Tensor, k: torch.Tensor, rebase: int, angle: int, dtype: torch.dtype
    ) -> torch.Tensor:
        """The window's keys (moved by `rebase`) joined to the call's keys (rotated by `angle`): k_all."""
        if rebase:
            local_k = rot.rotated(local_k, rebase, 1, dtype, per_row=False)
        return torch.cat([local_k, rot.rotated(k, angle, 1, dtype, per_row=False)], dim=1)

    def local_attention(
        self, rot: Rotary, q: torch.Tensor, angle: int, k_all: torch.Tensor, v_all: torch.Tensor,
        plan: CallPlan, scale: float, dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        """The local pass: out (heads, c, d) fp32, lse (heads, c), received (kv_heads, W + c)."""
        q_loc = rot.rotated(q, angle, 1, torch.float32, per_row=False)
        if (
            self.impl == "fast" and q.device.type == "cpu" and plan.c >= FUSED_CPU_MIN
        ):  # PyTorch's fused CPU attention
            return local_attention_fused(q_loc, k_all, v_all, plan, scale, torch.float32)
        return local_attention(q_loc, k_all, v_all, plan, scale, torch.float32)

    def local_attention_deferred(
        self, rot: Rotary, q: torch.Tensor, angle: int, k_all: torch.Tensor, v_all: torch.Tensor,
        plan: CallPlan, scale: float, dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        """The local pass without the received scores: out, lse and the queries at window positions
        (fp32), from which window.received_scores gives the scores later."""
        q_loc = rot.rotated(q, angle, 1, torch.float32, per_row=False)
        out, lse, _ = local_attention_fused(
            q_loc, k_all, v_all, plan, scale, torch.float32, with_received=False
        )
        return out, lse, q_loc

    def write_cut(
        self, layer: Any, plan: CallPlan, k_all: torch.Tensor, v_all: torch.Tensor, score: torch.Tensor,
        first: int, at: torch.Tensor,
    ) -> None:  # fmt: skip
        """layer.cut_units, written at units at, at + 1, ... (UnitStore.write_at)."""
        layer.store.write_at(at, *layer.cut_units(plan, k_all, v_all, score, first))

    def memory_queries(
        self, rot: Rotary, q: torch.Tensor, start: int, plan: CallPlan, t: dict[str, torch.Tensor], kvh: int,
        dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
        """The memory queries (at distance memory_distance) in fp32, and no per-block sums (computed by the caller)."""
        return rot.rotated(q, start, -1, torch.float32), None

    def choose_units(
        self, q_sum: torch.Tensor, reprs: torch.Tensor, units_before: torch.Tensor, mode: str, k: int
    ) -> torch.Tensor:
        """lookup.choose_units."""
        return lookup.choose_units(q_sum, reprs, units_before, mode, k, self.impl)

    def gather_units(
        self, store: UnitStore, ids: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """gather.gather_units."""
        return gather.gather_units(store, ids, dtype, self.impl)

    def scan_units(self, q: torch.Tensor, store: UnitStore, scale: float, dtype: torch.dtype) -> torch.Tensor:
        """The probe's scan (select.unit_lse): q (kv_heads, rows, d) fp32 -> (kv_heads, rows, n_units)."""
        return select.unit_lse(q, store, scale, dtype, self.gather_units)

    def gather_selected(
        self, store: UnitStore, ids: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A lookup's gather: through the store's device unit cache when it has one and ids (rows,
        kv_heads, t) are one lookup's (unit_cache.serves), else gather_units."""
        if unit_cache.serves([store], ids):
            return unit_cache.gather_cached(store, ids, dtype, self.gather_units)
        return self.gather_units(store, ids, dtype)

    def gather_units_stores(
        self, stores: list[UnitStore], ids: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Row s of ids (S, kv_heads, t) from stores[s] -> K, V (S, kv_heads, t*block_size, head_dim)
        (a batch's layer, context/stacked.py), through the stores' device unit caches when they have
        them (unit_cache.gather_cached_stores)."""
        if unit_cache.serves(stores, ids):
            return unit_cache.gather_cached_stores(stores, ids, dtype, self.read_units_stores)
        return self.read_units_stores(stores, ids, dtype)

    def read_units_stores(
        self, stores: list[UnitStore], ids: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """gather_units_stores from host memory: on the CPU with impl "fast" one pass over every
        store (gather.gather_host_stores), else one gather per store."""
        if self.impl == "fast" and ids.device.type == "cpu":
            return gather.gather_host_stores(stores, ids, dtype)
        parts = [self.gather_units(st, ids[i : i + 1], dtype) for i, st in enumerate(stores)]
        return torch.cat([k for k, _ in parts]), torch.cat([v for _, v in parts])

    def stores_gather(
        self,
    ) -> Callable[[list[UnitStore], torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]]:
        """gather_units_stores for one caller that calls it again and again (a batch's layer): on CUDA
        an object keeping the stores' joined segment tables between calls."""
        return self.gather_units_stores

    def memory_attention(
        self, layer: Any, q: torch.Tensor, q_mem: torch.Tensor, uk: torch.Tensor | None, uv: torch.Tensor | None,
        plan: CallPlan, chosen: int, scale: float, out: torch.Tensor, lse: torch.Tensor,
    ) -> torch.Tensor:  # fmt: skip
        """The memory pass over sinks + units, merged with the local pass (out, lse) -> (heads, c, d) fp32."""
        cfg = layer.config
        n_mb = len(plan.memory_blocks)
        k_mem, v_mem = joined_memory(layer.sink_k, layer.sink_v, uk, uv, n_mb)
        out_m, lse_m = memory_attention(
            q_mem, k_mem, v_mem, plan, layer.sink_k.shape[1], chosen, cfg.block_size, scale, torch.float32
        )
        return merge(out, lse, out_m, lse_m)

    def step_attention(self, *args: Any) -> torch.Tensor:
        """static.step_attention (one token of a static call)."""
        from memllm.context.static import step_attention

        return step_attention(*args)

    def choose_units_stacked(
        self, q_sum: torch.Tensor, reprs: torch.Tensor, units: torch.Tensor, mode: str, k: int
    ) -> torch.Tensor:
        """The stacked rows' lookup (stacked.py): q_sum (S, kv_heads, d), each row's own representatives
        (S, kv_heads, n, d), units (S,) -> ids (S, 1 or kv_heads, min(k, n)): lookup.choose_units of each
        row (its PyTorch "fast" selection, no host read, whatever the impl)."""
        return lookup.choose_units(q_sum, reprs, units, mode, k, "fast")

    def stacked_inputs(self, *args: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """static.stacked_inputs (the stacked rows' rotated queries; their new keys and values written)."""
        from memllm.context.static import stacked_inputs

        return stacked_inputs(*args)

    def stacked_attention(self, *args: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """static.stacked_attention (the stacked rows of a batched decode step)."""
        from memllm.context.static import stacked_attention

        return stacked_attention(*args)

    def decode_graph(self, cache: Any) -> Any:
        """No CUDA graphs off the CUDA path."""
        return None

    def batch_graph(self, batch: Any, capture: bool = True) -> Any:
        """The BatchGraph a batch's steps go through (cuda/batch_graph.py); off the CUDA path only
        without capture (its steps run eagerly: what tests compare with the plain batched step)."""
        if capture:
            return None
        from memllm.context.cuda.batch_graph import BatchGraph

        return BatchGraph(batch, capture=False)


class CudaKernels(TorchKernels):
    """impl "fast" on CUDA: the Triton kernels of memllm.context.cuda (imported here, once)."""

    fast = True

    def __init__(self):
        # on CUDA the kernels compute the received scores in the pass: none deferred
        super().__init__("fast", "cuda")
        from memllm.context.cuda import cut as cut_cuda
        from memllm.context.cuda import lookup as lookup_cuda
        from memllm.context.cuda import positions as positions_cuda
        from memllm.context.cuda import static as static_cuda
        from memllm.context.cuda import window as window_cuda

        self._cut, self._lookup, self._positions = cut_cuda, lookup_cuda, positions_cuda
        self._static, self._window = static_cuda, window_cuda

    def rotated(
        self, rot: Rotary, x: torch.Tensor, start: int, step: int, dtype: torch.dtype, per_row: bool = True
    ) -> torch.Tensor:
        """One Triton launch (cuda/positions.py) where head_dim is a power of two, else Rotary.rotated."""
        d = x.shape[-1]
        if x.is_cuda and d >= 2 and d & (d - 1) == 0:
            row = rot.rows(start, x.shape[-2]) if per_row else rot.row(start)
            cos, sin, _ = rot.tables(x.device)
            return self._positions.rotate(
                x, row, 1 if per_row else 0, step if per_row else 1, cos, sin, dtype
            )
        return rot.rotated(x, start, step, dtype, per_row=per_row)

    def join_keys(
        self, rot: Rotary, local_k: torch.Tensor, k: torch.Tensor, rebase: int, angle: int, dtype: torch.dtype
    ) -> torch.Tensor:
        """Rotated straight into k_all (cuda/positions.rotate's out)."""
        rotate = self._positions.rotate
        kvh, w, d = local_k.shape
        cos, sin, _ = rot.tables(k.device)
        k_all = torch.empty(kvh, w + k.shape[1], d, dtype=dtype, device=k.device)
        if rebase:
            rotate(local_k, rot.row(rebase), 0, 1, cos, sin, dtype, out=k_all[:, :w])
        else:
            k_all[:, :w].copy_(local_k)
        rotate(k, rot.row(angle), 0, 1, cos, sin, dtype, out=k_all[:, w:])
        return k_all

    def local_attention(
        self, rot: Rotary, q: torch.Tensor, angle: int, k_all: torch.Tensor, v_all: torch.Tensor,
        plan: CallPlan, scale: float, dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        q_loc = self.rotated(rot, q, angle, 1, dtype, per_row=False)
        return self._window.local_attention_cuda(q_loc, k_all, v_all, plan, scale)

    def write_cut(
        self, layer: Any, plan: CallPlan, k_all: torch.Tensor, v_all: torch.Tensor, score: torch.Tensor,
        first: int, at: torch.Tensor,
    ) -> None:  # fmt: skip
        """With bf16/fp16/fp32 units, one launch (cuda/cut.cut_units_cuda) cuts and writes them."""
        if layer.store.offload_dtype == "int8":
            return super().write_cut(layer, plan, k_all, v_all, score, first, at)
        row = layer.rotary.rows(first + plan.cut_start, plan.n_cut * layer.config.block_size)
        cos, sin, _ = layer.rotary.tables(k_all.device)
        self._cut.cut_units_cuda(
            layer.store, at, k_all, v_all, score, plan.cut_start, plan.n_cut, row, cos, sin
        )

    def memory_queries(
        self, rot: Rotary, q: torch.Tensor, start: int, plan: CallPlan, t: dict[str, torch.Tensor], kvh: int,
        dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
        """One launch: the queries in the model dtype and their per-block sums."""
        row = rot.rows(start, q.shape[1])
        cos, sin, _ = rot.tables(q.device)
        longest = max((plan.blocks[i].q1 - plan.blocks[i].q0 for i in plan.memory_blocks), default=0)
        return self._positions.memory_queries(q, row, cos, sin, t["mb_q0"], t["mb_q1"], kvh, dtype, longest)

    def choose_units(
        self, q_sum: torch.Tensor, reprs: torch.Tensor, units_before: torch.Tensor, mode: str, k: int
    ) -> torch.Tensor:
        """Two or three launches (cuda/lookup.choose_units_cuda) on CUDA tensors."""
        if q_sum.is_cuda:
            return self._lookup.choose_units_cuda(q_sum, reprs, units_before, mode == "shared", k)
        return super().choose_units(q_sum, reprs, units_before, mode, k)

    def gather_units(
        self, store: UnitStore, ids: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """From pinned host memory by device-side ids (cuda/gather.gather_units_uva) for a CUDA store."""
        if store.device.type == "cuda":
            from memllm.context.cuda.gather import gather_units_uva

            return gather_units_uva(store, ids, dtype)
        return super().gather_units(store, ids, dtype)

    def scan_units(self, q: torch.Tensor, store: UnitStore, scale: float, dtype: torch.dtype) -> torch.Tensor:
        """One Triton launch (cuda/select.unit_lse_uva) for a CUDA store of the shapes it takes."""
        if store.device.type == "cuda" and q.is_cuda:
            from memllm.context.cuda import select as select_cuda

            if select_cuda.supports(store):
                return select_cuda.unit_lse_uva(q, store, scale, dtype)
        return super().scan_units(q, store, scale, dtype)

    def gather_selected(
        self, store: UnitStore, ids: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Through the store's unit cache in one launch (cuda/gather.gather_cached_uva) for a CUDA store."""
        if store.device.type == "cuda" and unit_cache.serves([store], ids):
            from memllm.context.cuda.gather import gather_cached_uva

            return gather_cached_uva(store, ids, dtype)
        return super().gather_selected(store, ids, dtype)

    def gather_units_stores(
        self, stores: list[UnitStore], ids: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All stores' units in one launch (cuda/gather.gather_units_stores, through their unit caches
        when they have them) for CUDA stores."""
        if stores[0].device.type == "cuda":
            from memllm.context.cuda.gather import gather_units_stores

            return gather_units_stores(stores, ids, dtype)
        return super().gather_units_stores(stores, ids, dtype)

    def stores_gather(
        self,
    ) -> Callable[[list[UnitStore], torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]]:
        """cuda/gather.StoresGather: the joined segment tables kept while the stores' segments are unchanged
        (through the stores' unit caches when they have them)."""
        from memllm.context.cuda.gather import StoresGather

        return StoresGather()

    def memory_attention(
        self, layer: Any, q: torch.Tensor, q_mem: torch.Tensor, uk: torch.Tensor | None, uv: torch.Tensor | None,
        plan: CallPlan, chosen: int, scale: float, out: torch.Tensor, lse: torch.Tensor,
    ) -> torch.Tensor:  # fmt: skip
        """The memory pass merged with `out` (one kernel), sinks and units read where they are; when it covers
        every row, the result goes straight to the attention function's layout and dtype."""
        final = None
        if len(plan.memory_blocks) == len(plan.blocks) and layer.sink_k.shape[1] > 0:
            final = torch.empty(q.shape[1], q.shape[0], q.shape[2], dtype=layer.dtype, device=q.device)
        return self._window.memory_attention_merge_cuda(
            q_mem,
            layer.sink_k,
            layer.sink_v,
            uk,
            uv,
            plan,
            chosen,
            layer.config.block_size,
            scale,
            out,
            lse,
            final,
        )

    def step_attention(self, *args: Any) -> torch.Tensor:
        return self._static.step_attention_cuda(*args)

    def choose_units_stacked(
        self, q_sum: torch.Tensor, reprs: torch.Tensor, units: torch.Tensor, mode: str, k: int
    ) -> torch.Tensor:
        return self._lookup.choose_units_stacked_cuda(q_sum, reprs, units, mode == "shared", k)

    def stacked_inputs(self, *args: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return self._static.stacked_inputs_cuda(*args)

    def stacked_attention(
        self, q_loc: torch.Tensor, q_mem: torch.Tensor, win_k: torch.Tensor, win_v: torch.Tensor,
        score: torch.Tensor, window: torch.Tensor, hidden: torch.Tensor, *rest: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        return self._static.stacked_attention_cuda(q_loc, q_mem, win_k, win_v, score, window, *rest)

    def decode_graph(self, cache: Any) -> Any:
        """The DecodeGraph single tokens and static calls go through (cuda/graph.py)."""
        from memllm.context.cuda.graph import DecodeGraph

        return DecodeGraph(cache)

    def batch_graph(self, batch: Any, capture: bool = True) -> Any:
        """The BatchGraph a batch's steps go through (cuda/batch_graph.py), captured and replayed."""
        from memllm.context.cuda.batch_graph import BatchGraph

        return BatchGraph(batch, capture=capture)


def kernels_for(impl: str, device: torch.device | str) -> TorchKernels:
    """CudaKernels for impl "fast" on a CUDA device, else TorchKernels(impl)."""
    if impl == "fast" and torch.device(device).type == "cuda":
        return CudaKernels()
    return TorchKernels(impl, device)


def choose_units(
    q_sum: torch.Tensor, reprs: torch.Tensor, units_before: torch.Tensor, mode: str, k: int, impl: str
) -> torch.Tensor:
    """lookup.choose_units through the kernels of (impl, q_sum's device)."""
    return kernels_for(impl, q_sum.device).choose_units(q_sum, reprs, units_before, mode, k)


def gather_units(
    store: UnitStore, ids: torch.Tensor, dtype: torch.dtype, impl: str = "fast"
) -> tuple[torch.Tensor, torch.Tensor]:
    """gather.gather_units through the kernels of (impl, the store's device)."""
    return kernels_for(impl, store.device).gather_units(store, ids, dtype)
