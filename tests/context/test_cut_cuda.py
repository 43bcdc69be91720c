"""The fused cut kernel (cut_cuda.py) writes what ContextMemoryLayer.cut_units + UnitStore.write_at write."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from memllm.config import MemoryConfig
from memllm.context.cache import ContextMemoryLayer
from memllm.context.positions import Rotary
from memllm.context.support import ModelSpec
from tests.context.helpers import tiny_model


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the UVA write needs CUDA")
@pytest.mark.parametrize(
    "dtype,offload", [(torch.float32, "fp32"), (torch.bfloat16, "bf16"), (torch.bfloat16, "fp32"), (torch.float32, "bf16")]
)
def test_cut_kernel_equals_cut_units_and_write_at(dtype, offload):
    """Keys rotated back and values: the same bits; representatives (the top repr_topk keys by received
    score, averaged): equal up to the order of the sum; units written at a device-side index after
    units already stored, across a segment boundary."""
    dev = torch.device("cuda")
    model = tiny_model("llama3")
    spec = ModelSpec("tiny", 1, 4, 2, 16, 512, model.model.rotary_emb, dev, dtype)
    cfg = MemoryConfig(n_init=4, n_local=64, block_size=16, repr_topk=4, topk=2, exc_block_size=32, chunk_size=64,
                       offload_dtype=offload).resolved(512)  # fmt: skip
    rotary = Rotary(model.model.rotary_emb, 512, 16)
    gen = torch.Generator().manual_seed(3)
    layers = [ContextMemoryLayer(spec, cfg, rotary, 0) for _ in range(2)]
    old = [torch.randn(5, 2, 16, 16, generator=gen).to(dev, dtype) for _ in range(3)]
    for layer in layers:
        layer.store.segment_units = 6  # the call's units cross into a second segment
        layer.store._prefetch = None
        layer.store.append_many(*old)
        layer.store.ensure_room(5 + 3, dtype)
    k_all = torch.randn(2, 200, 16, generator=gen).to(dev, dtype)
    v_all = torch.randn(2, 200, 16, generator=gen).to(dev, dtype)
    score = torch.randperm(400, generator=gen).float().reshape(2, 200).to(dev) / 7  # no ties
    plan = SimpleNamespace(cut_start=8, n_cut=3)
    at = torch.tensor([5], device=dev)
    ref, fused = layers
    ref.store.write_at(at, *ref.cut_units(plan, k_all, v_all, score, 37))
    fused.write_cut_units(plan, k_all, v_all, score, 37, at)
    for layer in layers:
        layer.store.advance(3)
    want, got = ref.store.state(), fused.store.state()
    assert torch.equal(got["k"], want["k"]) and torch.equal(got["v"], want["v"])
    tol = {"rtol": 1e-2, "atol": 1e-2} if dtype == torch.bfloat16 else {"rtol": 1e-6, "atol": 1e-6}
    torch.testing.assert_close(got["repr"], want["repr"], **tol)
