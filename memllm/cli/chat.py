"""`memllm chat`: streams a model's answers; interactive on a TTY, line by line from piped stdin.

Commands inside the chat: /exit (or /quit), /reset, /help. Ctrl-D ends the chat; Ctrl-C stops the
answer being generated (at the prompt it says how to quit). Parsing and rendering only: the model,
its chat template and the window policy live in memllm.llm.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import typer

from memllm import models
from memllm.cli import common

HELP_TEXT = "commands: /exit or /quit (or Ctrl-D) to leave, /reset to forget the conversation, /help"


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _answer(
    llm: Any, history: list[dict[str, str]], opts: dict[str, Any], interactive: bool
) -> tuple[str, bool]:
    """Stream one answer to stdout; returns (text, interrupted)."""
    pieces: list[str] = []
    try:
        for piece in llm.chat_stream(history, **opts):
            pieces.append(piece)
            _write(piece)
    except KeyboardInterrupt:
        if not interactive:
            raise
        _write(" [interrupted]")
        return "".join(pieces), True
    return "".join(pieces), False


@common.fail_on_error
def chat(
    model: str = typer.Option(models.DEFAULT_MODEL, "--model", "-m", help="Alias, Hugging Face id or path."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", min=1, help="Longest answer, in tokens."),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 is greedy (deterministic)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    system: str | None = typer.Option(None, "--system", help="A system prompt for the conversation."),
    seed: int | None = typer.Option(None, "--seed", help="Random seed for sampling (temperature > 0)."),
    as_json: bool = typer.Option(False, "--json", help="Piped mode: one JSON object per answer."),
    interactive: bool | None = typer.Option(
        None, "--interactive/--no-interactive", hidden=True, help="Force prompt mode on or off."
    ),
) -> None:
    """Chat with a model. On a terminal: prompts and streamed answers. Piped: one answer per input line."""
    interactive = sys.stdin.isatty() if interactive is None else interactive
    llm = common.load_llm(model, device)
    opts: dict[str, Any] = {"max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed}
    base: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    history = list(base)
    if interactive:
        _write(f"memllm chat with {model}. {HELP_TEXT}\n")
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            if interactive:
                _write("\n")
            return
        except KeyboardInterrupt:
            if not interactive:
                raise
            _write("\n(use /exit or Ctrl-D to quit)\n")
            continue
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            cmd = text.split()[0].lower()
            if cmd in ("/exit", "/quit"):
                return
            if cmd == "/reset":
                history = list(base)
                _write("(conversation reset)\n")
            elif cmd == "/help":
                _write(HELP_TEXT + "\n")
            else:
                _write(f"unknown command {cmd}: {HELP_TEXT}\n")
            continue
        history.append({"role": "user", "content": text})
        if interactive:
            _write(f"{model}> ")
        start = time.perf_counter()
        if as_json and not interactive:
            answer = "".join(llm.chat_stream(history, **opts))
            interrupted = False
            record = {"user": text, "answer": answer, "seconds": round(time.perf_counter() - start, 3)}
            _write(json.dumps(record) + "\n")
        else:
            answer, interrupted = _answer(llm, history, opts, interactive)
            _write("\n")
        history.append({"role": "assistant", "content": answer})
        if interrupted:
            continue
