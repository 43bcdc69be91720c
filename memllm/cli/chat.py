"""`memllm chat`: streams a model's answers; interactive on a TTY, line by line from piped stdin.

Commands inside the chat: /exit (or /quit), /reset, /memory, /help. Ctrl-D ends the chat; Ctrl-C stops the
answer being generated (at the prompt it says how to quit). Parsing and rendering only: the model,
its chat template and the window policy live in memllm.llm.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from typing import Any

import typer

from memllm import models
from memllm.cli import common
from memllm.errors import InputError
from memllm.limits import MAX_LINE_CHARS

HELP_TEXT = (
    "commands: /exit or /quit (or Ctrl-D) to leave, /reset to forget the conversation, "
    "/memory to show what was recalled, /help"
)


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


class PlainConversation:
    """Chat without long-term memory: the history lives in this process only."""

    def __init__(self, llm: Any, system: str | None, opts: dict[str, Any]) -> None:
        self.llm, self.opts = llm, opts
        self.base: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
        self.history = list(self.base)

    def send(self, text: str) -> Iterator[str]:
        self.history.append({"role": "user", "content": text})
        pieces: list[str] = []
        try:
            for piece in self.llm.chat_stream(self.history, **self.opts):
                pieces.append(piece)
                yield piece
        finally:  # an interrupted answer stays in the history as far as it went
            self.history.append({"role": "assistant", "content": "".join(pieces)})

    def reset(self) -> str:
        self.history = list(self.base)
        return "(conversation reset)"

    def memory_report(self, as_json: bool) -> str:
        return "(memory is off: start with --user NAME to remember across runs)"

    def close(self) -> None:
        pass


class MemoryConversation:
    """Chat through a ChatAgent: every turn stored, memory recalled per turn."""

    def __init__(self, agent: Any) -> None:
        self.agent = agent

    def send(self, text: str) -> Iterator[str]:
        return self.agent.stream(text)

    def reset(self) -> str:
        return f"(long-term memory of {self.agent.user} is kept: `memllm memory forget` removes records)"

    def memory_report(self, as_json: bool) -> str:
        recall = self.agent.last_recall()
        if recall is None:
            return "(nothing recalled yet: ask something first)"
        return json.dumps(recall.to_dict()) if as_json else recall.explain()

    def close(self) -> None:
        self.agent.close()


def _answer(conv: Any, text: str, interactive: bool) -> None:
    """Stream one answer to stdout; Ctrl-C stops it (interactive) and the chat goes on."""
    try:
        for piece in conv.send(text):
            _write(piece)
    except KeyboardInterrupt:
        if not interactive:
            raise
        _write(" [interrupted]")


@common.fail_on_error
def chat(
    prompt: str | None = typer.Argument(
        None, metavar="PROMPT", help="Answer this one message and exit (as `llm \"...\"`); without it, a chat."
    ),
    model: str = typer.Option(models.DEFAULT_MODEL, "--model", "-m", help="Alias, Hugging Face id or path."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", min=1, max=common.MAX_NEW_TOKENS, help="Longest answer, in tokens."),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 is greedy (deterministic)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    system: str | None = typer.Option(
        None, "--system", help="A system prompt (default: the model's own, on every path, --user too)."
    ),
    repetition_penalty: float = typer.Option(
        1.0, "--repetition-penalty", min=1.0, help="> 1 penalises tokens the answer already used (1 is off)."
    ),
    no_repeat_ngram: int = typer.Option(
        0, "--no-repeat-ngram", min=0, help="Forbid repeating any n-gram of the answer (0 is off)."
    ),
    seed: int | None = typer.Option(None, "--seed", help="Random seed for sampling (temperature > 0)."),
    user: str | None = typer.Option(
        None, "--user", "-u", help="Remember this user's conversations across runs (text memory)."
    ),
    store: str | None = typer.Option(
        None, "--store", help="Memory store folder (default: $MEMLLM_HOME/memory)."
    ),
    memory: str = typer.Option("text", "--memory", help="Memory mode with --user: text, kv or hybrid."),
    memory_tokens: int | None = typer.Option(
        None, "--memory-tokens", min=0, max=common.MAX_BUDGET_TOKENS, help="Budget for recalled memory (default: a quarter of the window)."
    ),
    flash_tokens: int | None = typer.Option(
        None, "--flash-tokens", min=0, max=common.MAX_BUDGET_TOKENS, help="Budget for recent turns (default: half of the window)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Piped mode: one JSON object per answer."),
    interactive: bool | None = typer.Option(
        None, "--interactive/--no-interactive", hidden=True, help="Force prompt mode on or off."
    ),
) -> None:
    """Chat with a model. On a terminal: prompts and streamed answers. Piped: one answer per input line.
    With a PROMPT: that one message is answered (with the user's memory, given --user) and the command exits."""
    if prompt is not None and not prompt.strip():
        raise InputError("the prompt is empty: give a message, or no PROMPT for a chat")
    if prompt is not None and len(prompt) > MAX_LINE_CHARS:
        raise _too_long()
    interactive = (sys.stdin.isatty() if interactive is None else interactive) and prompt is None
    llm = common.load_llm(model, device)
    opts: dict[str, Any] = {"max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed}
    if repetition_penalty > 1.0 or no_repeat_ngram > 0:
        opts.update(repetition_penalty=repetition_penalty, no_repeat_ngram=no_repeat_ngram)
    store_: Any = None  # the text memory store this command opened (closed when the chat ends)
    if user is None:
        conv: Any = PlainConversation(llm, system, opts)
    else:
        from dataclasses import replace

        from memllm.agents.chat import ChatAgent

        budgets = ChatAgent.default_controller_config(llm.trained_len, max_new_tokens)
        if memory_tokens is not None:
            budgets = replace(budgets, memory_tokens=memory_tokens)
        if flash_tokens is not None:
            budgets = replace(budgets, flash_tokens=flash_tokens)
        store_ = common.open_store(store, with_embedder=True)
        agent = ChatAgent(
            llm,
            store_,
            user=user,
            memory=memory,
            system=system,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            controller=budgets,
            repetition_penalty=repetition_penalty,
            no_repeat_ngram=no_repeat_ngram,
            notify=common.status_printer(),
        )
        conv = MemoryConversation(agent)
        kv = agent.kv_status()
        if kv is not None and kv["tokens"]:
            common.status_printer()(f"kv memory of {user}: {kv['tokens']} tokens, {kv['turns']} turns")
    if interactive:
        _write(f"memllm chat with {model}{f' (memory of {user})' if user else ''}. {HELP_TEXT}\n")
    try:
        with common.exit_on_sigterm():  # SIGTERM unwinds: the store and the kv lock are closed
            if prompt is not None:
                _reply(conv, prompt.strip(), False, as_json)
            else:
                _loop(conv, model, interactive, as_json)
    finally:
        try:
            conv.close()
        finally:
            if store_ is not None:
                store_.close()


def _too_long() -> InputError:
    return InputError(
        f"a chat message is longer than {MAX_LINE_CHARS:,} characters: send long text with "
        "`memllm ask FILE` or split it into several messages"
    )


def prompter() -> Any | None:
    """Line editing and a history kept across chats (prompt_toolkit, as `llm chat` and ollama give) where
    stdin and stdout are a terminal; None elsewhere (piped, or --interactive under a test): input()."""
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        return None
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory

    home = models.memllm_home()
    home.mkdir(parents=True, exist_ok=True)
    return PromptSession(history=FileHistory(str(home / "chat_history")))


def _read_line(interactive: bool, session: Any | None = None) -> str:
    """One message: on a terminal, the prompt_toolkit session (else input()); from a pipe at most
    MAX_LINE_CHARS characters (an endless line is refused, not read whole). EOFError at the end of input."""
    if interactive:
        return session.prompt("you> ") if session is not None else input("you> ")
    line = sys.stdin.readline(MAX_LINE_CHARS + 1)
    if not line:
        raise EOFError
    if len(line) > MAX_LINE_CHARS:
        raise _too_long()
    return line


def _loop(conv: Any, model: str, interactive: bool, as_json: bool) -> None:
    """Read lines until /exit or end of input; answer each one."""
    session = prompter() if interactive else None
    while True:
        try:
            line = _read_line(interactive, session)
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
                _write(conv.reset() + "\n")
            elif cmd == "/memory":
                _write(conv.memory_report(as_json) + "\n")
            elif cmd == "/help":
                _write(HELP_TEXT + "\n")
            else:
                _write(f"unknown command {cmd}: {HELP_TEXT}\n")
            continue
        if interactive:
            _write(f"{model}> ")
        _reply(conv, text, interactive, as_json)


def _reply(conv: Any, text: str, interactive: bool, as_json: bool) -> None:
    """Answer one message: streamed, or one JSON object (--json, not on a terminal)."""
    start = time.perf_counter()
    if as_json and not interactive:
        answer = "".join(conv.send(text))
        record = {"user": text, "answer": answer, "seconds": round(time.perf_counter() - start, 3)}
        _write(json.dumps(record) + "\n")
    else:
        _answer(conv, text, interactive)
        _write("\n")
