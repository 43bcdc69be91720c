"""Run a generation in one thread of its own and hand its pieces to the HTTP response as they come.

The server's response iterator is advanced from whichever worker thread is free, but a generation must
stay in one thread and one context from start to end (context memory sets a context variable when it
starts and resets it when it ends). A reader that goes away stops the generation at its next piece.
Knows nothing of HTTP or the model.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterable, Iterator

log = logging.getLogger("memllm.serve")
_END = object()


class GenerationFailed(Exception):
    """The generation raised after the response had started; the original is logged, not sent."""


def pieces_from_thread(
    produce: Callable[[], Iterable[str]],
    *,
    timeout: float = 3600.0,
    passthrough: tuple[type[Exception], ...] = (),
) -> Iterator[str]:
    """Yield what `produce()` yields, produced in a thread of its own; GenerationFailed if it raised,
    or what it raised where that is one of `passthrough` (errors meant for the client, not a bug)."""
    out: queue.Queue = queue.Queue()
    stop = threading.Event()

    def run() -> None:
        try:
            for piece in produce():
                out.put(piece)
                if stop.is_set():
                    break  # closing produce()'s generator runs its cleanup (the answer so far is kept)
        except Exception as exc:  # noqa: BLE001 - handed to the reader, which logs it and ends the stream
            out.put(exc)
        finally:
            out.put(_END)

    thread = threading.Thread(target=run, name="memllm-generation", daemon=True)
    thread.start()
    try:
        while True:
            item = out.get(timeout=timeout)
            if item is _END:
                return
            if isinstance(item, passthrough):
                raise item
            if isinstance(item, Exception):
                log.error("generation failed mid-stream", exc_info=item)
                raise GenerationFailed(type(item).__name__)
            yield item
    finally:
        stop.set()
