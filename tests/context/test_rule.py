"""Past the window: memllm equals the slow reference of the same rule (tests/context/reference_rule.py)."""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface

from memllm.compat import cache_kwargs
from memllm.config import MEMORY_DISTANCE, MemoryConfig
from memllm.context import attach
from tests.context.helpers import rel_err, small_memory, tiny_model
from tests.context.reference_rule import RuleReference

PREFILL, DECODE = 200, 6


def reference_logits(model, ids, mem):
    ref = RuleReference(model, mem)
    name = "memllm_test_rule_reference"
    AttentionInterface.register(name, ref)
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        with torch.no_grad():
            zeros = torch.zeros(1, PREFILL, dtype=torch.long)
            outs = [model(input_ids=ids[:, :PREFILL], position_ids=zeros, use_cache=False).logits[0]]
            for i in range(PREFILL, PREFILL + DECODE):
                one = torch.zeros(1, 1, dtype=torch.long)
                outs.append(model(input_ids=ids[:, i : i + 1], position_ids=one, use_cache=False).logits[0])
    finally:
        model.set_attn_implementation(previous)
        AttentionInterface._global_mapping.pop(name, None)
    return torch.cat(outs), ref


def memllm_logits(model, ids, mem):
    outs = []
    with attach(model, mem) as cache, torch.no_grad():
        for a in range(0, PREFILL, mem.chunk_size):
            b = min(PREFILL, a + mem.chunk_size)
            pos = cache.next_position_ids(b - a)
            outs.append(
                model(input_ids=ids[:, a:b], **cache_kwargs(model, cache), position_ids=pos, use_cache=True).logits[
                    0
                ]
            )
        for i in range(PREFILL, PREFILL + DECODE):
            pos = cache.next_position_ids(1)
            outs.append(model(input_ids=ids[:, i : i + 1], **cache_kwargs(model, cache), position_ids=pos).logits[0])
    return torch.cat(outs), cache


@pytest.mark.parametrize(
    "kind,impl,lookup,distance",
    [
        ("llama", "fast", "shared", None),
        ("llama", "reference", "shared", None),
        ("qwen2", "fast", "shared", None),
        ("llama", "fast", "per_head", None),
        ("llama", "fast", "shared", 16),  # retrieved units nearer than the window's end
        ("llama", "reference", "shared", 16),
        ("llama", "fast", "shared", "chunk 64"),  # a prefill chunk longer than the window (n_local 48)
    ],
)
def test_past_window_equals_reference(kind, impl, lookup, distance):
    model = tiny_model(kind)
    # Distinct tokens: equal tokens have equal layer-0 keys, hence exactly tied unit scores.
    ids = torch.randperm(512, generator=torch.Generator().manual_seed(2))[: PREFILL + DECODE].unsqueeze(0)
    extra = {"chunk_size": 64} if distance == "chunk 64" else {"memory_distance": distance}
    mem = small_memory(impl=impl, lookup=lookup, **extra)
    assert mem.chunk_size <= mem.n_local or mem.chunk_size > mem.n_local == 48
    got, cache = memllm_logits(model, ids, mem)
    want, ref = reference_logits(model, ids, mem)
    assert len(ref.state[0]["units"]) == cache.layers[0].store.n_units > mem.topk  # retrieval really happened
    assert cache.stats()["lookups"] > 0
    assert rel_err(got, want.float()) < 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("offload,distance", [("fp32", None), ("bf16", None), ("int8", None), ("fp32", 16)])
def test_cuda_fast_path_equals_reference_path(offload, distance):
    """On CUDA: UVA gather + fused merge + device top-k against host gather + plain merge + host sort."""
    model = tiny_model("llama", trained=128).cuda()
    ids = (
        torch.randperm(512, generator=torch.Generator().manual_seed(2))[: PREFILL + DECODE]
        .unsqueeze(0)
        .cuda()
    )
    mem = {"offload_dtype": offload, "memory_distance": distance}
    fast, cache = memllm_logits(model, ids, small_memory(impl="fast", **mem))
    ref, _ = memllm_logits(model, ids, small_memory(impl="reference", **mem))
    assert cache.stats()["lookups"] > 0
    assert rel_err(fast, ref) < 1e-4
    want, _ = reference_logits(model.cpu(), ids.cpu(), small_memory(**mem))
    if offload == "fp32":
        assert rel_err(fast.cpu(), want.float()) < 1e-4


def test_deferred_received_scores_equal_the_reference_through_cuts_and_rollbacks():
    """CPU impl "fast" defers the window keys' received scores until a cut, a rebase or a snapshot needs
    them (cache.flush_scores); the logits, the units' representatives and the window's scores equal the
    reference path, which adds them every call, also across a rollback taken while scores are deferred."""
    from memllm.session import Session
    from tests.context.helpers import CharTokenizer, FakeLLM

    text = "".join(chr(33 + (i * 7919) % 90) for i in range(700))
    pieces = [70, 100, 1, 1, 64, 300, 1]  # calls of 64+ tokens defer; 236 tokens fit the 260-token window
    mem = {"n_local": 256, "chunk_size": 128, "exc_block_size": 32}
    sessions = {impl: Session(FakeLLM(tiny_model("llama"), CharTokenizer()), small_memory(impl=impl, **mem))
                for impl in ("fast", "reference")}  # fmt: skip
    fast = sessions["fast"].cache.layers[0]
    pos = 0
    for i, n in enumerate(pieces):
        for s in sessions.values():
            s.feed(text[pos : pos + n])
        pos += n
        if i == 1:  # deferred, then rolled back: the same state as before
            assert fast.deferred is not None and sessions["reference"].deferred_bytes() == 0
            held = sum(layer.device_bytes()["window"] for layer in sessions["fast"].cache.layers)
            assert sessions["fast"].deferred_bytes() >= held - sum(
                layer.device_bytes()["window"] for layer in sessions["reference"].cache.layers)  # counted by check_room
            cps = {impl: s.cache.checkpoint() for impl, s in sessions.items()}
            for impl, s in sessions.items():
                s.feed(text[600:680])
                s.cache.rollback(cps[impl])
        torch.testing.assert_close(sessions["fast"].last_logits, sessions["reference"].last_logits, rtol=1e-4, atol=1e-5)
    assert sessions["fast"].stats()["units_per_layer"] > 0 and fast.deferred is None  # cut: flushed
    for a, b in zip(sessions["fast"].cache.layers, sessions["reference"].cache.layers, strict=True):
        sa, sb = a.state(), b.state()
        for name in ("local_score", "units.repr", "local_k"):
            if name in sb:
                torch.testing.assert_close(sa[name], sb[name], rtol=1e-4, atol=1e-5)


def test_only_the_cpu_fast_path_defers_received_scores():
    from memllm.context.kernels import CudaKernels, TorchKernels

    assert TorchKernels("fast", "cpu").defers_scores
    assert not TorchKernels("reference", "cpu").defers_scores
    assert not TorchKernels("fast", "cuda").defers_scores
    if torch.cuda.is_available():
        assert not CudaKernels().defers_scores
    else:  # CudaKernels imports Triton kernels; its base is initialised for CUDA all the same
        import inspect

        assert 'super().__init__("fast", "cuda")' in inspect.getsource(CudaKernels.__init__)


def test_memory_distance_moves_only_what_memory_gives_and_is_bounded_by_the_window():
    """Retrieved units nearer than the window's end change the logits past the window only; a distance
    beyond the window is refused when the config is resolved."""
    from memllm.errors import ConfigError

    model = tiny_model("llama")
    ids = torch.randperm(512, generator=torch.Generator().manual_seed(2))[: PREFILL + DECODE].unsqueeze(0)
    far, _ = memllm_logits(model, ids, small_memory())
    near, cache = memllm_logits(model, ids, small_memory(memory_distance=16))
    fits = small_memory().n_init + small_memory().n_local  # the stream's first tokens: no memory yet
    assert rel_err(near[:fits], far[:fits]) < 1e-6
    assert rel_err(near[-DECODE:], far[-DECODE:]) > 1e-3
    assert cache.layers[0].config.memory_distance == 16
    with pytest.raises(ConfigError, match="memory_distance"):
        small_memory(memory_distance=64).resolved(128)
    assert small_memory().resolved(128).memory_distance == small_memory().n_local  # a window shorter than 512
    assert MemoryConfig().resolved(32768).memory_distance == MEMORY_DISTANCE == 512  # the 4,096 window's default


def test_a_variant_puts_every_layer_under_its_config_for_its_block_only():
    """ContextMemoryCache.configured (a measurement's variant on one read, memllm.bench.ruler_run.VARIANTS): units
    nearer while inside it, the same logits as the cache's own config after it; what the stored state depends
    on, and a distance past the window, are refused."""
    from memllm.errors import ConfigError

    model = tiny_model("llama")
    ids = torch.randperm(512, generator=torch.Generator().manual_seed(2))[:PREFILL].unsqueeze(0)
    mem = small_memory()
    with attach(model, mem) as cache, torch.no_grad():
        for a in range(0, PREFILL, mem.chunk_size):
            b = min(PREFILL, a + mem.chunk_size)
            model(input_ids=ids[:, a:b], **cache_kwargs(model, cache), position_ids=cache.next_position_ids(b - a))
        before = cache.config

        def step():
            cp = cache.checkpoint()
            out = model(input_ids=ids[:, :1], **cache_kwargs(model, cache), position_ids=cache.next_position_ids(1))
            cache.rollback(cp)
            return out.logits

        own = step()
        with cache.configured(memory_distance=16) as changed:
            assert changed.memory_distance == 16 and cache.variant
            assert all(layer.config is changed for layer in cache.layers)
            near = step()
        assert cache.config is before and not cache.variant and all(layer.config is before for layer in cache.layers)
        assert rel_err(near, own) > 1e-3 and rel_err(step(), own) == 0
        for bad, match in (({"n_local": 64}, "not n_local"), ({"memory_distance": 64}, "memory_distance")):
            with pytest.raises(ConfigError, match=match), cache.configured(**bad):
                pass
            assert cache.config is before
