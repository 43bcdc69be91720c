"""`memllm models`: list aliases with installed/cached state; `memllm models prepare NAME` builds the cache."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.table import Table

from memllm import models
from memllm.cli.common import fail_on_error, status_printer

models_app = typer.Typer(help="Model aliases: installed and cached state, sizes, trained context.")


def _size(n: int) -> str:
    return f"{n / 1e6:.0f} MB" if n else "-"


@models_app.callback(invoke_without_command=True)
def list_models(
    ctx: typer.Context,
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
) -> None:
    """List the model aliases (run `memllm models prepare NAME` to convert weights ahead of time)."""
    if ctx.invoked_subcommand is not None:
        return
    rows = models.model_table()
    if as_json:
        typer.echo(json.dumps({"models": rows, "home": str(models.memllm_home())}, indent=2))
        return
    table = Table(title=f"memllm models (cache: {models.memllm_home() / 'models'})")
    for col in ("alias", "installed", "cached", "package", "cache", "context"):
        table.add_column(col, no_wrap=True)
    for r in rows:
        table.add_row(
            r["alias"] + (" (default)" if r["default"] else ""),
            "yes" if r["installed"] else "no",
            "yes" if r["cached"] else "no",
            _size(r["package_bytes"]),
            _size(r["cache_bytes"]),
            f"{r['trained_context']:,}",
        )
    console = Console()
    console.print(table)
    for r in rows:
        note = r["description"] if r["installed"] else f"not installed: {r['install']}"
        if r["long_mode"]:
            note += f"; ask reads documents longer than its default window in --mode {r['long_mode']} where no mode is given"
        if r["long_read"]:
            note += f"; ask --mode kv reads them with {models.as_flags(r['long_read'])}"
        console.print(f"{r['alias']}: {note}", soft_wrap=True)


@models_app.command("prepare")
@fail_on_error
def prepare(name: str = typer.Argument(models.DEFAULT_MODEL, help="Alias, .gguf path or folder.")) -> None:
    """Convert a model's weights into the cache now, so the first chat starts fast."""
    resolved = models.resolve(name)
    location = models.weights_location(resolved, status_printer())
    typer.echo(f"{name}: ready ({location})")
