"""`memllm serve --ray` whose replicas load the tiny random Llama (the path given as --model, CPU, a small
context memory) and a store with the fake embedder: python -m tests.distributed.serve_ray_fake ARGS.
`serve_alone(ARGS)`: plain `memllm serve` on the same model and embedder (benchmarks/serve_ray_cpu.py)."""

from __future__ import annotations

import sys

from memllm.distributed import serve_ray

SMALL = {"n_init": 4, "n_local": 64, "block_size": 16, "repr_topk": 2, "topk": 2, "exc_block_size": 16,
         "chunk_size": 32, "selector": "question"}  # fmt: skip


def tiny_llm(path: str, host_budget: str | None = None):
    from memllm.config import MemoryConfig
    from memllm.llm import MemLLM

    return MemLLM.from_pretrained(path, device="cpu", memory=MemoryConfig(**SMALL), host_budget=host_budget)


def load_tiny(spec: serve_ray.ReplicaSpec):
    from memllm.memory_stores.embeddings import FakeEmbedder
    from memllm.memory_stores.faiss_store import FaissStore

    return tiny_llm(spec.model, spec.host_budget), FaissStore(spec.store, FakeEmbedder(dim=16))


def serve_alone(args: list[str]) -> None:
    from memllm.cli import common
    from memllm.cli.app import app
    from memllm.memory_stores.embeddings import FakeEmbedder

    common.load_llm = lambda model, device, dtype=None: tiny_llm(model)
    common.load_embedder = lambda: FakeEmbedder(dim=16)
    sys.argv = ["memllm", "serve", *args]
    app()


if __name__ == "__main__":
    from memllm.cli.app import app

    serve_ray.LOADER = "tests.distributed.serve_ray_fake:load_tiny"
    sys.argv = ["memllm", "serve", *sys.argv[1:]]
    app()
