"""Bounds: keys per query within budget, positions below the trained length, device memory flat."""

from __future__ import annotations

import torch

from memllm.context import attach, feed, step
from tests.context.helpers import TRAINED, small_memory, tiny_model


def test_bounds_over_a_long_stream():
    model = tiny_model("llama")
    mem = small_memory(offload_dtype="bf16", topk=2)
    budget = mem.n_init + mem.topk * mem.block_size + mem.n_local + mem.block_size + mem.exc_block_size
    ids = torch.randint(0, 512, (1, 1600), generator=torch.Generator().manual_seed(3))
    windows, index = [], []
    with attach(model, mem) as cache:
        for a in range(0, 1600, 160):
            feed(model, cache, ids[:, a : a + 160])
            s = cache.stats()
            windows.append(s["device_bytes_window"])
            index.append(s["device_bytes_index"])
        logits = None
        for _ in range(5):
            logits = step(model, cache, torch.tensor([[7]]))
    s = cache.stats()
    assert torch.isfinite(logits).all()
    assert s["tokens_seen"] == 1605
    assert s["max_keys_per_query"] <= budget
    assert s["max_position"] < TRAINED
    assert cache.layers[0].base > 0  # the window was re-based to keep positions below the trained length
    # The window (sinks + local + scores) is the same size at every later chunk: it stopped growing.
    assert len(set(windows[1:])) == 1
    # Representative keys: the only device memory that grows, at repr_topk / block_size of the keys.
    per_unit = (
        model.config.num_hidden_layers * 2 * mem.repr_topk * 16 * 4
    )  # layers, kv heads, head_dim 16, fp32
    assert index[-1] <= 2 * per_unit * s["units_per_layer"]
    # Host memory holds the units: bf16 K+V per stored token and layer = 2 * kv_heads * head_dim * 2 bytes.
    assert s["host_bytes_stored"] == s["units"] * mem.block_size * 2 * 2 * 16 * 2


def test_a_feed_reserves_its_unit_index_once():
    """A feed of known length sizes each layer's unit index for the units it cuts (plus one call's worth)
    at once; short feeds after it (questions, answers) do not grow it again."""
    model = tiny_model("llama")
    mem = small_memory()
    ids = torch.randint(0, 512, (1, 700), generator=torch.Generator().manual_seed(4))
    with attach(model, mem) as cache:
        feed(model, cache, ids[:, :600])
        cfg = cache.config
        store = cache.layers[0].store
        units = store.n_units
        assert units == (600 - cfg.n_init - cfg.n_local) // cfg.block_size
        capacity = store.repr_buffer().shape[1]
        assert capacity == units + cfg.chunk_size // cfg.block_size
        for a in range(600, 620, 5):
            feed(model, cache, ids[:, a : a + 5])
        assert store.n_units > units and store.repr_buffer().shape[1] == capacity
