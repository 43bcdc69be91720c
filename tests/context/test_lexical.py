"""The lexical signal (memllm/unit_lexical.py) and the selector that reads it ("lexical", the default):
the text index's rare-word scores equal a brute-force scan of the windows, a rollback leaves the same
index as a fresh one, the selection equals a small reference of the rule, and a session reads the chosen
units in every layer."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from memllm.config import MemoryConfig
from memllm.context import select
from memllm.errors import ConfigError, InputError
from memllm.memory_stores.embeddings import FakeEmbedder
from memllm.unit_lexical import words
from memllm.unit_text import UnitTextIndex
from tests.context.helpers import CharTokenizer
from tests.context.test_select import NEEDLE, PROSE, ask_logged, text_session

VOCAB = "apple river stone cloud maple tiger lemon piano rocket garden candle silver".split()


def stream(n_words: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    out = [rng.choice(VOCAB) for _ in range(n_words)]
    for i, w in ((40, "zebra violet"), (90, "zebra"), (150, "zebra violet")):
        out[i] = w
    return " ".join(out)


def brute_force(
    idx: UnitTextIndex, question: str, n_units: int, rare: float, floor: int
) -> tuple[list[float], list[set[str]], list[str]]:
    """Per unit: the best window's IDF-weighted share of the question's rare words, and those words; the
    rare words in the question's order."""
    n_windows = idx.windows_for(n_units)
    sets = [set(words(idx.window_text(j))) for j in range(n_windows)]
    df = {w: sum(w in s for s in sets) for w in dict.fromkeys(words(question))}
    q = [w for w, d in df.items() if 0 < d <= max(rare * n_windows, floor)]
    idf = {w: math.log(n_windows / df[w]) for w in q}
    total = sum(idf.values())
    scores, held = [], []
    for u in range(n_units):
        lo, hi = idx.n_init + u * idx.block_size, idx.n_init + (u + 1) * idx.block_size
        inside = [j for j in range(n_windows)
                  if min(hi, idx.n_init + j * idx.stride + idx.window) - max(lo, idx.n_init + j * idx.stride) >= idx.window // 2]  # fmt: skip
        per = [sum(idf[w] for w in q if w in sets[j]) / total if q else 0.0 for j in inside]
        best = inside[per.index(max(per))]
        scores.append(max(per))
        held.append({w for w in q if w in sets[best]})
    return scores, held, q


@pytest.mark.parametrize(
    "block_size,window,rare,floor", [(32, 16, 0.05, 0), (64, 48, 0.1, 0), (16, 16, 0.02, 0), (16, 16, 0.02, 3)]
)
def test_rare_word_scores_equal_a_brute_force_scan_of_the_windows(block_size, window, rare, floor):
    n_init, n_units = 5, 30
    text = stream(400)
    idx = UnitTextIndex(FakeEmbedder(), CharTokenizer(), n_init, block_size, window=window)
    idx.write(0, [ord(c) for c in text])
    question = "Where is the zebra violet, the tiger?"
    score, held = idx.lexical(question, n_units, rare=rare, floor=floor)
    want, want_held, rare_words = brute_force(idx, question, n_units, rare, floor)
    assert score.shape == (n_units,) and score.dtype == torch.float32 and rare_words
    torch.testing.assert_close(score, torch.tensor(want), rtol=0, atol=1e-6)
    assert held.shape == (n_units, len(rare_words))
    for u in range(n_units):
        assert {w for w, h in zip(rare_words, held[u].tolist(), strict=True) if h} == want_held[u]
    with pytest.raises(ConfigError, match="fewer than"):
        idx.lexical(question, len(text) // block_size + 5)


def brute_sides(idx: UnitTextIndex, question: str, n_units: int, rare: float, floor: int) -> list[int]:
    """Per unit: +1 where the windows with its best score reach its last half window (or past it), -1 its
    first half window, 0 both, neither or no word."""
    n_windows = idx.windows_for(n_units)
    sets = [set(words(idx.window_text(j))) for j in range(n_windows)]
    _, _, q = brute_force(idx, question, n_units, rare, floor)
    df = {w: sum(w in s for s in sets) for w in q}
    idf = {w: math.log(n_windows / df[w]) for w in q}
    total = sum(idf.values())
    bs, half = idx.block_size, idx.window // 2
    out = []
    for u in range(n_units):
        lo, hi = u * bs, (u + 1) * bs  # after n_init
        inside = [j for j in range(n_windows) if min(hi, j * idx.stride + idx.window) - max(lo, j * idx.stride) >= half]
        per = {j: sum(idf[w] for w in q if w in sets[j]) / total if q else 0.0 for j in inside}
        top = max(per.values())
        if top <= 0:
            out.append(0)
            continue
        best = [j for j in inside if per[j] == top]
        start, end = min(best) * idx.stride, max(best) * idx.stride + idx.window
        out.append(int(end > hi - half) - int(start < lo + half))
    return out


@pytest.mark.parametrize("block_size,window,seed", [(32, 16, 0), (64, 48, 1), (16, 16, 2), (128, 48, 3)])
def test_sides_point_to_the_neighbour_a_units_words_lie_against(block_size, window, seed):
    """UnitTextIndex.lexical_sides: the scores and words of `lexical`, and each unit's side equal a brute-force
    reading of its best windows; a rare word at a unit's end points to the next unit, at its start to the
    previous one."""
    rng = random.Random(seed)
    n_init = 5
    filler = [rng.choice(VOCAB) for _ in range(700)]
    text = " ".join(filler)
    for at in (rng.randrange(len(text) - 40) for _ in range(6)):  # rare words anywhere, on unit borders too
        text = text[:at] + " zebra violet " + text[at + 14 :]
    idx = UnitTextIndex(FakeEmbedder(), CharTokenizer(), n_init, block_size, window=window)
    idx.write(0, [ord(c) for c in text])
    n_units = (len(text) - n_init) // block_size - 2
    question = "Where is the zebra violet?"
    score, held, sides, _ = idx.lexical_sides(question, n_units)
    want_score, want_held = idx.lexical(question, n_units)
    assert torch.equal(score, want_score) and torch.equal(held, want_held)
    assert sides.dtype == torch.int8 and sides.tolist() == brute_sides(idx, question, n_units, 0.02, 16)
    assert set(sides.tolist()) <= {-1, 0, 1} and (sides[score <= 0] == 0).all()

    if block_size < 2 * window:
        return  # a window reaching both halves of the unit: no side to point at
    # a word just before a border points forward; just after it, back
    u = 4
    end = n_init + (u + 1) * block_size
    ids = [ord(c) for c in " ".join(filler)]
    ids[end - 9 : end - 2] = [ord(c) for c in " kudzu "]
    ids[end + 3 * block_size : end + 3 * block_size + 7] = [ord(c) for c in " kudzu "]
    idx = UnitTextIndex(FakeEmbedder(), CharTokenizer(), n_init, block_size, window=window)
    idx.write(0, ids)
    score, _, sides, _ = idx.lexical_sides("kudzu?", n_units)
    assert float(score[u]) > 0 and int(sides[u]) == 1
    assert float(score[u + 4]) > 0 and int(sides[u + 4]) == -1


def test_a_rollback_leaves_the_words_of_a_fresh_index():
    text = stream(300, seed=1)
    ids = [ord(c) for c in text]
    a = UnitTextIndex(FakeEmbedder(), CharTokenizer(), 4, 32, window=16)
    a.write(0, ids)
    a.lexical("zebra violet", 40)  # reads the windows' words
    a.write(700, [ord(c) for c in " zebra zebra violet maple"])  # a rollback rewrites the tail
    b = UnitTextIndex(FakeEmbedder(), CharTokenizer(), 4, 32, window=16)
    b.write(0, ids[:700] + [ord(c) for c in " zebra zebra violet maple"])
    n = (len(b.ids) - 4) // 32 - 1
    for x, y in zip(a.lexical("zebra violet maple", n), b.lexical("zebra violet maple", n), strict=True):
        assert torch.equal(x, y)
    kept = (700 - 16 - 4) // 8 + 1  # windows that end before the rewritten tail
    assert len(b._words) <= len(a._words) <= kept
    assert [a._words.window(j) for j in range(len(b._words))] == [b._words.window(j) for j in range(len(b._words))]
    qw = sorted(b._words.vocab)
    for x, y in zip(a._words.holding(qw, len(b._words))[1], b._words.holding(qw, len(b._words))[1], strict=True):
        assert x.tolist() == y.tolist()


def reference(ranked, mass, lexical, held, k, nb, sides=None, reach=None):
    """The rule as the offline replay wrote it (benchmarks/ruler_lexical.py: tier_first; where the tier
    holds every rare word, tier_whole with union), the tier's units before their neighbours, the neighbour
    each unit's words lie against (sides) before the units its paragraph goes on into (reach: every tier
    unit's next ones before those two away, after before before), before the others."""
    n = mass.numel()
    n_ev = max(1, min(k, round(k * select.EVIDENCE_SHARE)))
    best = float(lexical.max())
    tier = [] if best <= 0 else [u for u in range(n) if lexical[u] >= best * (1 - select.LEXICAL_MARGIN)]
    if len(tier) > n_ev:
        tier = []
    tier.sort(key=lambda u: -float(lexical[u]))
    lead: list[int] = []
    toward = [] if sides is None or not nb else [u + int(sides[u]) for u in tier if int(sides[u])]
    paragraph = []
    for j in range(1, 1 + (int(reach.max()) if reach is not None and nb else 0)):  # nearest first over the tier
        for u in tier:
            paragraph += [u + j] * (j <= int(reach[u, 1])) + [u - j] * (j <= int(reach[u, 0]))
    for v in tier + toward + paragraph + [u + s * j for u in tier for j in range(1, nb + 1) for s in (-1, 1)]:
        if 0 <= v < n and v not in lead and len(lead) < n_ev:
            lead.append(v)
    if tier and set().union(*(set(held[u].nonzero().flatten().tolist()) for u in tier)) == set(range(held.shape[1])):
        return select.choose(mass, k, nb, first=lead)  # the tier holds every rare word: the attention fills
    return select.evidence_then_attention(ranked, mass, k, nb, first=lead)


@pytest.mark.parametrize("seed", range(12))
def test_lexical_evidence_equals_the_reference_rule(seed):
    g = torch.Generator().manual_seed(seed)
    n, k = 120, 16
    mass = torch.rand(n, generator=g)
    ranked = torch.randn(n, generator=g)
    held = torch.zeros(n, 3, dtype=torch.bool)
    lexical = torch.zeros(n)
    n_full = 1 + seed % 5  # units that hold every rare word (values of one key)
    full = torch.randperm(n, generator=g)[: n_full + 6].tolist()
    for u in full[:n_full]:
        held[u, : 2 if seed % 2 else 3] = True  # odd seeds: word 2 only elsewhere (the tier covers not all)
        lexical[u] = 1.0 - 0.03 * (u % 3)
    for u in full[n_full : n_full + 3]:  # near-duplicates: part of the words
        held[u, 0] = True
        lexical[u] = 0.4
    for u in full[n_full + 3 :]:  # another word: not a near-duplicate
        held[u, 2] = True
        lexical[u] = 0.3
    if seed == 11:
        lexical.zero_()  # no word found: today's rule
        held.zero_()
    got = select.lexical_evidence(ranked, mass, lexical, held, k, 1)
    want = reference(ranked, mass, lexical, held, k, 1)
    assert torch.equal(got, want)
    sides = torch.randint(-1, 2, (n,), generator=g, dtype=torch.int8)
    sided = select.lexical_evidence(ranked, mass, lexical, held, k, 1, sides=sides)
    assert torch.equal(sided, reference(ranked, mass, lexical, held, k, 1, sides))
    reach = torch.randint(0, 3, (n, 2), generator=g, dtype=torch.int8)
    read_on = select.lexical_evidence(ranked, mass, lexical, held, k, 1, sides=sides, reach=reach)
    assert torch.equal(read_on, reference(ranked, mass, lexical, held, k, 1, sides, reach))
    assert got.numel() == k
    if seed != 11:  # every unit holding all the words is read
        assert set(full[:n_full]) <= set(got.tolist())
    if seed == 11:
        assert torch.equal(got, select.evidence_then_attention(ranked, mass, k, 1))


@pytest.mark.parametrize("covers", [True, False])
def test_a_small_topk_reads_every_tier_unit_and_a_covering_tier_leaves_the_fill_to_the_attention(covers):
    n, k = 60, 8  # six evidence slots: four values with neighbours would read two
    g = torch.Generator().manual_seed(3)
    mass, ranked = torch.rand(n, generator=g), torch.randn(n, generator=g)
    values = [7, 21, 35, 49]
    lexical, held = torch.zeros(n), torch.zeros(n, 2, dtype=torch.bool)
    lexical[values] = 1.0
    held[values, 0] = True
    if covers:
        held[values, 1] = True
    else:
        held[3, 1] = True
        lexical[3] = 0.2
    got = select.lexical_evidence(ranked, mass, lexical, held, k, 1)
    assert set(values) <= set(got.tolist())
    lead = [*values, 6, 8]  # the tier, then the first value's neighbours up to six
    want = select.choose(mass, k, 1, first=lead) if covers else select.evidence_then_attention(ranked, mass, k, 1, first=lead)
    assert torch.equal(got, want)


def test_a_small_topk_reads_first_the_neighbour_each_values_words_lie_against():
    """Four values of one key and six evidence slots: without sides the first value's two neighbours take the
    last two; with them, the halves of the two values cut across a border (the next unit after 21, the one
    before 49) are read, and no neighbour when neighbours=0."""
    n, k = 60, 8
    g = torch.Generator().manual_seed(5)
    mass, ranked = torch.rand(n, generator=g), torch.randn(n, generator=g)
    values = [7, 21, 35, 49]
    lexical, held = torch.zeros(n), torch.ones(n, 1, dtype=torch.bool)
    lexical[values] = 1.0
    sides = torch.zeros(n, dtype=torch.int8)
    sides[21], sides[49] = 1, -1
    got = select.lexical_evidence(ranked, mass, lexical, held, k, 1, sides=sides)
    assert torch.equal(got, select.choose(mass, k, 1, first=[*values, 22, 48]))
    assert torch.equal(select.lexical_evidence(ranked, mass, lexical, held, k, 1), select.choose(mass, k, 1, first=[*values, 6, 8]))
    assert torch.equal(select.lexical_evidence(ranked, mass, lexical, held, k, 0, sides=sides), select.choose(mass, k, 0, first=values))


def test_every_tier_units_next_paragraph_unit_comes_before_one_two_away():
    """A stream without blank lines (a log): every tier unit's paragraph reaches 2 each side; the lead takes each
    tier unit's units one away before any two away, so a later tier unit keeps its neighbours."""
    n, k = 80, 16  # twelve evidence slots
    mass, ranked = torch.zeros(n), torch.zeros(n)
    lexical, held = torch.zeros(n), torch.ones(n, 1, dtype=torch.bool)
    tier = [10, 30, 50, 70]
    lexical[tier] = 1.0
    reach = torch.full((n, 2), 2, dtype=torch.int8)
    got = select.lexical_evidence(ranked, mass, lexical, held, k, 1, reach=reach)
    assert torch.equal(got, select.choose(mass, k, 1, first=[*tier, 11, 9, 31, 29, 51, 49, 71, 69]))


def test_the_paragraph_of_a_tier_unit_is_read_before_the_neighbour_across_a_break():
    """A question's words open a paragraph of three units (40..42) that follows another (39): the unit after
    the next (42, where the answer may be) is read before the unit before (39, another paragraph)."""
    n, k = 60, 8
    g = torch.Generator().manual_seed(6)
    mass, ranked = torch.rand(n, generator=g), torch.randn(n, generator=g)
    lexical, held = torch.zeros(n), torch.ones(n, 1, dtype=torch.bool)
    lexical[[40, 12]] = torch.tensor([1.0, 0.95])
    sides, reach = torch.zeros(n, dtype=torch.int8), torch.zeros(n, 2, dtype=torch.int8)
    sides[40], reach[40] = 1, torch.tensor([0, 2])
    got = select.lexical_evidence(ranked, mass, lexical, held, k, 1, sides=sides, reach=reach)
    assert torch.equal(got, select.choose(mass, k, 1, first=[40, 12, 41, 42, 39, 11]))
    assert torch.equal(select.lexical_evidence(ranked, mass, lexical, held, k, 1, sides=sides), select.choose(mass, k, 1, first=[40, 12, 41, 39, 11, 13]))
    assert torch.equal(select.lexical_evidence(ranked, mass, lexical, held, k, 0, sides=sides, reach=reach), select.choose(mass, k, 0, first=[40, 12]))


def brute_reach(idx: UnitTextIndex, question: str, n_units: int, most: int) -> list[list[int]]:
    """Per unit: the units before and after it (up to `most`) the paragraph of its best windows goes on into,
    read from the decoded text: a unit is reached when no blank line lies between it and the middle of the
    nearest best window."""
    n_windows = idx.windows_for(n_units)
    sets = [set(words(idx.window_text(j))) for j in range(n_windows)]
    _, _, q = brute_force(idx, question, n_units, 0.02, 16)
    df = {w: sum(w in s for s in sets) for w in q}
    idf = {w: math.log(n_windows / df[w]) for w in q}
    total = sum(idf.values())
    bs, base, half = idx.block_size, idx.n_init, idx.window // 2
    text = "".join(chr(t) for t in idx.ids)  # CharTokenizer: a token is a character

    def blank(a: int, b: int) -> bool:  # a blank line ends in text[a:b]: "\n\n" with its second newline there
        return any(text[i - 1 : i + 1] == "\n\n" for i in range(max(a, 1), b))

    out = []
    for u in range(n_units):
        lo, hi = u * bs, (u + 1) * bs
        inside = [j for j in range(n_windows) if min(hi, j * idx.stride + idx.window) - max(lo, j * idx.stride) >= half]
        per = {j: sum(idf[w] for w in q if w in sets[j]) / total if q else 0.0 for j in inside}
        if max(per.values()) <= 0:
            out.append([0, 0])
            continue
        best = [j for j in inside if per[j] == max(per.values())]
        first, last = base + min(best) * idx.stride + idx.stride, base + max(best) * idx.stride + idx.stride  # middles
        back = next((r - 1 for r in range(1, most + 1) if u - r < 0 or blank(base + (u - r + 1) * bs - 1, first)), most)
        ahead = next((r - 1 for r in range(1, most + 1) if u + r >= n_units or blank(last, base + (u + r) * bs + 1)), most)
        out.append([back, ahead])
    return out


@pytest.mark.parametrize("block_size,window,seed", [(32, 16, 0), (64, 48, 1), (16, 16, 2)])
def test_paragraph_reach_equals_a_reading_of_the_blank_lines(block_size, window, seed):
    """UnitTextIndex.lexical_sides' reach: per unit with the question's words, the units before and after its
    best windows that no blank line parts from them (up to 2), as the decoded text reads; read again after
    the stream grows and after a rollback, as a fresh index reads it."""
    rng = random.Random(seed)
    n_init = 5
    text = " ".join(rng.choice(VOCAB) for _ in range(900))
    for at in sorted(rng.sample(range(20, len(text) - 20), 30)):  # paragraphs of random lengths
        text = text[:at] + "\n\n" + text[at + 2 :]
    for at in (rng.randrange(len(text) - 40) for _ in range(6)):
        text = text[:at] + " zebra violet " + text[at + 14 :]
    ids = [ord(c) for c in text]
    n_units = (len(text) - n_init) // block_size - 2
    question = "Where is the zebra violet?"
    idx = UnitTextIndex(FakeEmbedder(), CharTokenizer(), n_init, block_size, window=window)
    idx.write(0, ids[: len(ids) // 2])
    idx.paragraph_breaks(len(ids))  # read the first half's breaks before the rest arrives
    idx.write(len(ids) // 2, ids[len(ids) // 2 :])
    m = idx.lexical_sides(question, n_units)
    assert m.reach.dtype == torch.int8 and m.reach.shape == (n_units, 2)
    assert m.reach.tolist() == brute_reach(idx, question, n_units, 2)
    assert (m.reach[m.score <= 0] == 0).all() and m.reach.max() <= 2 and m.reach.sum() > 0
    assert idx.lexical_sides(question, n_units, reach=0).reach.sum() == 0
    assert idx.paragraph_breaks(len(ids)).tolist() == [i for i in range(1, len(text)) if text[i - 1 : i + 1] == "\n\n"]
    idx.write(len(ids) - 3 * block_size, ids[len(ids) - 3 * block_size :])  # a rollback: the same text again
    assert idx.lexical_sides(question, n_units).reach.tolist() == m.reach.tolist()


def test_no_tier_when_too_many_units_hold_the_words():
    lexical = torch.ones(40)
    assert select.lexical_tier(lexical, cap=12) == []
    assert select.lexical_tier(torch.zeros(5), cap=12) == []
    lexical = torch.tensor([0.0, 0.95, 1.0, 0.5, 0.95])
    assert select.lexical_tier(lexical, cap=12) == [2, 1, 4]


def test_the_lexical_selector_reads_the_needle_in_every_layer():
    selector = MemoryConfig().selector  # the default
    s = text_session(topk=6)
    s.feed(PROSE[:300] + NEEDLE + PROSE[:400])
    cfg = s.config
    gold = select.units_of_spans(
        [(300, 300 + len(NEEDLE))], cfg.n_init, cfg.block_size, s.stats()["units_per_layer"]
    )
    _, log, sel = ask_logged(s, question="Where is the zebra violet?", selector=selector)
    assert len(sel["units"]) == cfg.topk and sel["lexical_score"] is not None
    assert set(gold) & set(sel["units"])
    for _, ids in log:
        assert sorted(set(ids.tolist())) == sel["units"]
    _, _, plain = ask_logged(s, question="Where is the zebra violet?", selector="hybrid")
    assert plain["lexical_score"] is None


def test_the_lexical_selector_reads_on_into_the_paragraph_of_the_questions_words():
    """A rare word opens a paragraph (after a blank line) that goes on for three more units: every layer reads
    the word's unit and the two after it (MemoryConfig.paragraph_reach, default 2)."""
    s = text_session(topk=6, selector="lexical")
    text = PROSE[:300] + "\n\n" + " kudzu " + PROSE[:40] + "\n\n" + PROSE[:300]
    s.feed(text)
    cfg = s.config
    n_units = s.stats()["units_per_layer"]
    at = text.index("kudzu")
    (u,) = select.units_of_spans([(at, at + 5)], cfg.n_init, cfg.block_size, n_units)
    _, log, sel = ask_logged(s, question="Where is the kudzu?", query="kudzu?")
    assert int(sel["lexical_score"].argmax()) == u
    assert {u, u + 1, u + 2} <= set(sel["units"])
    for _, ids in log:
        assert {u, u + 1, u + 2} <= set(ids.tolist())
    match = s.text_index.lexical_sides("kudzu?", n_units)
    assert int(match.reach[u, 1]) == 2 and int(match.reach[u, 0]) == 0  # the blank line just before
    with pytest.raises(ConfigError, match="paragraph_reach"):
        MemoryConfig(paragraph_reach=-1)


def test_the_selection_matches_the_query_not_the_prompts_instructions():
    """A prompt's instructions hold words the stream also holds ("qx jw" here; "answer", "documents" in a
    book): matched with the question they pull their units; with `query` (the user's words, as docqa and
    chat pass them) the question's own units lead. The probe's attention still reads the whole prompt."""
    s = text_session(topk=6, selector="lexical")
    s.feed(PROSE[:200] + " qx jw " + PROSE[:200] + NEEDLE + PROSE[:300])
    cfg = s.config
    n_units = s.stats()["units_per_layer"]
    needle = select.units_of_spans([(407, 407 + len(NEEDLE))], cfg.n_init, cfg.block_size, n_units)
    prompt, query = "Say qx jw. Where is the zebra?", "Where is the zebra?"
    _, _, whole = ask_logged(s, question=prompt)
    assert whole["query"] == prompt and int(whole["lexical_score"].argmax()) not in needle
    _, log, asked = ask_logged(s, question=prompt, query=query)
    assert asked["query"] == query and int(asked["lexical_score"].argmax()) in needle
    assert set(needle) & set(asked["units"])
    for _, ids in log:
        assert sorted(set(ids.tolist())) == asked["units"]
    _, _, blank = ask_logged(s, question=prompt, query="  ")
    assert blank["query"] == prompt  # a blank query: the prompt's text
    with pytest.raises(InputError, match="query must be text"):
        ask_logged(s, question=prompt, query=3)


def test_the_words_are_held_compactly_and_counted():
    """~4 bytes a (window, distinct word) once the vocabulary is known: 1M stream tokens cost ~6 B a token
    in words, not the ~176 of Python sets; UnitTextIndex.nbytes counts them."""
    from memllm.unit_lexical import WindowWords

    ww = WindowWords()
    text = stream(200, seed=2)
    ww.extend([text] * 20)
    base = ww.nbytes()
    ww.extend([text] * 2000)
    per = (ww.nbytes() - base) / (2000 * len(ww.window(0)))
    assert per <= 4 + 8 / len(ww.window(0)) + 0.5  # int32 id a word, int64 offset a window (array growth slack)
    assert ww.window(5) == frozenset(words(text))
    idx = UnitTextIndex(FakeEmbedder(), CharTokenizer(), 4, 32, window=16)
    idx.write(0, [ord(c) for c in stream(300)])
    before = idx.nbytes()
    idx.lexical("zebra violet", 40)
    assert idx.nbytes() > before


@pytest.mark.parametrize("n", [0, 1, 1023, 1024, 2500])
def test_window_cosines_equal_the_fp32_product(n):
    """unit_text.window_cosines converts the fp16 vectors a chunk at a time: the same fp32 products as
    converting them all first, across chunk boundaries."""
    from memllm.unit_text import COSINE_CHUNK, window_cosines

    assert COSINE_CHUNK == 1024
    rng = np.random.default_rng(n)
    vectors = rng.standard_normal((n, 48)).astype(np.float16)
    q = rng.standard_normal(48).astype(np.float32)
    got = window_cosines(vectors, q)
    assert got.dtype == torch.float32 and got.shape == (n,)
    np.testing.assert_allclose(got.numpy(), vectors.astype(np.float32) @ q, rtol=1e-5, atol=1e-5)
