"""Bring selected units' K/V to the device: gather_units(store, ids) -> (..., kv_heads, t*block_size, head_dim).

ids (..., kv_heads, t): any leading dims (one row of ids per execution block, say); row h reads head h.

Paths: "reference" (plain PyTorch; reads ids on the host), CPU (ids index host tensors directly) and
CUDA fast (a Triton kernel reads the selected units straight from pinned host memory by device-side
ids, through unified addressing: no host synchronisation; see uva.py). Knows nothing of lookup.
"""

from __future__ import annotations

import torch

from memllm.context.units import UnitStore


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


def gather_units(
    store: UnitStore, ids: torch.Tensor, dtype: torch.dtype, impl: str = "fast"
) -> tuple[torch.Tensor, torch.Tensor]:
    """ids (..., kv_heads, t) long on the store's device -> K, V (..., kv_heads, t*block_size, head_dim) there."""
    if impl == "reference":
        return store.gather_reference(ids, dtype)
    if store.device.type == "cpu":
        return gather_host(store, ids, dtype)
    if store.device.type == "cuda":
        from memllm.context.uva import gather_units_uva

        return gather_units_uva(store, ids, dtype)
    k, v = gather_host(store, ids.to("cpu"), dtype)
    return k.to(store.device), v.to(store.device)
