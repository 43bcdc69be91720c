"""`slow` tier: the real default model (SmolLM2-135M-Instruct) on the CPU, through the library and the CLI."""

from __future__ import annotations

import shutil
import subprocess

import pytest

QUESTION = "What is the capital of France? Answer in one word."

pytestmark = pytest.mark.slow


def test_library_answers_paris():
    from memllm import MemLLM

    llm = MemLLM.from_pretrained("smollm2-135m", device="cpu")
    answer = llm.chat([{"role": "user", "content": QUESTION}], max_new_tokens=16)
    assert "Paris" in answer


def test_cli_answers_paris_from_piped_stdin():
    exe = shutil.which("memllm")
    assert exe, "the memllm console script is not on PATH: run the README install command"
    proc = subprocess.run([exe, "chat"], input=QUESTION + "\n", capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
