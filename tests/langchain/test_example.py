"""The example runs as a script, offline, on the default model, and recalls a fact from its first turn."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "agent_with_memory.py"


@pytest.mark.slow
def test_agent_with_memory_example_recalls_the_dogs_name(tmp_path):
    offline = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, str(EXAMPLE), "--store", str(tmp_path / "memory")],
        env={**os.environ, **offline},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    replies = [line for line in run.stdout.splitlines() if line.startswith("assistant: ")]
    assert len(replies) == 3
    assert "Pixel" in replies[-1]  # told in turn 1; the prompt only shows the last exchange (turn 2)
    assert (tmp_path / "memory" / "memory.db").is_file()  # the memory persists where --store says
