"""`memllm serve --ray ADDRESS`: the server's replicas under Ray Serve, each user on the replica holding
their session.

Two deployments. `ChatReplica` (N replicas, one model each, one CPU or GPU each) runs the same FastAPI
app as `memllm serve` (memllm.serve.app), fed requests as data through memllm.serve.asgi_call, and
names itself in every response (header `x-memllm-replica`). `Ingress` (one, no CPU reserved) takes the
HTTP requests from Ray Serve's proxy, reads whose session each touches (memllm.serve.routing, as the
app resolves it) and sends it through a handle with that user as the multiplexed model id. The
replicas' router is memllm.distributed.serve_router.SessionAffinityRouter (Ray Serve's request-router
extension): a user goes to the replica that reports holding them (`@serve.multiplexed`, one entry
per user, its LRU as large as --max-sessions; an entry dropped closes that user's session), else to the
rendezvous-hash winner among live replicas. Responses, streamed ones too, flow back piece by piece.

A user's memory lives in the store folder (`--store`, which every replica opens: SQLite for text
memory, `<store>/kv/<user key>/` snapshots for kv memory, saved after every answer). When a replica
goes away (killed, its node lost), Ray Serve starts another, the router sends its users elsewhere,
and their next request restores their session from the snapshot: nothing answered is lost. A request
in flight on the replica that died gets a 503 (retry). The store must be reachable by every replica
with working file locks and SQLite's shared memory (one machine, or a filesystem that provides both:
not NFS). `/metrics` and `/healthz` answer for the replica that took the request.

ray is imported inside functions (the optional extra `memllm[ray]`). Knows nothing of the command line.
"""

from __future__ import annotations

import importlib
import json
import logging
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from memllm.agents.chat import MEMORY_MODES
from memllm.errors import ConfigError, DistributedError
from memllm.serve.app import Limits
from memllm.serve.asgi_call import RawRequest, call

log = logging.getLogger("memllm.serve")
APP_NAME = "memllm"
REPLICA_HEADER = "x-memllm-replica"
DEFAULT_REPLICAS = 2
LOCK_TIMEOUT_S = 60.0  # a replica waits this long for a user's kv memory held by another, then 429
LOADER = "memllm.distributed.serve_ray:load_parts"


@dataclass(frozen=True)
class ReplicaSpec:
    """What each replica loads and serves. store, keys: absolute paths every replica reaches.
    loader: 'module:function' that returns (llm, store) for this spec (a seam for tests)."""

    model: str
    device: str
    memory: str
    store: str
    keys: str
    limits: Limits = field(default_factory=Limits)
    host_budget: str | None = None
    loader: str = LOADER

    def __post_init__(self) -> None:
        if self.memory not in MEMORY_MODES:
            raise ConfigError(f"--memory must be one of {', '.join(MEMORY_MODES)}, got {self.memory!r}")
        for name in ("store", "keys"):
            if not Path(getattr(self, name)).is_absolute():
                raise ConfigError(f"the {name} path of Ray replicas must be absolute, got {getattr(self, name)!r}")
        if ":" not in self.loader:
            raise ConfigError(f"loader must be 'module:function', got {self.loader!r}")


def load_parts(spec: ReplicaSpec) -> tuple[Any, Any]:
    """The model and the store of one replica, as `memllm serve` loads them."""
    from memllm.cli import common
    from memllm.host_budget import HostBudget

    llm = common.load_llm(spec.model, spec.device)
    llm.host_budget = HostBudget(spec.host_budget) if spec.host_budget is not None else None
    store = common.open_store(spec.store, with_embedder=True)
    embedder = getattr(store, "embedder", None)
    if embedder is not None:
        embedder.embed(["warm up"])
    return llm, store


def _load(path: str) -> Callable[[ReplicaSpec], tuple[Any, Any]]:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


class Held:
    """A user held by a replica (the multiplexed 'model'): when Ray drops it from the replica's LRU, the
    user's session is closed (saved, its lock let go). Ray calls __del__ itself; the garbage collector
    may again, which does nothing."""

    def __init__(self, user: str, close: Callable[[str], None]) -> None:
        self.user, self._close, self.closed = user, close, False

    def __del__(self) -> None:
        if not self.closed:
            self.closed = True
            self._close(self.user)


class ChatReplica:
    """One model and memllm's FastAPI app in one Ray Serve replica."""

    def __init__(self, spec: ReplicaSpec) -> None:
        from ray import serve

        from memllm.serve.app import create_app
        from memllm.serve.auth import KeyStore

        self.llm, self.store = _load(spec.loader)(spec)
        limits = spec.limits
        if limits.lock_timeout is None:  # never wait forever for a user another replica still holds
            limits = replace(limits, lock_timeout=LOCK_TIMEOUT_S)
        self.app = create_app(self.llm, self.store, model_name=spec.model, keys=KeyStore(spec.keys),
                              limits=limits, memory=spec.memory)  # fmt: skip
        self.name = serve.get_replica_context().replica_id.to_full_id_str()  # its actor's name too
        close = self.app.state.close_session

        async def hold(user: str) -> Held:
            return Held(user, close)

        self.hold = serve.multiplexed(max_num_models_per_replica=limits.max_sessions)(hold)

    async def handle(self, request: RawRequest) -> AsyncIterator[dict[str, Any] | bytes]:
        """The app's response to `request`: its start (status, headers), then its body chunks."""
        from ray import serve

        user = serve.get_multiplexed_model_id()
        if user:
            await self.hold(user)  # this replica now reports holding the user (routing sticks to it)
        async for part in call(self.app, request):
            if isinstance(part, dict):
                part["headers"].append((REPLICA_HEADER.encode(), self.name.encode()))
            yield part


class Ingress:
    """Ray Serve's HTTP entry: each request to the replica holding its user's session."""

    def __init__(self, replicas: Any, keys: str, max_body: int) -> None:
        from memllm.serve.auth import KeyStore

        self.replicas, self.keys, self.max_body = replicas, KeyStore(keys), max_body

    async def __call__(self, request: Any) -> Any:
        import ray
        from starlette.responses import JSONResponse, StreamingResponse

        from memllm.serve.routing import session_user

        scope = request.scope
        size = request.headers.get("content-length")
        # a body of unknown or excessive length is not read here: the app refuses it from its headers
        body = await request.body() if size is not None and size.isdigit() and int(size) <= self.max_body else b""
        user = session_user(scope["path"], request.headers, body, self.keys)
        raw = RawRequest(method=request.method, path=scope["path"], query=scope.get("query_string", b""),
                         headers=list(scope.get("headers", [])), body=body, client=scope.get("client"),
                         server=scope.get("server"), scheme=scope.get("scheme", "http"),
                         raw_path=scope.get("raw_path"))  # fmt: skip
        parts = self.replicas.options(stream=True, multiplexed_model_id=user or "").handle.remote(raw)
        try:
            start = await parts.__anext__()
        except ray.exceptions.RayError as exc:
            log.warning("a replica failed before answering %s: %s", scope["path"], exc)
            return JSONResponse({"error": {"message": "the replica serving this user went away: retry",
                                           "type": "unavailable", "code": 503}},
                                status_code=503, headers={"Retry-After": "1"})  # fmt: skip

        async def rest() -> AsyncIterator[bytes]:
            try:
                async for chunk in parts:
                    yield chunk
            except ray.exceptions.RayError as exc:  # the replica died mid-answer: the response ends there
                log.warning("a replica failed while answering %s: %s", scope["path"], exc)

        response = StreamingResponse(rest(), status_code=start["status"])
        response.raw_headers = list(start["headers"])
        return response


def require_serve() -> None:
    """ConfigError naming the install when Ray Serve (with its request routers) cannot be imported."""
    try:
        import ray.serve  # noqa: F401

        import memllm.distributed.serve_router  # noqa: F401  (imports ray.serve.request_router)
    except ImportError as exc:
        raise ConfigError(
            f"--ray needs Ray Serve with request routers (tested with ray 2.60): pip install -U 'memllm[ray]' ({exc})"
        ) from None


def check_capacity(ray: Any, replicas: int, device: str) -> bool:
    """Whether replicas need GPUs (device cuda...); DistributedError where the cluster has too few."""
    if replicas < 1:
        raise ConfigError(f"--replicas must be at least 1, got {replicas}")
    gpu = device.startswith("cuda")
    have = int(ray.cluster_resources().get("GPU" if gpu else "CPU", 0))
    if replicas > have:
        kind = "GPU" if gpu else "CPU"
        raise DistributedError(
            f"{replicas} replicas need one {kind} each, the Ray cluster has {have}: lower --replicas or add nodes"
        )
    return gpu


def deploy(ray: Any, spec: ReplicaSpec, *, host: str, port: int, replicas: int = DEFAULT_REPLICAS) -> None:
    """Start Ray Serve's HTTP proxy on host:port and run the replicas and the ingress on the connected
    cluster; returns once every replica has loaded its model."""
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from memllm.distributed.serve_router import SessionAffinityRouter

    gpu = check_capacity(ray, replicas, spec.device)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # stderr keeps to memllm's status lines
    serve.start(http_options={"host": host, "port": port})
    replica = serve.deployment(
        name="ChatReplica", num_replicas=replicas,
        ray_actor_options={"num_gpus": 1} if gpu else {"num_cpus": 1},
        max_ongoing_requests=spec.limits.max_concurrent,
        request_router_config=RequestRouterConfig(request_router_class=SessionAffinityRouter),
    )(ChatReplica)  # fmt: skip
    ingress = serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0},
                               max_ongoing_requests=spec.limits.max_concurrent)(Ingress)  # fmt: skip
    try:
        serve.run(ingress.bind(replica.bind(spec), spec.keys, spec.limits.max_body_bytes), name=APP_NAME,
                  route_prefix="/")  # fmt: skip
    except RuntimeError as exc:  # a replica that cannot start (its model, its store): Serve's report
        lines = [line for line in str(exc).splitlines() if line.strip()]
        raise DistributedError(f"the Ray Serve replicas did not start: {lines[-1] if lines else exc}") from None


def undeploy() -> None:
    """Delete the app; shut Ray Serve down too where no other app runs on it."""
    from ray import serve

    serve.delete(APP_NAME)
    if not serve.status().applications:
        serve.shutdown()


def routed_at(host: str, port: int) -> bool:
    """Whether Ray Serve's proxy at host:port routes to this app (its /-/routes lists it): not so where
    Serve was already running on the cluster with other HTTP options, which it then keeps."""
    target = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    url = f"http://{'[' + target + ']' if ':' in target else target}:{port}/-/routes"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return APP_NAME in json.loads(resp.read().decode()).values()
    except (OSError, ValueError, AttributeError):
        return False


def serve_forever(ray: Any, spec: ReplicaSpec, *, host: str, port: int, replicas: int,
                  say: Callable[[str], None]) -> None:  # fmt: skip
    """deploy, then wait until interrupted (Ctrl-C, SIGTERM through the CLI), then undeploy."""
    deploy(ray, spec, host=host, port=port, replicas=replicas)
    try:
        if not routed_at(host, port):
            say(f"warning: Ray Serve does not answer for memllm at http://{host}:{port}: it was started on this "
                "cluster before, with other HTTP options, and keeps them (`serve shutdown` to restart it)")  # fmt: skip
        say(f"serving on http://{host}:{port} with {replicas} replica(s) under Ray Serve (Ctrl-C to stop)")
        while True:
            time.sleep(3600)
    finally:
        undeploy()
