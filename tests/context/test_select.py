"""The question selector (context/select.py), the oracle and the selection diagnostics, on tiny models:
the probe's unit masses equal a dense softmax over all keys, the fast scan equals the reference, the
chosen units are read by every layer (also through the static decode path), the oracle reads the gold
units everywhere, and the memory is rolled back afterwards."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from memllm.config import MemoryConfig
from memllm.context import select
from memllm.context.cuda.graph import DecodeGraph
from memllm.context.kernels import kernels_for
from memllm.context.units import UnitStore
from memllm.errors import ConfigError
from memllm.session import Session
from tests.context.helpers import (
    CharTokenizer,
    FakeLLM,
    kernel_devices,
    skip_interpreted_runtime_loops,
    small_memory,
    tiny_model,
)

TEXT = "".join(chr(33 + (i * 7919) % 90) for i in range(700))
QUESTION = "What was said near the start?"


def make_session(device: str = "cpu", **mem) -> Session:
    model = tiny_model("llama").to(device)
    return Session(FakeLLM(model, CharTokenizer()), small_memory(**mem))


def filled_store(
    n_units: int, kvh: int = 2, bs: int = 8, d: int = 16, device: str = "cpu", dtype: str = "fp32"
) -> UnitStore:
    store = UnitStore(kvh, bs, d, 2, dtype, torch.device(device), segment_units=7)
    g = torch.Generator().manual_seed(0)
    k = torch.randn(n_units, kvh, bs, d, generator=g)
    v = torch.randn(n_units, kvh, bs, d, generator=g)
    r = torch.randn(n_units, kvh, 2, d, generator=g)
    store.append_many(k.to(device), v.to(device), r.to(device))
    return store


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_unit_mass_is_the_dense_softmax_over_all_keys(impl):
    heads, kvh, m, d, n, bs = 4, 2, 3, 16, 11, 8
    store = filled_store(n, kvh, bs, d)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(heads, m, d, generator=g)
    sinks = torch.randn(kvh, 4, d, generator=g)
    window_k = torch.randn(kvh, 5, d, generator=g)
    scale = d**-0.5
    qg = q.reshape(kvh, heads // kvh, m, d)
    lse_window = torch.logsumexp(torch.einsum("hgmd,hkd->hgmk", qg, window_k) * scale, -1).reshape(heads, m)
    gather = kernels_for(impl, torch.device("cpu")).gather_units
    scan = partial(select.unit_lse, dtype=torch.float32, gather=gather, chunk=4)
    got = select.unit_mass(q, lse_window, sinks, store, scale, scan)
    units_k, _ = store.gather_reference(torch.arange(n).expand(1, kvh, -1), torch.float32)  # (1, kvh, n*bs, d)
    keys = torch.cat([window_k, sinks, units_k[0]], dim=1)
    p = torch.softmax(torch.einsum("hgmd,hkd->hgmk", qg, keys) * scale, dim=-1)
    unit_p = p[..., window_k.shape[1] + sinks.shape[1] :].reshape(kvh, heads // kvh, m, n, bs).sum(-1)
    want = unit_p.reshape(heads, m, n).sum(0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_choose_takes_gold_first_then_best_with_neighbours():
    score = torch.tensor([0.0, 0.1, 5.0, 0.2, 0.0, 0.0, 3.0, 0.0, 0.0, 0.3])
    assert select.choose(score, 4, neighbours=0).tolist() == [2, 3, 6, 9]
    assert select.choose(score, 4, neighbours=1).tolist() == [1, 2, 3, 6]
    assert select.choose(score, 4, neighbours=1, first=[8]).tolist() == [1, 2, 3, 8]
    assert select.choose(score, 3, neighbours=2).tolist() == [1, 2, 3]  # nearest neighbours first


def test_evidence_then_attention_fills_past_the_evidence_with_the_attention_ranking():
    """The fused ranking's best units (with neighbours) take `share` of the slots; the rest follow the
    question's attention alone, so the text's near-duplicates of the evidence are not read."""
    mass = torch.zeros(32)
    mass[[0, 1, 2]] = torch.tensor([5.0, 4.0, 3.0])  # the units every question looks at (the stream's start)
    mass[20] = 2.0
    ranked = torch.zeros(32)
    ranked[[20, 10, 25, 28]] = torch.tensor([9.0, 8.0, 7.5, 7.0])  # evidence, then near-duplicates
    got = select.evidence_then_attention(ranked, mass, k=8, neighbours=1, share=0.375).tolist()
    assert got == [0, 1, 2, 3, 4, 19, 20, 21]  # 3 slots: the best unit and its neighbours; then attention
    assert set(select.choose(ranked, 8, 1).tolist()) >= {10, 19, 20, 21}  # the ranking alone reads them
    # the oracle's gold units still come first; share 1 is the ranking alone
    assert 30 in select.evidence_then_attention(ranked, mass, 8, 1, first=[30], share=0.5).tolist()
    assert torch.equal(select.evidence_then_attention(ranked, mass, 8, 1, share=1.0), select.choose(ranked, 8, 1))


def test_units_of_spans_and_recall_by_layer():
    assert select.units_of_spans([(0, 4)], n_init=4, block_size=8, n_units=10) == []  # sinks only
    assert select.units_of_spans([(10, 22), (30, 31)], 4, 8, 10) == [0, 1, 2, 3]
    assert select.units_of_spans([(90, 100)], 4, 8, 10) == []  # still in the window
    log = [(0, torch.tensor([1, 2, 3])), (1, torch.tensor([5])), (1, torch.tensor([2]))]
    assert select.recall_by_layer(log, [2, 5], 3) == [0.5, 1.0, None]


def test_selector_is_validated():
    with pytest.raises(ConfigError, match="selector"):
        MemoryConfig(selector="bm25")
    with pytest.raises(ConfigError, match="select_neighbours"):
        MemoryConfig(select_neighbours=-1)


def ask_logged(s: Session, static: bool = False, question: str = QUESTION, **kw) -> tuple[list[int], list, dict]:
    if static:
        graph = DecodeGraph(s.cache, capture=False)
        s.cache.decode_graph = lambda: graph  # what CUDA gets; eager on the CPU
    with s.answering(), s.cache.record_lookups() as log:
        toks = list(s.generate_ids(question, max_new_tokens=6, stop=set(), **kw))
        log = [(layer, ids.cpu()) for layer, ids in log]
    return toks, log, s.last_selection


def test_question_selector_forces_its_units_into_every_layer_and_rolls_back():
    s = make_session()
    s.feed(TEXT)
    n_units, before = s.stats()["units_per_layer"], s.last_logits.clone()
    assert n_units > s.config.topk
    toks, log, sel = ask_logged(s)
    chosen = sel["units"]
    assert len(chosen) == s.config.topk and chosen == sorted(set(chosen))
    assert {layer for layer, _ in log} == {0, 1}
    for _, ids in log:  # question and answer: every lookup of every layer read exactly the chosen units
        assert sorted(set(ids.tolist())) == chosen
    # Everything is rolled back and forcing is off: the next ask with InfLLM's rule equals a fresh session's.
    assert s.stats()["units_per_layer"] == n_units and torch.equal(s.last_logits, before)
    assert not s.cache.forced.active and not bool(s.cache.forced.flag)
    fresh = make_session()
    fresh.feed(TEXT)
    a = ask_logged(s, selector="infllm")
    b = ask_logged(fresh, selector="infllm")
    assert a[0] == b[0] and [x.tolist() for _, x in a[1]] == [x.tolist() for _, x in b[1]]


def test_static_path_obeys_forcing_and_answers_alike():
    plain = make_session(exc_block_size=64, chunk_size=192)
    plain.feed(TEXT)
    want, log_plain, sel = ask_logged(plain)
    static = make_session(exc_block_size=64, chunk_size=192)
    static.feed(TEXT)
    got, log_static, sel_static = ask_logged(static, static=True)
    assert sel_static["units"] == sel["units"]
    assert got == want
    for _, ids in log_static:
        assert sorted(set(ids.tolist())) == sel["units"]


def test_oracle_reads_the_gold_units_in_every_layer():
    s = make_session()
    s.feed(TEXT)
    cfg = s.config
    gold_span = (cfg.n_init + 3 * cfg.block_size + 2, cfg.n_init + 4 * cfg.block_size + 1)  # units 3 and 4
    _, log, sel = ask_logged(s, oracle_spans=[gold_span])
    assert sel["gold_units"] == [3, 4] and {3, 4} <= set(sel["units"])
    assert select.recall_by_layer(log, [3, 4], 2) == [1.0, 1.0]
    # InfLLM's rule on the same question, for comparison: the diagnostic reports whatever it read.
    _, log_rule, _ = ask_logged(s, selector="infllm")
    assert all(r is not None for r in select.recall_by_layer(log_rule, [3, 4], 2))


def test_probe_is_not_counted_or_logged():
    s = make_session()
    s.feed(TEXT)
    lookups = s.stats()["lookups"]
    _, log, _ = ask_logged(s)
    assert s.stats()["lookups"] - lookups == len(log)


def test_nothing_is_forced_while_the_stream_fits():
    s = make_session()
    s.feed(TEXT[:10])  # with the question, 39 tokens: within n_init + n_local
    _, log, sel = ask_logged(s)
    assert sel is None and log == []


@pytest.mark.gpu
def test_cuda_scan_and_selection_equal_the_reference():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    heads, kvh, m, d, n = 4, 2, 3, 16, 300
    store = filled_store(n, kvh, 8, d, device="cuda")
    g = torch.Generator().manual_seed(1)
    q = torch.randn(heads, m, d, generator=g).cuda()
    sinks = torch.randn(kvh, 4, d, generator=g).cuda()
    lse = torch.randn(heads, m, generator=g).cuda()
    cuda = torch.device("cuda")
    fast = select.unit_mass(q, lse, sinks, store, 0.25, partial(kernels_for("fast", cuda).scan_units, dtype=torch.float32))
    ref_scan = partial(select.unit_lse, dtype=torch.float32, gather=kernels_for("reference", cuda).gather_units, chunk=64)
    ref = select.unit_mass(q, lse, sinks, store, 0.25, ref_scan)
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-6)
    # A whole session on CUDA (fast path, decode graphs) chooses the units the CPU reference chooses.
    cuda = make_session("cuda", impl="fast")
    cuda.feed(TEXT)
    cpu = make_session("cpu", impl="reference")
    cpu.feed(TEXT)
    got, log_cuda, sel_cuda = ask_logged(cuda)
    want, _, sel_cpu = ask_logged(cpu)
    assert sel_cuda["units"] == sel_cpu["units"]
    for _, ids in log_cuda:
        assert sorted(set(ids.tolist())) == sel_cuda["units"]
    assert got == want


# ---- the text index over units (memllm/unit_text.py) and the hybrid selector ----------------------
WORDS = "apple river stone cloud maple tiger lemon piano rocket garden candle silver"
PROSE = " ".join(WORDS.split()[i % 12] for i in range(220))  # units of 8 characters: word soup
NEEDLE = " zebra violet "


def text_session(**mem) -> Session:
    from memllm.memory_stores.embeddings import FakeEmbedder

    model = tiny_model("llama")
    return Session(FakeLLM(model, CharTokenizer()), small_memory(**mem), embedder=FakeEmbedder())


def test_standardized_sum_keeps_a_peaked_score_on_top_and_lets_the_other_decide_where_it_is_flat():
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(64, generator=g) * 0.1
    peaked = noise.clone()
    peaked[2] = 10.0  # the question's attention on a needle
    flat = 1.0 + noise  # attention that tells little
    text = 0.2 + torch.rand(64, generator=g) * 0.1
    text[6] = 0.6  # the unit whose text the question paraphrases
    assert int(select.standardized_sum([peaked, text]).argmax()) == 2
    assert int(select.standardized_sum([flat, text]).argmax()) == 6
    assert select.standardized_sum([torch.ones(4), text[:4]]).isfinite().all()
    with pytest.raises(ValueError, match="lengths"):
        select.standardized_sum([peaked, text[:3]])


@pytest.mark.parametrize("block_size,window", [(8, 8), (8, 3), (16, 6), (128, 48), (64, 64)])
def test_text_index_scores_each_unit_by_its_best_window_as_a_brute_force_scan_does(block_size, window):
    from memllm.memory_stores.embeddings import FakeEmbedder
    from memllm.unit_text import UnitTextIndex

    n_init, n_units = 5, 9
    idx = UnitTextIndex(FakeEmbedder(), CharTokenizer(), n_init, block_size, window=window)
    words = (WORDS.split() * 400)[: (n_init + (n_units + 1) * block_size) // 2]
    idx.write(0, [ord(c) for c in " ".join(words)][: n_init + (n_units + 1) * block_size])
    got = idx.scores("tiger lemon", n_units)
    q = idx.embedder.embed(["tiger lemon"])[0]
    n_windows = idx.windows_for(n_units)
    cos = [float(idx._vectors[j].astype("float32") @ q) for j in range(n_windows)]
    for u in range(n_units):  # every window lying at least half inside the unit, found by scanning
        lo, hi = n_init + u * block_size, n_init + (u + 1) * block_size
        inside = [j for j in range(n_windows)
                  if min(hi, n_init + j * idx.stride + window) - max(lo, n_init + j * idx.stride) >= window // 2]  # fmt: skip
        assert inside and got[u].item() == pytest.approx(max(cos[j] for j in inside), abs=1e-6)
    # Every window that a unit's score can use was embedded, and none past the last unit's end.
    assert n_init + (n_windows - 1) * idx.stride < n_init + n_units * block_size
    with pytest.raises(ConfigError, match="window"):
        UnitTextIndex(FakeEmbedder(), CharTokenizer(), n_init, block_size, window=block_size + 1)


def test_hybrid_keeps_the_attention_ranking_where_text_agrees_and_fuses_where_it_does_not():
    g = torch.Generator().manual_seed(0)
    mass = torch.rand(256, generator=g) * 0.01
    mass[20] = 1.0  # the question's attention on a needle
    text = torch.rand(256, generator=g) * 0.2
    text[[21, 40, 41]] = torch.tensor([0.9, 0.95, 0.92])  # the needle (a neighbour of 20) and near-duplicates
    assert select.agrees(mass, text)  # supported, though not the text's best: many near-duplicates
    assert torch.equal(select.hybrid(mass, text), mass)  # the near-duplicates are not added
    text[21] = 0.25  # the text does not support the attention's pick: a paragraph the attention ranks low
    assert not select.agrees(mass, text)
    fused = select.hybrid(mass, text)
    torch.testing.assert_close(fused, select.standardized_sum([mass.log(), text]))
    assert set(select.choose(fused, 6, 1).tolist()) >= {20, 40, 41}
    # Few units: the text's best next to the attention's is support (z cannot reach 3 below 11 units).
    assert select.agrees(mass[:2], torch.tensor([0.1, 0.9])) and select.agrees(mass[:1], torch.tensor([0.3]))
    assert not select.agrees(mass[15:25], torch.tensor([0.0] * 9 + [0.9]))


def test_text_index_embeds_units_lazily_once_and_drops_what_a_rollback_rewrites():
    s = text_session()
    s.feed(PROSE[:300] + NEEDLE + PROSE[:400])
    idx, cfg = s.text_index, s.config
    n_units = s.stats()["units_per_layer"]
    assert len(idx.ids) == s.cache.seen_tokens and idx.embedded == 0  # reading embeds nothing
    where = (cfg.n_init + 300 + 2 - cfg.n_init) // cfg.block_size  # the unit holding "zebra"
    score = idx.scores("zebra violet", n_units)
    assert idx.embedded == idx.windows_for(n_units) and int(score.argmax()) in (where - 1, where, where + 1)
    calls = idx.embedder.calls
    with s.answering():  # a question and its answer come and go: no unit is embedded again
        list(s.generate_ids("where is the zebra?", max_new_tokens=3, stop=set(), selector="hybrid"))
    assert idx.embedder.calls - calls == 1  # only the question
    assert len(idx.ids) >= s.cache.seen_tokens
    s.feed("more")  # written where the rollback left the stream
    assert idx.ids[-4:].tolist() == [ord(c) for c in "more"] and len(idx.ids) == s.cache.seen_tokens


def test_text_selector_reads_the_unit_whose_text_matches_in_every_layer():
    s = text_session(topk=6)  # hybrid: the question's best unit and the text's, each with its neighbours
    s.feed(PROSE[:300] + NEEDLE + PROSE[:400])
    cfg = s.config
    gold = select.units_of_spans([(300, 300 + len(NEEDLE))], cfg.n_init, cfg.block_size, s.stats()["units_per_layer"])
    for selector in ("text", "hybrid"):
        _, log, sel = ask_logged(s, question="Where is the zebra violet?", selector=selector)
        assert len(sel["units"]) == cfg.topk and sel["text_score"] is not None
        hit = set(gold) & set(sel["units"])
        assert hit, (selector, gold, sel["units"])
        for _, ids in log:  # every layer's lookups read the chosen units
            assert sorted(set(ids.tolist())) == sel["units"]
    # Without a text index, hybrid is the question selector.
    plain = make_session(topk=6)
    plain.feed(PROSE[:300] + NEEDLE + PROSE[:400])
    a = ask_logged(plain, selector="hybrid")
    b = ask_logged(plain, selector="question")
    assert a[2]["units"] == b[2]["units"] and a[2]["text_score"] is None


def test_the_default_selector_is_lexical_with_the_shared_packaged_embedder(monkeypatch):
    """MemoryConfig() selects by "lexical" (a text selector): a Session keeps a text index with the process's packaged
    MiniLM (not loaded until a question needs it); "question" keeps none; an embedder given is used."""
    from memllm.memory_stores import embeddings
    from memllm.memory_stores.embeddings import FakeEmbedder, SentenceTransformerEmbedder, shared_embedder

    monkeypatch.setattr(embeddings, "_SHARED", {})  # this process's, as if no session had asked yet

    assert MemoryConfig().selector == "lexical"
    llm = FakeLLM(tiny_model("llama"), CharTokenizer())
    a, b = Session(llm, small_memory(selector="lexical")), Session(llm, small_memory(selector="hybrid"))
    assert isinstance(a.text_index.embedder, SentenceTransformerEmbedder)
    assert a.text_index.embedder is b.text_index.embedder is shared_embedder("cpu")
    assert a.text_index.embedder._model is None  # nothing loaded by reading
    a.feed(PROSE)
    assert a.text_index.embedded == 0 and a.bytes_per_token() > Session(llm, small_memory()).bytes_per_token()
    assert Session(llm, small_memory()).text_index is None
    fake = FakeEmbedder()
    assert Session(llm, small_memory(selector="hybrid"), embedder=fake).text_index.embedder is fake


def test_a_restored_session_indexes_the_text_it_was_saved_with(tmp_path):
    """The snapshot keeps the stream's token ids: the restored session's text index holds the same
    stream (its windows are embedded again when a question needs them); a snapshot saved without an
    index restores without one (no text to index), and the selector is then the question selector."""
    s = text_session(selector="hybrid")
    s.feed(PROSE[:300] + NEEDLE + PROSE[:400])
    snap = s.save(tmp_path / "snap")
    r = Session.restore(s.llm, snap)
    assert r.text_index is not None and r.text_index.ids.tolist() == s.text_index.ids.tolist()
    r.feed("more")
    assert len(r.text_index.ids) == r.cache.seen_tokens
    s.text_index = None  # as a snapshot written before the stream's ids were kept
    r2 = Session.restore(s.llm, s.save(tmp_path / "snap2"))
    assert r2.config.selector == "hybrid" and r2.text_index is None
    _, _, sel = ask_logged(r2, selector="hybrid")
    assert sel["text_score"] is None and len(sel["units"]) == r2.config.topk


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("offload", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("rows", [1, 45, 70])
@pytest.mark.parametrize("precision", ["tf32x3", "ieee"])
def test_scan_kernel_equals_the_chunked_reference(device, offload, rows, precision, monkeypatch):
    """cuda/select.unit_lse_uva (one launch, keys from pinned host memory) against select.unit_lse (chunks
    through the gather): units over several segments, row counts below, between and above its tiles,
    keys read in bf16 from every host dtype (int8 dequantized as the gather does). On CUDA through the
    fast kernels' scan_units; on the CPU under TRITON_INTERPRET=1 (ieee products, keys in fp32)."""
    skip_interpreted_runtime_loops(device)
    if device == "cpu" and (precision != "ieee" or offload == "int8"):
        pytest.skip("the interpreter: ieee products, fp32 and bf16 units")
    from memllm.context.cuda import select as select_cuda

    monkeypatch.setattr(select_cuda, "PRECISION", precision)
    kvh, bs, d, n = 2, 16, 32, 23
    store = filled_store(n, kvh, bs, d, device=device, dtype=offload)
    assert select_cuda.supports(store)
    q = torch.randn(kvh, rows, d, generator=torch.Generator().manual_seed(rows)).to(device)
    gather = kernels_for("reference", torch.device(device)).gather_units
    # the interpreter's bf16 rounding is not the device's (nor torch's): keys read in fp32 there
    for dtype in (torch.float32, torch.bfloat16) if device == "cuda" else (torch.float32,):
        want = select.unit_lse(q, store, 0.3, dtype, gather, chunk=5)
        if device == "cuda":
            got = kernels_for("fast", torch.device("cuda")).scan_units(q, store, 0.3, dtype)
        else:
            got = select_cuda.unit_lse_uva(q, store, 0.3, dtype)
        assert got.shape == want.shape == (kvh, rows, n)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
