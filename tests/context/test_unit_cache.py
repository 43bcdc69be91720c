"""The device unit cache (context/unit_cache.py, MemoryConfig.device_unit_cache).

The cache itself: a scripted sequence of selections gives the hits, misses, evictions and resident
units an LRU per KV head gives (by hand, and against an OrderedDict LRU on random one-id gathers);
never more than its slots; every slot holds its unit's K/V; a gather's output is the plain gather's;
a batch's planning (one over stacked tables) leaves each store's cache as its own gathers would;
forgotten units (truncate) are dropped, so units cut after a rollback never read stale slots.
With a model: decoding with the cache on gives the logits and lookups of decoding with it off (a
session alone, plain and static steps, a batch of sessions of different lengths, both batched paths),
a session leaving a batch frees its pools, and a rewind or rollback followed by other text reads the
new units. The CUDA gather (cuda/gather.py, CACHED) against the reference: the `gpu` tests at the end.
"""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch

from memllm.config import MemoryConfig
from memllm.context import attach, unit_cache
from memllm.context.kernels import TorchKernels, gather_units
from memllm.context.prefill import feed, greedy, step
from memllm.context.unit_cache import UnitCache
from memllm.context.units import UnitStore
from memllm.engine import BatchEngine
from memllm.errors import ConfigError
from memllm.session import Session
from tests.context.helpers import CharTokenizer, FakeLLM, small_memory, tiny_model
from tests.context.test_batch import LENGTHS, TEXT, Recorder, alone, batched_equals_alone
from tests.context.test_static import decode

KVH, BS, D = 2, 4, 8


def make_store(n: int, slots: int, seed: int = 0, dtype: str = "fp32", device: str = "cpu") -> UnitStore:
    """A store of n random units with a cache of `slots` slots per KV head."""
    dev = torch.device(device)
    store = UnitStore(
        KVH, BS, D, 2, dtype, dev, segment_units=4, unit_cache=UnitCache(KVH, BS, D, slots, dev)
    )
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        k = torch.randn(KVH, BS, D, generator=gen).to(dev)
        store.append(k, torch.randn(KVH, BS, D, generator=gen).to(dev), k[:, :2])
    return store


def resident(cache: UnitCache) -> list[set[int]]:
    """The units each KV head's slots hold."""
    return [{u for u in row if u >= 0} for row in cache.table[0].tolist()]


def counted(cache: UnitCache) -> tuple[int, int, int]:
    return tuple(cache.meta[1:].tolist())


def gathered(store: UnitStore, ids: list[list[int]], kernels: TorchKernels | None = None) -> None:
    """One lookup's gather of ids (per KV head) through the cache; its output is the plain gather's."""
    t = torch.tensor([ids])
    got = (kernels or TorchKernels("reference")).gather_selected(store, t, torch.float32)
    want = gather_units(store, t, torch.float32, "reference")
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def assert_consistent(store: UnitStore) -> None:
    """At most `capacity` units per head, each once, and every slot holds its unit's K/V."""
    cache = store.unit_cache
    assert cache.table.shape == (2, KVH, cache.capacity)
    assert cache.pool_k.shape == (KVH, cache.capacity, BS, D)
    for h, row in enumerate(cache.table[0].tolist()):
        units = [u for u in row if u >= 0]
        assert len(units) == len(set(units)) <= cache.capacity
        assert all(u < store.n_units for u in units)
        for slot, u in enumerate(row):
            if u >= 0:
                k, v = store.host_unit(u, torch.float32)
                torch.testing.assert_close(cache.pool_k[h, slot], k[h], rtol=0, atol=0)
                torch.testing.assert_close(cache.pool_v[h, slot], v[h], rtol=0, atol=0)


def test_a_scripted_sequence_counts_hits_misses_and_evictions():
    """3 slots; the same ids for both KV heads (a "shared" lookup), so each count is twice one head's."""
    store = make_store(8, slots=3)
    cache = store.unit_cache
    script = [  # ids, then one head's (hits, misses, evictions) so far and what is resident after
        ([0], (0, 1, 0), {0}),
        ([1], (0, 2, 0), {0, 1}),
        ([2], (0, 3, 0), {0, 1, 2}),
        ([0], (1, 3, 0), {0, 1, 2}),  # 0 used again: 1 is now the least recently used
        ([3], (1, 4, 1), {0, 2, 3}),
        ([2, 0], (3, 4, 1), {0, 2, 3}),  # 3 is the least recently used
        ([1], (3, 5, 2), {0, 1, 2}),
        ([3, 4, 5], (3, 8, 5), {3, 4, 5}),  # three misses evict all three
        ([5, 5, 3], (5, 8, 5), {3, 4, 5}),  # a repeated id counts once
        ([6, 5, 6], (6, 9, 6), {3, 5, 6}),  # a hit is never evicted by the same gather's miss
    ]
    for ids, (hits, misses, evictions), held in script:
        gathered(store, [ids, ids])
        assert counted(cache) == (2 * hits, 2 * misses, 2 * evictions), ids
        assert resident(cache) == [held, held], ids
        assert_consistent(store)
    assert cache.meta[0].item() == len(script)  # the clock: one tick per gather


def test_heads_keep_their_own_lru():
    """Per-head lookups: each KV head's slots follow its own ids."""
    store = make_store(8, slots=2)
    for ids in ([[0], [5]], [[1], [5]], [[2], [5]], [[0], [6]]):
        gathered(store, ids)
    assert resident(store.unit_cache) == [{2, 0}, {5, 6}]
    assert counted(store.unit_cache) == (2, 6, 2)  # head 1's 5 hit twice; head 0 evicted 0, then 1


def test_one_id_gathers_match_an_lru_model():
    """Random one-id gathers per head against an OrderedDict LRU: the same resident units and counts."""
    slots, n = 3, 7
    store = make_store(n, slots=slots, seed=1)
    lru = [OrderedDict() for _ in range(KVH)]
    want = [0, 0, 0]
    gen = torch.Generator().manual_seed(2)
    for _ in range(60):
        ids = torch.randint(0, n, (KVH,), generator=gen).tolist()
        for h, u in enumerate(ids):
            if u in lru[h]:
                want[0] += 1
                lru[h].move_to_end(u)
                continue
            want[1] += 1
            if len(lru[h]) == slots:
                lru[h].popitem(last=False)
                want[2] += 1
            lru[h][u] = True
        gathered(store, [[u] for u in ids])
        assert resident(store.unit_cache) == [set(x) for x in lru]
        assert counted(store.unit_cache) == tuple(want)
    assert want[0] > 10 and want[2] > 10


def test_random_gathers_keep_the_cache_consistent():
    """Gathers of several ids, repeats among them: capacity respected, slots hold their units, outputs
    equal the plain gather (checked in `gathered`); impl "fast" (the CPU gather) as well."""
    store = make_store(9, slots=4, seed=3)
    gen = torch.Generator().manual_seed(4)
    for i in range(40):
        t = int(torch.randint(1, 5, (1,), generator=gen))
        ids = torch.randint(0, 9, (KVH, t), generator=gen).tolist()
        gathered(store, ids, TorchKernels("fast" if i % 2 else "reference"))
        assert_consistent(store)
    hits, misses, _ = counted(store.unit_cache)
    assert hits > 0 and misses > 0


def test_gathers_of_several_lookups_bypass_the_cache():
    """Ids of several rows (a prefill chunk's execution blocks) or more ids than slots: read from host
    memory, the cache untouched."""
    store = make_store(8, slots=2)
    kern = TorchKernels("reference")
    for ids in (torch.tensor([[[0, 1], [0, 1]], [[2, 3], [2, 3]]]), torch.tensor([[[0, 1, 2], [0, 1, 2]]])):
        got = kern.gather_selected(store, ids, torch.float32)
        want = gather_units(store, ids, torch.float32, "reference")
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    assert store.unit_cache.pool_k is None and counted(store.unit_cache) == (0, 0, 0)


def test_truncated_units_leave_the_cache_and_new_units_are_read():
    """Units forgotten by truncate (a rollback) are dropped from the slots; units cut after it, at the
    same ids, are read from host memory (never the old slot's K/V); load_state drops every slot."""
    store = make_store(7, slots=3)
    gathered(store, [[4, 5, 6], [4, 5, 6]])
    store.truncate(5)
    assert resident(store.unit_cache) == [{4}, {4}]
    gen = torch.Generator().manual_seed(9)
    for _ in range(2):  # other units at ids 5 and 6
        k = torch.randn(KVH, BS, D, generator=gen)
        store.append(k, torch.randn(KVH, BS, D, generator=gen), k[:, :2])
    gathered(store, [[4, 5, 6], [4, 5, 6]])  # equal to the plain gather of the new units
    assert counted(store.unit_cache) == (2, 10, 0)  # 5 and 6 go to the dropped (empty) slots
    assert_consistent(store)
    store.load_state(store.state())
    assert resident(store.unit_cache) == [set(), set()]


def test_a_batch_planned_at_once_leaves_each_store_as_its_own_gathers():
    """gather_units_stores (a batch's stacked rows: one planning over the stacked tables) gives each row
    the plain gather of its store, and each store's cache what gathers of its own row would leave."""
    gen = torch.Generator().manual_seed(5)
    sizes = (6, 9, 12)
    batched = [make_store(n, slots=3, seed=n) for n in sizes]
    single = [make_store(n, slots=3, seed=n) for n in sizes]
    kern = TorchKernels("fast")
    for _ in range(12):
        ids = torch.stack([torch.randint(0, n, (KVH, 3), generator=gen) for n in sizes])
        got_k, got_v = kern.gather_units_stores(batched, ids, torch.float32)
        for i, s in enumerate(single):
            want_k, want_v = kern.gather_selected(s, ids[i : i + 1], torch.float32)
            torch.testing.assert_close(got_k[i : i + 1], want_k, rtol=0, atol=0)
            torch.testing.assert_close(got_v[i : i + 1], want_v, rtol=0, atol=0)
    for a, b in zip(batched, single, strict=True):
        assert torch.equal(a.unit_cache.table, b.unit_cache.table)
        assert torch.equal(a.unit_cache.meta, b.unit_cache.meta)
        assert_consistent(a)


def test_config_switch():
    """Off by default (no cache, stats unchanged); on, one cache of max_cached_blocks slots per layer."""
    assert MemoryConfig().device_unit_cache is False
    with pytest.raises(ConfigError, match="MemoryConfig.device_unit_cache"):
        MemoryConfig(device_unit_cache="yes")
    model = tiny_model("llama")
    off = Session(FakeLLM(model, CharTokenizer()), small_memory())
    assert off.cache.unit_caches() == [] and "unit_cache" not in off.stats()
    on = Session(FakeLLM(model, CharTokenizer()), small_memory(device_unit_cache=True, max_cached_blocks=5))
    caches = on.cache.unit_caches()
    assert len(caches) == 2 and all(c.capacity == 5 for c in caches)
    assert on.stats()["unit_cache"] == {"hits": 0, "misses": 0, "evictions": 0, "resident": 0,
                                        "capacity": 2 * 2 * 5, "hit_rate": None}  # fmt: skip
    default = Session(FakeLLM(model, CharTokenizer()), small_memory(device_unit_cache=True))
    assert default.cache.unit_caches()[0].capacity == 2 * default.config.topk


# ---- with a model ----------------------------------------------------------------------------------


def session(model, on: bool, n: int, **mem) -> Session:
    s = Session(FakeLLM(model, CharTokenizer()), small_memory(device_unit_cache=on, **mem))
    s.feed(TEXT[:n])
    return s


@pytest.mark.parametrize("mem", [{}, {"lookup": "per_head", "max_cached_blocks": 4}, {"impl": "reference"}])
def test_session_decode_with_the_cache_equals_without(mem):
    """A session decoding alone: the same tokens, logits and lookups with the cache on as off; every
    lookup of the steps counted as hits + misses; an ask answers alike, its probe bypassing the cache."""
    model = tiny_model("llama")
    off, on = session(model, False, 700, **mem), session(model, True, 700, **mem)
    fetched = on.stats()["units_fetched"]
    want, got = alone(off, 12), alone(on, 12)
    assert got[0] == want[0] and got[2] == want[2]
    for a, b in zip(got[1], want[1], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    stats = on.stats()
    counts = stats["unit_cache"]
    assert counts["hits"] + counts["misses"] == stats["units_fetched"] - fetched
    assert counts["hits"] > 0 and counts["evictions"] > 0
    assert counts["resident"] <= counts["capacity"]
    assert stats["device_bytes"] == stats["device_bytes_window"] + stats["device_bytes_index"] + stats[
        "device_bytes_unit_cache"]  # fmt: skip
    assert on.ask("qz?", max_new_tokens=4) == off.ask("qz?", max_new_tokens=4)
    after = on.stats()  # the answer's lookups counted; the question's probe bypassed the cache
    looked = after["unit_cache"]["hits"] + after["unit_cache"]["misses"] - counts["hits"] - counts["misses"]
    assert looked == after["units_fetched"] - stats["units_fetched"] > 0


@pytest.mark.parametrize("lookup,offload", [("shared", "fp32"), ("per_head", "int8")])
def test_static_decode_with_the_cache_equals_plain_without(lookup, offload):
    """The static step (what a CUDA graph replays; here eager) reads units through the cache: its logits
    and lookups are the plain path's without the cache, and the caches end as the plain path's with it."""
    model = tiny_model("llama")
    ids = torch.randint(1, 500, (1, 160), generator=torch.Generator().manual_seed(3))
    mem = {"lookup": lookup, "offload_dtype": offload}
    want, _, _, want_log = decode(model, small_memory(**mem), ids, static=False)
    got, cache, graph, got_log = decode(model, small_memory(device_unit_cache=True, **mem), ids, static=True)
    plain_on = decode(model, small_memory(device_unit_cache=True, **mem), ids, static=False)[1]
    assert graph.steps > 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got_log == want_log
    for a, b in zip(cache.unit_caches(), plain_on.unit_caches(), strict=True):
        assert torch.equal(a.table, b.table) and torch.equal(a.meta, b.meta)
    assert cache.stats()["unit_cache"]["hits"] > 0


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_batched_decode_with_the_cache_equals_each_session_alone_without(impl):
    """Sessions of different lengths decoding together with the cache on: each one's tokens, logits and
    lookups are what it gives alone with the cache off; each session's caches end as they do when it
    decodes alone with the cache on; a session leaving frees its pools."""
    model = tiny_model("llama")
    steps = 10
    want = [alone(session(model, False, n), steps) for n in LENGTHS]
    solo = [session(model, True, n) for n in LENGTHS]
    for s in solo:
        alone(s, steps)
    sessions = [session(model, True, n) for n in LENGTHS]
    engine = BatchEngine(FakeLLM(model, CharTokenizer()), impl)
    reqs = [engine.join(s, max_new_tokens=steps, stop=set()) for s in sessions]
    rec = Recorder(engine)
    tables = []
    while engine.active:
        if len(rec.logits.get(id(reqs[-1]), [])) == steps - 1:  # before the last step: caches in use
            tables = [[c.table.clone() for c in s.cache.unit_caches()] for s in sessions]
        rec.step()
    assert (engine.stacked_rows > 0) == (impl == "fast")
    for r, (toks, logits, lookups) in zip(reqs, want, strict=True):
        assert r.tokens == toks and rec.lookups[id(r)] == lookups
        for a, b in zip(rec.logits[id(r)], logits, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for s, ref, held in zip(sessions, solo, tables, strict=True):
        for c, rc in zip(s.cache.unit_caches(), ref.cache.unit_caches(), strict=True):
            assert torch.equal(c.meta, rc.meta)  # the same hits, misses, evictions
            assert c.pool_k is None and (c.table[0] == -1).all()  # left: pools freed, slots dropped
        assert any((t[0] >= 0).any() for t in held) == (s.cache.seen_tokens > 60)
    assert sum(s.stats()["unit_cache"]["hits"] for s in sessions) > 0


def test_rewind_and_rollback_never_read_stale_units():
    """Units cached, the stream rewound (Session.mark/rewind) below them, other text fed (new units at
    the same ids) and decoded: the logits of a session that only ever read the second text, cache off.
    The same with the cache's own checkpoint/rollback."""
    model = tiny_model("llama")
    other = TEXT[::-1]
    ref = session(model, False, 300)
    ref.feed(other[:200])
    want = alone(ref, 8)
    s = session(model, True, 300)
    mark = s.mark()
    s.feed(TEXT[300:500])
    alone(s, 8)  # units 31.. cut and cached
    assert any((c.table[0] >= mark[0][0]["n_units"]).any() for c in s.cache.unit_caches())
    s.rewind(mark)
    assert all((c.table[0] < s.cache.layers[0].store.n_units).all() for c in s.cache.unit_caches())
    s.feed(other[:200])
    got = alone(s, 8)
    assert got[0] == want[0] and got[2] == want[2]
    for a, b in zip(got[1], want[1], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    mem = small_memory(device_unit_cache=True)
    ids = torch.randint(1, 500, (1, 400), generator=torch.Generator().manual_seed(8))
    alt = torch.randint(1, 500, (1, 400), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        with attach(model, small_memory()) as plain:
            feed(model, plain, ids[:, :200])
            feed(model, plain, alt[:, 200:])
            want = [step(model, plain, alt[:, i : i + 1]) for i in range(200, 208)]
        with attach(model, mem) as cache:
            feed(model, cache, ids[:, :200])
            cp = cache.checkpoint()
            feed(model, cache, ids[:, 200:])
            for i in range(200, 208):
                step(model, cache, ids[:, i : i + 1])
            cache.rollback(cp)
            feed(model, cache, alt[:, 200:])
            got = [step(model, cache, alt[:, i : i + 1]) for i in range(200, 208)]
    torch.testing.assert_close(torch.stack(got), torch.stack(want), rtol=0, atol=0)


# ---- CUDA (for the next GPU run: skipped without a device) -------------------------------------------
# The kernel tests are also marked `triton`: without a device, under TRITON_INTERPRET=1 (triton
# installed), they run the same kernel on CPU stores (fp32 output: the interpreter rounds to bf16
# otherwise than the device does, for the plain gather too).

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA graphs and pinned memory need CUDA"
)
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OUT_DTYPE = torch.bfloat16 if torch.cuda.is_available() else torch.float32


def reference_read(
    store: UnitStore, ids: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    return gather_units(store, ids, dtype, "reference")


def random_lookup(gen: torch.Generator, n: int, per_head: bool) -> torch.Tensor:
    """(1, kv_heads, t) ids of one lookup, 1 <= t <= 4, repeats possible; shared: one row expanded."""
    t = int(torch.randint(1, 5, (1,), generator=gen))
    ids = torch.randint(0, n, (1, KVH if per_head else 1, t), generator=gen)
    return ids.expand(1, KVH, t).to(KERNEL_DEVICE)


@pytest.mark.gpu
@pytest.mark.triton
@pytest.mark.parametrize("dtype_name", ["bf16", "int8"])
@pytest.mark.parametrize("per_head", [False, True])
def test_cuda_cached_gather_equals_the_reference(dtype_name, per_head):
    """cuda/gather.gather_cached_uva (hits from the pool, misses from pinned host memory and installed,
    one launch) against the reference cached gather on the same sequence: the same outputs (exactly),
    slot tables, counters and pool contents."""
    from memllm.context.cuda.gather import gather_cached_uva

    fast, ref = (make_store(11, 4, seed=6, dtype=dtype_name, device=KERNEL_DEVICE) for _ in range(2))
    gen = torch.Generator().manual_seed(7)
    for _ in range(30):
        ids = random_lookup(gen, 11, per_head)
        got = gather_cached_uva(fast, ids, OUT_DTYPE)
        want = unit_cache.gather_cached(ref, ids, OUT_DTYPE, reference_read)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert torch.equal(fast.unit_cache.table, ref.unit_cache.table)
        assert torch.equal(fast.unit_cache.meta, ref.unit_cache.meta)
    torch.testing.assert_close(fast.unit_cache.pool_k, ref.unit_cache.pool_k, rtol=0, atol=0)
    torch.testing.assert_close(fast.unit_cache.pool_v, ref.unit_cache.pool_v, rtol=0, atol=0)
    assert counted(fast.unit_cache)[0] > 0 and counted(fast.unit_cache)[2] > 0


def gather_equals_each_store(gather, fast: list, ref: list, sizes, gen: torch.Generator) -> None:
    """One StoresGather call over `fast` (random ids, row i within sizes[i]) equals, row by row, the
    reference cached gather of the same row's store in `ref`."""
    ids = torch.stack([torch.randint(0, n, (KVH, 3), generator=gen) for n in sizes]).to(KERNEL_DEVICE)
    got_k, got_v = gather(fast, ids, OUT_DTYPE)
    for i, s in enumerate(ref):
        want_k, want_v = unit_cache.gather_cached(s, ids[i : i + 1], OUT_DTYPE, reference_read)
        torch.testing.assert_close(got_k[i : i + 1], want_k, rtol=0, atol=0)
        torch.testing.assert_close(got_v[i : i + 1], want_v, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.triton
@pytest.mark.parametrize("dtype_name", ["bf16", "int8"])
def test_cuda_stores_gather_through_caches_equals_the_reference(dtype_name):
    """cuda/gather.StoresGather with the stores' caches (one planning, one launch over every store) against
    the reference cached gather of each store: outputs, tables and counters equal, step after step."""
    from memllm.context.cuda.gather import StoresGather

    sizes = (6, 9, 13)
    fast = [make_store(n, 3, seed=n, dtype=dtype_name, device=KERNEL_DEVICE) for n in sizes]
    ref = [make_store(n, 3, seed=n, dtype=dtype_name, device=KERNEL_DEVICE) for n in sizes]
    gather = StoresGather()
    gen = torch.Generator().manual_seed(8)
    for _ in range(20):
        gather_equals_each_store(gather, fast, ref, sizes, gen)
    for a, b in zip(fast, ref, strict=True):
        assert torch.equal(a.unit_cache.table, b.unit_cache.table)
        assert torch.equal(a.unit_cache.meta, b.unit_cache.meta)
    assert gather.joins == 1


@pytest.mark.gpu
@pytest.mark.triton
def test_stores_gather_takes_another_store_in_place():
    """A row's store replaced by another's (a session joining as another leaves, BatchCache.swap): the
    joined segment tables, the offsets and the caches' stacked address tables are written in place (the
    tensors a captured graph reads stay), and every row's gather equals the reference cached gather of
    its own store, before and after."""
    from memllm.context.cuda.gather import StoresGather

    sizes = [6, 9, 13]
    fast = [make_store(n, 3, seed=n, device=KERNEL_DEVICE) for n in sizes]
    ref = [make_store(n, 3, seed=n, device=KERNEL_DEVICE) for n in sizes]
    gather = StoresGather()
    gen = torch.Generator().manual_seed(9)
    tensors = None
    for i_step in range(12):
        if i_step == 6:  # row 1 is another session's now
            sizes[1] = 11
            fast[1], ref[1] = (make_store(11, 3, seed=99, device=KERNEL_DEVICE) for _ in range(2))
        gather_equals_each_store(gather, fast, ref, sizes, gen)
        if i_step == 5:
            tensors = [t.data_ptr() for t in (*gather.joined.values(), gather.base, gather.kept["tables"],
                                              gather.kept["pools"])]  # fmt: skip
    assert gather.joins == 2 and gather.made == 1
    assert tensors == [t.data_ptr() for t in (*gather.joined.values(), gather.base, gather.kept["tables"],
                                              gather.kept["pools"])]  # fmt: skip


@pytest.mark.gpu
@needs_cuda
def test_cuda_sessions_with_the_cache_equal_without():
    """On CUDA: a session decoding alone through its captured decode graph, and sessions batched (the
    stacked step), give the same tokens and lookups with the cache on as off (logits within fp32
    rounding); the graph replays the cache's planning (hits counted across replays); decoding (replays,
    and the plain steps that cut a unit) makes no host synchronisation."""
    model = tiny_model("llama").cuda()
    want = alone(session(model, False, 700), 12)
    on = session(model, True, 700)
    got = alone(on, 12)
    assert got[0] == want[0] and got[2] == want[2]
    for a, b in zip(got[1], want[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    graph = on.cache.decode_graph()
    assert graph is not None and graph.replays > 0
    assert on.stats()["unit_cache"]["hits"] > 0
    with attach(model, cache=on.cache), torch.no_grad():
        _, logits = greedy(model, on.cache, on.last_logits, 3)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:  # replays, and the plain steps that cut a unit (the cached gather: device planning only)
            greedy(model, on.cache, logits, 20)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    wants = [alone(session(model, False, n), 6) for n in (700, 300, 60)]
    engine = BatchEngine(FakeLLM(model, CharTokenizer()), "fast")
    batched_equals_alone(engine, [session(model, True, n) for n in (700, 300, 60)], wants, 6, 1e-3)
