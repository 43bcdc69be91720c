"""`memllm ask --ray ADDRESS`: each document answered on a Ray worker, one model per worker.

A pool of `DocWorker` actors (one per GPU of the cluster, each holding one GPU, or `workers` of them
holding one CPU each) loads the model once per actor with the CLI's loader and answers a document's
questions with `memllm.agents.batch_docs.answer_each`, the function `memllm ask --each` runs locally,
so both give the same answers. `cluster(address)` connects (and disconnects after). Documents travel as Document objects (read by the driver); a worker
needs memllm and the model installed, not the files. Each actor is given one document at a time; the
results come back as they finish (`on_done(done, total)`) and are yielded in the documents' order.

ray is imported inside the functions (the optional extra `memllm[ray]`); importing this module
changes nothing. Failures are named errors (ConfigError, DistributedError, or the worker's own
MemllmError), never Ray's tracebacks.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from memllm.agents.batch_docs import DocumentAnswers
from memllm.documents import Document
from memllm.errors import ConfigError, DistributedError, MemllmError

DEFAULT_CPU_WORKERS = 2
CONNECT_TIMEOUT_S = 5.0


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError("--ray needs Ray: pip install 'memllm[ray]'") from None
    return ray


class DocWorker:
    """One model in one Ray actor; answers one document's questions at a time."""

    def __init__(self, model: str, device: str, mode: str | None, settings: dict[str, Any] | None, max_new_tokens: int) -> None:
        self.model, self.device = model, device
        self.mode, self.settings, self.max_new_tokens = mode, dict(settings or {}), max_new_tokens
        self.llm: Any = None
        self.embedder: Any = None

    def load(self) -> str:
        """Load the model (and the embedder the mode needs) once; returns the model's name."""
        if self.llm is None:
            from memllm.cli import common

            self.llm = common.load_llm(self.model, self.device)
            self.embedder = common.embedder_before_reading(self.llm, self.mode, self.settings)
        return self.model

    def answer(self, doc: Document, questions: list[str]) -> DocumentAnswers:
        from memllm.agents.batch_docs import answer_each

        self.load()
        (result,) = answer_each(self.llm, [doc], questions, self.mode, settings=self.settings,
                                embedder=self.embedder, max_new_tokens=self.max_new_tokens)  # fmt: skip
        return result


def _check_reachable(address: str) -> None:
    """DistributedError at once where nothing listens at host:port (ray.init would retry for minutes)."""
    if "://" in address:
        return  # a Ray client address (ray://HOST:PORT): left to ray.init
    host, sep, port = address.rpartition(":")
    if not (sep and host and port.isdigit()):
        raise ConfigError(f"--ray takes auto or HOST:PORT of a Ray cluster's head node, got {address!r}")
    try:
        with socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        raise DistributedError(
            f"no Ray cluster at {address} ({exc.strerror or exc}): start one with `ray start --head` "
            "or give its head node's HOST:PORT (or auto)"
        ) from None


def connect(address: str) -> Any:
    """Connect this process to the Ray cluster at `address` ('auto': the one running on this machine
    or named by RAY_ADDRESS); returns the ray module."""
    ray = _ray()
    if address != "auto":
        _check_reachable(address)
    try:
        ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR)
    except ConnectionError as exc:
        raise DistributedError(f"could not connect to a Ray cluster at {address}: {exc}") from None
    return ray


@contextlib.contextmanager
def cluster(address: str) -> Iterator[Any]:
    """Connected to the Ray cluster at `address` within the block (the ray module); disconnected after,
    which ends the actors started in it."""
    ray = connect(address)
    try:
        yield ray
    finally:
        ray.shutdown()


def default_workers(ray: Any) -> int:
    """One worker per GPU of the cluster, else DEFAULT_CPU_WORKERS."""
    gpus = int(ray.cluster_resources().get("GPU", 0))
    return gpus or DEFAULT_CPU_WORKERS


def _unwrap(ray: Any, exc: BaseException) -> MemllmError:
    """A worker's failure as a named error: its own MemllmError, else a one-line DistributedError."""
    cause = getattr(exc, "cause", None)
    if isinstance(exc, ray.exceptions.RayTaskError) and isinstance(cause, MemllmError):
        return cause
    if isinstance(exc, ray.exceptions.RayTaskError) and cause is not None:
        text = str(cause).strip().splitlines()
        return DistributedError(f"a Ray worker failed: {type(cause).__name__}: {text[0] if text else ''}")
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return DistributedError(f"a Ray worker failed: {first}")


def answer_on_ray(
    ray: Any,
    documents: Sequence[Document],
    questions: Sequence[str],
    *,
    model: str,
    device: str,
    mode: str | None,
    settings: dict[str, Any] | None,
    max_new_tokens: int,
    workers: int | None = None,
    on_done: Callable[[int, int], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> Iterator[DocumentAnswers]:
    """Answer every question of every document on the connected cluster (`ray`, from `cluster`);
    results in the documents' order, each as soon as it and those before it are done. workers: actors
    to start (None: one per GPU of the cluster, else DEFAULT_CPU_WORKERS; never more than the
    documents, nor than the cluster's GPUs, else its CPUs). on_done(done, total) after each document a
    worker finishes; log(message): a status line; settings: the memory settings each worker changes from
    its model's own (batch_docs.memory_settings)."""
    if workers is not None and workers < 1:
        raise ConfigError(f"--ray-workers must be at least 1, got {workers}")
    if not documents:
        return
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    capacity = gpus or int(resources.get("CPU", 0))  # more actors than this would wait forever
    if capacity < 1:
        raise DistributedError("the Ray cluster has no CPU or GPU to run a worker on: add a node")
    n = min(workers or default_workers(ray), capacity, len(documents))
    if log is not None:
        log(f"{n} Ray worker(s), one {'GPU' if gpus else 'CPU'} and one model each")
    actor = ray.remote(**({"num_gpus": 1} if gpus else {"num_cpus": 1}))(DocWorker)
    pool = [actor.remote(model, device, mode, settings, max_new_tokens) for _ in range(n)]
    qs = list(questions)
    try:
        ray.get([a.load.remote() for a in pool])  # a model that cannot load fails here, once
    except ray.exceptions.RayError as exc:
        raise _unwrap(ray, exc) from None
    pending: dict[Any, tuple[int, Any]] = {}
    queue = iter(enumerate(documents))

    def submit(a: Any) -> None:
        item = next(queue, None)
        if item is not None:
            pending[a.answer.remote(item[1], qs)] = (item[0], a)

    for a in pool:
        submit(a)
    results: dict[int, DocumentAnswers] = {}
    upto = 0  # documents yielded so far
    while pending:
        (ref,), _ = ray.wait(list(pending), num_returns=1)
        index, a = pending.pop(ref)
        try:
            results[index] = ray.get(ref)
        except ray.exceptions.RayError as exc:
            raise _unwrap(ray, exc) from None
        submit(a)
        if on_done is not None:
            on_done(upto + len(results), len(documents))
        while upto in results:
            yield results.pop(upto)
            upto += 1
