"""Long-document QA benchmark: EM / F1, seconds to read and per answer, for kv, text, hybrid and full.

For every dataset and length, the chosen questions' gold paragraphs are hidden among distractors
(memllm.bench.qa_data) in as few haystacks as keep gold under 40% of each; each haystack is read once
in the richest mode needed (hybrid serves kv, text and hybrid; full needs no reading) and every
question is asked in every mode from that one reading. Read seconds are reported per mode from the
parts of the reading that mode needs: kv = streaming into context memory, text = chunk + embed +
store, hybrid = both, full = 0 (its cost is all in answering). Also: `read_once_ask_many` (time for
many questions on one document against one question) and the table printer.

Knows nothing of the CLI; uses memllm.agents.docqa.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Sequence
from typing import Any

from memllm.bench.qa_data import DATASETS, Haystack, build_haystacks, exact_match, f1_score, pick_cases
from memllm.errors import ConfigError

BENCH_MODES = ("kv", "text", "hybrid", "full")
Log = Callable[[str], None]


def parse_lengths(text: str) -> list[int]:
    """'8k,32k,128k,512k,1m' -> token counts (k = 1024, m = 1024*1024)."""
    out = []
    for part in text.split(","):
        p = part.strip().lower()
        if not p:
            continue
        mult = 1024 if p.endswith("k") else 1024 * 1024 if p.endswith("m") else 1
        try:
            n = int(float(p.rstrip("km")) * mult)
        except ValueError:
            raise ConfigError(
                f"cannot read length {part!r}: use numbers like 8k, 32k, 128k, 512k, 1m"
            ) from None
        if n < 1024:
            raise ConfigError(f"length {part!r} is too short: at least 1k tokens")
        out.append(n)
    if not out:
        raise ConfigError("give at least one length, e.g. --lengths 8k,32k")
    return out


def parse_list(text: str, allowed: Sequence[str], what: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        raise ConfigError(f"{what}s must be among {', '.join(allowed)}, got {text!r}")
    return items


def label(n: int) -> str:
    return (
        f"{n // (1024 * 1024)}M" if n % (1024 * 1024) == 0 else f"{n // 1024}K" if n % 1024 == 0 else str(n)
    )


def reading_mode(modes: Sequence[str]) -> str:
    kv = bool({"kv", "hybrid"} & set(modes))
    text = bool({"text", "hybrid"} & set(modes))
    return "hybrid" if kv and text else "kv" if kv else "text" if text else "full"


def _read_seconds(mode: str, report: Any) -> float:
    return {"kv": report.kv_seconds, "text": report.text_seconds,
            "hybrid": report.kv_seconds + report.text_seconds, "full": 0.0}[mode]  # fmt: skip


def environment(llm: Any) -> dict[str, Any]:
    import torch
    import transformers

    dev = str(llm.device)
    name = torch.cuda.get_device_name(llm.device) if dev.startswith("cuda") else platform.processor() or "cpu"
    return {"device": dev, "device_name": name, "torch": torch.__version__,
            "transformers": transformers.__version__, "model": getattr(llm, "name", "?"),
            "dtype": str(llm.dtype).removeprefix("torch."), "python": platform.python_version()}  # fmt: skip


def build_all(
    count_tokens: Callable[[str], int],
    datasets: Sequence[str],
    lengths: Sequence[int],
    n_questions: int,
    seed: int = 0,
) -> list[Haystack]:
    """Every haystack of the benchmark, dataset by dataset, length by length."""
    out: list[Haystack] = []
    for dataset in datasets:
        chosen = pick_cases(dataset, n_questions, seed)
        for length in lengths:
            out.extend(build_haystacks(dataset, length, chosen, count_tokens, seed))
    return out


def run(
    llm: Any,
    *,
    lengths: Sequence[int] = (),
    modes: Sequence[str],
    datasets: Sequence[str] = DATASETS,
    n_questions: int = 10,
    seed: int = 0,
    embedder: Any = None,
    memory: Any = None,
    max_new_tokens: int = 24,
    log: Log | None = None,
    haystacks: Sequence[Haystack] | None = None,
    store_factory: Callable[[], Any] | None = None,
    qa_kwargs: dict[str, Any] | None = None,
    on_rows: Callable[[list[dict[str, Any]], list[dict[str, Any]]], None] | None = None,
) -> dict[str, Any]:
    """Run the benchmark; returns {'meta', 'rows' (one per dataset x length x mode), 'answers'}.

    haystacks: prebuilt ones (e.g. from a pack made on another machine); default: built here.
    store_factory: the text store for each reading (default: DocumentQA's private FAISS store).
    on_rows(rows, answers): called after each dataset x length (to keep partial results).
    """
    from memllm.agents.docqa import DocumentQA

    log = log or (lambda s: None)
    if haystacks is None:
        haystacks = build_all(llm.count_tokens, datasets, lengths, n_questions, seed)
    rows: list[dict[str, Any]] = []
    answers: list[dict[str, Any]] = []
    read_mode = reading_mode(modes)
    keys: list[tuple[str, int]] = []
    for hay in haystacks:
        if (hay.dataset, hay.length) not in keys:
            keys.append((hay.dataset, hay.length))
    for dataset, length in keys:
        hays = [h for h in haystacks if (h.dataset, h.length) == (dataset, length)]
        stats = {m: {"em": 0.0, "f1": 0.0, "n": 0, "read_s": 0.0, "answer_s": 0.0} for m in modes}
        tokens = 0
        for h_i, hay in enumerate(hays):
            log(f"{dataset} {label(length)}: haystack {h_i + 1}/{len(hays)}, {hay.tokens} tokens, "
                f"{len(hay.cases)} questions; reading ({read_mode})")  # fmt: skip
            store = store_factory() if store_factory is not None and read_mode in ("text", "hybrid") else None
            qa = DocumentQA(llm, read_mode, store=store, embedder=embedder, memory=memory,
                            max_new_tokens=max_new_tokens, **(qa_kwargs or {}))  # fmt: skip
            try:
                report = qa.read(hay.text, name=f"{dataset}-{label(length)}-{h_i}")
                tokens += report.tokens
                log(
                    f"  read in {report.seconds:.1f} s (kv {report.kv_seconds:.1f} s, text {report.text_seconds:.1f} s)"
                )
                for m in modes:
                    stats[m]["read_s"] += _read_seconds(m, report)
                    for case in hay.cases:
                        ans = qa.ask(case.question, mode=m)
                        em, f1 = exact_match(ans.text, case.answers), f1_score(ans.text, case.answers)
                        st = stats[m]
                        st["em"] += em
                        st["f1"] += f1
                        st["n"] += 1
                        st["answer_s"] += ans.seconds
                        answers.append({"dataset": dataset, "length": length, "mode": m, "id": case.id,
                                        "question": case.question, "gold": case.answers, "answer": ans.text,
                                        "em": em, "f1": round(f1, 4), "seconds": round(ans.seconds, 3),
                                        "depths": hay.depths.get(case.id)})  # fmt: skip
                    log(f"  {m}: EM {stats[m]['em']:.0f}/{stats[m]['n']}, F1 {stats[m]['f1']:.2f}")
            finally:
                qa.close()
        for m in modes:
            st = stats[m]
            n = max(1, st["n"])
            rows.append({"dataset": dataset, "length": length, "mode": m, "n": st["n"], "tokens": tokens,
                         "em": round(100 * st["em"] / n, 1), "f1": round(100 * st["f1"] / n, 1),
                         "read_s": round(st["read_s"], 2), "answer_s": round(st["answer_s"] / n, 3),
                         "haystacks": len(hays)})  # fmt: skip
        if on_rows is not None:
            on_rows(rows, answers)
    meta = environment(llm) | {"lengths": sorted({k[1] for k in keys}), "modes": list(modes),
                               "datasets": list(dict.fromkeys(k[0] for k in keys)), "questions": max((r["n"] for r in rows), default=0),
                               "seed": seed, "reading_mode": read_mode, "max_new_tokens": max_new_tokens}  # fmt: skip
    return {"meta": meta, "rows": rows, "answers": answers}


def read_once_haystack(
    count_tokens: Callable[[str], int], length: int, n: int = 20, seed: int = 0
) -> Haystack:
    """One SQuAD haystack of `length` tokens holding the gold paragraphs of n questions."""
    from memllm.bench import qa_data

    saved = qa_data.GOLD_SHARE
    qa_data.GOLD_SHARE = 1.0  # one haystack with every question
    try:
        (hay,) = build_haystacks("squad", length, pick_cases("squad", n, seed + 1), count_tokens, seed)
    finally:
        qa_data.GOLD_SHARE = saved
    hay.dataset = "read-once"
    return hay


def read_once_ask_many(
    llm: Any, hay: Haystack, mode: str = "kv", embedder: Any = None, warm_up: bool = True
) -> dict[str, Any]:
    """Read `hay` once, ask all its questions: seconds for one question (read + first answer) against
    all of them (read + every answer), and their ratio.

    warm_up: first read an eighth of the text and answer one question in a separate DocumentQA, so
    one-time process costs (GPU kernels compiled; Triton keeps them on disk for later processes; the
    whole warm-up took 10.4 s on a fresh H100 in read-once run 17) are not counted in the timed read or
    first answer; its seconds are reported as warm_up_s."""
    from memllm.agents.docqa import DocumentQA

    warm_s = None
    if warm_up:
        t = time.perf_counter()
        warm = DocumentQA(llm, mode, embedder=embedder)
        try:
            warm.read(hay.text[: len(hay.text) // 8], name="warm-up")
            warm.ask(hay.cases[0].question)
        finally:
            warm.close()
        warm_s = round(time.perf_counter() - t, 3)
    qa = DocumentQA(llm, mode, embedder=embedder)
    parts = {"question_feed_s": 0.0, "tokens": 0}
    try:
        report = qa.read(hay.text, name="read-once")
        if qa.session is not None:
            _time_answer_parts(qa.session, parts)
        times, em, answers = [], 0.0, []
        for case in hay.cases:
            ans = qa.ask(case.question)
            times.append(ans.seconds)
            answers.append(ans.text)
            em += exact_match(ans.text, case.answers)
        graph = qa.session.cache.decode_graph() if qa.session is not None else None
        parts["graph"] = graph.counters() if graph is not None else None
    finally:
        qa.close()
    read_s = report.seconds
    one, many = read_s + times[0], read_s + sum(times)
    return {"tokens": report.tokens, "mode": mode, "questions": len(times), "read_s": round(read_s, 3),
            "tokens_per_s": round(report.tokens_per_second, 1), "first_answer_s": round(times[0], 3),
            "mean_answer_s": round(sum(times) / len(times), 3), "one_question_total_s": round(one, 3),
            "all_questions_total_s": round(many, 3), "ratio": round(many / one, 3),
            "em": round(100 * em / len(times), 1), "warm_up_s": warm_s, "answer_s": [round(t, 3) for t in times],
            "question_feed_s_total": round(parts["question_feed_s"], 3), "tokens_generated": parts["tokens"],
            "graph": parts.get("graph"), "answers": answers}  # fmt: skip


def _time_answer_parts(session: Any, parts: dict[str, Any]) -> None:
    """Wrap the session's question feed (timed to the end of its device work) and its token generator
    (counted), so a read-once run says where an answer's time goes."""
    feed_ids, generate_ids = session.feed_ids, session.generate_ids

    def timed_feed(ids: Any, progress: Any = None) -> None:
        t = time.perf_counter()
        feed_ids(ids, progress)
        if session.last_logits is not None and session.last_logits.device.type == "cuda":
            import torch

            torch.cuda.synchronize()
        parts["question_feed_s"] += time.perf_counter() - t

    def counted(*a: Any, **k: Any) -> Any:
        for tok in generate_ids(*a, **k):
            parts["tokens"] += 1
            yield tok

    session.feed_ids, session.generate_ids = timed_feed, counted


def text_key(text: str) -> str:
    import hashlib

    return hashlib.sha1(text.encode()).hexdigest()


class CachedEmbedder:
    """An embedder that answers from a table (sha1 of text -> vector) and, for texts it lacks, asks
    `base` (and remembers). With no base, a missing text is an error: the table was made elsewhere."""

    def __init__(self, table: dict[str, Any] | None = None, base: Any = None) -> None:
        import numpy as np

        self.table = {k: np.asarray(v, dtype=np.float32) for k, v in (table or {}).items()}
        self.base = base
        self.name = getattr(base, "name", "cached")
        self.misses = 0

    @property
    def dim(self) -> int:
        if self.table:
            return int(next(iter(self.table.values())).shape[0])
        return int(self.base.dim)

    def embed(self, texts: list[str]) -> Any:
        import numpy as np

        keys = [text_key(t) for t in texts]
        missing = [i for i, k in enumerate(keys) if k not in self.table]
        if missing:
            if self.base is None:
                raise ConfigError(f"{len(missing)} of {len(texts)} texts have no cached embedding "
                                  "(was the pack made with the same tokenizer and chunk size?)")  # fmt: skip
            self.misses += len(missing)
            vectors = self.base.embed([texts[i] for i in missing])
            for i, v in zip(missing, vectors, strict=True):
                self.table[keys[i]] = np.asarray(v, dtype=np.float32)
        return np.stack([self.table[k] for k in keys]) if keys else np.zeros((0, self.dim), np.float32)


def pack_vectors(
    llm: Any, haystacks: Sequence[Haystack], embedder: Any, chunk_tokens: int = 192
) -> dict[str, list[float]]:
    """Embeddings of every chunk DocumentQA will store for these haystacks, and of every question."""
    from memllm.agents.doc_chunks import TokenizedDocument, chunk_spans
    from memllm.documents import read_text

    texts: list[str] = []
    for i, hay in enumerate(haystacks):
        td = TokenizedDocument.build(read_text(hay.text, f"h{i}"), llm.tokenizer)
        texts.extend(hay.text[s:e] for s, e in chunk_spans(td, chunk_tokens))
        texts.extend(" ".join(c.question.split()) for c in hay.cases)
    unique = list(dict.fromkeys(texts))
    vectors = embedder.embed(unique)
    return {text_key(t): v for t, v in zip(unique, vectors, strict=True)}


def table(rows: Sequence[dict[str, Any]]) -> str:
    """A markdown table of the rows."""
    head = "| dataset | length | mode | n | EM | F1 | read s | s/answer |"
    out = [head, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['dataset']} | {label(r['length'])} | {r['mode']} | {r['n']} | {r['em']:.1f} | "
                   f"{r['f1']:.1f} | {r['read_s']:.1f} | {r['answer_s']:.2f} |")  # fmt: skip
    return "\n".join(out)
