"""The real default embedder (all-MiniLM-L6-v2 from its PyPI package), loaded with sockets disabled."""

from __future__ import annotations

import numpy as np
import pytest

from memllm.memory_stores import FaissStore, MemoryRecord, SentenceTransformerEmbedder
from memllm.memory_stores.embeddings import extract_default_model

pytestmark = pytest.mark.slow


def test_minilm_offline_semantic_neighbour(tmp_path):
    pytest_socket = pytest.importorskip("pytest_socket")
    pytest_socket.disable_socket()
    try:
        emb = SentenceTransformerEmbedder()
        vectors = emb.embed(
            ["A kitten is sleeping on the rug.", "The cat naps on a carpet.", "Stock markets fell."]
        )
        assert vectors.shape == (3, emb.dim) == (3, 384) and vectors.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
        assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.3
        exact = SentenceTransformerEmbedder(precision="fp32").embed(["A kitten is sleeping on the rug."])
        assert float(exact[0] @ vectors[0]) > 0.999  # bf16 autocast ("auto" on such CPUs) keeps the space
        with FaissStore(tmp_path / "s", emb) as store:
            store.add_many(
                [
                    MemoryRecord(t, namespace="u", kind="fact")
                    for t in [
                        "My daughter's name is Lucia and she is seven.",
                        "I drive a blue Volvo to work.",
                        "We are going to Portugal on holiday in June.",
                    ]
                ]
            )
            hits = store.search("What car do I have?", k=1, namespace="u")
            assert hits[0].record.text == "I drive a blue Volvo to work."
            assert store.search("summer vacation plans", k=1, namespace="u")[0].record.text.startswith(
                "We are going"
            )
    finally:
        pytest_socket.enable_socket()
    assert extract_default_model() == extract_default_model()  # extracted once, then reused
