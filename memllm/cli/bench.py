"""`memllm bench ...` commands (sub-app registered by memllm.cli.app). Parse, call memllm.bench, render."""

from __future__ import annotations

import typer

bench_app = typer.Typer(help="Benchmarks: passkey retrieval, long-document QA.", no_args_is_help=True)
