"""The lexical tier's paragraph read on, replayed without a model (issue 25).

`select.lexical_evidence` reads the tier's units, the neighbour their words lie against, then each tier unit's
neighbours on both sides. A SQuAD paragraph is 2-4 units of 128 tokens and the sentence that answers may hold
none of the question's words: where the tier unit opens its paragraph, the unit before (another paragraph) was
read and the paragraph's third unit was not. `reach` (UnitTextIndex.paragraph_reach) reads, before the plain
neighbours, the units the paragraph holding a tier unit's words goes on into, up to R on each side. This replays,
per question of a built suite, the units the rule reads with R = 0 (as before) and R = 1, 2, 3 (the attention's
mass and the fused ranking left flat: their fill is the units 0, 1, ...) and counts the questions whose gold units
(the evidence spans' units, as the oracle reads) are all read. Selections, not answers.

    python benchmarks/lexical_paragraph_signal.py --suite .gpu/suite_qwen_c.json.gz \
        --tokenizer ~/.cache/memllm/models/qwen2.5-coder-0.5b/weights --lengths 512k
"""

from __future__ import annotations

from typing import Any

import torch
from lexical_sides_signal import gold_questions, run

from memllm.bench.ruler import Haystack
from memllm.context import select

REACH = (0, 1, 2, 3)


def replay(
    hay: Haystack, tok: Any, n_init: int, block_size: int, n_local: int, topk: int
) -> list[dict[str, Any]]:
    index, n_units, asked = gold_questions(hay, tok, n_init, block_size, n_local, topk)
    flat = torch.zeros(n_units)
    rows = []
    for q, gold in asked:
        row: dict[str, Any] = {"family": q.family, "id": q.id, "gold": gold}
        m = index.lexical_sides(q.query or q.prompt, n_units, reach=max(REACH))  # reach r is it capped at r
        for r in REACH:
            reach = m.reach.clamp(max=r)
            chosen = select.lexical_evidence(flat, flat, m.score, m.held, topk, 1, sides=m.sides, reach=reach)
            row[f"reach {r}"] = all(u in set(chosen.tolist()) for u in gold)
        rows.append(row)
    return rows


def main() -> None:
    run(
        replay, __doc__, "n_local {n_local}, topk {topk}: questions with every gold unit read",
        tuple(f"reach {r}" for r in REACH), lambda rs, n: str(sum(r[n] for r in rs)),
    )  # fmt: skip


if __name__ == "__main__":
    main()
