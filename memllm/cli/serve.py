"""`memllm serve` and `memllm serve keys add|list|remove`: parse options, build the app, run uvicorn (or, with
--ray, the app's replicas under Ray Serve: memllm.distributed.serve_ray).

No logic of its own: the app is memllm.serve.app, keys memllm.serve.auth.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from memllm.cli import common

if TYPE_CHECKING:
    from memllm.serve.app import Limits

serve_app = typer.Typer(help="Serve an OpenAI-compatible HTTP API with per-user memory.", invoke_without_command=True)
keys_app = typer.Typer(help="API keys of the server (stored hashed).", no_args_is_help=True)
serve_app.add_typer(keys_app, name="keys")

KeysOpt = typer.Option(None, "--keys", help="Keys file (default: $MEMLLM_HOME/serve/keys.json).")


def _keys_path(path: str | None) -> Path:
    from memllm.models import memllm_home

    return Path(path) if path else memllm_home() / "serve" / "keys.json"


def _warm_up(store: object) -> None:
    """Load the embedder before serving, so the first requests do not wait for it (and time out)."""
    embedder = getattr(store, "embedder", None)
    if embedder is not None:
        embedder.embed(["warm up"])


@serve_app.callback()
@common.fail_on_error
def serve(
    ctx: typer.Context,
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8000, "--port"),
    model: str = typer.Option("smollm2-135m", "--model", help="Alias, HF id or path."),
    device: str = typer.Option("cpu", "--device"),
    memory: str = typer.Option("text", "--memory", help="text, kv or hybrid."),
    store: str | None = typer.Option(None, "--store", help="Memory store folder."),
    keys: str | None = KeysOpt,
    max_body: int = typer.Option(1_000_000, "--max-body", help="Largest request body in bytes (413 over)."),
    max_tokens: int = typer.Option(512, "--max-tokens", help="Largest max_tokens a request may ask."),
    max_concurrent: int = typer.Option(64, "--max-concurrent", help="Requests at once before 429."),
    max_sessions: int = typer.Option(64, "--max-sessions", help="User sessions kept in memory (LRU)."),
    max_queue: int = typer.Option(64, "--max-queue", min=1, help="Chats waiting for the model before 429."),
    batch: bool = typer.Option(True, "--batch/--no-batch", help="Users' greedy answers decode together, one model call per step for "
                               "all of them (text memory: when several are asked at once; --no-batch: one answer "
                               "at a time)."),
    memory_tokens: int | None = typer.Option(
        None, "--memory-tokens", min=0, help="Budget for recalled memory per prompt (default: a quarter of the window)."),
    flash_tokens: int | None = typer.Option(
        None, "--flash-tokens", min=0, help="Budget for recent turns per prompt (default: half of the window)."),
    host_budget: str | None = typer.Option(
        None, "--host-budget", metavar="SIZE", help="Host memory (pinned on a GPU) all users' kv memories may hold together, "
        "e.g. 8GiB: idle sessions are closed (saved on disk) to make room, else 503 (default: no budget)."),
    ray: str | None = typer.Option(
        None, "--ray", metavar="ADDRESS|auto", help="Run replicas under Ray Serve on the cluster at HOST:PORT "
        "(auto: the one running here); each user is served by the replica holding their session. Needs pip "
        "install 'memllm\\[ray]'."),
    replicas: int | None = typer.Option(
        None, "--replicas", help="Replicas under --ray, one model and one CPU (GPU with --device cuda) each "
        "(default: 2)."),
) -> None:
    """Run the server (no keys configured: loopback clients only)."""
    if ctx.invoked_subcommand is not None:
        return
    import uvicorn

    from memllm.errors import ConfigError
    from memllm.host_budget import HostBudget
    from memllm.serve.app import Limits, create_app
    from memllm.serve.auth import KeyStore

    budget = HostBudget(host_budget) if host_budget is not None else None  # checked before the model loads
    limits = Limits(max_body_bytes=max_body, max_tokens=max_tokens, max_concurrent=max_concurrent,
                    max_sessions=max_sessions, max_queue=max_queue, memory_tokens=memory_tokens, flash_tokens=flash_tokens,
                    batch=batch)
    if replicas is not None and ray is None:
        raise ConfigError("--replicas applies with --ray ADDRESS")
    key_store = KeyStore(_keys_path(keys))
    if len(key_store) == 0 and host not in ("127.0.0.1", "::1", "localhost"):
        typer.echo("no API keys configured: only loopback clients will be served "
                   "(add one with `memllm serve keys add NAME --user U`)", err=True)
    if ray is not None:
        _serve_on_ray(ray, replicas, host=host, port=port, model=model, device=device, memory=memory, store=store,
                      keys=keys, limits=limits, host_budget=host_budget)  # fmt: skip
        return
    llm = common.load_llm(model, device)
    llm.host_budget = budget
    s = common.open_store(store, with_embedder=True)
    _warm_up(s)
    app = create_app(llm, s, model_name=model, keys=key_store, limits=limits, memory=memory)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        s.close()


def _serve_on_ray(address: str, replicas: int | None, *, host: str, port: int, model: str, device: str,
                  memory: str, store: str | None, keys: str | None, limits: Limits, host_budget: str | None) -> None:
    """`memllm serve --ray`: the replicas under Ray Serve until Ctrl-C or SIGTERM (memllm.distributed.serve_ray)."""
    from memllm.distributed import ray_docs, serve_ray
    from memllm.models import default_store_path

    spec = serve_ray.ReplicaSpec(
        model=model, device=device, memory=memory, store=str(Path(store or default_store_path()).resolve()),
        keys=str(_keys_path(keys).resolve()), limits=limits, host_budget=host_budget, loader=serve_ray.LOADER,
    )  # fmt: skip
    serve_ray.require_serve()
    say = common.status_printer()
    # SIGTERM's handler after ray.init, which installs its own (a stack dump, then death) over it
    with ray_docs.cluster(address) as ray_module, common.exit_on_sigterm():
        say(f"starting {replicas or serve_ray.DEFAULT_REPLICAS} replica(s) of {model} under Ray Serve")
        try:
            serve_ray.serve_forever(ray_module, spec, host=host, port=port,
                                    replicas=replicas or serve_ray.DEFAULT_REPLICAS, say=say)  # fmt: skip
        except KeyboardInterrupt:
            say("stopped")


@keys_app.command("add")
@common.fail_on_error
def keys_add(name: str, user: list[str] = typer.Option(..., "--user", "-u"), keys: str | None = KeysOpt,
             as_json: bool = typer.Option(False, "--json")) -> None:
    """Create a key for USER(s); the token is printed once and only its hash is stored."""
    from memllm.serve.auth import KeyStore

    token = KeyStore(_keys_path(keys)).add(name, user)
    typer.echo(json.dumps({"name": name, "users": user, "key": token}) if as_json else token)


@keys_app.command("list")
@common.fail_on_error
def keys_list(keys: str | None = KeysOpt) -> None:
    """Key names and their users (never the tokens)."""
    from memllm.serve.auth import KeyStore

    for name, entry in KeyStore(_keys_path(keys)).keys.items():
        typer.echo(f"{name}\t{','.join(entry['users'])}")


@keys_app.command("remove")
@common.fail_on_error
def keys_remove(name: str, keys: str | None = KeysOpt) -> None:
    """Remove a key."""
    from memllm.serve.auth import KeyStore

    if not KeyStore(_keys_path(keys)).remove(name):
        raise typer.Exit(1)


@serve_app.command("mcp")
@common.fail_on_error
def serve_mcp(
    transport: str = typer.Option("stdio", "--transport", help="stdio or http (streamable HTTP at /mcp)."),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8001, "--port"),
    user: list[str] = typer.Option(["default"], "--user", "-u",
                                   help="Users a caller without a key acts for (stdio; loopback HTTP)."),
    store: str | None = typer.Option(None, "--store", help="Memory store folder."),
    keys: str | None = KeysOpt,
) -> None:
    """Serve the memory tools (search, add, forget) over MCP, for agent hosts."""
    from memllm.errors import ConfigError
    from memllm.serve.auth import KeyStore
    from memllm.serve.mcp_server import create_mcp

    if transport not in ("stdio", "http"):
        raise ConfigError(f"--transport {transport!r}: use stdio or http")
    key_store = KeyStore(_keys_path(keys)) if transport == "http" else None
    if transport == "http" and len(key_store) == 0 and host not in ("127.0.0.1", "::1", "localhost"):
        raise ConfigError(f"no API keys configured: serve MCP on a loopback --host, or add a key with "
                          f"`memllm serve keys add NAME --user U` to serve on {host}")
    s = common.open_store(store, with_embedder=True)
    _warm_up(s)
    base = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    server = create_mcp(s, users=user, keys=key_store, base_url=base)
    try:
        if transport == "stdio":
            server.run("stdio")
        else:
            server.run("streamable-http", host=host, port=port)
    finally:
        s.close()
