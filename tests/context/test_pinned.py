"""Segments allocated one ahead in background threads (pinned.py): timing, layout, errors, contents.

A fake slow allocator stands in for cudaHostAlloc, so these run on the CPU; the `gpu` tests use the
real pinned allocator and the gather kernel's stable address tables (uva.py).
"""

from __future__ import annotations

import gc
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


@pytest.mark.parametrize("dtype", ["bf16", "int8"])
def test_units_read_back_as_in_a_store_without_prefetch(dtype):
    k, v, r = units(2 * SEG + 3)
    plain, ahead = make_store(dtype), make_store(dtype, FakeAlloc(delay=0.0))
    for store in (plain, ahead):
        store.append_many(k[:3], v[:3], r[:3])
        for i in range(3, k.shape[0]):
            store.append(k[i], v[i], r[i])
    for i in range(k.shape[0]):
        for a, b in zip(plain.host_unit(i, torch.float32), ahead.host_unit(i, torch.float32), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
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
    from memllm.context.gather import gather_units
    from memllm.context.uva import TABLE_CAPACITY, _Tables

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
