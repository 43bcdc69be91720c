"""Memory units of one layer: K/V of `block_size` tokens kept off the device, representatives on it.

Host storage is a list of fixed-size segments (page-locked when the device is CUDA, so a kernel can
read them through unified addressing without a host synchronisation); units are never moved once
written. Page-locked segments are allocated one ahead, in background threads (pinned.py):
cudaHostAlloc took ~5 ms per 8 MiB segment tensor, measured on the H100, and every layer needs a new
segment in the same model call. So a CUDA store holds one segment's buffers beyond those in use once
it has taken its first segment (`prefetched_bytes`); stores on the CPU allocate on demand in the
calling thread, with no thread. CUDA stores take their allocator from pinned.default_host_alloc()
(registered mmap memory, pinned.registered_alloc, where the device supports it); pinned.py gives what
prefetch saved when measured (with cudaHostAlloc: little; with registered memory: not yet measured).
K/V are kept as bf16/fp16/fp32, or int8 with scales (keys: per unit, head and channel; values: per
unit, head and token). A unit's representative keys (repr_topk per KV head, un-rotated) are kept on
the device as their mean, which is all the lookup's score needs (q . mean(r) = mean(q . r)): laid out
(kv_heads, capacity, head_dim) so scoring reads them without a copy; the buffer grows by a quarter
when full, so the device memory beyond the units' own stays small (one key per unit and KV head);
a feed of known length reserves what it will cut at once (`reserve`), without that slack.
A store may hold a device cache of its units (`unit_cache`, unit_cache.py, MemoryConfig.device_unit_cache):
the store drops its slots of the units `truncate` or `load_state` forget, so no reused id reads stale data.

Knows nothing of positions, attention or which units get selected (see lookup.py, gather.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from memllm.context.pinned import HostAlloc, SegmentPrefetch, SegmentSpec, default_host_alloc
from memllm.context.unit_cache import UnitCache

HOST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "int8": torch.int8}


def quantize_int8(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 along all but `dim`'s reduction: scale = absmax over `dim` / 127."""
    scale = x.float().abs().amax(dim=dim, keepdim=True).clamp_min(1e-8) / 127.0
    q = torch.round(x.float() / scale).clamp_(-127, 127).to(torch.int8)
    return q, scale


class UnitStore:
    """Units of one layer. Shapes: unit K/V (kv_heads, block_size, head_dim); repr (kv_heads, repr_topk, head_dim)."""

    def __init__(
        self,
        kv_heads: int,
        block_size: int,
        head_dim: int,
        repr_topk: int,
        offload_dtype: str,
        device: torch.device,
        segment_units: int | None = None,
        host_alloc: HostAlloc | None = None,
        device_writer: Callable[..., None] | None = None,
        unit_cache: UnitCache | None = None,
    ):
        """host_alloc(shape, dtype) -> host tensor: when given, segments come from it, one segment ahead in
        background threads (as page-locked ones do on CUDA, where the default is
        pinned.default_host_alloc(): registered_alloc, or pinned_empty where the device cannot read
        registered memory at its host address). device_writer(store, first, k, v): how `write_at` writes
        at a device index (kernels.unit_writer: on CUDA a kernel, no host synchronisation); None: a host
        copy at int(first). unit_cache: the device cache of recently read units lookups gather through
        (unit_cache.py), or None."""
        self.kv_heads, self.block_size, self.head_dim, self.repr_topk = (
            kv_heads,
            block_size,
            head_dim,
            repr_topk,
        )
        self.offload_dtype = offload_dtype
        self.device_writer = device_writer
        self.host_dtype = HOST_DTYPES[offload_dtype]
        self.device = torch.device(device)
        self.pin = self.device.type == "cuda"
        if segment_units is None:
            # Pinned host memory is allocated in powers of two: fill ~8 MiB segments almost exactly.
            unit_bytes = (
                kv_heads * block_size * head_dim * torch.empty(0, dtype=self.host_dtype).element_size()
            )
            segment_units = max(1, (8 << 20) // unit_bytes) if self.pin else 64
        self.segment_units = segment_units
        self.kernel_state: object | None = None  # owned by the gather kernel (cuda/gather.py)
        self.unit_cache = unit_cache
        self.n_units = 0
        # Each segment: dict of host tensors with leading dim segment_units.
        self.segments: list[dict[str, torch.Tensor]] = []
        if host_alloc is None and self.pin:
            host_alloc = default_host_alloc()
        self._prefetch = SegmentPrefetch(self._segment_spec(), host_alloc) if host_alloc else None
        # (kv_heads, capacity, head_dim) on the device: each unit's mean representative key.
        self._repr: torch.Tensor | None = None
        self.version = 0  # bumps when segments are added (gather kernels rebuild pointer tables)
        # bumps whenever units or representatives are written or forgotten (a copy of the index, such
        # as a batch's stacked one (context/stacked.py), is current while this is unchanged)
        self.edits = 0

    # ---- writing -------------------------------------------------------------------------------
    def _host_empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, pin_memory=self.pin)

    def _segment_spec(self) -> SegmentSpec:
        """Name -> (shape, dtype) of one segment's host tensors."""
        n, h, b, d = self.segment_units, self.kv_heads, self.block_size, self.head_dim
        spec: SegmentSpec = {"k": ((n, h, b, d), self.host_dtype), "v": ((n, h, b, d), self.host_dtype)}
        if self.offload_dtype == "int8":
            spec["k_scale"] = ((n, h, 1, d), torch.float32)
            spec["v_scale"] = ((n, h, b, 1), torch.float32)
        return spec

    def _new_segment(self) -> dict[str, torch.Tensor]:
        if self._prefetch is not None:
            seg = self._prefetch.take()
        else:
            seg = {
                name: self._host_empty(shape, dtype) for name, (shape, dtype) in self._segment_spec().items()
            }
        self.segments.append(seg)
        self.version += 1
        return seg

    def append(self, k: torch.Tensor, v: torch.Tensor, repr_k: torch.Tensor) -> int:
        """Add one unit: k, v (kv_heads, block_size, head_dim) on the device; repr_k (kv_heads, repr_topk, head_dim)."""
        self.append_many(k.unsqueeze(0), v.unsqueeze(0), repr_k.unsqueeze(0))
        return self.n_units - 1

    def append_many(self, k: torch.Tensor, v: torch.Tensor, repr_k: torch.Tensor) -> None:
        """Add n units: k, v (n, kv_heads, block_size, head_dim); repr_k (n, kv_heads, repr_topk, head_dim).

        Copies to pinned host memory are asynchronous (stream-ordered before any later gather)."""
        n = k.shape[0]
        if self.offload_dtype == "int8":
            k, ks = quantize_int8(k, dim=2)  # per (unit, head, channel)
            v, vs = quantize_int8(v, dim=3)  # per (unit, head, token)
            parts = {"k": k, "v": v, "k_scale": ks, "v_scale": vs}
        else:
            parts = {"k": k, "v": v}
        self._write_host(self.n_units, parts)
        need = self.n_units + n
        self._repr_room(need, repr_k.dtype)
        self._repr[:, self.n_units : need] = self._mean(repr_k)
        self.n_units = need
        self.edits += 1

    @staticmethod
    def _mean(repr_k: torch.Tensor) -> torch.Tensor:
        """(n, kv_heads, repr_topk, head_dim) -> the index's layout (kv_heads, n, head_dim)."""
        return repr_k.float().mean(dim=2).transpose(0, 1).to(repr_k.dtype)

    def _write_host(self, start: int, parts: dict[str, torch.Tensor]) -> None:
        """Copy parts (name -> (n, ...)) into the segments from unit `start` on, taking segments as needed."""
        n = next(iter(parts.values())).shape[0]
        done = 0
        while done < n:
            seg_i, off = divmod(start + done, self.segment_units)
            seg = self.segments[seg_i] if seg_i < len(self.segments) else self._new_segment()
            take = min(n - done, self.segment_units - off)
            for name, t in parts.items():
                seg[name][off : off + take].copy_(t[done : done + take], non_blocking=self.pin)
            done += take

    def ensure_room(self, n_units: int, dtype: torch.dtype) -> None:
        """Segments and index slots for units [0, n_units), taken now (host work), for `write_at`."""
        while len(self.segments) * self.segment_units < n_units:
            self._new_segment()
        self._repr_room(n_units, dtype)

    def _repr_room(self, n_units: int, dtype: torch.dtype) -> None:
        """Index slots for n_units, the buffer grown by at least a quarter when it must grow (a static
        call's graph keeps the buffer's address: growing it once per call would mean a capture per call)."""
        if self._repr is None or self._repr.shape[1] < n_units:
            self._grow_repr(max(16, n_units, (5 * self._repr.shape[1]) // 4 if self._repr is not None else 0),
                            dtype)  # fmt: skip

    def write_at(self, first: torch.Tensor, k: torch.Tensor, v: torch.Tensor, repr_k: torch.Tensor) -> None:
        """append_many's writes at units first, first + 1, ... where `first` is a device scalar (long):
        the device work of a static call (static.py), no host synchronisation on CUDA. The room must
        exist (ensure_room); n_units is left as it is (`advance`). Not for int8 units."""
        if self.offload_dtype == "int8":
            raise ValueError("write_at does not quantize: int8 units take append_many")
        n = k.shape[0]
        slots = first + torch.arange(n, device=first.device)
        self._repr.index_copy_(1, slots, self._mean(repr_k))
        if self.device_writer is not None:
            self.device_writer(self, first, k, v)
        else:
            self._write_host(int(first), {"k": k, "v": v})

    def advance(self, n: int) -> None:
        """Count n units written by `write_at` (host bookkeeping after the device work)."""
        if (
            len(self.segments) * self.segment_units < self.n_units + n
            or self.repr_buffer().shape[1] < self.n_units + n
        ):
            raise ValueError(f"no room was made for {n} more units (ensure_room)")
        self.n_units += n
        self.edits += 1

    def reserve(self, n_units: int, dtype: torch.dtype) -> None:
        """Make room for n_units representatives at once (a feed of known length: no growth slack)."""
        if self._repr is None or self._repr.shape[1] < n_units:
            self._grow_repr(n_units, dtype)

    def _grow_repr(self, capacity: int, dtype: torch.dtype) -> None:
        grown = torch.empty((self.kv_heads, capacity, self.head_dim), dtype=dtype, device=self.device)
        if self._repr is not None:
            grown[:, : self.n_units] = self._repr[:, : self.n_units]
        self._repr = grown

    def truncate(self, n_units: int) -> None:
        """Forget units >= n_units (their storage is reused by later appends)."""
        if n_units > self.n_units:
            raise ValueError(f"cannot truncate {self.n_units} units to {n_units}")
        if self.unit_cache is not None and n_units < self.n_units:
            self.unit_cache.invalidate(n_units)
        self.n_units = n_units
        self.edits += 1

    # ---- reading -------------------------------------------------------------------------------
    def repr_keys(self) -> torch.Tensor:
        """(kv_heads, n_units, head_dim) on the device (a view): each unit's mean representative key."""
        return self.repr_buffer()[:, : self.n_units]

    def repr_buffer(self) -> torch.Tensor:
        """The whole buffer of mean representatives (kv_heads, capacity, head_dim), unwritten slots
        included (their contents are undefined): the static decode step scores all slots and masks."""
        if self._repr is None:
            return torch.empty(self.kv_heads, 0, self.head_dim, device=self.device)
        return self._repr

    def host_unit(self, idx: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """One unit's K/V dequantized to `dtype` on the host: (kv_heads, block_size, head_dim) each."""
        seg = self.segments[idx // self.segment_units]
        off = idx % self.segment_units
        k, v = seg["k"][off], seg["v"][off]
        if self.offload_dtype == "int8":
            return (k.float() * seg["k_scale"][off]).to(dtype), (v.float() * seg["v_scale"][off]).to(dtype)
        return k.to(dtype), v.to(dtype)

    def gather_reference(self, ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Plain-PyTorch gather. ids (..., kv_heads, t) long -> K, V (..., kv_heads, t*block_size, head_dim)
        on the device (row h of ids reads head h).

        Reads the ids on the host (a synchronisation on CUDA); the fast path is kernels.CudaKernels.gather_units.
        """
        lead, (h, t) = ids.shape[:-2], ids.shape[-2:]
        rows = ids.reshape(-1, h, t).to("cpu").tolist()
        ks = torch.empty(len(rows), h, t, self.block_size, self.head_dim, dtype=dtype)
        vs = torch.empty_like(ks)
        for r, row in enumerate(rows):
            for head in range(h):
                for j, u in enumerate(row[head]):
                    k, v = self.host_unit(int(u), dtype)
                    ks[r, head, j], vs[r, head, j] = k[head], v[head]
        flat = (*lead, h, t * self.block_size, self.head_dim)
        return ks.reshape(flat).to(self.device), vs.reshape(flat).to(self.device)

    # ---- accounting and snapshots ------------------------------------------------------------------
    def host_bytes(self) -> int:
        """Bytes of the segments in use (all their capacity); buffers held ahead are `prefetched_bytes`."""
        return sum(t.numel() * t.element_size() for seg in self.segments for t in seg.values())

    def segment_bytes(self) -> int:
        """Host bytes of one segment (segment_units units, all their tensors)."""
        return sum(
            math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
            for shape, dtype in self._segment_spec().values()
        )

    def host_bytes_for(self, n_units: int) -> int:
        """Host bytes that room for `n_units` units in all would add: whole segments, and on pinned
        stores the one allocated ahead when a segment is taken."""
        new = max(0, -(-n_units // self.segment_units) - len(self.segments))
        return (new + (1 if new and self._prefetch is not None else 0)) * self.segment_bytes()

    def stored_bytes(self) -> int:
        """Bytes the n_units units occupy on the host (excluding unused segment capacity)."""
        if not self.segments:
            return 0
        per_unit = sum(t[0].numel() * t.element_size() for t in self.segments[0].values())
        return per_unit * self.n_units

    def prefetched_bytes(self) -> int:
        """Host bytes requested ahead for the next segment (allocated or in progress); 0 on CPU stores."""
        return 0 if self._prefetch is None else self._prefetch.held_bytes()

    def device_bytes(self) -> int:
        return 0 if self._repr is None else self._repr.numel() * self._repr.element_size()

    def state(self) -> dict[str, torch.Tensor]:
        """The n_units units as contiguous host tensors (for safetensors)."""
        out: dict[str, torch.Tensor] = {"repr": self.repr_keys().to("cpu").contiguous()}
        if self.n_units == 0:
            return out
        names = list(self.segments[0].keys())
        for name in names:
            parts = [seg[name] for seg in self.segments]
            out[name] = torch.cat(parts, dim=0)[: self.n_units].contiguous()
        return out

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of `state` (units are written back into fresh segments)."""
        repr_k = state["repr"]  # (kv_heads, n, d); snapshots from before the mean: (kv_heads, n, r, d)
        if repr_k.dim() == 4:
            repr_k = repr_k.float().mean(dim=2).to(repr_k.dtype)
        n = repr_k.shape[1]
        self.truncate(0)  # drops every cached slot (unit_cache holds only ids < n_units)
        if n:
            self._write_host(0, {name: state[name] for name in self._segment_spec()})
        self._repr = repr_k.to(self.device).clone() if n else None
        self.n_units = n
        self.edits += 1
