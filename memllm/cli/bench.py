"""`memllm bench ...` commands (sub-app registered by memllm.cli.app). Parse, call memllm.bench, render."""

from __future__ import annotations

import json
import sys

import typer

from memllm import models
from memllm.cli.common import check_selector, fail_on_error, load_llm, status_printer
from memllm.config import SELECTORS
from memllm.errors import ConfigError

bench_app = typer.Typer(help="Benchmarks: passkey retrieval, long-document QA.", no_args_is_help=True)


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


@bench_app.command("passkey")
@fail_on_error
def passkey(
    lengths: str = typer.Option(
        "8k,32k,128k,1m", "--lengths", help="Comma-separated lengths (k = 1024, m = 1024^2)."
    ),
    depths: int = typer.Option(10, "--depths", min=1, help="Key depths per length, evenly from 0 to 1."),
    model: str = typer.Option(models.DEFAULT_MODEL, "--model", "-m", help="Alias, Hugging Face id or path."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    dtype: str | None = typer.Option(
        None, "--dtype", help="Model dtype (default: bf16 on GPU, fp32 on CPU)."
    ),
    n_local: int | None = typer.Option(None, "--n-local", help="Local window (default: from the model)."),
    topk: int = typer.Option(16, "--topk", help="Memory units retrieved per execution block."),
    offload_dtype: str = typer.Option("bf16", "--offload-dtype", help="bf16, fp16, fp32 or int8."),
    full_attention_baseline: bool = typer.Option(
        False,
        "--full-attention-baseline",
        help="Also run plain full attention (lengths within the trained context).",
    ),
    selector: str | None = typer.Option(
        None, "--selector", metavar="|".join(SELECTORS),
        help="Ask the question after the read as `ask` does, through this selector (every layer reads the units "
        "it chooses; the default lexical among them); without it the prompt is read and answered in one stream.",
    ),  # fmt: skip
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
) -> None:
    """Passkey retrieval: accuracy per length, prefill tokens/s, decode ms/token, peak GPU and host memory."""
    from memllm.bench.passkey import parse_length, run_passkey
    from memllm.config import MemoryConfig

    try:
        wanted = [parse_length(x) for x in lengths.split(",") if x.strip()]
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    check_selector(selector)
    memory = MemoryConfig(n_local=n_local, topk=topk, offload_dtype=offload_dtype,
                          selector=selector or MemoryConfig.selector)  # fmt: skip
    llm = load_llm(model, device, dtype)
    say = status_printer()
    results = []
    if full_attention_baseline:
        fits = [n for n in wanted if n <= llm.trained_len]
        results += run_passkey(llm, fits, depths, system="full", progress=say)
    system = "memllm" if selector is None else f"ask:{selector}"
    results += run_passkey(llm, wanted, depths, memory=memory, system=system, progress=say, selector=selector)
    summaries = [r.summary() for r in results]
    if as_json:
        payload = {"model": model, "device": str(llm.device), "dtype": str(llm.dtype), "results": summaries}
        json.dump(payload, sys.stdout)
        sys.stdout.write("\n")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"passkey retrieval: {model} on {llm.device}")
    for col in ("system", "length", "correct", "prefill tok/s", "decode ms/tok", "peak GPU", "host (units)"):
        table.add_column(col)
    for s in summaries:
        tps = s["prefill_tokens_per_s"]
        dec = s["decode_ms_per_token"]
        table.add_row(
            s["system"],
            str(s["length"]),
            f"{s['correct']}/{s['trials']}",
            "-" if tps is None else f"{tps:,.0f}",
            "-" if dec is None else f"{dec:.1f}",
            _gib(s["peak_gpu_bytes"]),
            _gib(s["host_bytes"]),
        )
    Console().print(table)


@bench_app.command("ruler")
@fail_on_error
def ruler(
    lengths: str = typer.Option("4k", "--lengths", help="Comma-separated lengths (k = 1024, m = 1024^2)."),
    families: str = typer.Option(
        "single,multikey,multivalue,multiquery,squad,hotpotqa", "--families", help="Task families to ask."
    ),
    questions: int = typer.Option(8, "--questions", min=1, help="Questions per family and length."),
    systems: str = typer.Option(
        "full,infllm,lexical,oracle", "--systems",
        help="full (the model's own attention, lengths within its context), infllm (each layer's own "
        "lookup), question (the question's attention alone), hybrid (the question's attention and a text index "
        "over the units), lexical (the default selector: hybrid with the units holding the question's rare words "
        "first), text (the text index alone), oracle (gold units read first).",
    ),
    model: str = typer.Option(models.DEFAULT_MODEL, "--model", "-m", help="Alias, Hugging Face id or path."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    dtype: str | None = typer.Option(None, "--dtype", help="Model dtype (default: bf16 on GPU, fp32 on CPU)."),
    n_local: int | None = typer.Option(None, "--n-local", help="Local window (default: from the model)."),
    topk: int = typer.Option(16, "--topk", help="Memory units read per lookup."),
    block_size: int = typer.Option(128, "--block-size", help="Tokens per memory unit."),
    memory_distance: int | None = typer.Option(
        None, "--memory-distance", help="Where retrieved units sit from every query (default: from the window)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the haystacks and questions."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (every answer) instead of a table."),
) -> None:
    """RULER-style tasks on real text (essays with needles, Wikipedia paragraphs with SQuAD/HotpotQA
    questions), read once and asked many questions: score per family and system, and which layers
    read the gold evidence."""
    from memllm.bench import ruler as suite
    from memllm.bench import ruler_run
    from memllm.bench.passkey import parse_length
    from memllm.bench.qa import parse_list
    from memllm.config import MemoryConfig

    try:
        wanted = [parse_length(x) for x in lengths.split(",") if x.strip()]
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    fams = parse_list(families, suite.FAMILIES, "task")
    chosen = parse_list(systems, ruler_run.SYSTEMS, "system")
    memory = MemoryConfig(n_local=n_local, topk=topk, block_size=block_size, memory_distance=memory_distance)
    llm = load_llm(model, device, dtype)
    embedder = None
    if set(ruler_run.TEXT_SYSTEMS) & set(chosen):
        from memllm.cli.common import load_embedder

        embedder = load_embedder()
    say = status_printer()
    rows = []
    for n in wanted:
        hays = suite.build_suite(llm.tokenizer, n, fams, questions, seed=seed)
        use = [s for s in chosen if s != "full" or n <= llm.trained_len]
        rows += ruler_run.run(llm, hays, use, memory, progress=say, embedder=embedder)
    items = ruler_run.summary(rows)
    if as_json:
        json.dump({"model": model, "device": str(llm.device), "summary": items, "rows": rows}, sys.stdout,
                  default=str)  # fmt: skip
        sys.stdout.write("\n")
        return
    sys.stdout.write(ruler_run.table(items) + "\n")
