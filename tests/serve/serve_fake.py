"""Start `memllm serve` with a fake LLM and fake embedder (for the fast tier): python -m tests.serve.serve_fake ARGS."""

from __future__ import annotations

import sys

from memllm.cli import common
from memllm.cli.app import app
from memllm.memory_stores.embeddings import FakeEmbedder
from tests.fakes import FakeLLM

if __name__ == "__main__":
    common.load_llm = lambda model, device, dtype=None: FakeLLM()
    common.load_embedder = lambda: FakeEmbedder(dim=64)
    sys.argv = ["memllm", "serve", *sys.argv[1:]]
    app()
