"""Run the RULER-style suite (ruler.py): read each haystack once, ask every question of it under each
system, score, and report per family and system with the selection diagnostics (issue 25).

Systems: "full" (the model's own attention over the same ids, one cache per haystack cropped back
after each question); "infllm" (each layer's own lookup, the rule the prefill uses); "question" (the
question's attention alone, context/select.py); "hybrid" (select.hybrid: the
question's attention mass and the cosine of a text index over the units' text, memllm/unit_text.py;
without an embedder the session's own, the packaged MiniLM); "text" (the text index alone); "oracle" (the question selector with the gold evidence's units read first);
"lexical" (the default selector: the hybrid with the units holding the question's rare words first,
select.lexical_evidence).
The memllm systems share one read of each haystack (the selector acts at question time only). Diagnostics per question: per layer, the share of the gold units its lookups read during the
question and answer; whether every layer read every gold unit; for the question selector, the rank
of each gold unit in the fused score (and in the text index's, `text_rank`). Knows nothing of the CLI.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import torch

from memllm.bench.ruler import Haystack, Question
from memllm.config import TEXT_SELECTORS, MemoryConfig
from memllm.context import select
from memllm.errors import ConfigError
from memllm.session import Session

# Systems that are a selector with the cache under other settings while it answers (ContextMemoryCache.configured),
# for a measurement on one read: "_far" puts the sinks and read units at the window's end (InfLLM's distance, the
# default before run 61) instead of config.MEMORY_DISTANCE.
Changes = Callable[[MemoryConfig], dict[str, Any]]


def _far(cfg: MemoryConfig) -> dict[str, Any]:
    return {"memory_distance": cfg.n_local}


VARIANTS: dict[str, tuple[str, Changes]] = {"lexical_far": ("lexical", _far), "oracle_far": ("oracle", _far)}
SYSTEMS = ("full", "infllm", "question", "hybrid", "text", "oracle", "lexical", *VARIANTS)
# systems that need the text index's embedder: the selectors that read it and their variants
TEXT_SYSTEMS = (*TEXT_SELECTORS, *(name for name, (base, _) in VARIANTS.items() if base in TEXT_SELECTORS))


def newline_ids(tokenizer: Any) -> set[int]:
    """Token ids whose text holds a newline (an answer ends at its first line)."""
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    out = set()
    for tid in vocab.values():
        try:
            if "\n" in tokenizer.decode([tid]):
                out.add(tid)
        except (TypeError, ValueError, KeyError):
            continue
    return out


def _answer(tokenizer: Any, ids: list[int]) -> str:
    text = tokenizer.decode(ids, skip_special_tokens=True)
    return text.strip().split("\n")[0].strip()


def _until_line(tokens: Any, tokenizer: Any, newlines: set[int]) -> list[int]:
    out: list[int] = []
    for t in tokens:
        out.append(t)
        if t in newlines and tokenizer.decode(out, skip_special_tokens=True).strip():
            break
    return out


def answer_logprob(out: list[int], logprobs: list[float], newlines: set[int]) -> float | None:
    """The mean log-probability the model gave the answer's tokens (the line ending that closed it left
    out): its confidence, a diagnostic; None for an empty answer."""
    n = len(out) - (1 if out and out[-1] in newlines else 0)
    return round(sum(logprobs[:n]) / n, 4) if n > 0 else None


def _ranks(score: torch.Tensor, units: Sequence[int]) -> list[int | None]:
    """Each unit's place (0 = best) when all units are sorted by `score`."""
    order = torch.argsort(score.float().cpu(), descending=True).tolist()
    rank = {u: i for i, u in enumerate(order)}
    return [rank.get(u) for u in units]


def ask_memllm(
    session: Session, q: Question, system: str, newlines: set[int], stops: set[int], log_scores: bool = False
) -> dict[str, Any]:
    """One question under one memllm system: the answer, its score and the diagnostics."""
    tok = session.llm.tokenizer
    cfg = session.config
    n_units = session.cache.layers[0].store.n_units
    gold = select.units_of_spans(q.spans, cfg.n_init, cfg.block_size, n_units)
    ids = list(tok(q.prompt, add_special_tokens=False)["input_ids"])
    base, changes_of = VARIANTS.get(system, (system, None))
    changes = changes_of(session.cache.config) if changes_of is not None else {}
    selector = base if base in ("infllm", *TEXT_SELECTORS) else "question"
    oracle = q.spans if base == "oracle" else None
    t0 = time.perf_counter()
    logprobs: list[float] = []
    variant = session.cache.configured(**changes) if changes else nullcontext()
    with variant, session.answering(), session.cache.record_lookups() as log:
        gen = session.generate_ids(
            ids,
            q.max_new_tokens,
            stop=stops,
            oracle_spans=oracle,
            selector=selector,
            query=q.query or None,
            logprobs=logprobs,
        )
        try:
            out = _until_line(gen, tok, newlines)
        finally:
            gen.close()
        recall = select.recall_by_layer(log, gold, len(session.cache.layers))
    seconds = time.perf_counter() - t0
    answer = _answer(tok, out)
    row: dict[str, Any] = {
        "system": system, "family": q.family, "id": q.id, "answer": answer, "score": q.score(answer),
        "depth": q.depth, "gold_units": gold, "in_window": len(gold) == 0, "seconds": seconds,
        "new_tokens": len(out), "recall_by_layer": recall,
        "all_layers_read": bool(gold) and all(r == 1.0 for r in recall if r is not None),
        "logprob": answer_logprob(out, logprobs, newlines),
    }  # fmt: skip
    sel = session.last_selection if system != "infllm" else None
    if sel is not None and gold:
        row["gold_rank"] = _ranks(sel["score"], gold)
        row["chosen"] = sel["units"]
        if sel.get("text_score") is not None:
            row["text_rank"] = _ranks(sel["text_score"], gold)
            if log_scores:  # both rankings in full, to compare fusions offline (benchmarks)
                row["scores"] = {
                    "attention": [float(f"{x:.4g}") for x in sel["score"].float().cpu().tolist()],
                    "text": [round(x, 4) for x in sel["text_score"].float().cpu().tolist()],
                }
    return row


class FullAttention:
    """The model's own attention over a haystack's ids, prefilled once; each question is answered and
    the cache cropped back. Long haystacks are not cut: a haystack beyond the trained length is refused."""

    def __init__(self, llm: Any, ids: list[int], chunk: int = 8192):
        from transformers import DynamicCache

        if len(ids) + 128 > llm.trained_len:
            raise ConfigError(
                f"full attention: {len(ids)} tokens exceed the trained length {llm.trained_len}"
            )
        self.llm = llm
        self.cache = DynamicCache(config=llm.model.config)
        self.n = len(ids)
        t = torch.tensor([ids], device=llm.device)
        with torch.no_grad():
            for lo in range(0, len(ids), chunk):
                self.logits = self._call(t[:, lo : lo + chunk], lo)

    def _call(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        from memllm.compat import cache_kwargs

        pos = torch.arange(start, start + ids.shape[1], device=ids.device).unsqueeze(0)
        out = self.llm.model(input_ids=ids, position_ids=pos, use_cache=True, logits_to_keep=1,
                             **cache_kwargs(self.llm.model, self.cache))  # fmt: skip
        return out.logits[0, -1].float()

    @torch.no_grad()
    def ask(self, q: Question, newlines: set[int], stops: set[int]) -> dict[str, Any]:
        tok = self.llm.tokenizer
        t0 = time.perf_counter()
        ids = list(tok(q.prompt, add_special_tokens=False)["input_ids"])
        logits = self._call(torch.tensor([ids], device=self.llm.device), self.n)
        pos = self.n + len(ids)

        def tokens():
            nonlocal logits, pos
            for _ in range(q.max_new_tokens):
                t = int(logits.argmax())
                if t in stops:
                    return
                yield t
                logits = self._call(torch.tensor([[t]], device=self.llm.device), pos)
                pos += 1

        out = _until_line(tokens(), tok, newlines)
        extra = self.cache.get_seq_length() - self.n
        if extra:
            self.cache.crop(-extra)  # a negative count removes that many tokens on every version
        answer = _answer(tok, out)
        return {"system": "full", "family": q.family, "id": q.id, "answer": answer, "score": q.score(answer),
                "depth": q.depth, "seconds": time.perf_counter() - t0, "new_tokens": len(out)}  # fmt: skip


def run(
    llm: Any,
    haystacks: Sequence[Haystack],
    systems: Sequence[str],
    memory: MemoryConfig,
    progress: Callable[[str], None] | None = None,
    embedder: Any = None,
    log_scores: bool = False,
) -> list[dict[str, Any]]:
    """Every question of every haystack under every system -> one row per (question, system)."""
    bad = [s for s in systems if s not in SYSTEMS]
    if bad:
        raise ConfigError(f"unknown systems {bad}: choose among {', '.join(SYSTEMS)}")
    say = progress or (lambda _m: None)
    tok = llm.tokenizer
    newlines = newline_ids(tok)
    stops = set(llm.stop_ids()) if hasattr(llm, "stop_ids") else {tok.eos_token_id}
    rows: list[dict[str, Any]] = []
    for hi, hay in enumerate(haystacks):
        tag = f"{hay.kind} {len(hay.ids)} tokens ({hi + 1}/{len(haystacks)}, {len(hay.questions)} questions)"
        if "full" in systems:
            t0 = time.perf_counter()
            full = FullAttention(llm, hay.ids)
            say(f"{tag}: full attention read in {time.perf_counter() - t0:.1f}s")
            for q in hay.questions:
                rows.append({**full.ask(q, newlines, stops), "length": hay.length})
            del full
        mem = [s for s in systems if s != "full"]
        if not mem:
            continue
        if embedder is None and set(TEXT_SYSTEMS) & set(mem) and memory.selector not in TEXT_SELECTORS:
            raise ConfigError(
                "the hybrid, text and lexical systems need an embedder (the text index over units)"
            )
        session = Session(llm, memory, embedder=embedder)
        t0 = time.perf_counter()
        session.feed_ids(hay.ids, progress=read_progress(say, tag))
        if llm.device.type == "cuda":
            torch.cuda.synchronize()
        say(
            f"{tag}: memllm read in {time.perf_counter() - t0:.1f}s, {session.stats()['units_per_layer']} units/layer"
        )
        for q in hay.questions:
            for system in mem:
                row = ask_memllm(session, q, system, newlines, stops, log_scores and system == "hybrid")
                rows.append({**row, "length": hay.length})
        del session
    return rows


# A read's progress is told at most once per READ_EVERY_S seconds (a 32K read takes ~8 minutes on a 2-core CPU).
READ_EVERY_S = 30.0


def read_progress(
    say: Callable[[str], None], tag: str, every_s: float | None = None
) -> Callable[[int, int], None]:
    """A feed_ids progress callback that tells `say` the tokens read and the rate, at most once per `every_s`
    (default READ_EVERY_S)."""
    every_s = READ_EVERY_S if every_s is None else every_s
    t0 = last = time.perf_counter()

    def tell(done: int, total: int) -> None:
        nonlocal last
        now = time.perf_counter()
        if now - last >= every_s and done < total:
            last = now
            say(f"{tag}: read {done}/{total} tokens, {done / (now - t0):.0f} tokens/s")

    return tell


def _system_order(system: str) -> tuple[int, str]:
    """Systems in SYSTEMS order; others (rows of older runs: "fused", "lexical_near") after them, by name."""
    return (SYSTEMS.index(system), "") if system in SYSTEMS else (len(SYSTEMS), system)


def summary(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (length, family, system): score, questions, and for memllm systems the evidence diagnostics."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["length"], r["family"], r["system"]), []).append(r)
    out = []
    for (length, family, system), rs in sorted(
        groups.items(), key=lambda kv: (kv[0][0], kv[0][1], *_system_order(kv[0][2]))
    ):
        mem = [r for r in rs if not r.get("in_window", True)]
        item = {"length": length, "family": family, "system": system, "questions": len(rs),
                "score": sum(r["score"] for r in rs), "from_memory": len(mem),
                "score_from_memory": sum(r["score"] for r in mem)}  # fmt: skip
        if mem:
            layers = [r["recall_by_layer"] for r in mem]
            n_layers = len(layers[0])
            per_layer = [sum(rec[i] or 0.0 for rec in layers) / len(layers) for i in range(n_layers)]
            item["gold_recall_by_layer"] = [round(x, 3) for x in per_layer]
            item["all_layers_read"] = sum(r["all_layers_read"] for r in mem) / len(mem)
        out.append(item)
    return out


def gap(rows: Sequence[dict[str, Any]], system: str, reference: str = "oracle") -> list[dict[str, Any]]:
    """Per (length, family): the questions `reference` answers (score > 0) and `system` does not, split by
    whether `system` read every gold unit in every layer (`read`: the other units read with them, or the
    model; `not_read`: the selection), and those `system` answers and `reference` does not (`only_system`).
    Of `not_read`, `text_best`: a gold unit was the text index's best unit (`text_rank` 0), so a selection
    that always reads the text's best would have read it. Questions are matched by id; a question either
    system lacks is skipped."""
    by: dict[tuple, dict[str, dict[str, Any]]] = {}
    for r in rows:
        if r["system"] in (system, reference):
            by.setdefault((r["length"], r["family"], r["id"]), {})[r["system"]] = r
    out: dict[tuple, dict[str, Any]] = {}
    for (length, family, _), pair in sorted(by.items(), key=lambda kv: kv[0]):
        if len(pair) < 2:
            continue
        item = out.setdefault((length, family), {"length": length, "family": family, "system": system,
                                                 "reference": reference, "questions": 0, "read": 0,
                                                 "not_read": 0, "text_best": 0, "only_system": 0})  # fmt: skip
        sys_row, ref_row = pair[system], pair[reference]
        item["questions"] += 1
        if ref_row["score"] > 0 and not sys_row["score"] > 0:
            read = sys_row.get("all_layers_read", True)
            item["read" if read else "not_read"] += 1
            item["text_best"] += not read and 0 in (sys_row.get("text_rank") or [])
        elif sys_row["score"] > 0 and not ref_row["score"] > 0:
            item["only_system"] += 1
    return list(out.values())


def table(items: Sequence[dict[str, Any]]) -> str:
    lines = [
        f"{'length':>8} {'family':11} {'system':9} {'score':>12} {'from memory':>14} {'all layers read':>16} {'mean layer recall':>18}"
    ]
    for it in items:
        rec = it.get("gold_recall_by_layer")
        mean = f"{sum(rec) / len(rec):.2f}" if rec else "-"
        alr = f"{it['all_layers_read']:.2f}" if "all_layers_read" in it else "-"
        fm = f"{it['score_from_memory']:.1f}/{it['from_memory']}"
        lines.append(
            f"{it['length']:>8} {it['family']:11} {it['system']:9} {it['score']:>7.1f}/{it['questions']:<4} {fm:>14} {alr:>16} {mean:>18}"
        )
    return "\n".join(lines)
