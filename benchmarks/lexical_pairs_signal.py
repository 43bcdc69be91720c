"""The question's word pairs beside its rare words, replayed without a model (issue 25).

The lexical tier (unit_lexical.py) scores a window by the question's rare words it holds, as a bag. A key or name
of two words, one of them common ("brawny-end", "Black Death"), then scores as its rare word alone, and the
near-duplicates that share that word (other "brawny-" keys, other paragraphs on death) tie with it: the tier is
empty (more units than its cap) or holds them all, and the fused ranking's evidence, near-duplicates included,
follows. Here a pair of adjacent question words, one of them rare, counts as one more rare term where the two
stand adjacent in a window's text and few windows hold them so (as a phrase query). Per question of a built suite
this replays `select.lexical_evidence` with the attention flat (as lexical_sides_signal.py) with and without the
pairs, and counts:
  * gold: the questions whose gold units are all in the lead (tier, sides, neighbours);
  * pure: those whose tier is gold units only and holds every rare term (then the attention fills the rest and
    no near-duplicate comes from the fused ranking, as with the oracle);
  * tier: those with a tier at all.
Selections, not answers.

    python benchmarks/lexical_pairs_signal.py --suite .gpu/suite_smol.json.gz \
        --tokenizer ~/.cache/memllm/models/smollm2-135m/weights --lengths 32k --n-local 512 --topk 8
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from lexical_sides_signal import gold_questions, run

from memllm.bench.ruler import Haystack
from memllm.context import select
from memllm.unit_lexical import RARE, RARE_FLOOR, best_windows, words
from memllm.unit_text import UnitTextIndex


def terms(index: UnitTextIndex, question: str, n_windows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The words' (n_windows,) scores and (n_windows, words) held, as WindowWords.window_scores gives them, and
    (n_windows, pairs) held: the question's adjacent pairs with a rare word, where a window holds the two
    adjacent and few windows do."""
    per_window, words_held = index._words.window_scores(question, n_windows)
    most = max(RARE * n_windows, RARE_FLOOR)
    qwords = words(question)
    found, at = index._words.holding(list(dict.fromkeys(qwords)), n_windows)
    windows_of = dict(zip(found, at, strict=True))
    rare = {w for w, a in windows_of.items() if len(a) <= most}
    cols, texts = [], {}
    for a, b in dict.fromkeys(zip(qwords, qwords[1:], strict=False)):
        if a == b or not (a in rare or b in rare) or a not in windows_of or b not in windows_of:
            continue
        hold = []
        for j in np.intersect1d(windows_of[a], windows_of[b]).tolist():
            seq = texts.setdefault(j, words(index.window_text(j)))
            if any(x == a and y == b for x, y in zip(seq, seq[1:], strict=False)):
                hold.append(j)
        if 0 < len(hold) <= most:
            cols.append(hold)
    pairs_held = np.zeros((n_windows, len(cols)), dtype=bool)
    for i, c in enumerate(cols):
        pairs_held[c, i] = True
    return per_window, words_held, pairs_held


def scored(held: np.ndarray) -> np.ndarray:
    """(n_windows,) each window's IDF-weighted share of the terms (`held`'s columns) it holds, as
    WindowWords.window_scores weighs words."""
    if held.shape[1] == 0:
        return np.zeros(held.shape[0])
    idf = np.log(held.shape[0] / held.sum(axis=0))
    return held @ (idf / max(idf.sum(), 1e-12))


def narrowed(
    score: torch.Tensor, pairs_held: np.ndarray, first: torch.Tensor, last: torch.Tensor, cap: int
) -> torch.Tensor:
    """`score`, where more than `cap` units are within the tier's margin of the best (the words single out no
    few units): those of them whose best window holds the most of the question's rare pairs raised to the best
    score plus the margin's worth, the rest left as they are; elsewhere unchanged."""
    best = float(score.max()) if score.numel() else 0.0
    if best <= 0 or pairs_held.shape[1] == 0:
        return score
    near = (score >= best * (1 - select.LEXICAL_MARGIN)).nonzero().flatten()
    if len(near) <= cap:
        return score
    per_unit, _, _, _ = best_windows(pairs_held.sum(axis=1).astype(float), pairs_held, first, last)
    got = per_unit[near]
    if float(got.max()) <= 0:
        return score
    top = near[got == got.max()]
    if len(top) > cap:
        return score
    out = score.clone()
    out[top] = best / (1 - select.LEXICAL_MARGIN) + 1e-6
    return out


def replay(
    hay: Haystack, tok: Any, n_init: int, block_size: int, n_local: int, topk: int
) -> list[dict[str, Any]]:
    index, n_units, asked = gold_questions(hay, tok, n_init, block_size, n_local, topk)
    flat = torch.zeros(n_units)
    rows: list[dict[str, Any]] = []
    if not asked:
        return rows
    index.lexical("x", n_units)  # reads every window's words once
    n_windows = index.windows_for(n_units)
    first, last = index.unit_windows(n_units)
    n_evidence = max(1, min(topk, round(topk * select.EVIDENCE_SHARE)))
    for q, gold in asked:
        row = {"family": q.family, "id": q.id, "gold": gold}
        per_window, words_held, pairs_held = terms(index, q.query or q.prompt, n_windows)
        both = np.concatenate([words_held, pairs_held], axis=1)
        for name, (per, held_w) in (
            ("words", (per_window, words_held)), ("pairs", (scored(both), both)), ("narrow", (per_window, words_held))
        ):
            score, held, lo, hi = best_windows(per, held_w, first, last)
            if name == "narrow":  # the words' score, its over-full tier narrowed to the units with the most pairs
                score = narrowed(score, pairs_held, first, last, n_evidence)
            sides = index.sides(score, lo, hi)
            lead = set(select.lexical_evidence(flat, flat, score, held, topk, 1, sides=sides).tolist())
            tier = select.lexical_tier(score, n_evidence)
            complete = bool(tier) and held.shape[1] > 0 and bool(held[tier].any(dim=0).all())
            row[name] = {
                "gold": all(u in lead for u in gold),
                "pure": complete and all(u in gold for u in tier),
                "tier": bool(tier),
                "terms": int(held.shape[1]),
            }
        rows.append(row)
    return rows


def main() -> None:
    run(
        replay, __doc__,
        "{suite} n_local {n_local}, topk {topk}: questions with gold all in the lead / pure tier / a tier",
        ("words", "pairs", "narrow"),
        lambda rs, n: " / ".join(str(sum(r[n][k] for r in rs)) for k in ("gold", "pure", "tier")),
    )  # fmt: skip


if __name__ == "__main__":
    main()
