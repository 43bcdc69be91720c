"""What the selection's text signals find when they match the whole prompt or the question alone (issue 25).

The "lexical" selector's rare words and the text index's cosine match a text: until session 8 the decoded
prompt, which in the suite's QA prompts (as in memllm ask's and most RAG prompts) also holds instructions
("Answer the question based on the given documents. Only give me the answer and do not output any other
words."). In a haystack of Wikipedia paragraphs "answer", "question", "documents", "output" are rare words
too, and the units that hold them lead the tier. Since then the suite's questions carry `query` (the question
alone) and the ruler runner, docqa and chat pass it (`Session.generate_ids(query=...)`).

Model-free (no attention, no answers): for every question whose gold units are in memory, the lexical tier
(`select.lexical_tier` over `UnitTextIndex.lexical`) with the prompt and with the query: whether the tier's
best unit is a gold unit, whether the tier holds one, whether the tier holds every rare word (the covering
branch of `select.lexical_evidence`); with --text also whether the MiniLM text index's best unit is gold.

    python benchmarks/ruler_query_signal.py --tokenizer ~/.cache/memllm/models/qwen2.5-coder-0.5b/weights \
        --suite .gpu/suite_qwen_a.json.gz,.gpu/suite_qwen_c.json.gz,.gpu/suite_qwen_b.json.gz --text \
        --out benchmarks/results/ruler_query_signal_qwen.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ruler_gpu import load_suite  # noqa: E402

from memllm.bench import ruler  # noqa: E402
from memllm.config import MemoryConfig  # noqa: E402
from memllm.context import select  # noqa: E402
from memllm.unit_text import UnitTextIndex  # noqa: E402


class NoEmbedder:
    """The lexical signal alone reads no vectors."""

    dim = 384

    def embed(self, texts):  # pragma: no cover - never called without --text
        raise RuntimeError("no embedder: run with --text")


def signals(index: UnitTextIndex, text: str, n_units: int, gold: set[int], cap: int, with_text: bool) -> dict:
    lexical, held = index.lexical(text, n_units)
    tier = select.lexical_tier(lexical, cap)
    out = {
        "tier_best_gold": bool(tier) and tier[0] in gold,
        "tier_has_gold": bool(gold & set(tier)),
        "covering": bool(tier) and held.shape[1] > 0 and bool(held[tier].any(dim=0).all()),
        "tier_size": len(tier),
    }
    if with_text:
        out["text_best_gold"] = int(index.scores(text, n_units).argmax()) in gold
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--suite", required=True, help="gzipped suites (ruler_gpu.py build), comma-separated")
    ap.add_argument("--families", default=None)
    ap.add_argument(
        "--text", action="store_true", help="also the MiniLM text index's best unit (CPU: minutes at 1M)"
    )
    ap.add_argument("--n-local", type=int, default=4096, help="the window (ruler_gpu.py's default)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    cfg = MemoryConfig()
    cap = max(1, min(cfg.topk, round(cfg.topk * select.EVIDENCE_SHARE)))
    embedder = NoEmbedder()
    if args.text:
        from memllm.memory_stores.embeddings import shared_embedder

        embedder = shared_embedder("cpu")
    families = set(args.families.split(",")) if args.families else None
    rows, t0 = [], time.perf_counter()
    for hays in load_suite(args.suite).values():
        for data in hays:
            hay = ruler.Haystack.from_dict(data)
            qs = [q for q in hay.questions if families is None or q.family in families]
            if not qs:
                continue
            index = UnitTextIndex(embedder, tok, cfg.n_init, cfg.block_size)
            index.write(0, hay.ids)
            # units past the window, from the length: a session's cut may hold one fewer (8,157 at 1M)
            n_units = (len(hay.ids) - cfg.n_init - args.n_local) // cfg.block_size
            for q in qs:
                gold = set(select.units_of_spans(q.spans, cfg.n_init, cfg.block_size, n_units))
                if not gold or not q.query:
                    continue
                ids = tok(q.prompt, add_special_tokens=False)["input_ids"]
                prompt = tok.decode(ids, skip_special_tokens=True).strip()  # as Session.select_prompt
                row = {"length": hay.length, "family": q.family, "id": q.id}
                for name, text in (("prompt", prompt), ("query", q.query)):
                    row[name] = signals(index, text, n_units, gold, cap, args.text)
                rows.append(row)
            print(
                f"[{time.perf_counter() - t0:7.1f}s] {hay.kind} {hay.length:,}: {len(qs)} questions",
                flush=True,
            )
    table: dict = defaultdict(lambda: defaultdict(int))
    for r in rows:
        cell = table[(r["length"], r["family"])]
        cell["n"] += 1
        for name in ("prompt", "query"):
            for k, v in r[name].items():
                if k != "tier_size":
                    cell[f"{name}:{k}"] += int(v)
    keys = ["tier_best_gold", "tier_has_gold", "covering"] + (["text_best_gold"] if args.text else [])
    print(f"{'length':>8} {'family':11} {'n':>3}  " + "  ".join(f"{k} (prompt -> query)" for k in keys))
    for (length, family), cell in sorted(table.items()):
        vals = "  ".join(
            f"{cell[f'prompt:{k}']:>3} -> {cell[f'query:{k}']:<3}".ljust(len(k) + 19) for k in keys
        )
        print(f"{length:>8} {family:11} {cell['n']:>3}  {vals}")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
