"""The `memllm` command: a typer app that parses, calls the library and renders. No logic of its own.

MemllmError becomes a one-line message on stderr and its exit code (no traceback).
"""

from __future__ import annotations

import sys

import typer

from memllm import __version__
from memllm.cli.ask import ask, qa_command
from memllm.cli.bench import bench_app
from memllm.cli.chat import chat
from memllm.cli.memory import memory_app
from memllm.cli.models import models_app
from memllm.cli.serve import serve_app
from memllm.errors import MemllmError

app = typer.Typer(
    name="memllm",
    help="Language models with memory beyond their context window: chat, long-document Q&A, benchmarks.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion, --show-completion (bash, zsh, fish, powershell)
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"memllm {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """memllm: memory beyond the context window for language models."""


app.command(help="Chat with a model (streams tokens; reads piped stdin line by line).")(chat)
app.command(help="Answer questions about documents: read once, ask many, show the evidence.")(ask)
app.add_typer(models_app, name="models")
app.add_typer(memory_app, name="memory")
app.add_typer(bench_app, name="bench")
app.add_typer(serve_app, name="serve")
bench_app.command("qa", help="Long-document QA: SQuAD/HotpotQA hidden in distractors; EM/F1 per mode.")(qa_command)


def _word_metavars(typer_app: typer.Typer) -> None:
    """Every option and argument without a metavar of its own shows a word in --help (MODEL, N)
    rather than its Python type (<str>, <int>); flags show none."""
    import inspect

    from typer.models import ArgumentInfo, OptionInfo

    callbacks = [c.callback for c in typer_app.registered_commands]
    if typer_app.registered_callback is not None:  # a group's own options (memllm serve)
        callbacks.append(typer_app.registered_callback.callback)
    for callback in callbacks:
        if callback is None:
            continue
        for name, param in inspect.signature(callback).parameters.items():
            info = param.default
            if not isinstance(info, OptionInfo | ArgumentInfo) or info.metavar is not None:
                continue
            kind = str(param.annotation)
            info.metavar = "" if "bool" in kind else "N" if "int" in kind else "X" if "float" in kind else name.upper()
    for group in typer_app.registered_groups:
        _word_metavars(group.typer_instance)


_word_metavars(app)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except MemllmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    main()
