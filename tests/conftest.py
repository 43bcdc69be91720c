"""Shared test fixtures: every test gets its own MEMLLM_HOME; `gpu` tests skip without CUDA (those also
marked `triton` run under TRITON_INTERPRET=1 instead); in the fast tier a FutureWarning raised while memllm's
own code is on the stack (a deprecated call memllm makes, e.g. `past_key_values=` on transformers 5.24+) is an
error."""

from __future__ import annotations

import importlib.util
import os
import sys
import warnings

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


def _memllm_on_stack(frame) -> bool:
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if name == "memllm" or name.startswith("memllm."):
            return True
        frame = frame.f_back
    return False


@pytest.fixture(autouse=True)
def memllm_future_warnings_are_errors(request, monkeypatch):
    """Fast tier: a FutureWarning warned with memllm code among its callers raises instead of printing.

    A `filterwarnings` module filter cannot say this: transformers attributes its deprecation warnings to
    torch's Module.__call__, not to the memllm code that made the call."""
    if request.node.get_closest_marker("slow") is not None:
        yield
        return
    real_warn = warnings.warn

    def warn(message, category=None, stacklevel=1, source=None):
        cat = type(message) if isinstance(message, Warning) else (category or UserWarning)
        if issubclass(cat, FutureWarning) and _memllm_on_stack(sys._getframe(1)):
            raise message if isinstance(message, Warning) else cat(message)
        return real_warn(message, category, stacklevel + 1, source)

    monkeypatch.setattr(warnings, "warn", warn)
    yield


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
