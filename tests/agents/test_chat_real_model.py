"""`slow` tier: the real default model recalls a fact from the first turn after a dialogue several
times longer than its window, through the library and again after restarting the CLI."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from memllm.agents.chat import ChatAgent
from memllm.agents.controller import ControllerConfig

pytestmark = pytest.mark.slow


def chitchat_filler(min_tokens: int, count_tokens) -> list[tuple[str, str]]:
    """Real dialogue turns (role, text) from chitchat-dataset, alternating roles, at least min_tokens long."""
    from memllm.bench.recall import build_cases

    turns: list[tuple[str, str]] = []
    total = 0
    for case in build_cases(later_sessions=5, n_cases=40, seed=7):
        for role, text, _ in case.turns():
            if text == case.fact:
                continue
            turns.append((role, text))
            total += count_tokens(text)
            if total >= min_tokens:
                return turns
    raise AssertionError("not enough filler")


def test_fact_recalled_after_many_windows_and_after_cli_restart(tmp_path):
    from memllm.llm import MemLLM
    from memllm.memory_stores.embeddings import SentenceTransformerEmbedder
    from memllm.memory_stores.faiss_store import FaissStore

    llm = MemLLM.from_pretrained("smollm2-135m", device="cpu")
    store_dir = tmp_path / "store"
    store = FaissStore(store_dir, SentenceTransformerEmbedder())
    budgets = ControllerConfig(memory_tokens=256, flash_tokens=64)
    agent = ChatAgent(llm, store, user="pat", max_new_tokens=24, controller=budgets, summarize=False)
    agent.chat("Hi! My dog is called Biscuit.")
    filler = chitchat_filler(4 * llm.trained_len, llm.count_tokens)  # four windows of real dialogue
    store.add_many([agent.controller.make_record(text, kind="turn", role=role) for role, text in filler])
    assert sum(llm.count_tokens(text) for _, text in filler) >= 4 * llm.trained_len

    answer = agent.chat("What is my dog called?")
    recall = agent.last_recall()
    assert recall.gate.fire
    assert any("Biscuit" in it.record.text for it in recall.used)
    assert "biscuit" in answer.lower()
    store.close()

    exe = shutil.which("memllm")
    assert exe, "the memllm console script is not on PATH: run the README install command"
    proc = subprocess.run(
        [
            exe,
            "chat",
            "--user",
            "pat",
            "--store",
            str(store_dir),
            "--max-new-tokens",
            "24",
            "--memory-tokens",
            "256",
            "--flash-tokens",
            "64",
        ],
        input="What is my dog called?\n",
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert "biscuit" in proc.stdout.lower()
