"""Shared test fixtures: every test gets its own MEMLLM_HOME; `gpu` tests skip without CUDA."""

from __future__ import annotations

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
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
