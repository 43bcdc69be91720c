"""Host buffers of a store's next segment, allocated ahead of need in background threads.

A pinned allocation costs host time in the calling thread: cudaHostAlloc took ~5 ms per 8 MiB segment
tensor, measured on the H100 with torch.profiler (benchmarks/profile_gpu.py). Every layer's store
crosses a segment boundary in the same model call, so allocating on demand stalled that call by ~300 ms
(30 layers). A `SegmentPrefetch` keeps, for each tensor of a segment (k, v; int8 adds k_scale,
v_scale), one Future for the NEXT segment: `take` returns the buffers (waiting only if they are not
ready yet) and submits the following segment's at once. So one segment's buffers are held ahead per
store. The allocator is a parameter (`HostAlloc`); `default_host_alloc()` gives the one CUDA stores use.

Measured on the H100 (30 stores of 8 MiB tensors, ~50 ms of GPU work per call; build/pinbench, by an
earlier session): while a worker is in cudaHostAlloc, the calling thread's CUDA calls (kernel
launches, async copies) wait for it, though the GIL is released (the driver takes a global lock). So
with `pinned_empty` the call that submits the next segments still stalled ~200-300 ms, as without
prefetch. Ordinary memory with its pages touched (~2.4 ms per 8 MiB, outside the lock) and then
cudaHostRegister (~1.3 ms, holding the lock) blocked the calling thread for less; with PyTorch's
PYTORCH_CUDA_ALLOC_CONF=pinned_use_cuda_host_register:True,pinned_num_register_threads:8 the same call
stalled 50-160 ms, and a later call up to 63 ms.

`registered_alloc` does that itself (anonymous mmap, transparent huge pages asked for, pages touched,
then cudaHostRegister; regions whose tensors died are kept, up to POOL_BYTES, and reused: see
`release_pool`) and is the default for CUDA stores (`CUDA_HOST_ALLOC`; set it to `pinned_empty`
to switch back). Its stall in a model-like run is NOT measured yet: benchmarks/pinned_alloc_gpu.py
compares the three ways on the GPU.

The worker pool (`WORKERS` threads named memllm-pin-*) is process-wide and created on first submit;
importing this module starts no thread. Knows nothing of units, quantization or the device.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import math
import mmap
import os
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

HostAlloc = Callable[[tuple[int, ...], torch.dtype], torch.Tensor]
SegmentSpec = dict[str, tuple[tuple[int, ...], torch.dtype]]  # tensor name -> (shape, dtype)

WORKERS = 4
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def pinned_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised page-locked host tensor (cudaHostAlloc through PyTorch's host allocator)."""
    return torch.empty(shape, dtype=dtype, pin_memory=True)


HUGE_PAGE = 2 << 20  # bytes of a transparent huge page (x86-64, arm64 with 4 KiB base pages)
PAGE = 4096  # one byte in every PAGE bytes is written to fault the memory in
HOST_REGISTER_FLAGS = 1 | 2  # cudaHostRegisterPortable | cudaHostRegisterMapped
_CU_ATTR_HOST_POINTER_FOR_REGISTERED_MEM = 91  # CU_DEVICE_ATTRIBUTE_CAN_USE_HOST_POINTER_FOR_REGISTERED_MEM
_noted: set[str] = set()  # one-time log messages already given


def _note_once(key: str, level: int, msg: str, *args: object) -> None:
    if key not in _noted:
        _noted.add(key)
        logger.log(level, msg, *args)


def region_bytes(nbytes: int) -> int:
    """Bytes registered for a tensor of `nbytes`: rounded up to `HUGE_PAGE` from one huge page on,
    to `PAGE` below it (a smaller region can hold no huge page; int8 scale tensors are 0.25-0.5 MiB)."""
    to = HUGE_PAGE if nbytes >= HUGE_PAGE else PAGE
    return max(1, -(-nbytes // to)) * to


@functools.cache
def host_pointers_usable() -> bool | None:
    """Whether every visible CUDA device reads registered host memory at its host address.

    The UVA gather (cuda/gather.py) hands the kernel host addresses; for memory from cudaHostRegister that is
    valid only where CU_DEVICE_ATTRIBUTE_CAN_USE_HOST_POINTER_FOR_REGISTERED_MEM is 1 (it is not
    needed for cudaHostAlloc memory). Queried once through the driver library (libcuda.so.1, with
    ctypes: PyTorch does not expose the attribute). None where it cannot be queried (no CUDA, no
    libcuda.so.1, a driver call failed).
    """
    if not torch.cuda.is_available():
        return None
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError as exc:
        logger.debug("libcuda.so.1 not loadable (%s): registered-memory capability unknown", exc)
        return None
    dev, value = ctypes.c_int(), ctypes.c_int()
    if lib.cuInit(0) != 0:
        return None
    for ordinal in range(torch.cuda.device_count()):
        if lib.cuDeviceGet(ctypes.byref(dev), ordinal) != 0:
            return None
        if lib.cuDeviceGetAttribute(ctypes.byref(value), _CU_ATTR_HOST_POINTER_FOR_REGISTERED_MEM, dev) != 0:
            return None
        if value.value != 1:
            return False
    return True


class _Registered:
    """One registered mapping. numpy arrays made from it keep it alive (their `base`), and torch tensors
    made from those arrays keep the arrays alive, so it dies with the last tensor or view on it."""

    def __init__(self, mm: mmap.mmap, ptr: int, nbytes: int) -> None:
        self.mm, self.ptr, self.nbytes = mm, ptr, nbytes
        self.__array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (ptr, False), "version": 3}


def _unregister(cudart: Any, mm: mmap.mmap, ptr: int, nbytes: int) -> None:
    """Unregister, then unmap; a failed unregister is logged."""
    err = cudart.cudaHostUnregister(ptr)
    if int(err) != 0:
        logger.warning(
            "cudaHostUnregister of %d bytes at %#x failed: %s", nbytes, ptr, _error_text(cudart, err)
        )
    mm.close()


# ---- registered regions kept for reuse ----------------------------------------------------------
# A session's segments die with it; the next session (the next document, the next passkey trial)
# would touch and register as many again: at 1M tokens ~2,900 regions of 8 MiB, ~1.3 ms each in
# cudaHostRegister holding the driver's lock (the module note), and ~0.3 s of a fresh session's
# first cut on the H100 (benchmarks/feed_start_profile.py). So a dying region is kept, up to
# POOL_BYTES in all, and handed to the next registered_alloc of the same size, as PyTorch keeps its
# pinned blocks. A kept region is reused only once the GPU work queued when it died is done (a CUDA
# event, queried, never waited on); its contents are the old ones (stores write before they read).
POOL_BYTES: int | None = None  # bytes of registered regions kept after their tensors die; None: half the RAM
_kept: dict[int, list[tuple[mmap.mmap, int, Any, Any]]] = {}  # region bytes -> [(mm, ptr, cudart, event)]
_kept_bytes = 0
# re-entrant: a region's finalizer (_release) takes it, and the garbage collector may run that finalizer
# in a thread that holds it already (inside _reuse's loop): with a plain Lock the thread waited on itself
_kept_lock = threading.RLock()


def pool_limit() -> int:
    """POOL_BYTES, or half the machine's physical memory when it is None."""
    if POOL_BYTES is not None:
        return POOL_BYTES
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


def kept_bytes() -> int:
    """Bytes of registered regions kept for reuse now."""
    return _kept_bytes


def _queued_work_event() -> Any:
    """An event after the work queued so far on the current CUDA stream (None without CUDA in use)."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    ev = torch.cuda.Event()
    ev.record()
    return ev


def _release(cudart: Any, mm: mmap.mmap, ptr: int, nbytes: int) -> None:
    """The finalizer of a `_Registered`: keep the region for reuse while the pool has room, else
    unregister and unmap it."""
    global _kept_bytes
    with _kept_lock:
        if _kept_bytes + nbytes <= pool_limit():
            _kept.setdefault(nbytes, []).append((mm, ptr, cudart, _queued_work_event()))
            _kept_bytes += nbytes
            return
    _unregister(cudart, mm, ptr, nbytes)


def _reuse(nbytes: int, cudart: Any) -> tuple[mmap.mmap, int] | None:
    """A kept region of nbytes registered through `cudart` whose GPU work is done, taken from the pool."""
    global _kept_bytes
    with _kept_lock:
        regions = _kept.get(nbytes, [])
        for i, (mm, ptr, owner, ev) in enumerate(regions):
            if owner is cudart and (ev is None or ev.query()):
                del regions[i]
                _kept_bytes -= nbytes
                return mm, ptr
    return None


def release_pool() -> int:
    """Unregister and unmap every kept region (after the GPU work queued when it died); returns the bytes."""
    global _kept_bytes
    with _kept_lock:
        regions = [(n, r) for n, rs in _kept.items() for r in rs]
        _kept.clear()
        freed, _kept_bytes = _kept_bytes, 0
    for nbytes, (mm, ptr, cudart, ev) in regions:
        if ev is not None:
            ev.synchronize()
        _unregister(cudart, mm, ptr, nbytes)
    return freed


def _error_text(cudart: Any, err: Any) -> str:
    get = getattr(cudart, "cudaGetErrorString", None)
    return f"error {int(err)}" + (f" ({get(err)})" if get is not None else "")


def _advise_huge(mm: mmap.mmap, start: int, length: int) -> None:
    """Ask for transparent huge pages on `length` bytes of `mm` from `start`; where that is not
    possible, a debug log says so (once)."""
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is None:
        _note_once(
            "madv", logging.DEBUG, "mmap.MADV_HUGEPAGE not available: registered segments use base pages"
        )
        return
    try:
        mm.madvise(advice, start, length)
    except OSError as exc:
        _note_once("madv-err", logging.DEBUG, "madvise(MADV_HUGEPAGE) failed (%s): base pages are used", exc)


def registered_alloc(shape: tuple[int, ...], dtype: torch.dtype, *, cudart: Any = None) -> torch.Tensor:
    """A page-locked host tensor: anonymous mmap, touched, then cudaHostRegister (zero-filled), or a kept
    region of the same size (below).

    The registered range is `region_bytes` long: the tensor's bytes rounded up to 2 MiB (`HUGE_PAGE`)
    for tensors of 2 MiB and more (segment K/V), to 4 KiB below. A range of 2 MiB or more starts on a
    2 MiB boundary (2 MiB more address space is mapped to align it; that slack is never touched, so
    takes no memory) and gets madvise(MADV_HUGEPAGE): where Linux's transparent huge pages are in
    `madvise` or `always` mode, touching then faults 2 MiB pages (fewer faults, fewer pages to pin).
    One byte per 4 KiB page is written in the calling thread (a prefetch worker for all but a store's
    first segment), outside the driver's lock; then cudaHostRegister (flags Portable | Mapped) pins and
    maps the range, holding it. The tensor's storage is the whole range.

    The mapping is private (MAP_PRIVATE): Python's default, shared anonymous memory, is shmem, which
    madvise(MADV_HUGEPAGE) does not give huge pages. Measured by the session that wrote this on the
    project's CPU machine (a VM, Linux 6.18, THP in `madvise` mode), touching 8 MiB one byte per page:
    shared 6.3 ms (smaps: THPeligible 0), private 4.2 ms with 4 KiB pages, private with MADV_HUGEPAGE
    0.8 ms (smaps: 8192 kB AnonHugePages). Memory the VM had not used before was far slower
    (13-27 ms per 8 MiB, with or without huge pages), so only the comparison may carry over.

    torch reports the tensor pinned (`is_pinned()` asks the driver, cudaPointerGetAttributes), so
    non_blocking copies to and from it are asynchronous; tests/context/test_pinned.py checks that on
    a GPU. When the last tensor or view on the memory is freed, the region is kept for reuse while
    the kept regions stay within `pool_limit()` (see POOL_BYTES; `release_pool` frees them), else
    unregistered and unmapped at once: then nothing waits for GPU work still reading it, so a segment
    must not be dropped while a kernel or copy on it is queued (UnitStore never drops a segment while
    it is alive). A reused region is not zeroed: it holds what its last tensor held.

    cudart: the object with cudaHostRegister / cudaHostUnregister (torch.cuda.cudart() when None; the
    tests pass a fake). With the real one, raises RuntimeError if a visible device cannot use host
    pointers of registered memory (`host_pointers_usable` is False). Raises RuntimeError naming the
    bytes if cudaHostRegister fails (the mapping is unmapped first; the CUDA runtime's last-error of
    the calling thread is not cleared: torch.cuda.cudart() has no cudaGetLastError).
    """
    if cudart is None:
        cudart = torch.cuda.cudart()
        usable = host_pointers_usable()
        if usable is False:
            raise RuntimeError(
                "a visible CUDA device cannot read registered host memory at its host address "
                "(CU_DEVICE_ATTRIBUTE_CAN_USE_HOST_POINTER_FOR_REGISTERED_MEM is 0): use pinned_empty"
            )
        if usable is None:
            _note_once(
                "usable?",
                logging.WARNING,
                "could not query whether the device reads registered "
                "memory at its host address; the UVA gather assumes it does",
            )
    numel = math.prod(shape)
    nbytes = region_bytes(numel * dtype.itemsize)
    kept = _reuse(nbytes, cudart)
    if kept is not None:  # registered already; old contents
        return _registered_tensor(cudart, *kept, nbytes, shape, dtype)
    huge = nbytes >= HUGE_PAGE
    # MAP_PRIVATE: mmap's default MAP_SHARED is shmem, which madvise(MADV_HUGEPAGE) leaves at 4 KiB pages
    mm = mmap.mmap(-1, nbytes + HUGE_PAGE if huge else nbytes, flags=mmap.MAP_PRIVATE)
    view = ctypes.c_char.from_buffer(mm)  # a buffer export, released at once: mm must stay closable
    base = ctypes.addressof(view)
    del view
    skip = -base % HUGE_PAGE if huge else 0
    ptr = base + skip
    if huge:
        _advise_huge(mm, skip, nbytes)
    touch = torch.from_numpy(np.asarray(_Registered(mm, ptr, nbytes)))
    touch[::PAGE].fill_(0)  # fault every page in (anonymous pages read as zeros already)
    del touch
    err = cudart.cudaHostRegister(ptr, nbytes, HOST_REGISTER_FLAGS)
    if int(err) != 0:
        mm.close()
        raise RuntimeError(
            f"cudaHostRegister of {nbytes} bytes (for {tuple(shape)} {dtype}) failed: "
            f"{_error_text(cudart, err)}"
        )
    return _registered_tensor(cudart, mm, ptr, nbytes, shape, dtype)


def _registered_tensor(
    cudart: Any, mm: mmap.mmap, ptr: int, nbytes: int, shape: tuple[int, ...], dtype: torch.dtype
) -> torch.Tensor:
    """A `shape` tensor at the start of a registered region, which goes to `_release` (kept or freed)
    when the last tensor or view on it dies."""
    holder = _Registered(mm, ptr, nbytes)
    raw = torch.from_numpy(np.asarray(holder))
    fin = weakref.finalize(holder, _release, cudart, mm, ptr, nbytes)
    fin.atexit = False  # at exit the process's memory goes anyway; CUDA may already be torn down
    return raw.view(dtype)[: math.prod(shape)].view(shape)


CUDA_HOST_ALLOC: HostAlloc = registered_alloc  # what CUDA stores use; pinned_empty switches back


def default_host_alloc() -> HostAlloc:
    """The allocator for CUDA stores: `CUDA_HOST_ALLOC`, except `pinned_empty` in place of
    `registered_alloc` where `host_pointers_usable()` is not True (logged once)."""
    if CUDA_HOST_ALLOC is registered_alloc and host_pointers_usable() is not True:
        _note_once(
            "fallback",
            logging.INFO,
            "registered host memory not known to be readable by the "
            "device at its host address: CUDA stores use pinned_empty (cudaHostAlloc)",
        )
        return pinned_empty
    return CUDA_HOST_ALLOC


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
