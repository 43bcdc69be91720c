"""Shared test fixtures: every test gets its own MEMLLM_HOME (fixtures of a wider scope a session-wide one); `gpu` tests skip without CUDA (those also
marked `triton` run under TRITON_INTERPRET=1 instead); in the fast tier a FutureWarning raised while memllm's
own code is on the stack (a deprecated call memllm makes, e.g. `past_key_values=` on transformers 5.24+) is an
error."""

from __future__ import annotations

import importlib.util
import os
import sys
import warnings

import pytest


@pytest.fixture(scope="session", autouse=True)
def _user_home(tmp_path_factory):
    """The user's MEMLLM_HOME, kept for `slow` tests; for the whole session the environment points at a
    temporary home, so module- and session-scoped fixtures (set up before any test's own home) never write
    into the user's weight cache."""
    user = os.environ.get("MEMLLM_HOME")
    os.environ["MEMLLM_HOME"] = str(tmp_path_factory.mktemp("session_home"))
    yield user
    if user is None:
        os.environ.pop("MEMLLM_HOME", None)
    else:
        os.environ["MEMLLM_HOME"] = user


@pytest.fixture(autouse=True)
def isolated_home(_user_home, tmp_path_factory, monkeypatch, request):
    """Each test gets a fresh MEMLLM_HOME, except `slow` tests, which share the user's weight cache."""
    if request.node.get_closest_marker("slow") is None:
        home = tmp_path_factory.mktemp("memllm_home")
        monkeypatch.setenv("MEMLLM_HOME", str(home))
        yield home
    else:
        if _user_home is None:
            monkeypatch.delenv("MEMLLM_HOME", raising=False)
        else:
            monkeypatch.setenv("MEMLLM_HOME", _user_home)
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
