"""Session: ask leaves memory unchanged, snapshots restore in a new process, unsupported models refused."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from memllm.config import MemoryConfig
from memllm.errors import ConfigError, SnapshotError, UnsupportedModelError
from memllm.session import Session
from tests.context.helpers import CharTokenizer, FakeLLM, small_memory, tiny_model

TEXT = "".join(chr(33 + (i * 7919) % 90) for i in range(700))  # printable, long enough to cut units


def make_session(kind: str = "llama", **mem) -> Session:
    return Session(FakeLLM(tiny_model(kind), CharTokenizer()), small_memory(**mem))


def test_feed_progress_and_stats():
    s = make_session()
    calls = []
    n = s.feed(TEXT, progress=lambda done, total: calls.append((done, total)))
    assert n == len(TEXT) and calls[-1] == (n, n)
    assert all(done <= s.config.chunk_size * (i + 1) for i, (done, _) in enumerate(calls))
    st = s.stats()
    assert st["tokens_seen"] == n and st["units"] > 0 and st["lookups"] > 0
    assert st["host_bytes"] > 0 and st["device_bytes"] > 0


def test_ask_rolls_back_memory():
    s = make_session()
    s.feed(TEXT)
    before = s.last_logits.clone()
    seen, units = s.stats()["tokens_seen"], s.stats()["units"]
    answer = s.ask("What was said?", max_new_tokens=8)
    assert isinstance(answer, str)
    assert s.stats()["tokens_seen"] == seen and s.stats()["units"] == units
    assert torch.equal(s.last_logits, before)
    # The next step after ask equals the next step of a session that never asked.
    fresh = make_session()
    fresh.feed(TEXT)
    a = list(s.generate_ids("xyz", max_new_tokens=4, stop=set()))
    b = list(fresh.generate_ids("xyz", max_new_tokens=4, stop=set()))
    assert a == b
    torch.testing.assert_close(s.last_logits, fresh.last_logits, rtol=0, atol=0)


def answer_ids(s: Session, static: bool) -> tuple[list[int], int, object]:
    """Tokens of an answer (rolled back), units during it; static: through a DecodeGraph run eagerly."""
    from memllm.context.cuda.graph import DecodeGraph

    graph = DecodeGraph(s.cache, capture=False) if static else None
    if static:
        s.cache.decode_graph = lambda: graph  # what CUDA gets; eager on the CPU
    with s.answering():
        toks = list(s.generate_ids("What was said?", max_new_tokens=8, stop=set()))
        units = s.stats()["units"]
    return toks, units, graph


def test_answering_cuts_nothing_and_static_calls_answer_alike():
    """While answering, calls that fit the held limit cut no units (the question and answer stay in the
    window); the question as one static 16-row call and the answer as static single tokens give the
    plain path's tokens, and the memory is rolled back either way."""
    plain = make_session(exc_block_size=64, chunk_size=192)
    plain.feed(TEXT)
    units = plain.stats()["units"]
    want, during, _ = answer_ids(plain, static=False)
    assert during == units and plain.stats()["units"] == units
    static = make_session(exc_block_size=64, chunk_size=192)
    static.feed(TEXT)
    got, during, graph = answer_ids(static, static=True)
    assert got == want and during == units
    assert graph.row_steps == 1 and graph.steps == 1 + len(got)
    assert static.stats()["tokens_seen"] == len(TEXT)


def test_answering_rolls_back_on_error():
    """What was fed inside `answering()` is rolled back also when the block raises."""
    s = make_session()
    s.feed(TEXT)
    before = (s.stats()["tokens_seen"], s.stats()["units"], s.last_logits.clone())
    with pytest.raises(KeyboardInterrupt), s.answering():
        s.feed("a question that is interrupted " * 3)
        raise KeyboardInterrupt
    assert (s.stats()["tokens_seen"], s.stats()["units"]) == before[:2]
    assert torch.equal(s.last_logits, before[2]) and s.asks == 1


def test_generate_keeps_tokens_in_memory():
    s = make_session()
    s.feed(TEXT[:100])
    pieces = list(s.generate(max_new_tokens=5))
    assert s.stats()["tokens_seen"] == 100 + len("".join(pieces))


SUBPROCESS = textwrap.dedent(
    """
    import sys, torch
    from transformers import AutoModelForCausalLM
    sys.path.insert(0, {root!r})
    from tests.context.helpers import CharTokenizer, FakeLLM
    from memllm.session import Session
    model = AutoModelForCausalLM.from_pretrained({model!r}).eval()
    s = Session.restore(FakeLLM(model, CharTokenizer()), {snap!r})
    s.feed("?!")
    torch.save({{"logits": s.last_logits, "stats": s.stats()}}, {out!r})
    """
)


@pytest.mark.parametrize("offload", ["fp32", "int8"])
def test_snapshot_restores_in_new_process(tmp_path: Path, offload: str):
    s = make_session(offload_dtype=offload)
    s.llm.model.save_pretrained(tmp_path / "model")
    s.feed(TEXT)
    snap = s.save(tmp_path / "snap")
    manifest = json.loads((snap / "manifest.json").read_text())
    assert manifest["version"] == 2 and manifest["memory"]["offload_dtype"] == offload
    s.feed("?!")
    out = tmp_path / "out.pt"
    root = str(Path(__file__).resolve().parents[2])
    code = SUBPROCESS.format(root=root, model=str(tmp_path / "model"), snap=str(snap), out=str(out))
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    got = torch.load(out)
    torch.testing.assert_close(got["logits"], s.last_logits, rtol=1e-6, atol=1e-6)
    assert got["stats"]["units"] == s.stats()["units"]


def test_snapshot_errors(tmp_path: Path):
    s = make_session()
    with pytest.raises(SnapshotError, match="no memory snapshot"):
        Session.restore(s.llm, tmp_path / "missing")
    s.feed("hello")
    snap = s.save(tmp_path / "snap")
    manifest = json.loads((snap / "manifest.json").read_text())
    manifest["version"] = 99
    (snap / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SnapshotError, match="version 99"):
        Session.restore(s.llm, snap)
    manifest["version"] = 1
    (snap / "manifest.json").write_text(json.dumps(manifest))
    other = FakeLLM(tiny_model("llama", layers=3), CharTokenizer())
    with pytest.raises(SnapshotError, match="shaped"):
        Session.restore(other, snap)


def test_unsupported_model_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).eval()
    with pytest.raises(UnsupportedModelError, match="rotary"):
        Session(FakeLLM(model, CharTokenizer()), small_memory())


def test_budget_beyond_trained_length_is_refused():
    with pytest.raises(ConfigError, match="trained context"):
        make_session(n_local=400, topk=16, block_size=8)
    with pytest.raises(ConfigError, match="chunk_size"):
        MemoryConfig(n_init=4, n_local=48, block_size=8, chunk_size=500).resolved(512)
    with pytest.raises(ConfigError, match=r"n_local \(512\) leaves no room .* \(512\) .*default for this model: 256"):
        MemoryConfig(n_init=4, n_local=512, block_size=8).resolved(512)  # named, not as a chunk_size below 1
