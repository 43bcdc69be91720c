"""Where a wrong answer came from: the units one system read and another did not (issue 25, a diagnostic of
measured ruler rows and the suite's text, no model).

For every question that system B answers better than system A (the same question id in both files), A's extra
units are those A read and B did not (`chosen`). The script decodes them, with half a unit of context each side,
and counts how many of the words of A's answer (longer than three letters, at most eight) are in that text and
how many in the gold units' text. An answer whose words are all in A's extra units and not in the gold was taken
from a unit the other system did not read. With `--lead`, each extra unit is told as the lexical selector's lead
(`select.lexical_lead`, replayed from the text index without a model: the tier, the neighbour its words lie
against, the paragraph, the plain neighbours) or the rest (the fused ranking's evidence or the attention's fill),
`/no-word` where it holds no rare word of the question, with whether the tier holds every rare word (then the rest
is the attention's fill alone); and over every question of A, the gold units and all units read outside the lead.

    python benchmarks/ruler_answer_source.py --a benchmarks/results/ruler_qwen_run60_c_512k.json.gz:lexical --b benchmarks/results/ruler_qwen_run50_512k.json.gz:oracle --suite .gpu/suite_qwen_c.json.gz --tokenizer ~/.cache/memllm/models/qwen2.5-coder-0.5b/weights --lead
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from lexical_sides_signal import gold_questions  # noqa: E402
from ruler_gpu import load_suite  # noqa: E402

from memllm.bench.ruler import Haystack  # noqa: E402
from memllm.context import select  # noqa: E402

WORD = re.compile(r"\w+")


def rows_of(spec: str) -> dict[str, dict[str, Any]]:
    """'FILE:SYSTEM' -> that system's rows by question id."""
    path, system = spec.rsplit(":", 1)
    with gzip.open(path, "rt") as fh:
        rows = json.load(fh)["rows"]
    return {r["id"]: r for r in rows if r["system"] == system}


def answer_words(answer: str, most: int = 8) -> list[str]:
    return [w for w in WORD.findall(answer.lower()) if len(w) > 3][:most]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--a", required=True, help="FILE:SYSTEM whose wrong answers are traced")
    ap.add_argument("--b", required=True, help="FILE:SYSTEM that answered those questions better")
    ap.add_argument("--suite", required=True, help="the suite the rows were asked of (ruler_gpu.py build)")
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--families", default="squad,hotpotqa")
    ap.add_argument("--n-init", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--n-local", type=int, default=4096)
    ap.add_argument("--topk", type=int, default=16)
    ap.add_argument("--lead", action="store_true", help="tell each extra unit as the lexical lead's or not")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    hays = {q["id"]: h for hs in load_suite(args.suite).values() for h in hs for q in h["questions"]}
    ids_of = {qid: h["ids"] for qid, h in hays.items()}
    indexes: dict[int, Any] = {}

    def lead_of(qid: str) -> tuple[set[int], bool, torch.Tensor]:
        """The lexical lead of question qid (a replay, no model), whether its tier holds every rare word, and
        every unit's rare-word score."""
        hay = Haystack.from_dict(hays[qid])
        if id(hays[qid]) not in indexes:
            indexes[id(hays[qid])] = gold_questions(hay, tok, n, bs, args.n_local, args.topk)[:2]
        index, n_units = indexes[id(hays[qid])]
        q = next(q for q in hay.questions if q.id == qid)
        m = index.lexical_sides(q.query or q.prompt, n_units)
        lead, covers = select.lexical_lead(m.score, m.held, args.topk, 1, sides=m.sides, reach=m.reach)
        return set(lead), covers, m.score

    a, b = rows_of(args.a), rows_of(args.b)
    families = set(args.families.split(","))
    n, bs = args.n_init, args.block_size

    def text(ids: list[int], units: list[int], pad: int) -> str:
        return " ".join(
            tok.decode(ids[max(0, n + u * bs - pad) : n + (u + 1) * bs + pad]) for u in units
        ).lower()

    traced = read_all = from_extra = 0
    outside = (
        collections.Counter()
    )  # units A read outside the lead: gold, gold with no rare word, all, no rare word
    for qid, ra in a.items():
        rb = b.get(qid)
        if rb is None or ra["family"] not in families or rb["score"] <= ra["score"]:
            continue
        ids = ids_of[qid]
        extra = sorted(set(ra["chosen"]) - set(rb["chosen"]))
        words = answer_words(ra["answer"])
        in_extra = [w for w in words if w in text(ids, extra, bs // 2)]
        in_gold = [w for w in words if w in text(ids, ra["gold_units"], 0)]
        traced += 1
        read_all += bool(ra["all_layers_read"])
        whole = bool(words) and len(in_extra) == len(words) and len(in_gold) < len(words)
        from_extra += whole
        told = ""
        if args.lead:
            lead, held, score = lead_of(qid)
            told = " ".join(
                f"{u}:{'lead' if u in lead else 'rest'}{'' if score[u] > 0 else '/no-word'}" for u in extra
            )
            told = f" [extra: {told}; tier holds every word {held}]"
        print(f"{qid}: every gold unit read {ra['all_layers_read']}, answer words in A's extra units "
              f"{len(in_extra)}/{len(words)}, in the gold {len(in_gold)}/{len(words)}: {ra['answer'][:60]!r}{told}")  # fmt: skip
    print(f"{traced} questions B answered better; A read every gold unit in every layer in {read_all}; "
          f"A's answer words all in its extra units (not all in the gold) in {from_extra}")  # fmt: skip
    if args.lead:  # over every question of A in the families (not only those traced)
        for qid, ra in a.items():
            if ra["family"] in families and not ra["in_window"] and ra.get("chosen"):
                lead, _, score = lead_of(qid)
                gold = [u for u in ra["gold_units"] if u in ra["chosen"] and u not in lead]
                rest = [u for u in ra["chosen"] if u not in lead]
                outside["gold"] += len(gold)
                outside["gold, no word"] += sum(not score[u] > 0 for u in gold)
                outside["all"] += len(rest)
                outside["all, no word"] += sum(not score[u] > 0 for u in rest)
        print(f"every question of A: gold units read outside the lead {outside['gold']}, of them holding no rare word "
              f"{outside['gold, no word']}; units read outside the lead {outside['all']}, holding no rare word "
              f"{outside['all, no word']}")  # fmt: skip


if __name__ == "__main__":
    main()
