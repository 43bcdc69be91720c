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

from memllm.bench.qa_data import DATASETS, build_haystacks, exact_match, f1_score, pick_cases
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


def run(
    llm: Any,
    *,
    lengths: Sequence[int],
    modes: Sequence[str],
    datasets: Sequence[str] = DATASETS,
    n_questions: int = 10,
    seed: int = 0,
    embedder: Any = None,
    memory: Any = None,
    max_new_tokens: int = 24,
    log: Log | None = None,
    qa_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the benchmark; returns {'meta', 'rows' (one per dataset x length x mode), 'answers'}."""
    from memllm.agents.docqa import DocumentQA

    log = log or (lambda s: None)
    rows: list[dict[str, Any]] = []
    answers: list[dict[str, Any]] = []
    read_mode = reading_mode(modes)
    for dataset in datasets:
        chosen = pick_cases(dataset, n_questions, seed)
        for length in lengths:
            stats = {m: {"em": 0.0, "f1": 0.0, "n": 0, "read_s": 0.0, "answer_s": 0.0} for m in modes}
            tokens = 0
            hays = build_haystacks(dataset, length, chosen, llm.count_tokens, seed)
            for h_i, hay in enumerate(hays):
                log(f"{dataset} {label(length)}: haystack {h_i + 1}/{len(hays)}, {hay.tokens} tokens, "
                    f"{len(hay.cases)} questions; reading ({read_mode})")  # fmt: skip
                qa = DocumentQA(llm, read_mode, embedder=embedder, memory=memory, max_new_tokens=max_new_tokens,
                                **(qa_kwargs or {}))  # fmt: skip
                try:
                    report = qa.read(hay.text, name=f"{dataset}-{label(length)}-{h_i}")
                    tokens += report.tokens
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
                        log(f"  {m}: EM {stats[m]['em']:.0f}/{stats[m]['n']}")
                finally:
                    qa.close()
            for m in modes:
                st = stats[m]
                n = max(1, st["n"])
                rows.append({"dataset": dataset, "length": length, "mode": m, "n": st["n"], "tokens": tokens,
                             "em": round(100 * st["em"] / n, 1), "f1": round(100 * st["f1"] / n, 1),
                             "read_s": round(st["read_s"], 2), "answer_s": round(st["answer_s"] / n, 3),
                             "haystacks": len(hays)})  # fmt: skip
    meta = environment(llm) | {"lengths": list(lengths), "modes": list(modes), "datasets": list(datasets),
                               "questions": n_questions, "seed": seed, "reading_mode": read_mode,
                               "max_new_tokens": max_new_tokens}  # fmt: skip
    return {"meta": meta, "rows": rows, "answers": answers}


def read_once_ask_many(
    llm: Any,
    *,
    length: int,
    n_questions: int = 20,
    mode: str = "kv",
    dataset: str = "squad",
    seed: int = 0,
    embedder: Any = None,
    max_new_tokens: int = 24,
    log: Log | None = None,
) -> dict[str, Any]:
    """One haystack of `length` tokens holding n questions' gold paragraphs: read once, then ask one
    question vs all n. Returns seconds and the ratio (read + n answers) / (read + 1 answer)."""
    from memllm.agents.docqa import DocumentQA
    from memllm.bench import qa_data

    log = log or (lambda s: None)
    chosen = pick_cases(dataset, n_questions, seed)
    saved = qa_data.GOLD_SHARE
    qa_data.GOLD_SHARE = 1.0  # one haystack with every question
    try:
        (hay,) = build_haystacks(dataset, length, chosen, llm.count_tokens, seed)
    finally:
        qa_data.GOLD_SHARE = saved
    qa = DocumentQA(llm, mode, embedder=embedder, max_new_tokens=max_new_tokens)
    try:
        t0 = time.perf_counter()
        report = qa.read(hay.text, name=f"{dataset}-{label(length)}")
        read_s = time.perf_counter() - t0
        log(f"read {report.tokens} tokens in {read_s:.1f} s")
        times, em = [], 0.0
        for case in hay.cases:
            ans = qa.ask(case.question)
            times.append(ans.seconds)
            em += exact_match(ans.text, case.answers)
        one = read_s + times[0]
        many = read_s + sum(times)
        return {"length": length, "tokens": report.tokens, "mode": mode, "questions": len(times),
                "read_s": round(read_s, 3), "first_answer_s": round(times[0], 3),
                "answers_s": round(sum(times), 3), "one_question_s": round(one, 3),
                "all_questions_s": round(many, 3), "ratio": round(many / one, 3),
                "em": round(100 * em / len(times), 1)}  # fmt: skip
    finally:
        qa.close()


def table(rows: Sequence[dict[str, Any]]) -> str:
    """A markdown table of the rows."""
    head = "| dataset | length | mode | n | EM | F1 | read s | s/answer |"
    out = [head, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['dataset']} | {label(r['length'])} | {r['mode']} | {r['n']} | {r['em']:.1f} | "
                   f"{r['f1']:.1f} | {r['read_s']:.1f} | {r['answer_s']:.2f} |")  # fmt: skip
    return "\n".join(out)
