"""CLI transcripts with a fake model: exact output for scripted stdin; errors as one line, no traceback."""

from __future__ import annotations

import json
import subprocess
import sys

from typer.testing import CliRunner

from memllm import __version__
from memllm.cli.app import app

runner = CliRunner()


def test_version_and_help():
    assert runner.invoke(app, ["--version"]).stdout == f"memllm {__version__}\n"
    out = runner.invoke(app, ["--help"]).stdout
    for cmd in ("chat", "models", "bench"):
        assert cmd in out


def test_piped_chat_transcript(fake_llm):
    result = runner.invoke(app, ["chat"], input="hello there\n\nsecond question\n")
    assert result.exit_code == 0, result.output
    assert result.stdout == "echo: hello there (1 msgs)\necho: second question (3 msgs)\n"
    assert fake_llm.loaded == [("smollm2-135m", "auto")]


def test_piped_reset_exit_help_and_unknown(fake_llm):
    script = "one\n/reset\ntwo\n/help\n/nope\n/exit\nnever sent\n"
    result = runner.invoke(app, ["chat", "--model", "m", "--device", "cpu"], input=script)
    assert result.exit_code == 0
    help_line = (
        "commands: /exit or /quit (or Ctrl-D) to leave, /reset to forget the conversation, "
        "/memory to show what was recalled, /help\n"
    )
    assert result.stdout == (
        "echo: one (1 msgs)\n(conversation reset)\necho: two (1 msgs)\n"
        + help_line
        + "unknown command /nope: "
        + help_line
    )
    assert len(fake_llm.calls) == 2


def test_interactive_prompts_and_ctrl_d(fake_llm):
    result = runner.invoke(app, ["chat", "--interactive", "--system", "be brief"], input="hi\n")
    assert result.exit_code == 0
    assert result.stdout == (
        "memllm chat with smollm2-135m. commands: /exit or /quit (or Ctrl-D) to leave, "
        "/reset to forget the conversation, /memory to show what was recalled, /help\n"
        "you> smollm2-135m> echo: hi (2 msgs)\nyou> \n"
    )
    assert fake_llm.calls[0][0] == {"role": "system", "content": "be brief"}


def test_one_prompt_is_answered_and_the_command_exits(fake_llm):
    result = runner.invoke(app, ["chat", "what is up?"], input="never read\n")
    assert result.exit_code == 0, result.output
    assert result.stdout == "echo: what is up? (1 msgs)\n" and len(fake_llm.calls) == 1
    result = runner.invoke(app, ["chat", "a b", "--json"])
    assert json.loads(result.stdout)["answer"] == "echo: a b (1 msgs)"
    result = runner.invoke(app, ["chat", "  "])
    assert result.exit_code != 0 and "the prompt is empty" in result.stderr and result.stdout == ""


def test_json_mode(fake_llm):
    result = runner.invoke(app, ["chat", "--json"], input="a b\n")
    record = json.loads(result.stdout)
    assert record["user"] == "a b" and record["answer"] == "echo: a b (1 msgs)"


def test_max_new_tokens_passed(fake_llm):
    result = runner.invoke(app, ["chat", "--max-new-tokens", "2"], input="a b c\n")
    assert result.stdout == "echo: a\n"


def test_unknown_model_is_one_line_without_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "memllm.cli.app", "chat", "--model", "no-such-model"],
        input="hi\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 3
    assert proc.stdout == ""
    assert proc.stderr == (
        "error: model 'no-such-model' not found: use an alias from `memllm models` "
        "(smollm2-135m, qwen2.5-coder-0.5b), a Hugging Face id or a path to a model folder or .gguf file\n"
    )


def test_models_json_lists_aliases(isolated_home):
    result = runner.invoke(app, ["models", "--json"])
    data = json.loads(result.stdout)
    assert [m["alias"] for m in data["models"]] == ["smollm2-135m", "qwen2.5-coder-0.5b"]
    assert [m["long_read"] for m in data["models"]] == [{"n_local": 512, "topk": 8}, {}]
    assert [m["long_mode"] for m in data["models"]] == ["text", None]
    assert [m["text_tokens"] for m in data["models"]] == [512, 2048]
    assert data["home"] == str(isolated_home)
    assert all(m["cached"] is False for m in data["models"])


def test_models_prepare_unknown_name():
    result = runner.invoke(app, ["models", "prepare", "nope"])
    assert result.exit_code == 3
    assert "model 'nope' not found" in result.stderr


def test_terminal_chat_gets_line_editing_and_a_history_file(monkeypatch, tmp_path):
    from memllm.cli import chat as chat_cli

    monkeypatch.setenv("MEMLLM_HOME", str(tmp_path))
    monkeypatch.setattr(sys.stdin, "isatty", lambda: False)
    assert chat_cli.prompter() is None  # piped: input()
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    session = chat_cli.prompter()
    assert session is not None and session.history.filename == str(tmp_path / "chat_history")


def test_shell_completion_completes_commands_and_options(monkeypatch):
    """`memllm --show-completion bash` prints the script; the completion itself names commands and options."""
    import typer.completion

    # Typer names the shell it finds among the process's ancestors (shellingham), whatever word follows the
    # option; a test run with no shell above it (a detached job) would find none and exit 1.
    monkeypatch.setattr(typer.completion, "_get_shell_name", lambda: "bash")
    shown = runner.invoke(app, ["--show-completion", "bash"], prog_name="memllm")
    assert shown.exit_code == 0 and "complete -o default -F _memllm_completion memllm" in shown.output

    def complete(words: str) -> list[str]:
        cword = len(words.split()) - (0 if words.endswith(" ") else 1)  # the word being completed
        env = {"_MEMLLM_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(cword)}
        return runner.invoke(app, [], prog_name="memllm", env=env).output.split()

    assert complete("memllm ch") == ["chat"]
    assert "--selector" in complete("memllm ask --sel")
    assert {"show", "forget", "add", "repair"} <= set(complete("memllm memory "))


def test_options_show_words_not_python_types():
    """Every option of every command names its value with a word (MODEL, N, PATH...) in --help."""
    import typer.main

    def walk(cmd, path: str):
        yield path, cmd
        for name, sub in getattr(cmd, "commands", {}).items():
            yield from walk(sub, f"{path} {name}")

    seen = 0
    for path, cmd in walk(typer.main.get_command(app), "memllm"):
        for p in cmd.params:
            if getattr(p, "is_flag", True) is False and p.name != "help":  # options taking a value
                seen += 1
                assert p.metavar and not p.metavar.startswith("<"), (path, p.name, p.metavar)
    assert seen > 40
    shown = runner.invoke(app, ["ask", "--help"], terminal_width=200).output
    assert "<str>" not in shown.replace("<list[str]>", "") and "QUESTION" in shown
