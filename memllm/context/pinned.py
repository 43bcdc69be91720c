"""Host buffers of a store's next segment, allocated ahead of need in background threads.

A pinned allocation costs host time in the calling thread: cudaHostAlloc took ~5 ms per 8 MiB segment
tensor, measured on the H100 with torch.profiler (benchmarks/profile_gpu.py). Every layer's store
crosses a segment boundary in the same model call, so allocating on demand stalled that call by ~300 ms
(30 layers). A `SegmentPrefetch` keeps, for each tensor of a segment (k, v; int8 adds k_scale,
v_scale), one Future for the NEXT segment: `take` returns the buffers (waiting only if they are not
ready yet) and submits the following segment's at once. So one segment's buffers are held ahead per
store. The allocator is a parameter (`HostAlloc`); the default is `pinned_empty`.

Measured on the H100 (30 stores of 8 MiB tensors, ~50 ms of GPU work per call): while a worker is in
cudaHostAlloc, the calling thread's CUDA calls (kernel launches, async copies) wait for it, though the
GIL is released (the driver takes a global lock). So with the default allocator the call that submits
the next segments still stalled ~200-300 ms, as without prefetch. With PyTorch's
PYTORCH_CUDA_ALLOC_CONF=pinned_use_cuda_host_register:True,pinned_num_register_threads:8 (pages touched
outside the lock, then cudaHostRegister) the same call stalled 50-160 ms, and a later call up to 63 ms.

The worker pool (`WORKERS` threads named memllm-pin-*) is process-wide and created on first submit;
importing this module starts no thread. Knows nothing of units, quantization or the device.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial

import torch

HostAlloc = Callable[[tuple[int, ...], torch.dtype], torch.Tensor]
SegmentSpec = dict[str, tuple[tuple[int, ...], torch.dtype]]  # tensor name -> (shape, dtype)

WORKERS = 4
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def pinned_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised page-locked host tensor (cudaHostAlloc through PyTorch's host allocator)."""
    return torch.empty(shape, dtype=dtype, pin_memory=True)


def pool() -> ThreadPoolExecutor:
    """The process-wide worker pool, created on first call."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="memllm-pin")
        return _pool


def spec_bytes(spec: SegmentSpec) -> int:
    """Bytes of one segment laid out as `spec`."""
    return sum(math.prod(shape) * dtype.itemsize for shape, dtype in spec.values())


class SegmentPrefetch:
    """Buffers for a store's segments, all laid out as `spec`; the next segment's are prepared ahead."""

    def __init__(self, spec: SegmentSpec, alloc: HostAlloc = pinned_empty) -> None:
        self.spec = dict(spec)
        self.alloc = alloc
        self._next: dict[str, Future[torch.Tensor]] = {}

    def take(self) -> dict[str, torch.Tensor]:
        """One segment's buffers (name -> tensor); submits the allocation of the one after it.

        Waits if the prefetched buffers are not ready yet; allocates in this thread if none were
        submitted (the first segment). An allocation that failed is raised here as a RuntimeError.
        """
        pending, self._next = self._next, {}
        if pending:
            seg = {name: self._result(name, fut.result) for name, fut in pending.items()}
        else:
            seg = {name: self._result(name, partial(self.alloc, *s)) for name, s in self.spec.items()}
        self._submit()
        return seg

    def held_bytes(self) -> int:
        """Bytes requested for the next segment (submitted, ready or not); 0 before the first take."""
        return spec_bytes(self.spec) if self._next else 0

    def _submit(self) -> None:
        workers = pool()
        self._next = {
            name: workers.submit(self.alloc, shape, dtype) for name, (shape, dtype) in self.spec.items()
        }

    def _result(self, name: str, get: Callable[[], torch.Tensor]) -> torch.Tensor:
        """`get()` (a Future's result or a direct allocation), its errors named with the bytes asked for."""
        shape, dtype = self.spec[name]
        try:
            t = get()
        except Exception as exc:  # the allocator's own error, possibly raised in a worker thread
            nbytes = spec_bytes({name: (shape, dtype)})
            raise RuntimeError(
                f"allocating {nbytes} bytes of host memory for segment tensor {name!r} {tuple(shape)} "
                f"{dtype} failed: {exc!r}; pinned memory is page-locked RAM: free host memory, or keep "
                "units as int8 (MemoryConfig.offload_dtype='int8')"
            ) from exc
        if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
            raise RuntimeError(
                f"host allocator returned {tuple(t.shape)} {t.dtype} for segment tensor {name!r}, "
                f"expected {tuple(shape)} {dtype}"
            )
        return t
