"""Segments allocated one ahead in background threads (pinned.py): timing, layout, errors, contents.

A fake slow allocator stands in for cudaHostAlloc, and a fake cudart for cudaHostRegister /
cudaHostUnregister (registered_alloc), so these run on the CPU; the `gpu` tests use the real
allocators (registered memory is the CUDA default) and the gather kernel's stable address tables (uva.py).
"""

from __future__ import annotations

import functools
import gc
import logging
import mmap
import sys
import threading
import time
import weakref

import pytest
import torch

from memllm.context import pinned
from memllm.context.units import UnitStore

H, B, D, R, SEG = 2, 4, 8, 2, 4  # kv_heads, block_size, head_dim, repr_topk, segment_units


class FakeAlloc:
    """Sleeps `delay` s per call and records (shape, dtype, thread name); fails from call `fail_from` on."""

    def __init__(self, delay: float = 0.05, fail_from: int | None = None) -> None:
        self.delay, self.fail_from = delay, fail_from
        self.calls: list[tuple[tuple[int, ...], torch.dtype, str]] = []
        self.lock = threading.Lock()

    def __call__(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        with self.lock:
            i = len(self.calls)
            self.calls.append((tuple(shape), dtype, threading.current_thread().name))
        if self.fail_from is not None and i >= self.fail_from:
            raise MemoryError("fake: no host memory")
        time.sleep(self.delay)
        return torch.empty(shape, dtype=dtype)

    def wait_calls(self, n: int, timeout: float = 1.0) -> None:
        end = time.monotonic() + timeout
        while len(self.calls) < n and time.monotonic() < end:
            time.sleep(0.002)
        assert len(self.calls) >= n, f"{len(self.calls)} allocations requested, expected {n}"


def make_store(dtype: str = "bf16", alloc: FakeAlloc | None = None) -> UnitStore:
    return UnitStore(H, B, D, R, dtype, torch.device("cpu"), segment_units=SEG, host_alloc=alloc)


def units(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(n, H, B, D, generator=gen).to(torch.bfloat16)
    v = torch.randn(n, H, B, D, generator=gen).to(torch.bfloat16)
    return k, v, k[:, :, :R]


def expected_spec(dtype: str) -> set[tuple[tuple[int, ...], torch.dtype]]:
    host = {"bf16": torch.bfloat16, "int8": torch.int8}[dtype]
    spec = {((SEG, H, B, D), host)}
    if dtype == "int8":
        spec |= {((SEG, H, 1, D), torch.float32), ((SEG, H, B, 1), torch.float32)}
    return spec


def test_next_segment_is_requested_in_the_background_when_one_is_taken():
    alloc = FakeAlloc(delay=0.05)
    store = make_store(alloc=alloc)
    assert alloc.calls == [] and store.prefetched_bytes() == 0  # nothing before the first segment
    store.append_many(*units(1))
    first = [name for _, _, name in alloc.calls[:2]]
    assert first == [threading.current_thread().name] * 2  # the first segment: k, v in this thread
    alloc.wait_calls(4)  # the next segment's k, v, with no further call on the store
    assert all(name.startswith("memllm-pin") for _, _, name in alloc.calls[2:])
    seg_bytes = 2 * SEG * H * B * D * 2
    assert store.host_bytes() == seg_bytes and store.prefetched_bytes() == seg_bytes
    assert len(store.segments) == 1


def test_taking_a_ready_segment_does_not_wait_and_an_unready_one_does():
    alloc = FakeAlloc(delay=0.05)
    store = make_store(alloc=alloc)
    store.append_many(*units(SEG))  # fills segment 0; segment 1 is requested
    time.sleep(0.12)  # > the fake's 50 ms (k and v run in parallel workers)
    t0 = time.perf_counter()
    store.append_many(*units(1, seed=1))  # takes segment 1 (ready); requests segment 2
    ready = time.perf_counter() - t0
    store.append_many(*units(SEG, seed=2))  # crosses into segment 2 at once: waits for it
    waited = time.perf_counter() - t0 - ready
    assert ready < 0.03, f"taking a prefetched segment took {ready * 1e3:.1f} ms"
    assert waited > 0.03, f"an unready segment was taken after {waited * 1e3:.1f} ms"
    assert len(store.segments) == 3 and store.n_units == 2 * SEG + 1


@pytest.mark.parametrize("dtype", ["bf16", "int8"])
def test_prefetched_segments_have_the_store_layout(dtype):
    alloc = FakeAlloc(delay=0.0)
    store = make_store(dtype, alloc)
    store.append_many(*units(2 * SEG + 1))  # three segments taken, a fourth requested
    names = {"k", "v"} | ({"k_scale", "v_scale"} if dtype == "int8" else set())
    alloc.wait_calls(4 * len(names))
    assert len(alloc.calls) == 4 * len(names)
    assert {(shape, dt) for shape, dt, _ in alloc.calls} == expected_spec(dtype)
    for seg in store.segments:
        assert set(seg) == names
        assert {(tuple(t.shape), t.dtype) for t in seg.values()} == expected_spec(dtype)
    assert store.prefetched_bytes() == sum(t.numel() * t.element_size() for t in store.segments[0].values())


def test_an_allocator_error_surfaces_at_the_segment_take():
    alloc = FakeAlloc(delay=0.0, fail_from=2)  # the first segment succeeds, the prefetched one fails
    store = make_store(alloc=alloc)
    store.append_many(*units(SEG))
    alloc.wait_calls(4)
    nbytes = SEG * H * B * D * 2
    with pytest.raises(RuntimeError, match=f"allocating {nbytes} bytes of host memory.*MemoryError"):
        store.append_many(*units(1, seed=1))
    assert len(store.segments) == 1 and store.n_units == SEG  # nothing half-appended
    alloc.fail_from = None  # the error was consumed: the next take allocates afresh
    store.append_many(*units(1, seed=1))
    assert store.n_units == SEG + 1


def test_a_failing_first_allocation_names_the_bytes():
    store = make_store(alloc=FakeAlloc(delay=0.0, fail_from=0))
    with pytest.raises(RuntimeError, match=f"allocating {SEG * H * B * D * 2} bytes"):
        store.append_many(*units(1))


def fill_and_compare(plain: UnitStore, other: UnitStore, k, v, r) -> None:
    """Append the same units to both stores (a batch, then one by one); they read back identically."""
    for store in (plain, other):
        store.append_many(k[:3], v[:3], r[:3])
        for i in range(3, k.shape[0]):
            store.append(k[i], v[i], r[i])
    for i in range(k.shape[0]):
        for a, b in zip(plain.host_unit(i, torch.float32), other.host_unit(i, torch.float32), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", ["bf16", "int8"])
def test_units_read_back_as_in_a_store_without_prefetch(dtype):
    k, v, r = units(2 * SEG + 3)
    plain, ahead = make_store(dtype), make_store(dtype, FakeAlloc(delay=0.0))
    fill_and_compare(plain, ahead, k, v, r)
    state = plain.state()
    restored = make_store(dtype, FakeAlloc(delay=0.0))
    restored.load_state(state)
    restored.truncate(SEG + 1)
    restored.append_many(k[SEG + 1 :], v[SEG + 1 :], r[SEG + 1 :])
    for name, t in restored.state().items():
        torch.testing.assert_close(t, state[name], rtol=0, atol=0)


def test_cpu_stores_start_no_thread(monkeypatch):
    def no_pool() -> None:
        raise AssertionError("a CPU store asked for the worker pool")

    monkeypatch.setattr(pinned, "pool", no_pool)
    store = make_store()
    store.append_many(*units(3 * SEG))
    assert len(store.segments) == 3 and store.prefetched_bytes() == 0


def test_the_pool_is_created_on_first_submit_and_a_dropped_store_is_freed(monkeypatch):
    monkeypatch.setattr(pinned, "_pool", None)
    store = make_store(alloc=FakeAlloc(delay=0.0))
    assert pinned._pool is None  # constructing a store submits nothing
    store.append_many(*units(1))
    workers = pinned._pool
    assert workers is not None
    ref = weakref.ref(store)
    del store
    gc.collect()
    assert ref() is None
    workers.shutdown(wait=True)  # this test's own pool; monkeypatch restores the previous one


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bf16", "int8"])
def test_cuda_store_segments_are_pinned_and_prefetched(dtype):
    store = UnitStore(H, B, D, R, dtype, torch.device("cuda"), segment_units=SEG)
    k, v, r = units(3 * SEG + 1)
    store.append_many(k.cuda(), v.cuda(), r.cuda())
    assert all(t.is_pinned() for seg in store.segments for t in seg.values())
    assert {(tuple(t.shape), t.dtype) for t in store.segments[-1].values()} == expected_spec(dtype)
    assert store.prefetched_bytes() == sum(t.numel() * t.element_size() for t in store.segments[0].values())
    torch.cuda.synchronize()
    if dtype == "bf16":  # int8 rounds a few values differently on the GPU than on the CPU
        for i in range(k.shape[0]):
            torch.testing.assert_close(store.host_unit(i, torch.bfloat16), (k[i], v[i]), rtol=0, atol=0)


@pytest.mark.gpu
def test_gather_tables_keep_their_address_until_capacity_is_exceeded():
    from memllm.context.cuda.gather import TABLE_CAPACITY, _Tables
    from memllm.context.kernels import gather_units

    store = UnitStore(H, B, D, R, "bf16", torch.device("cuda"), segment_units=1)
    k, v, r = (t.cuda() for t in units(TABLE_CAPACITY + 3))
    ptrs: set[tuple[int, ...]] = set()
    for n in range(1, k.shape[0] + 1):
        store.append(k[n - 1], v[n - 1], r[n - 1])
        ids = torch.randint(0, n, (H, 3), device="cuda")
        fast = gather_units(store, ids, torch.bfloat16, "fast")
        ref = gather_units(store, ids, torch.bfloat16, "reference")
        for a, b in zip(fast, ref, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        tables = store.kernel_state
        assert isinstance(tables, _Tables)
        assert tables.capacity_version == (1 if n <= TABLE_CAPACITY else 2)
        ptrs.add(tuple(t.data_ptr() for t in tables.dev.values()))
    assert len(ptrs) == 2  # one table up to the capacity, a doubled one after
    assert tables.capacity == 2 * TABLE_CAPACITY


# ---- registered host memory (pinned.registered_alloc) ----------------------------------------------


class FakeCudart:
    """Stands in for torch.cuda.cudart(): records register/unregister calls; `fail` is an error code."""

    def __init__(self, fail: int = 0) -> None:
        self.fail = fail
        self.registered: list[tuple[int, int, int, str]] = []  # ptr, bytes, flags, thread name
        self.unregistered: list[int] = []
        self.lock = threading.Lock()

    def cudaHostRegister(self, ptr: int, nbytes: int, flags: int) -> int:
        with self.lock:
            self.registered.append((ptr, nbytes, flags, threading.current_thread().name))
        return self.fail

    def cudaHostUnregister(self, ptr: int) -> int:
        with self.lock:
            self.unregistered.append(ptr)
        return 0

    def cudaGetErrorString(self, err: int) -> str:
        return "fake: out of memory"


def mapped(ptr: int) -> bool:
    """Whether address `ptr` lies in a mapping of this process (Linux /proc/self/maps)."""
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= ptr < hi:
                return True
    return False


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")


def test_registered_regions_round_up_to_huge_pages_from_2_mib_on():
    mib = 1 << 20
    assert pinned.region_bytes(0) == pinned.region_bytes(1) == 4096
    assert pinned.region_bytes(261_888) == 262_144  # int8 key scales of an 8 MiB segment: 4 KiB pages
    assert pinned.region_bytes(2 * mib - 1) == 2 * mib
    assert pinned.region_bytes(2 * mib) == 2 * mib
    assert pinned.region_bytes(2 * mib + 1) == 4 * mib
    assert pinned.region_bytes(170 * 3 * 128 * 64 * 2) == 8 * mib  # a SmolLM2 bf16 K segment


@pytest.mark.parametrize(
    ("shape", "dtype", "region", "align"),
    [
        ((170, 3, 128, 64), torch.bfloat16, 8 << 20, 2 << 20),  # SmolLM2 bf16 K/V segment
        ((341, 3, 1, 64), torch.float32, 262_144, 4096),  # SmolLM2 int8 key scales
        ((3, 5), torch.float16, 4096, 4096),
    ],
)
def test_registered_alloc_registers_an_aligned_zeroed_region(shape, dtype, region, align):
    cudart = FakeCudart()
    t = pinned.registered_alloc(shape, dtype, cudart=cudart)
    assert tuple(t.shape) == shape and t.dtype == dtype and t.is_contiguous()
    assert cudart.registered == [(t.data_ptr(), region, 3, threading.current_thread().name)]
    assert t.data_ptr() % align == 0
    assert t.untyped_storage().nbytes() == region  # the storage is the whole registered range
    assert bool((t == 0).all())
    src = torch.randn(shape).to(dtype)
    t.copy_(src)
    torch.testing.assert_close(t, src, rtol=0, atol=0)


@pytest.fixture(autouse=True)
def _no_kept_regions():
    """Every test starts and ends with no registered region kept for reuse."""
    pinned.release_pool()
    yield
    pinned.release_pool()


def test_registered_memory_is_released_with_its_last_view(monkeypatch):
    monkeypatch.setattr(pinned, "POOL_BYTES", 0)  # nothing kept for reuse
    released: list[mmap.mmap] = []
    real_release = pinned._release

    def spy(cudart, mm, ptr, nbytes):
        real_release(cudart, mm, ptr, nbytes)
        released.append(mm)

    monkeypatch.setattr(pinned, "_release", spy)
    cudart = FakeCudart()
    t = pinned.registered_alloc((4, 1 << 19), torch.float32, cudart=cudart)  # 8 MiB
    ptr = t.data_ptr()
    view = t[2]
    view.fill_(7.0)
    del t
    gc.collect()
    assert cudart.unregistered == [] and released == []  # a view keeps the memory registered
    assert float(view.sum()) == 7.0 * (1 << 19)
    del view
    gc.collect()
    assert cudart.unregistered == [ptr]
    assert len(released) == 1 and released[0].closed  # unregistered, then unmapped


@linux_only
def test_a_dead_region_is_kept_and_reused_without_registering_again(monkeypatch):
    """Within POOL_BYTES a freed region stays registered and mapped; the next allocation of its size
    gets it back (old contents, no new cudaHostRegister); past the limit regions are released;
    release_pool unregisters and unmaps what is kept."""
    region = 8 << 20
    monkeypatch.setattr(pinned, "POOL_BYTES", region)
    cudart = FakeCudart()
    t = pinned.registered_alloc((4, 1 << 19), torch.float32, cudart=cudart)  # 8 MiB
    u = pinned.registered_alloc((4, 1 << 19), torch.float32, cudart=cudart)
    ptr, other = t.data_ptr(), u.data_ptr()
    t.fill_(3.0)
    del t
    gc.collect()
    assert cudart.unregistered == [] and pinned.kept_bytes() == region and mapped(ptr)
    del u
    gc.collect()
    assert cudart.unregistered == [other] and not mapped(other)  # the pool was full
    again = pinned.registered_alloc((2, 1 << 20), torch.float32, cudart=cudart)  # same region size
    assert again.data_ptr() == ptr and len(cudart.registered) == 2 and pinned.kept_bytes() == 0
    assert bool((again == 3.0).all())  # not zeroed
    # Another cudart's allocation does not get it; dying at once, that region fills the pool, so
    # `again`'s region is released when it dies, and release_pool frees the other one.
    assert pinned.registered_alloc((4, 1 << 19), torch.float32, cudart=FakeCudart()).data_ptr() != ptr
    del again
    gc.collect()
    assert pinned.release_pool() == region
    assert cudart.unregistered == [other, ptr] and not mapped(ptr) and pinned.kept_bytes() == 0


@linux_only
def test_a_failed_registration_names_the_bytes_and_unmaps():
    cudart = FakeCudart(fail=2)
    with pytest.raises(RuntimeError, match=r"cudaHostRegister of 8388608 bytes .*fake: out of memory"):
        pinned.registered_alloc((170, 3, 128, 64), torch.bfloat16, cudart=cudart)
    assert len(cudart.registered) == 1
    ptr = cudart.registered[0][0]
    assert cudart.unregistered == []
    assert not mapped(ptr)


@pytest.mark.parametrize("advice", [None, 0x7FFF])  # missing constant; one madvise rejects (EINVAL)
def test_no_huge_pages_is_a_debug_note_not_an_error(monkeypatch, caplog, advice):
    monkeypatch.setattr(pinned, "_noted", set())
    if advice is None:
        monkeypatch.delattr(mmap, "MADV_HUGEPAGE", raising=False)
    else:
        monkeypatch.setattr(mmap, "MADV_HUGEPAGE", advice, raising=False)
    with caplog.at_level(logging.DEBUG, logger="memllm.context.pinned"):
        t = pinned.registered_alloc((2, 1 << 20), torch.float32, cudart=FakeCudart())
    assert bool((t == 0).all())
    notes = [r for r in caplog.records if "MADV_HUGEPAGE" in r.getMessage()]
    assert notes and all(r.levelno == logging.DEBUG for r in notes)


@pytest.mark.parametrize("dtype", ["bf16", "int8"])
def test_a_store_on_registered_memory_reads_back_as_a_plain_one(dtype):
    cudart = FakeCudart()
    k, v, r = units(2 * SEG + 3)
    plain = make_store(dtype)
    alloc = functools.partial(pinned.registered_alloc, cudart=cudart)
    reg = UnitStore(H, B, D, R, dtype, torch.device("cpu"), segment_units=SEG, host_alloc=alloc)
    fill_and_compare(plain, reg, k, v, r)
    names = len(reg.segments[0])
    first = [thread for *_, thread in cudart.registered[:names]]
    assert first == [threading.current_thread().name] * names  # the first segment: in this thread
    assert all(t.startswith("memllm-pin") for *_, t in cudart.registered[names:])  # the rest: workers
    ptrs = {t.data_ptr() for seg in reg.segments for t in seg.values()}
    assert ptrs <= {p for p, *_ in cudart.registered}


@pytest.mark.parametrize(
    ("choice", "usable", "expected"),
    [
        ("registered_alloc", True, "registered_alloc"),
        ("registered_alloc", False, "pinned_empty"),
        ("registered_alloc", None, "pinned_empty"),
        ("pinned_empty", True, "pinned_empty"),
    ],
)
def test_cuda_stores_take_the_module_default(monkeypatch, choice, usable, expected):
    monkeypatch.setattr(pinned, "CUDA_HOST_ALLOC", getattr(pinned, choice))
    monkeypatch.setattr(pinned, "host_pointers_usable", lambda: usable)
    assert pinned.default_host_alloc() is getattr(pinned, expected)
    store = UnitStore(H, B, D, R, "bf16", torch.device("cuda"), segment_units=SEG)  # allocates nothing yet
    assert store._prefetch is not None and store._prefetch.alloc is getattr(pinned, expected)


@pytest.mark.gpu
def test_registered_memory_is_pinned_and_takes_async_copies(caplog):
    assert pinned.host_pointers_usable() is True  # the UVA gather reads registered memory by host address
    assert pinned.default_host_alloc() is pinned.registered_alloc
    t = pinned.registered_alloc((170, 3, 128, 64), torch.bfloat16)
    assert t.is_pinned()  # torch asks the driver (cudaPointerGetAttributes): registered memory is host-pinned
    src = torch.randn(170, 3, 128, 64, device="cuda").to(torch.bfloat16)
    t.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    torch.testing.assert_close(t, src.cpu(), rtol=0, atol=0)
    back = t.to("cuda", non_blocking=True)
    torch.testing.assert_close(back, src, rtol=0, atol=0)
    torch.cuda.synchronize()
    with caplog.at_level(logging.WARNING, logger="memllm.context.pinned"):
        del t
        gc.collect()
    assert not [r for r in caplog.records if "cudaHostUnregister" in r.getMessage()]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bf16", "int8"])
def test_registered_smollm2_segments_gather_as_the_reference(dtype):
    from memllm.context.cuda.gather import gather_units_uva

    h, b, d = 3, 128, 64  # SmolLM2: default segments of 8 MiB (bf16) take the 2 MiB-page path
    store = UnitStore(h, b, d, 4, dtype, torch.device("cuda"))
    assert store._prefetch is not None and store._prefetch.alloc is pinned.registered_alloc
    n = 2 * store.segment_units + 5
    gen = torch.Generator(device="cuda").manual_seed(0)
    k = torch.randn(n, h, b, d, device="cuda", generator=gen).to(torch.bfloat16)
    v = torch.randn(n, h, b, d, device="cuda", generator=gen).to(torch.bfloat16)
    store.append_many(k[:7], v[:7], k[:7, :, :4])
    store.append_many(k[7:], v[7:], k[7:, :, :4])
    assert len(store.segments) == 3
    assert all(t.is_pinned() for seg in store.segments for t in seg.values())
    ids = torch.randint(0, n, (2, h, 40), device="cuda", generator=gen)
    ids[0, :, :3] = torch.tensor([0, store.segment_units, n - 1], device="cuda")  # every segment
    fast = gather_units_uva(store, ids, torch.bfloat16)
    ref = store.gather_reference(ids, torch.bfloat16)
    for a, c in zip(fast, ref, strict=True):
        torch.testing.assert_close(a, c, rtol=0, atol=0)
    if dtype == "bf16":  # the stored units are the appended ones
        heads = torch.arange(h, device="cuda")[None, :, None]
        want = k[ids, heads].reshape(2, h, 40 * b, d)
        torch.testing.assert_close(ref[0], want, rtol=0, atol=0)
