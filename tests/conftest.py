"""Shared test fixtures: every test gets its own MEMLLM_HOME; `gpu` tests skip without CUDA (those also
marked `triton` run under TRITON_INTERPRET=1 instead)."""

from __future__ import annotations

import importlib.util
import os

import pytest


@pytest.fixture(autouse=True)
def isolated_home(tmp_path_factory, monkeypatch, request):
    """Each test gets a fresh MEMLLM_HOME, except `slow` tests, which share the user's weight cache."""
    if request.node.get_closest_marker("slow") is None:
        home = tmp_path_factory.mktemp("memllm_home")
        monkeypatch.setenv("MEMLLM_HOME", str(home))
        yield home
    else:
        yield None


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        has_cuda = False
    if has_cuda:
        return
    # Kernel tests marked `triton` run on the CPU under Triton's interpreter (TRITON_INTERPRET=1).
    interpret = os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None and not (interpret and item.get_closest_marker("triton")):
            item.add_marker(skip)
