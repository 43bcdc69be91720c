"""Bring selected units' K/V to the device: gather_units(store, ids) -> (..., kv_heads, t*block_size, head_dim).

ids (..., kv_heads, t): any leading dims (one row of ids per execution block, say); row h reads head h.

Paths: "reference" (plain PyTorch; reads ids on the host), CPU (ids index host tensors directly), other
devices (ids read on the host). The CUDA fast path (a Triton kernel reads the selected units straight
from pinned host memory by device-side ids, through unified addressing: no host synchronisation) is
cuda/gather.py, chosen by kernels.py. With the device unit cache on (MemoryConfig.device_unit_cache),
a lookup's gather goes through unit_cache.py first (kernels.gather_selected), which calls these for
the units' host copies. Knows nothing of lookup.
"""

from __future__ import annotations

import torch

from memllm.context.units import UnitStore


def distinct_pairs(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids (rows, kv_heads, t) -> the distinct (unit, head) pairs as keys unit * kv_heads + head, sorted,
    in the first `count` of n = ids.numel() slots (the rest 0); count (1,); and each entry's slot (n,).
    Fixed shapes, on the device: no host synchronisation."""
    rows, h, t = ids.shape
    heads = torch.arange(h, device=ids.device).view(1, h, 1)
    keys, order = torch.sort((ids * h + heads).reshape(-1))
    new = torch.ones_like(keys, dtype=torch.bool)
    new[1:] = keys[1:] != keys[:-1]
    slot_sorted = torch.cumsum(new, 0) - 1
    slot = torch.empty_like(slot_sorted).scatter_(0, order, slot_sorted)
    distinct = torch.zeros_like(keys).scatter_(0, slot_sorted, keys)  # equal keys write equal values
    return distinct, new.sum().view(1), slot


def gather_host(store: UnitStore, ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """CPU path: ids (..., kv_heads, t) long on the host -> K, V (..., kv_heads, t*block_size, head_dim) there."""
    lead, (h, t) = ids.shape[:-2], ids.shape[-2:]
    seg_of = torch.div(ids, store.segment_units, rounding_mode="floor")
    off = ids % store.segment_units
    heads = torch.arange(h).unsqueeze(1).expand(ids.shape)
    shape = (*ids.shape, store.block_size, store.head_dim)
    k = torch.empty(shape, dtype=dtype)
    v = torch.empty(shape, dtype=dtype)
    for si in torch.unique(seg_of).tolist():
        seg = store.segments[si]
        sel = seg_of == si
        o, hh = off[sel], heads[sel]
        if store.offload_dtype == "int8":
            k[sel] = (seg["k"][o, hh].float() * seg["k_scale"][o, hh]).to(dtype)
            v[sel] = (seg["v"][o, hh].float() * seg["v_scale"][o, hh]).to(dtype)
        else:
            k[sel] = seg["k"][o, hh].to(dtype)
            v[sel] = seg["v"][o, hh].to(dtype)
    flat = (*lead, h, t * store.block_size, store.head_dim)
    return k.reshape(flat), v.reshape(flat)


def gather_host_stores(
    stores: list[UnitStore], ids: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """CPU path of a batch's gather: row s of ids (S, kv_heads, t) long on the host read from stores[s]
    -> K, V (S, kv_heads, t*block_size, head_dim). The ids are read once; each (store, segment) pair
    they touch is read by one index_select per tensor, and the parts put in place by one more."""
    rows, (h, t) = ids.shape[0], ids.shape[-2:]
    first = stores[0]
    names = ("k", "v", "k_scale", "v_scale") if first.offload_dtype == "int8" else ("k", "v")
    reads: list[tuple[dict[str, torch.Tensor], int, int]] = []  # (segment, first, end) in `flat`
    flat: list[int] = []  # per id: its (unit, head) row in its segment viewed as (units * h, ...)
    order: list[int] = []  # the output slot of each id, in the order `flat` holds them
    at = 0
    for store, row in zip(stores, ids.tolist(), strict=True):
        su = store.segment_units
        by_seg: dict[int, tuple[list[int], list[int]]] = {}
        for head, units in enumerate(row):
            for u in units:
                keys, slots = by_seg.setdefault(u // su, ([], []))
                keys.append((u % su) * h + head)
                slots.append(at)
                at += 1
        for si, (keys, slots) in by_seg.items():
            reads.append((store.segments[si], len(flat), len(flat) + len(keys)))
            flat += keys
            order += slots
    index = torch.tensor(flat)
    got = {
        name: torch.cat([seg[name].flatten(0, 1).index_select(0, index[lo:hi]) for seg, lo, hi in reads])
        for name in names
    }  # (rows * h * t, ...) in `order`
    k, v = got["k"], got["v"]
    if "k_scale" in got:
        k, v = k.float() * got["k_scale"], v.float() * got["v_scale"]
    if order != list(range(at)):
        where = torch.tensor(order)
        k, v = torch.empty_like(k).index_copy_(0, where, k), torch.empty_like(v).index_copy_(0, where, v)
    shape = (rows, h, t * first.block_size, first.head_dim)
    return k.to(dtype).reshape(shape), v.to(dtype).reshape(shape)


def gather_units(
    store: UnitStore, ids: torch.Tensor, dtype: torch.dtype, impl: str = "fast"
) -> tuple[torch.Tensor, torch.Tensor]:
    """ids (..., kv_heads, t) long on the store's device -> K, V (..., kv_heads, t*block_size, head_dim) there.
    The PyTorch paths; on CUDA with impl "fast" use kernels.gather_units (or a layer's kernels)."""
    if impl == "reference":
        return store.gather_reference(ids, dtype)
    if store.device.type == "cpu":
        return gather_host(store, ids, dtype)
    k, v = gather_host(store, ids.to("cpu"), dtype)
    return k.to(store.device), v.to(store.device)
