"""Runs the `memllm` command in a child process with the fake embedder (no MiniLM load), for the
security tests that need real processes (kills, locks, concurrent imports). Not collected by pytest.

python -m tests.security.cli_child ARGS...   same as `memllm ARGS...`
"""

from __future__ import annotations

import sys

from memllm.cli import common
from memllm.memory_stores.embeddings import FakeEmbedder


def main() -> None:
    common.load_embedder = lambda: FakeEmbedder(dim=64)  # type: ignore[assignment]
    from memllm.cli.app import main as app_main

    sys.argv = ["memllm", *sys.argv[1:]]
    app_main()


if __name__ == "__main__":
    main()
