"""The static single-token step (static.py, what graph.py captures) equals the plain decode path.

Run eagerly (DecodeGraph(capture=False)) on the CPU: per-token logits, the state after decoding, the
counters and the lookup log all match the plain path, across the steps that cut units (one in block_size
tokens: a static step, then the unit cut; `StaticDecode.cut_after`) and a checkpoint/rollback in the middle of
static steps.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from memllm.context import attach
from memllm.context.cuda.graph import DecodeGraph
from memllm.context.prefill import feed, greedy, step
from tests.context.helpers import kernel_devices, small_memory, tiny_model

PREFILL, DECODE = 120, 40


def one_token(model, cache, graph, tok):
    """The static step when the call (a token, or a few) is eligible for it, else the plain path (what
    prefill.step does)."""
    logits = graph.step(model, tok) if graph is not None else None
    return logits if logits is not None else step(model, cache, tok)


def decode(model, mem, ids, static: bool, capture: bool = False):
    """Feed PREFILL tokens, then DECODE single tokens (teacher-forced); logits per token, the cache, the
    graph and the whole lookup log."""
    return short_calls(model, mem, ids, [1] * DECODE, static, hold=False, capture=capture)[:4]


@pytest.mark.parametrize(
    "kind,lookup,offload",
    [("llama", "shared", "fp32"), ("qwen2", "per_head", "fp32"), ("llama", "shared", "int8")],
)
def test_static_decode_equals_plain(kind, lookup, offload):
    model = tiny_model(kind)
    mem = small_memory(lookup=lookup, offload_dtype=offload)
    ids = torch.randint(1, 500, (1, PREFILL + DECODE), generator=torch.Generator().manual_seed(3))
    want, plain, _, want_log = decode(model, mem, ids, static=False)
    got, cache, graph, got_log = decode(model, mem, ids, static=True)
    # every token a static step, those that complete a unit too (the unit cut after the step)
    assert graph.steps == DECODE and graph.cut_after_steps >= 2
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got_log == want_log
    assert_same_memory(cache, plain)


def test_rollback_inside_static_steps():
    """A checkpoint taken between static steps survives them: rolling back repeats the same logits."""
    model = tiny_model("llama")
    mem = small_memory()
    ids = torch.randint(1, 500, (1, PREFILL + 12), generator=torch.Generator().manual_seed(4))
    with attach(model, mem) as cache, torch.no_grad():
        feed(model, cache, ids[:, :PREFILL])
        graph = DecodeGraph(cache, capture=False)
        for i in range(PREFILL, PREFILL + 2):
            assert graph.step(model, ids[:, i : i + 1]) is not None
        cp = cache.checkpoint()

        def run():
            out = []
            for i in range(PREFILL + 2, PREFILL + 12):
                out.append(one_token(model, cache, graph, ids[:, i : i + 1]))
            return torch.stack(out)

        first = run()
        cache.rollback(cp)
        second = run()
    torch.testing.assert_close(first, second, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("offload", ["fp32", "int8"])
def test_graph_replay_equals_static_steps(offload):
    """On CUDA: tokens replayed from the captured graph give the logits of the same static steps run eagerly."""
    model = tiny_model("llama").cuda()
    mem = small_memory(offload_dtype=offload)
    ids = torch.randint(1, 500, (1, PREFILL + DECODE), generator=torch.Generator().manual_seed(5)).cuda()
    want, eager, _, _ = decode(model, mem, ids, static=True, capture=False)
    got, replayed, graph, _ = decode(model, mem, ids, static=True, capture=True)
    assert graph.replays > 0 and graph.captures >= 1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        replayed.layers[0].local_score, eager.layers[0].local_score, rtol=1e-5, atol=1e-5
    )


def test_decode_graph_does_not_keep_its_cache_alive():
    """The cache owns its DecodeGraph; no reference cycle keeps a dropped cache's (device) buffers."""
    import gc
    import weakref

    model = tiny_model("llama")
    mem = small_memory()
    ids = torch.randint(1, 500, (1, PREFILL + 1), generator=torch.Generator().manual_seed(6))
    with attach(model, mem) as cache, torch.no_grad():
        feed(model, cache, ids[:, :PREFILL])
        graph = DecodeGraph(cache, capture=False)
        cache._decode_graph = graph
        assert graph.step(model, ids[:, PREFILL:]) is not None
    alive = weakref.ref(cache)
    gc.disable()
    try:
        del cache, graph
        assert alive() is None
    finally:
        gc.enable()


def step_inputs(device, dtype, window, units, g=3, kvh=2, d=16, cap=70, n_sinks=4, topk=3, bs=8):
    """Random inputs of static.step_attention: a window buffer of cap keys, sinks, topk gathered units."""
    gen = torch.Generator().manual_seed(window * 31 + units)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device, dtype)

    score = torch.rand(kvh, cap, generator=gen).to(device)
    return (rand(kvh, g, d).float(), rand(kvh, g, d).float(), rand(kvh, cap, d), rand(kvh, cap, d), score,
            torch.tensor([window], device=device), rand(kvh, n_sinks, d), rand(kvh, n_sinks, d),
            rand(kvh, topk * bs, d), rand(kvh, topk * bs, d), torch.tensor([units], device=device),
            topk, bs, 0.25)  # fmt: skip


@pytest.mark.gpu
@pytest.mark.triton
@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window,units", [(0, 1), (5, 2), (63, 3), (64, 9), (69, 5)])
def test_step_attention_kernel_equals_reference(device, dtype, window, units):
    """decode_cuda.step_attention_cuda: the same output and received scores as static.step_attention
    (window edges on and off tile boundaries; fewer units than topk and more). On CUDA, and on the CPU
    under TRITON_INTERPRET=1 (fp32: the interpreter's bf16 dots are off)."""
    if device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter gets bf16 dots wrong")
    check_step_attention(device, dtype, window, units)


def check_step_attention(device, dtype, window, units):
    from memllm.context.cuda.static import step_attention_cuda
    from memllm.context.static import step_attention

    want_args = step_inputs(device, dtype, window, units)
    got_args = step_inputs(device, dtype, window, units)
    want = step_attention(*want_args)
    got = step_attention_cuda(*got_args)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_args[4], want_args[4], rtol=1e-5, atol=1e-5)  # received scores


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_sessions_with_decode_graphs_leave_no_device_memory():
    """Each session's decode graph warms up and captures on the one side stream per device: device memory
    after a dropped session is what it was after the one before (a new stream per graph kept a cuBLAS
    workspace per session alive)."""
    model = tiny_model("llama").cuda()
    mem = small_memory()
    ids = torch.randint(1, 500, (1, PREFILL + 8), generator=torch.Generator().manual_seed(8)).cuda()
    after = []
    for _ in range(3):
        with attach(model, mem) as cache, torch.no_grad():
            logits = feed(model, cache, ids[:, :PREFILL])
            graph = DecodeGraph(cache, capture=True)
            for _ in range(8):
                logits = one_token(model, cache, graph, logits.argmax().view(1, 1))
            assert graph.captures >= 1
        del cache, graph, logits
        torch.cuda.synchronize()
        after.append(torch.cuda.memory_allocated())
    assert after[2] == after[1]


def short_calls(model, mem, ids, sizes, static: bool, hold: bool, capture: bool = False):
    """Feed PREFILL tokens, then calls of `sizes` tokens (teacher-forced), optionally held (answering):
    the logits after each call, the cache, the graph, the lookup log and where the calls' part of it
    starts."""
    with attach(model, mem) as cache, torch.no_grad(), cache.record_lookups() as log:
        feed(model, cache, ids[:, :PREFILL])
        first = len(log)
        graph = DecodeGraph(cache, capture=capture) if static else None
        outs, at = [], PREFILL
        with cache.hold_cuts() if hold else contextlib.nullcontext():
            for n in sizes:
                outs.append(one_token(model, cache, graph, ids[:, at : at + n]))
                at += n
        ids_log = [(layer, t.tolist()) for layer, t in log]
    return torch.stack(outs), cache, graph, ids_log, first


ROW_SIZES = [5, 1, 1, 16, 3, 1, 9, 12, 1, 2, 7]  # from 120 tokens seen: the 4th call crosses 128


@pytest.mark.parametrize(
    "kind,lookup,offload,hold",
    [("llama", "shared", "fp32", True), ("qwen2", "per_head", "fp32", True), ("llama", "shared", "int8", True),
     ("llama", "shared", "fp32", False)],
)  # fmt: skip
def test_static_rows_equal_plain(kind, lookup, offload, hold):
    """Calls of several tokens (padded to 16 rows; one across an execution-block boundary, so with two
    lookups) through the static step give the plain path's logits, state, counters and lookup log, held
    (answering: nothing cut, all fit the held limit of 48 + 8 + 64) or not (calls that cut take the
    plain path)."""
    model = tiny_model(kind)
    mem = small_memory(lookup=lookup, offload_dtype=offload, exc_block_size=64)
    total = PREFILL + sum(ROW_SIZES)
    ids = torch.randint(1, 500, (1, total), generator=torch.Generator().manual_seed(11))
    want, plain, _, want_log, _ = short_calls(model, mem, ids, ROW_SIZES, static=False, hold=hold)
    got, cache, graph, got_log, first = short_calls(model, mem, ids, ROW_SIZES, static=True, hold=hold)
    assert graph.row_steps > 0
    if hold:
        assert graph.steps == len(ROW_SIZES)  # nothing cut: every call static
        assert cache.layers[0].store.n_units == plain.layers[0].store.n_units
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got_log == want_log
    if hold:
        assert len(got_log) - first == len(cache.layers) * (len(ROW_SIZES) + 1)  # two lookups for one call
    # Padded rows reach further positions than the plain call: max_position is only bounded.
    assert_same_memory(cache, plain, counters=("lookups", "units_fetched", "max_keys_per_query", "units"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graph_replay_of_rows_equals_static_rows():
    """On CUDA: short calls replayed from their captured graphs (one per padded size) give the logits and
    window state of the same static steps run eagerly; the replays make no host synchronisation."""
    model = tiny_model("llama").cuda()
    mem = small_memory(exc_block_size=64)
    sizes = [5, 1, 1, 6, 1, 3, 1, 9, 12, 1, 2, 7]  # 16-row calls: warm-up, capture, replays
    ids = torch.randint(1, 500, (1, PREFILL + sum(sizes)), generator=torch.Generator().manual_seed(12)).cuda()
    want, eager, _, want_log, _ = short_calls(model, mem, ids, sizes, static=True, hold=True)
    got, replayed, graph, got_log, _ = short_calls(
        model, mem, ids, sizes, static=True, hold=True, capture=True
    )
    assert graph.row_steps == 7 and graph.captures >= 2 and graph.replays >= 5
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got_log == want_log
    for a, b in zip(replayed.layers, eager.layers, strict=True):
        torch.testing.assert_close(a.local_k, b.local_k, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.local_score, b.local_score, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n,exc,rows", [(1, 512, 1), (2, 512, 16), (16, 512, 16), (17, 512, 32), (128, 512, 128),
                                         (129, 512, None), (3, 8, 8), (9, 8, None), (5, 16, 16)])  # fmt: skip
def test_rows_bucket(n, exc, rows):
    from memllm.context.static import rows_bucket

    assert rows_bucket(n, exc) == rows


def chunked_feed(model, mem, ids, static: bool, capture: bool = False, decode: int = 10):
    """Feed all but the last `decode` ids in chunk_size calls, then `decode` single tokens, each call
    static when eligible (a cutting chunk in phase 2; a token): the logits after each call, the cache and
    the graph."""
    n = ids.shape[1] - decode
    with attach(model, mem) as cache, torch.no_grad():
        graph = DecodeGraph(cache, capture=capture) if static else None
        cache.reserve(n)
        outs, done, chunk = [], 0, cache.config.chunk_size
        while done < n:
            end = min(n, done + chunk - cache.seen_tokens % chunk)
            outs.append(one_token(model, cache, graph, ids[:, done:end]))
            done = end
        for i in range(n, ids.shape[1]):
            outs.append(one_token(model, cache, graph, ids[:, i : i + 1]))
    return torch.stack(outs), cache, graph


COUNTERS = ("lookups", "units_fetched", "max_keys_per_query", "max_position", "units")


def assert_same_memory(cache, plain, tol: float = 1e-5, counters: tuple[str, ...] = COUNTERS) -> None:
    """Layer states, stored units and the `counters` of two caches' stats agree; positions stay below
    the trained length."""
    for a, b in zip(cache.layers, plain.layers, strict=True):
        assert (a.seen, a.store.n_units, a.base, a.cut) == (b.seen, b.store.n_units, b.base, b.cut)
        for x, y in ((a.local_k, b.local_k), (a.local_v, b.local_v), (a.local_score, b.local_score)):
            torch.testing.assert_close(x, y, rtol=tol, atol=tol)
        sa, sb = a.store.state(), b.store.state()
        assert sa.keys() == sb.keys()
        for name in sa:
            torch.testing.assert_close(sa[name], sb[name], rtol=tol, atol=tol)
    s, p = cache.stats(), plain.stats()
    for key in counters:
        assert s[key] == p[key], key
    assert s["max_position"] < cache.spec.trained_len


@pytest.mark.parametrize(
    "kind,lookup,chunk",
    [("llama", "shared", 32), ("qwen2", "per_head", 32), ("llama", "shared", 256), ("llama3", "shared", 96)],
)
def test_static_cutting_chunks_equal_plain(kind, lookup, chunk):
    """Prefill chunks that cut units (phase 2) through the static cutting step (static.attend_cut: the
    window read from and written back to the buffers, units written at the device unit count, the
    lookup over the whole index) give the plain path's logits, windows, stored units, counters and
    bounds; so do the decode steps after them (the device scalars are set from the new state). With
    chunk 256 every chunk re-bases the window first, so all steady chunks share one shape."""
    model = tiny_model(kind)
    mem = small_memory(lookup=lookup, chunk_size=chunk)
    ids = torch.randint(1, 500, (1, 1200), generator=torch.Generator().manual_seed(21))
    want, plain, _ = chunked_feed(model, mem, ids, static=False)
    got, cache, graph = chunked_feed(model, mem, ids, static=True)
    calls = len(want) - 10
    assert graph.cut_steps >= calls - 4  # all but the first chunks (phase 1, the first cut, < topk units)
    assert graph.steps - graph.cut_steps <= 10  # decode tokens: static unless they cut (plain path)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert_same_memory(cache, plain)
    if chunk == 256:
        assert len(graph.slots) <= 3  # the steady shape, the last (shorter) chunk, the decode token


def test_int8_units_take_the_plain_path_for_cutting_chunks():
    """int8 units are quantized on the plain path only: no static cutting step, the same results."""
    model = tiny_model("llama")
    mem = small_memory(offload_dtype="int8", chunk_size=64)
    ids = torch.randint(1, 500, (1, 600), generator=torch.Generator().manual_seed(22))
    want, plain, _ = chunked_feed(model, mem, ids, static=False)
    got, cache, graph = chunked_feed(model, mem, ids, static=True)
    assert graph.cut_steps == 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert_same_memory(cache, plain)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("offload", ["fp32", "bf16"])
def test_graph_replay_of_cutting_chunks_equals_plain(offload):
    """On CUDA: steady prefill chunks captured once and replayed (units written to pinned host memory by
    the UVA write kernel at the device unit count) give the plain path's logits, windows, stored units
    and counters; the decode tokens after them too."""
    model = tiny_model("llama").cuda()
    mem = small_memory(chunk_size=256, offload_dtype=offload, decode_graphs=False)
    ids = torch.randint(1, 500, (1, 2400), generator=torch.Generator().manual_seed(23)).cuda()
    want, plain, _ = chunked_feed(model, mem, ids, static=False)
    got, cache, graph = chunked_feed(model, mem, ids, static=True, capture=True)
    assert graph.cut_steps >= 7 and graph.captures >= 1 and graph.replays >= 5
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert_same_memory(cache, plain, tol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_replayed_cutting_chunks_make_no_host_synchronisation():
    """Steady prefill chunks replayed from their graph (host work: room in the stores, table refresh,
    device scalars) run under torch.cuda.set_sync_debug_mode("error") without raising."""
    model = tiny_model("llama").cuda()
    mem = small_memory(chunk_size=256)
    ids = torch.randint(1, 500, (1, 256 * 12), generator=torch.Generator().manual_seed(24)).cuda()
    with attach(model, mem) as cache, torch.no_grad():
        cache.reserve(ids.shape[1])
        feed(model, cache, ids[:, : 256 * 8])
        graph = cache.decode_graph()
        assert graph.replays > 0
        before = graph.replays
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            feed(model, cache, ids[:, 256 * 8 :])
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert graph.replays - before == 4
        # Decode after it: the first tokens warm up and capture the token's graph (a capture
        # synchronises once); then 20 tokens, two of which complete a unit (the plain path).
        _, logits = greedy(model, cache, step(model, cache, ids[:, -1:]), 3)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            greedy(model, cache, logits, 20)
        finally:
            torch.cuda.set_sync_debug_mode(0)
