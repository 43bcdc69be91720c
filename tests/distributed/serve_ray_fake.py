"""`memllm serve --ray` whose replicas load the tiny random Llama (the path given as --model, CPU, a small
context memory) and a store with the fake embedder: python -m tests.distributed.serve_ray_fake ARGS."""

from __future__ import annotations

import sys

from memllm.distributed import serve_ray

SMALL = {"n_init": 4, "n_local": 64, "block_size": 16, "repr_topk": 2, "topk": 2, "exc_block_size": 16,
         "chunk_size": 32, "selector": "question"}  # fmt: skip


def load_tiny(spec: serve_ray.ReplicaSpec):
    from memllm.config import MemoryConfig
    from memllm.llm import MemLLM
    from memllm.memory_stores.embeddings import FakeEmbedder
    from memllm.memory_stores.faiss_store import FaissStore

    llm = MemLLM.from_pretrained(spec.model, device="cpu", memory=MemoryConfig(**SMALL),
                                 host_budget=spec.host_budget)  # fmt: skip
    return llm, FaissStore(spec.store, FakeEmbedder(dim=16))


if __name__ == "__main__":
    from memllm.cli.app import app

    serve_ray.LOADER = "tests.distributed.serve_ray_fake:load_tiny"
    sys.argv = ["memllm", "serve", *sys.argv[1:]]
    app()
