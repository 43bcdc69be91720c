"""CUDA fast path of the unit gather: a Triton kernel reads selected units straight from pinned host memory.

Pinned host memory is mapped into the device's unified address space, so the kernel dereferences a
table of segment base addresses (a small device tensor) by device-side unit ids: no .item(), .cpu() or
nonzero, no host synchronisation. The table has room for `TABLE_CAPACITY` segments, doubled when
exceeded: only then is it a new tensor (`_Tables.capacity_version`), so a captured CUDA graph can keep
its address while segments are added; new entries are copied in place, old ones are never rewritten.
int8 units are dequantized in the kernel. `write_units_uva` is the other direction: a static call
(static.py) writes the units it cuts at device-side ids, so the call can be replayed as a graph. `gather_units_reference` (units.py) is the plain-PyTorch version the tests compare with.
With the device unit cache on (MemoryConfig.device_unit_cache, unit_cache.py), a lookup's gather
(`gather_cached_uva`; a batch's, StoresGather) is planned on the device by _plan_kernel (one
launch, a program per cache: unit_cache.plan_slots, its reference, was ~70 PyTorch launches per
layer and a stack of every cache's table, GPU run 39) and then the same kernel runs with CACHED:
each entry reads its pool slot (a hit) or its host unit (a miss, the only PCIe read), and a miss
also writes its unit to its pool slot, through a table of the pools' addresses (one row per store). unit_cache.gather_cached is its reference.
Knows nothing of lookup or attention. Imported only on CUDA (needs triton).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from memllm.context.cuda.lookup import DISTINCT_MAX, distinct_pairs_cuda
from memllm.context.gather import distinct_pairs
from memllm.context.unit_cache import NEVER, UnitCache, serves
from memllm.context.units import UnitStore

TL_DTYPES = {
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
    torch.float32: tl.float32,
    torch.int8: tl.int8,
}


@triton.jit(do_not_specialize=["t"])
def _gather_kernel(
    ids_ptr,  # (rows * kv_heads * t,) int64 unit ids; DEDUP: (n,) int64 keys unit * KV_HEADS + head
    count_ptr,  # DEDUP: (1,) int64, how many of the keys are real (the rest are not read)
    k_table,  # (segments,) int64 base addresses of K segments
    v_table,
    ks_table,  # int8 only: key scales (segment_units, kv_heads, 1, head_dim) fp32
    vs_table,  # int8 only: value scales (segment_units, kv_heads, block, 1) fp32
    out_k,  # (rows, kv_heads, t, block, head_dim); DEDUP: (n, block, head_dim)
    out_v,
    t,
    source_ptr,  # CACHED: (rows * kv_heads * t,) int64: the pool slot to read, or -1 (host memory)
    install_ptr,  # CACHED: (rows * kv_heads * t,) int64: the pool slot a miss writes to, or -1
    pool_table,  # CACHED: (rows, 2) int64: each row's pool_k, pool_v base addresses
    KV_HEADS: tl.constexpr,
    SEG_UNITS: tl.constexpr,
    BLOCK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    SRC_DTYPE: tl.constexpr,
    QUANT: tl.constexpr,
    CHUNK: tl.constexpr,
    DEDUP: tl.constexpr = False,
    CACHED: tl.constexpr = False,
    CAPACITY: tl.constexpr = 1,  # CACHED: slots per KV head of a pool (kv_heads, CAPACITY, block, head_dim)
):
    pid = tl.program_id(0)  # one (row, kv head, selected unit); DEDUP: one distinct (unit, head)
    part = tl.program_id(1)  # one CHUNK of the unit's block * head_dim elements
    elems: tl.constexpr = BLOCK * HEAD_DIM
    offs = part * CHUNK + tl.arange(0, CHUNK)
    mask = offs < elems
    if DEDUP:
        key = tl.load(ids_ptr + pid)
        u = key // KV_HEADS
        h = key % KV_HEADS
        mask = mask & (pid < tl.load(count_ptr))
    else:
        h = (pid // t) % KV_HEADS
        u = tl.load(ids_ptr + pid)
    host = mask  # the elements read from host memory (CACHED: a miss's only)
    if CACHED:
        # per element (broadcast here: Triton's interpreter refuses a block mask & a scalar condition)
        slot = offs * 0 + tl.load(source_ptr + pid)
        put = offs * 0 + tl.load(install_ptr + pid)
        row = pid // (KV_HEADS * t)
        pool_k = tl.load(pool_table + 2 * row).to(tl.pointer_type(out_k.dtype.element_ty))
        pool_v = tl.load(pool_table + 2 * row + 1).to(tl.pointer_type(out_v.dtype.element_ty))
        host = mask & (slot < 0)
    seg = u // SEG_UNITS
    off = u % SEG_UNITS
    src_off = (off * KV_HEADS + h) * elems
    k_src = tl.load(k_table + seg).to(tl.pointer_type(SRC_DTYPE))
    v_src = tl.load(v_table + seg).to(tl.pointer_type(SRC_DTYPE))
    k = tl.load(k_src + src_off + offs, mask=host, other=0.0).to(tl.float32)
    v = tl.load(v_src + src_off + offs, mask=host, other=0.0).to(tl.float32)
    if QUANT:
        ks = tl.load(ks_table + seg).to(tl.pointer_type(tl.float32))
        vs = tl.load(vs_table + seg).to(tl.pointer_type(tl.float32))
        k = k * tl.load(ks + (off * KV_HEADS + h) * HEAD_DIM + offs % HEAD_DIM, mask=host, other=0.0)
        v = v * tl.load(vs + (off * KV_HEADS + h) * BLOCK + offs // HEAD_DIM, mask=host, other=0.0)
    k = k.to(out_k.dtype.element_ty)
    v = v.to(out_v.dtype.element_ty)
    if CACHED:  # a hit reads its pool slot; a miss writes what it read from host memory to its slot
        hit = mask & (slot >= 0)
        k = tl.where(hit, tl.load(pool_k + (h * CAPACITY + slot) * elems + offs, mask=hit, other=0.0), k)
        v = tl.where(hit, tl.load(pool_v + (h * CAPACITY + slot) * elems + offs, mask=hit, other=0.0), v)
        fill = mask & (put >= 0)
        tl.store(pool_k + (h * CAPACITY + put) * elems + offs, k, mask=fill)
        tl.store(pool_v + (h * CAPACITY + put) * elems + offs, v, mask=fill)
    dst = pid * elems + offs
    tl.store(out_k + dst, k, mask=mask)
    tl.store(out_v + dst, v, mask=mask)


@triton.jit
def _write_kernel(
    first_ptr,  # (1,) int64: the first unit written
    k_table,  # (segments,) int64 base addresses of K segments
    v_table,
    src_k,  # (n, kv_heads, block, head_dim), contiguous
    src_v,
    SEG_UNITS: tl.constexpr,
    KV_HEADS: tl.constexpr,
    ELEMS: tl.constexpr,  # block * head_dim
    DST_DTYPE: tl.constexpr,
    CHUNK: tl.constexpr,
):
    pid = tl.program_id(0)  # one (unit, kv head): the rows of src in order
    part = tl.program_id(1)
    u = tl.load(first_ptr) + pid // KV_HEADS
    seg = u // SEG_UNITS
    dst_off = ((u % SEG_UNITS) * KV_HEADS + pid % KV_HEADS) * ELEMS
    offs = part * CHUNK + tl.arange(0, CHUNK)
    mask = offs < ELEMS
    k_dst = tl.load(k_table + seg).to(tl.pointer_type(DST_DTYPE))
    v_dst = tl.load(v_table + seg).to(tl.pointer_type(DST_DTYPE))
    tl.store(k_dst + dst_off + offs, tl.load(src_k + pid * ELEMS + offs, mask=mask).to(DST_DTYPE), mask=mask)
    tl.store(v_dst + dst_off + offs, tl.load(src_v + pid * ELEMS + offs, mask=mask).to(DST_DTYPE), mask=mask)


TABLE_CAPACITY = 64  # segments a fresh table has room for (per tensor name)


class _Tables:
    """Device tables of segment base addresses for one store: `dev[name]` (capacity,) int64.

    Entries [0, count) hold the addresses of the store's first `count` segments. A refresh after the
    store grew writes entries [count, n) into a pinned host mirror and copies just those, in place and
    stream-ordered, into the same device tensor; entries already written are never changed, so kernels
    in flight read consistent values. Past the capacity (or if the store's segments were replaced by
    fewer) a new table replaces the old one (capacity doubled as needed) and `capacity_version` bumps. Every host
    mirror, the replaced ones too, is kept alive (a few KiB, one per capacity doubling), so no
    asynchronous copy ever reads freed pinned memory.
    """

    def __init__(self) -> None:
        self.version = -1  # store.version the table reflects
        self.count = 0  # segments whose addresses are in the table
        self.capacity = 0
        self.capacity_version = 0  # bumps whenever `dev`'s tensors are replaced
        self.names: list[str] = []
        self.table = torch.empty(0, 0, dtype=torch.int64)  # (names, capacity) int64 on the device
        self.mirrors: list[torch.Tensor] = []  # pinned (names, capacity) int64; the last is current
        self.dev: dict[str, torch.Tensor] = {}

    def refresh(self, store: UnitStore) -> dict[str, torch.Tensor]:
        """The tables, with every segment of `store` in them; copies only entries not yet there."""
        if self.version == store.version:
            return self.dev
        n = len(store.segments)
        names = list(store.segments[0].keys())
        if n > self.capacity or n < self.count or names != self.names:
            self._replace(store, names, n)
        mirror, table = self.mirrors[-1], self.table
        for i, name in enumerate(names):
            mirror[i, self.count : n] = torch.tensor(
                [seg[name].data_ptr() for seg in store.segments[self.count : n]]
            )
            table[i, self.count : n].copy_(mirror[i, self.count : n], non_blocking=True)
        self.count = n
        self.version = store.version
        return self.dev

    def _replace(self, store: UnitStore, names: list[str], n: int) -> None:
        """A new, empty table with room for n segments (TABLE_CAPACITY, doubled as often as needed)."""
        cap = max(TABLE_CAPACITY, self.capacity)
        while cap < n:
            cap *= 2
        self.table = torch.zeros((len(names), cap), dtype=torch.int64, device=store.device)
        self.mirrors.append(torch.zeros((len(names), cap), dtype=torch.int64, pin_memory=store.pin))
        self.dev = {name: self.table[i] for i, name in enumerate(names)}
        self.names, self.capacity, self.count = names, cap, 0
        self.capacity_version += 1


def segment_tables(store: UnitStore) -> dict[str, torch.Tensor]:
    """The store's device tables of segment base addresses (name -> (capacity,) int64), every segment in."""
    if not isinstance(store.kernel_state, _Tables):
        store.kernel_state = _Tables()
    return store.kernel_state.refresh(store)


def gather_units_uva(
    store: UnitStore, ids: torch.Tensor, dtype: torch.dtype, dedup: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """ids (..., kv_heads, t) long on CUDA -> K, V (..., kv_heads, t*block_size, head_dim) in `dtype`, no host sync.

    With several rows of ids (the execution blocks of a call) and `dedup`, each distinct (unit, head)
    is read from host memory once, then copied on the device to every place that chose it:
    consecutive blocks often choose the same units, and host reads are the slow part (PCIe)."""
    lead, (h, t) = ids.shape[:-2], ids.shape[-2:]
    n_rows = ids.numel() // max(h * t, 1)
    bs, d = store.block_size, store.head_dim
    out_k = torch.empty(*lead, h, t * bs, d, dtype=dtype, device=ids.device)
    out_v = torch.empty_like(out_k)
    if t == 0 or n_rows == 0:
        return out_k, out_v
    tables = segment_tables(store)
    dedup = dedup and n_rows > 1
    if dedup:
        flat = ids.reshape(n_rows, h, t)
        keys, count, slot = (
            distinct_pairs_cuda(flat) if flat.numel() <= DISTINCT_MAX else distinct_pairs(flat)
        )
        dst_k = torch.empty(keys.shape[0], bs, d, dtype=dtype, device=ids.device)
        dst_v = torch.empty_like(dst_k)
    else:
        keys, count, dst_k, dst_v = ids.contiguous().reshape(-1), ids, out_k, out_v
    _launch_gather(keys, count, tables, store, dst_k, dst_v, t, h, dedup)
    if dedup:
        torch.index_select(dst_k, 0, slot, out=out_k.view(-1, bs, d))
        torch.index_select(dst_v, 0, slot, out=out_v.view(-1, bs, d))
    return out_k, out_v


def write_units_uva(store: UnitStore, first: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Write n units k, v (n, kv_heads, block, head_dim) on CUDA into the store's segments at units first,
    first + 1, ... (`first` a device scalar) through the segment tables: no host synchronisation. The
    segments must exist (UnitStore.ensure_room); bf16/fp16/fp32 units only."""
    n = k.shape[0]
    if n == 0:
        return
    tables = segment_tables(store)
    elems = store.block_size * store.head_dim
    chunk = 2048
    _write_kernel[(n * store.kv_heads, triton.cdiv(elems, chunk))](
        first.reshape(1),
        tables["k"],
        tables["v"],
        k.contiguous(),
        v.contiguous(),
        SEG_UNITS=store.segment_units,
        KV_HEADS=store.kv_heads,
        ELEMS=elems,
        DST_DTYPE=TL_DTYPES[store.host_dtype],
        CHUNK=chunk,
    )


def gather_units_stores(
    stores: list[UnitStore], ids: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row s of ids (S, kv_heads, t) long on CUDA read from stores[s] -> K, V (S, kv_heads, t*block_size,
    head_dim) in `dtype`: the units of several sessions' stores (one layer of a batch, context/stacked.py)
    in ONE launch, no host synchronisation (StoresGather, once; a caller that gathers again and again
    keeps a StoresGather)."""
    return StoresGather()(stores, ids, dtype)


class StoresGather:
    """gather_units_stores for one caller (a batch's layer), its joined tables kept between calls;
    through the stores' unit caches when they have them (cached_args: one planning over the stores'
    stacked tables, then the same one launch, each row's ids read from its own store's pool or host).

    The stores' segment tables are joined end to end and each row's ids moved by the segments before
    its store's table (ids + offset * segment_units), so the kernel of gather_units_uva reads them
    unchanged. The joined tables and the offsets (uploaded once, from pinned memory) are made again
    only when the stores, or any store's segments (UnitStore.version), changed since the last call:
    per call the host work is one version check per store. The stores must share kv_heads,
    block_size, head_dim, segment_units and offload_dtype (one MemoryConfig)."""

    def __init__(self) -> None:
        self.stores: list[UnitStore] = []
        self.versions: list[int] = []
        self.joined: dict[str, torch.Tensor] = {}
        self.base: torch.Tensor | None = None  # (S,) long: each row's first unit in the joined tables
        self.joins = 0  # times the tables were joined (tests read it)
        self.made = 0  # times the joined tables' tensors were made anew (a graph baked in the last ones)
        self.kept: dict = {}  # the stores' unit caches' address tables (cached_args)

    def __call__(
        self, stores: list[UnitStore], ids: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        first = stores[0]
        n_rows, h, t = ids.shape
        bs, d = first.block_size, first.head_dim
        out_k = torch.empty(n_rows, h, t * bs, d, dtype=dtype, device=ids.device)
        out_v = torch.empty_like(out_k)
        if t == 0 or n_rows == 0:
            return out_k, out_v
        self.current(stores, ids.device)
        gids = (ids + self.base.view(-1, 1, 1)).reshape(-1)  # (S * kv_heads * t,) ids in the joined tables
        cached = cached_args([s.unit_cache for s in stores], ids, dtype, self.kept) if serves(stores, ids) else None
        _launch_gather(gids, gids, self.joined, first, out_k, out_v, t, h, False, cached)
        return out_k, out_v

    def current(self, stores: list[UnitStore], device: torch.device) -> None:
        """The joined tables made again if the stores or their segments changed (a batch's graph step
        calls it before its call, on the current stream, so no warm-up on a side stream makes them)."""
        if not (
            len(stores) == len(self.stores)
            and all(a is b for a, b in zip(stores, self.stores, strict=True))
            and [s.version for s in stores] == self.versions
        ):
            self._join(stores, device)

    def _join(self, stores: list[UnitStore], device: torch.device) -> None:
        first = stores[0]
        for s in stores[1:]:
            if (s.kv_heads, s.block_size, s.head_dim, s.segment_units, s.offload_dtype) != (
                first.kv_heads, first.block_size, first.head_dim, first.segment_units, first.offload_dtype
            ):  # fmt: skip
                raise ValueError("gather_units_stores needs stores of one shape (one MemoryConfig)")
        names = ["k", "v", "k_scale", "v_scale"] if first.offload_dtype == "int8" else ["k", "v"]
        tables = [segment_tables(s) for s in stores]
        starts, at = [], 0
        for tab in tables:
            starts.append(at * first.segment_units)
            at += tab["k"].shape[0]
        base = torch.tensor(starts, dtype=torch.long)
        if not (
            self.base is not None and self.base.numel() == len(stores) and list(self.joined) == names
            and self.joined["k"].numel() >= at
        ):  # fmt: skip
            # new tensors (a graph that read the old ones is captured again), with room: a store's next
            # segments or another session's store then fit in place
            self.joined = {name: torch.zeros(2 * at, dtype=tables[0][name].dtype, device=tables[0][name].device) for name in names}
            self.base = torch.empty(len(stores), dtype=torch.long, device=device)
            self.made += 1
        # written in place (stream-ordered): a graph that read the tables reads these at its next replay
        for name in names:
            torch.cat([tab[name] for tab in tables], out=self.joined[name][:at])
        self.base.copy_(base.pin_memory() if device.type == "cuda" else base, non_blocking=True)
        self.stores, self.versions = list(stores), [s.version for s in stores]
        self.joins += 1


def _launch_gather(
    keys: torch.Tensor,
    count: torch.Tensor,
    tables: dict[str, torch.Tensor],
    store: UnitStore,
    dst_k: torch.Tensor,
    dst_v: torch.Tensor,
    t: int,
    kv_heads: int,
    dedup: bool,
    cached: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None = None,
) -> None:
    """One launch of _gather_kernel: the units `keys` names (distinct (unit, head) pairs with dedup,
    else every id; `count` the kernel's second argument as gather_units_uva passes it) read through
    the segment `tables` into dst_k, dst_v. `store` gives the shape and host dtype (for a batch's
    joined tables, its first store: all share them). cached (not with dedup): (source, install,
    pool table (rows, 2) int64, slots per KV head) of cached_args' planning: each id read from its
    pool slot or host memory, misses written to their slots."""
    bs, d = store.block_size, store.head_dim
    quant = store.offload_dtype == "int8"
    chunk = 2048
    grid = (keys.shape[0], triton.cdiv(bs * d, chunk))
    source, install, pools, capacity = cached if cached is not None else (keys, keys, keys, 1)
    _gather_kernel[grid](
        keys,
        count,
        tables["k"],
        tables["v"],
        tables["k_scale"] if quant else tables["k"],
        tables["v_scale"] if quant else tables["v"],
        dst_k,
        dst_v,
        t,
        source,
        install,
        pools,
        KV_HEADS=kv_heads,
        SEG_UNITS=store.segment_units,
        BLOCK=bs,
        HEAD_DIM=d,
        SRC_DTYPE=TL_DTYPES[store.host_dtype],
        QUANT=quant,
        CHUNK=chunk,
        DEDUP=dedup,
        CACHED=cached is not None,
        CAPACITY=capacity,
    )


AGE_MAX = torch.iinfo(torch.long).max


@triton.jit
def _plan_kernel(
    ids_ptr,  # (rows, KV_HEADS, T) int64, contiguous: row s's ids for cache s
    tables,  # (rows, 2) int64: cache s's table (2, KV_HEADS, C) and meta (4,) addresses
    source_ptr,  # (rows, KV_HEADS, T) int64 out: the slot to read, or NEVER (host memory)
    install_ptr,  # (rows, KV_HEADS, T) int64 out: the slot a miss writes its unit to, or NEVER
    C: tl.constexpr,
    KV_HEADS: tl.constexpr,
    T: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_T: tl.constexpr,
    AGE_MAX: tl.constexpr,
    NEVER: tl.constexpr,  # unit_cache.NEVER: an empty slot's unit (and stamp)
):
    """unit_cache.plan_slots for one cache per program (all its KV heads): hits, then the misses' least
    recently used slots in order, the table written in place and the counters once (no races)."""
    s = tl.program_id(0)
    table = tl.load(tables + 2 * s).to(tl.pointer_type(tl.int64))
    meta = tl.load(tables + 2 * s + 1).to(tl.pointer_type(tl.int64))
    slots = tl.arange(0, BLOCK_C)
    valid = slots < C
    pos = tl.arange(0, BLOCK_T)
    clock = tl.load(meta) + 1
    hits = clock * 0
    misses = clock * 0
    evictions = clock * 0
    for h in tl.static_range(KV_HEADS):
        units = tl.load(table + h * C + slots, mask=valid, other=NEVER - 1)  # past C: no slot, no id
        stamps = tl.load(table + (KV_HEADS + h) * C + slots, mask=valid, other=AGE_MAX)
        row = ids_ptr + (s * KV_HEADS + h) * T
        ids = tl.load(row + pos, mask=pos < T, other=-3)
        taken = slots < 0  # the slots this gather hits
        for j in tl.static_range(T):
            u = tl.load(row + j)
            taken = taken | ((units == u) & valid)
        age = tl.where(taken | (slots >= C), AGE_MAX, stamps)
        new_units = units
        new_stamps = stamps
        first_slot = pos * 0 + NEVER  # per id: the slot its first occurrence uses
        for j in tl.static_range(T):
            u = tl.load(row + j)
            match = (units == u) & valid
            hit = tl.max(match.to(tl.int32), axis=0) > 0
            hit_slot = tl.argmax(match.to(tl.int32), axis=0)
            earlier = (ids == u) & (pos < j)
            first = tl.max(earlier.to(tl.int32), axis=0) == 0
            earlier_slot = tl.max(tl.where(earlier, first_slot, NEVER), axis=0)  # equal ids: one slot
            victim = tl.argmin(age, axis=0)
            miss = first & (hit == 0)
            slot = tl.where(hit, hit_slot, tl.where(first, victim, earlier_slot))
            evicted = miss & (tl.sum(tl.where(slots == victim, units, 0), axis=0) != NEVER)
            age = tl.where(miss & (slots == victim), AGE_MAX, age)
            new_units = tl.where(slots == slot, u, new_units)
            new_stamps = tl.where(slots == slot, clock, new_stamps)
            first_slot = tl.where(pos == j, slot, first_slot)
            tl.store(source_ptr + (s * KV_HEADS + h) * T + j, tl.where(hit, slot, NEVER))
            tl.store(install_ptr + (s * KV_HEADS + h) * T + j, tl.where(miss, slot, NEVER))
            hits += (first & hit).to(tl.int64)
            misses += miss.to(tl.int64)
            evictions += evicted.to(tl.int64)
        tl.store(table + h * C + slots, new_units, mask=valid)
        tl.store(table + (KV_HEADS + h) * C + slots, new_stamps, mask=valid)
    tl.store(meta, clock)
    tl.store(meta + 1, tl.load(meta + 1) + hits)
    tl.store(meta + 2, tl.load(meta + 2) + misses)
    tl.store(meta + 3, tl.load(meta + 3) + evictions)


def plan_caches_cuda(
    caches: list[UnitCache], ids: torch.Tensor, tables: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """unit_cache.plan_caches in one launch: ids (N, kv_heads, t) long, tables (N, 2) int64 the caches'
    table and meta addresses (UnitCache.table_ptrs) -> source, install (N, kv_heads, t); the tables
    and counters updated in place, as plan_caches leaves them."""
    n, h, t = ids.shape
    ids = ids.contiguous()
    source = torch.empty_like(ids)
    install = torch.empty_like(ids)
    c = caches[0].capacity
    _plan_kernel[(n,)](ids, tables, source, install, C=c, KV_HEADS=h, T=t,
                       BLOCK_C=triton.next_power_of_2(c), BLOCK_T=triton.next_power_of_2(t),
                       AGE_MAX=AGE_MAX, NEVER=NEVER)  # fmt: skip
    return source, install


def stacked_addresses(caches: list[UnitCache], kept: dict) -> None:
    """kept["tables"], kept["pools"] ((N, 2) int64 on the device): the caches' address tables stacked,
    made again only when a cache's tables changed; for as many caches as before, written in place (a
    graph that read them reads the new ones at its next replay)."""
    key = kept.get("key")
    if key is not None and len(key) == len(caches) and all(
        k[0] is c.table_ptrs and k[1] is c.pool_ptrs for k, c in zip(key, caches, strict=True)
    ):
        return
    tables = torch.stack([c.table_ptrs for c in caches])
    pools = torch.stack([c.pool_ptrs for c in caches])
    if key is not None and len(key) == len(caches):
        kept["tables"].copy_(tables)
        kept["pools"].copy_(pools)
    else:
        kept["tables"], kept["pools"] = tables, pools
    kept["key"] = [(c.table_ptrs, c.pool_ptrs) for c in caches]


def cached_args(
    caches: list[UnitCache], ids: torch.Tensor, dtype: torch.dtype, kept: dict | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """The caches' pools made (`ensure`), this gather planned (one launch of _plan_kernel: tables and
    counters updated on the device) -> _launch_gather's `cached`. The kernels read the caches' address
    tables (UnitCache.table_ptrs, pool_ptrs: device tensors, so a captured graph keeps them); for
    several caches stacked once and kept in `kept` (a caller's dict) while the caches and their pools
    stay the same."""
    for c in caches:
        c.ensure(dtype)
    if len(caches) == 1:
        tables, pools = caches[0].table_ptrs.view(1, 2), caches[0].pool_ptrs.view(1, 2)
    else:
        kept = {} if kept is None else kept
        stacked_addresses(caches, kept)
        tables, pools = kept["tables"], kept["pools"]
    source, install = plan_caches_cuda(caches, ids, tables)
    return source.reshape(-1), install.reshape(-1), pools, caches[0].capacity


def gather_cached_uva(
    store: UnitStore, ids: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """ids (1, kv_heads, t) long on CUDA (one lookup's) -> K, V (1, kv_heads, t*block_size, head_dim) through
    the store's unit cache (unit_cache.py): hits read from its pool, misses from pinned host memory and
    installed, in one launch after the planning; no host synchronisation. unit_cache.gather_cached is
    the reference."""
    h, t = ids.shape[-2:]
    bs, d = store.block_size, store.head_dim
    out_k = torch.empty(1, h, t * bs, d, dtype=dtype, device=ids.device)
    out_v = torch.empty_like(out_k)
    cached = cached_args([store.unit_cache], ids, dtype)
    flat = ids.contiguous().reshape(-1)
    _launch_gather(flat, flat, segment_tables(store), store, out_k, out_v, t, h, False, cached)
    return out_k, out_v
