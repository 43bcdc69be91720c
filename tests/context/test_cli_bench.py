"""`memllm bench passkey`: options reach the runner, --json prints one parseable object."""

from __future__ import annotations

import json

import typer
from typer.testing import CliRunner

import memllm.cli.bench as bench_cli
from tests.context.helpers import CharTokenizer, FakeLLM, tiny_model


def invoke(args: list[str]):
    app = typer.Typer()
    app.add_typer(bench_cli.bench_app, name="bench")
    return CliRunner().invoke(app, ["bench", *args])


def test_passkey_json(monkeypatch):
    llm = FakeLLM(tiny_model("llama", trained=8192), CharTokenizer())
    monkeypatch.setattr(bench_cli, "load_llm", lambda model, device, dtype=None: llm)
    args = [
        "passkey",
        "--lengths",
        "600,700",
        "--depths",
        "2",
        "--json",
        "--full-attention-baseline",
        "--topk",
        "4",
    ]
    result = invoke(args)
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    rows = [(r["system"], r["length"], r["trials"]) for r in payload["results"]]
    assert rows == [("full", 600, 2), ("full", 700, 2), ("memllm", 600, 2), ("memllm", 700, 2)]
    for r in payload["results"]:
        assert 0 <= r["correct"] <= 2 and r["prefill_tokens_per_s"] > 0


def test_bad_length_is_a_config_error(monkeypatch):
    monkeypatch.setattr(bench_cli, "load_llm", lambda *a, **k: None)
    result = invoke(["passkey", "--lengths", "lots"])
    assert result.exit_code == 2


def test_passkey_asked_through_a_selector(monkeypatch):
    """--selector: the haystack read, then the question asked as `ask` asks it (rows named ask:SELECTOR)."""
    llm = FakeLLM(tiny_model("llama", trained=8192), CharTokenizer())
    monkeypatch.setattr(bench_cli, "load_llm", lambda model, device, dtype=None: llm)
    result = invoke(["passkey", "--lengths", "700", "--depths", "2", "--topk", "4", "--selector", "question", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert [(r["system"], r["length"], r["trials"]) for r in payload["results"]] == [("ask:question", 700, 2)]


def test_unknown_selector_is_a_config_error(monkeypatch):
    monkeypatch.setattr(bench_cli, "load_llm", lambda *a, **k: None)
    result = invoke(["passkey", "--selector", "best"])
    assert result.exit_code == 2 and "--selector must be one of" in result.output
