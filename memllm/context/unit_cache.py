"""A device-side cache of one layer's units (MemoryConfig.device_unit_cache): an LRU per KV head.

Why: without it every lookup's gather reads its topk units from host memory (pinned on a GPU, over
PCIe), every layer and every decode step (~2.3 GB a step at 48 sessions x 128K, SmolLM2 on the
H200), although a session's selection changes little from one step to the next. With the switch on,
each (session, layer) UnitStore holds a UnitCache of C = max_cached_blocks slots per KV head on the
model's device; a lookup's gather reads a chosen unit from its slot when it is there (a hit), from
host memory otherwise (a miss), and installs it, evicting the least recently used unit.

State, on the device, fixed shapes, written in place (no host synchronisation; a captured CUDA graph
keeps every address; only `ensure` after `release` allocates):
  table (2, kv_heads, C) long   [0] the unit id each slot holds (-1: empty), [1] the gather count
                                (stamp) at its last use (-1: never)
  meta  (4,) long               gathers so far (the clock), hits, misses, evictions
  pool_k, pool_v (kv_heads, C, block_size, head_dim) in the model dtype: the cached K/V
  table_ptrs, pool_ptrs (2,) int64: the addresses of table and meta, of pool_k and pool_v (what the
                                CUDA planning and gather kernels read: cuda/gather.py)
One planner (`plan_slots`) works on tables stacked over N stores, so one store's gather (N = 1) and a
batch's stacked step (N sessions' stores, context/stacked.py) run the same logic. Per gather, for each
(store, KV head, chosen id): the slot holding the id (a hit); else, for the first of equal ids, the
least recently used slot no hit of this gather uses (ties: lower slot; empty slots first), installed
there (a miss; an eviction when the slot held a unit); a repeated id takes its first's slot and source.
Counts are of distinct (unit, KV head) pairs per gather (with lookup "shared", kv_heads per unit).
At most C ids per gather (topk <= max_cached_blocks, checked by MemoryConfig): no id misses its slot.

Which gathers use it (`serves`): those of ONE lookup (one row of ids: a decoded token, a call of one
execution block, each row of a batched step). A gather of several lookups (a prefill chunk's execution
blocks, a static rows step spanning two blocks) and the question selector's probe (its scan of every
unit, select.unit_mass, and its call's own lookups: the call is rolled back, its lookups uncounted)
bypass it: they read host memory and leave the cache as it is. A prefill chunk's
blocks each choose topk units over the whole history, most read once: installing them would evict the
decode working set for nothing, and the chunk's gather already reads each distinct unit once
(gather.distinct_pairs).
Stale data: a unit's K/V never change once written, but UnitStore.truncate (a rollback, Session.rewind,
a snapshot load) forgets units whose ids later cuts reuse: the store drops every slot holding an id
at or past the new count (`invalidate`, a device op) before any such cut.

Data movement: `gather_cached` / `gather_cached_stores` here are the PyTorch reference (they read every
chosen id's host copy through the plain gather and keep it only for misses, install the misses by
index_put, read the hits from the pool: the same slots, values and counters as the fast path); on CUDA
with impl "fast", cuda/gather.py reads each entry from its pool slot or its host unit in one Triton
launch (host memory only on a miss) and installs the misses in the same launch.
Knows nothing of lookup, attention or which session a store belongs to.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from memllm.context.units import UnitStore

NEVER = -1  # an empty slot's unit and stamp
COUNTS = ("hits", "misses", "evictions")


class UnitCache:
    """C slots per KV head of one layer's units on `device` (see the module note)."""

    def __init__(self, kv_heads: int, block_size: int, head_dim: int, capacity: int, device: torch.device):
        if capacity < 1:
            raise ValueError(f"a unit cache needs at least one slot, got {capacity}")
        self.kv_heads, self.block_size, self.head_dim, self.capacity = (
            kv_heads,
            block_size,
            head_dim,
            capacity,
        )
        self.device = torch.device(device)
        self.table = torch.full((2, kv_heads, capacity), NEVER, dtype=torch.long, device=self.device)
        self.meta = torch.zeros(4, dtype=torch.long, device=self.device)
        # (2,) int64: table's and meta's addresses (they never move), for the CUDA planning kernel
        self.table_ptrs = torch.tensor([self.table.data_ptr(), self.meta.data_ptr()], dtype=torch.long).to(self.device)
        self.pool_k: torch.Tensor | None = None  # (kv_heads, C, block_size, head_dim), made by `ensure`
        self.pool_v: torch.Tensor | None = None
        self.pool_ptrs: torch.Tensor | None = None  # (2,) int64 on the device: pool_k's, pool_v's address

    def ensure(self, dtype: torch.dtype) -> None:
        """The pools exist in `dtype` (made empty, every slot dropped, when absent or of another dtype)."""
        if self.pool_k is not None and self.pool_k.dtype == dtype:
            return
        shape = (self.kv_heads, self.capacity, self.block_size, self.head_dim)
        self.pool_k = torch.zeros(shape, dtype=dtype, device=self.device)
        self.pool_v = torch.zeros(shape, dtype=dtype, device=self.device)
        ptrs = torch.tensor([self.pool_k.data_ptr(), self.pool_v.data_ptr()], dtype=torch.long)
        self.pool_ptrs = ptrs.to(self.device)
        self.table.fill_(NEVER)

    def release(self) -> None:
        """Free the pools and drop every slot (the counters stay); the next gather starts cold."""
        self.pool_k = self.pool_v = self.pool_ptrs = None
        self.table.fill_(NEVER)

    def invalidate(self, n_units: int) -> None:
        """Drop the slots holding units >= n_units (they are forgotten: their ids will be reused)."""
        self.table.masked_fill_(self.table[0] >= n_units, NEVER)

    def device_bytes(self) -> int:
        pools = 0 if self.pool_k is None else 2 * self.pool_k.numel() * self.pool_k.element_size()
        return pools + (self.table.numel() + self.meta.numel()) * 8

    def serves(self, ids: torch.Tensor) -> bool:
        """Whether a gather of ids (rows, kv_heads, t) goes through the cache: one lookup's, 1 <= t <= C."""
        return ids.dim() == 3 and ids.shape[0] == 1 and 0 < ids.shape[2] <= self.capacity


def serves(stores: Sequence[UnitStore], ids: torch.Tensor) -> bool:
    """Whether a gather of ids (rows, kv_heads, t), row s from stores[s] (or every row from the one store
    given), goes through the stores' caches: every store has one and each row is one lookup's."""
    caches = [s.unit_cache for s in stores]
    if not caches or any(c is None for c in caches):
        return False
    one = ids[:1] if len(stores) > 1 else ids
    return len(stores) in (1, ids.shape[0]) and caches[0].serves(one)


def plan_slots(
    ids: torch.Tensor, table: torch.Tensor, meta: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One gather of N stores' caches, planned (see the module note). ids (N, kv_heads, t) long, at most
    C distinct per (row, head); table (N, 2, kv_heads, C); meta (N, 4) ->
    source (N, kv_heads, t): the slot to read, or -1 to read host memory;
    install (N, kv_heads, t): the slot a miss writes its unit to, or -1;
    the new table and meta. Device ops of fixed shapes only."""
    n, h, t = ids.shape
    units, stamp = table[:, 0], table[:, 1]  # (N, h, C)
    match = ids.unsqueeze(-1) == units.unsqueeze(-2)  # (N, h, t, C): at most one slot holds an id
    hit = match.any(dim=-1)
    hit_slot = match.long().argmax(dim=-1)  # (N, h, t): meaningful where hit
    first_of = (ids.unsqueeze(-1) == ids.unsqueeze(-2)).long().argmax(dim=-1)  # the first equal id's place
    first = first_of == torch.arange(t, device=ids.device)
    miss = first & ~hit
    taken = torch.zeros_like(units).scatter_add_(-1, hit_slot, hit.long()) > 0  # slots this gather hits
    age = torch.where(taken, torch.iinfo(torch.long).max, stamp)
    order = torch.sort(age, dim=-1, stable=True).indices  # least recently used first, hit slots last
    victim = order.gather(-1, (torch.cumsum(miss.long(), dim=-1) - 1).clamp_(min=0))
    slot = torch.where(hit, hit_slot, victim).gather(-1, first_of)
    from_pool = hit.gather(-1, first_of)
    source = torch.where(from_pool, slot, NEVER)
    install = torch.where(miss, slot, NEVER)
    evicted = miss & (units.gather(-1, slot) != NEVER)
    clock = meta[:, :1] + 1  # (N, 1)
    new_table = torch.stack(
        [units.scatter(-1, slot, ids), stamp.scatter(-1, slot, clock.view(n, 1, 1).expand(n, h, t))], dim=1
    )  # every write to a slot writes the same id and stamp
    counts = torch.stack([(first & hit).sum(dim=(1, 2)), miss.sum(dim=(1, 2)), evicted.sum(dim=(1, 2))], 1)
    return source, install, new_table, torch.cat([clock, meta[:, 1:] + counts], dim=1)


def plan_caches(caches: Sequence[UnitCache], ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """plan_slots over caches (row s of ids (N, kv_heads, t) for caches[s]), their tables and counters
    updated in place -> source, install (N, kv_heads, t)."""
    if len(caches) == 1:
        table, meta = caches[0].table.unsqueeze(0), caches[0].meta.unsqueeze(0)
    else:
        table, meta = torch.stack([c.table for c in caches]), torch.stack([c.meta for c in caches])
    source, install, new_table, new_meta = plan_slots(ids, table, meta)
    torch._foreach_copy_(
        [c.table for c in caches] + [c.meta for c in caches], [*new_table.unbind(0), *new_meta.unbind(0)]
    )
    return source, install


def move_reference(
    cache: UnitCache, k: torch.Tensor, v: torch.Tensor, source: torch.Tensor, install: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One row's data movement (PyTorch): k, v (kv_heads, t, block_size, head_dim) the chosen units' host
    copies; source, install (kv_heads, t) -> K, V with the hits read from the pool; misses installed."""
    heads = torch.arange(k.shape[0], device=k.device).unsqueeze(1).expand(source.shape)
    put = install >= 0
    cache.pool_k[heads[put], install[put]] = k[put]
    cache.pool_v[heads[put], install[put]] = v[put]
    hit = source >= 0
    k, v = k.clone(), v.clone()
    k[hit] = cache.pool_k[heads[hit], source[hit]]
    v[hit] = cache.pool_v[heads[hit], source[hit]]
    return k, v


Read = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def gather_cached_stores(
    stores: Sequence[UnitStore], ids: torch.Tensor, dtype: torch.dtype, read: Read
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference cached gather: row s of ids (N, kv_heads, t) from stores[s] through its cache ->
    K, V (N, kv_heads, t*block_size, head_dim) in `dtype`; read(stores, ids, dtype): the plain gather of
    the same rows (host memory)."""
    caches = [s.unit_cache for s in stores]
    for c in caches:
        c.ensure(dtype)
    source, install = plan_caches(caches, ids)
    n, h, t = ids.shape
    first = stores[0]
    bs, d = first.block_size, first.head_dim
    k_host, v_host = read(stores, ids, dtype)
    k_host, v_host = k_host.view(n, h, t, bs, d), v_host.view(n, h, t, bs, d)
    parts = [move_reference(c, k_host[i], v_host[i], source[i], install[i]) for i, c in enumerate(caches)]
    shape = (n, h, t * bs, d)
    return torch.stack([k for k, _ in parts]).view(shape), torch.stack([v for _, v in parts]).view(shape)


def gather_cached(
    store: UnitStore, ids: torch.Tensor, dtype: torch.dtype, read: Read
) -> tuple[torch.Tensor, torch.Tensor]:
    """gather_cached_stores of one store: ids (1, kv_heads, t); read(store, ids, dtype)."""
    return gather_cached_stores([store], ids, dtype, lambda stores, i, dt: read(stores[0], i, dt))


def counts(caches: Sequence[UnitCache]) -> dict[str, int]:
    """Hits, misses, evictions (distinct (unit, KV head) pairs, summed over caches), units resident
    (slots holding a unit) and capacity (slots), read from the device at once."""
    if not caches:
        return {name: 0 for name in (*COUNTS, "resident", "capacity")}
    got = torch.stack([torch.cat([c.meta[1:], (c.table[0] >= 0).sum().view(1)]) for c in caches])
    total = got.sum(dim=0).tolist()
    out = dict(zip((*COUNTS, "resident"), total, strict=True))
    out["capacity"] = sum(c.kv_heads * c.capacity for c in caches)
    return out
