"""Helpers shared by CLI commands: status lines on stderr, MemllmError to exit codes, model loading."""

from __future__ import annotations

import contextlib
import functools
import signal
import sqlite3
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import typer

from memllm.errors import ConfigError, MemllmError, is_disk_failure, write_error

MAX_NEW_TOKENS = 1 << 20  # CLI bounds; the model's own context is checked where it is known
MAX_BUDGET_TOKENS = 1 << 24

F = TypeVar("F", bound=Callable[..., Any])


def status_printer() -> Callable[[str], None]:
    """A progress callback that writes one dim line per message on stderr (stdout stays for answers)."""

    def show(message: str) -> None:
        print(f"memllm: {message}", file=sys.stderr, flush=True)

    return show


def fail_on_error(fn: F) -> F:
    """Turn MemllmError into a one-line message on stderr and the error's exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MemllmError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise typer.Exit(exc.exit_code) from None
        except (OSError, sqlite3.Error) as exc:  # a write the library did not name: disk full, size limit
            if not is_disk_failure(exc):
                raise
            err = write_error(exc, getattr(exc, "filename", None) or "memllm's files")
            print(f"error: {err}", file=sys.stderr)
            raise typer.Exit(err.exit_code) from None

    return wrapper  # type: ignore[return-value]


def load_llm(model: str, device: str, dtype: str | None = None) -> Any:
    """Load a MemLLM (the CLI's single seam for tests to substitute a fake model)."""
    from transformers.utils import logging as hf_logging

    from memllm.llm import MemLLM

    hf_logging.disable_progress_bar()  # the CLI's own process: keep stderr to memllm's status lines
    return MemLLM.from_pretrained(model, device=device, dtype=dtype, progress=status_printer())


def load_embedder() -> Any:
    """The default sentence embedder, the process's one (a seam for tests to substitute a fake one)."""
    from memllm.memory_stores.embeddings import shared_embedder

    return shared_embedder()


def check_selector(selector: str | None) -> None:
    """--selector (ask, bench passkey): one of config.SELECTORS, or not given."""
    from memllm.config import SELECTORS

    if selector is not None and selector not in SELECTORS:
        raise ConfigError(f"--selector must be one of {', '.join(SELECTORS)}, got {selector!r}")


def embedder_for(mode: str | None, selector: str | None = None) -> Any:
    """The embedder `memllm ask` needs: the chunk store's (text, hybrid modes, and no mode given, where a
    long document may be read in the model's own mode), also the units' text index's (the selectors that
    read one); None where neither is used."""
    from memllm.config import TEXT_SELECTORS

    return load_embedder() if mode in ("text", "hybrid", None) or selector in TEXT_SELECTORS else None


def embedder_before_reading(llm: Any, mode: str | None, settings: Mapping[str, Any] | None) -> Any:
    """embedder_for the mode `ask` will read in (None: not given) with the user's memory `settings`, as far
    as it is known before the documents are (batch_docs.mode_before_reading): no embedder is loaded where
    the mode can only be kv and the units' selector reads no text index."""
    from memllm.agents.batch_docs import mode_before_reading, units_selector

    return embedder_for(mode_before_reading(llm, mode, settings), units_selector(llm, settings))


def open_store(path: str | None, *, with_embedder: bool) -> Any:
    """Open the text memory store at `path` (default $MEMLLM_HOME/memory); embedder only when needed."""
    from memllm.memory_stores.faiss_store import FaissStore
    from memllm.models import default_store_path

    return FaissStore(path or default_store_path(), load_embedder() if with_embedder else None)


class Terminated(SystemExit):
    """Raised in the main thread when SIGTERM arrives inside `exit_on_sigterm` (exit status 143)."""

    def __init__(self) -> None:
        super().__init__(143)


@contextlib.contextmanager
def exit_on_sigterm() -> Iterator[None]:
    """Within the block, SIGTERM (docker stop, systemd) unwinds like an exception, so `finally`
    blocks run: temporary document stores are removed, stores closed. Restored afterwards. Only for
    the CLI's own process (importing memllm never installs handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
