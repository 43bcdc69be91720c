"""The text index over memory units: token memory and text memory as one (issue 25's hybrid selection).

Each unit of the context memory holds `block_size` tokens of the stream (unit u: tokens n_init +
u * block_size ...). This index keeps the stream's token ids (int32, 4 bytes a token) and sentence
embeddings of short overlapping windows of the stream (`window` tokens every `window // 2`, from
n_init on). A question's text is embedded, scored against every window (cosine), and a unit's score
is the best of the windows that lie at least half inside it: a needle sentence or the sentence that
answers a question is scored on its own, not diluted by the rest of its unit's text (embedding whole
units found the gold units of 0.45 of the 128K suite's questions, windows of 48 tokens 0.83:
benchmarks/RESULTS.md, "The text index by windows"). The question selector (context/select.py) reads the
units this nominates beside those the question's attention finds. Windows are embedded lazily, when
a question needs their scores, so reading a document costs nothing here; a rollback
(Session.answering) that rewrites the stream drops the vectors of the windows it touched.

Knows nothing of attention, caches or models: ids in, (n_units,) scores out.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from memllm.config import PARAGRAPH_REACH
from memllm.errors import ConfigError
from memllm.unit_lexical import RARE, RARE_FLOOR, WindowWords, best_windows

WINDOW = 48  # tokens a window holds (at most block_size); a window starts every WINDOW // 2 tokens

# Windows whose fp16 vectors are converted at a time in window_cosines: a chunk's fp32 copy (1.5 MB at 384
# dimensions) stays in cache. At 1M tokens (43,690 windows) on a 2-core CPU: 3.9 ms a question, against 28.4
# for converting all of them first with NumPy (17.3 with torch), the same products (benchmarks/window_cosines.py).
COSINE_CHUNK = 1024


class LexicalMatch(NamedTuple):
    """`UnitTextIndex.lexical_sides`: per unit, the question's rare words its best window holds and where."""

    score: torch.Tensor  # (n_units,) fp32: the IDF-weighted share of the rare words (unit_lexical)
    held: torch.Tensor  # (n_units, words) bool: which
    sides: torch.Tensor  # (n_units,) int8: the neighbour the words lie against (+1 next, -1 previous, 0 none)
    reach: torch.Tensor  # (n_units, 2) int8: units before and after into which the words' paragraph goes on


def window_cosines(vectors: np.ndarray, q: np.ndarray) -> torch.Tensor:
    """vectors (n, dim) fp16 . q (dim,) fp32 -> (n,) fp32, in fp32, COSINE_CHUNK rows converted at a time."""
    v, qt = torch.from_numpy(vectors), torch.from_numpy(np.ascontiguousarray(q, dtype=np.float32))
    out = torch.empty(v.shape[0], dtype=torch.float32)
    for lo in range(0, v.shape[0], COSINE_CHUNK):
        torch.mv(v[lo : lo + COSINE_CHUNK].float(), qt, out=out[lo : lo + COSINE_CHUNK])
    return out


class UnitTextIndex:
    """embedder: a memllm Embedder (embed(texts) -> (n, dim) float32, rows unit-norm); tokenizer: the
    model's (decode ids -> text); n_init, block_size: the context memory's; window: tokens per
    embedded window (default min(48, block_size)), one starting every window // 2 tokens; batch:
    texts per embed call."""

    def __init__(
        self, embedder: Any, tokenizer: Any, n_init: int, block_size: int, window: int | None = None, batch: int = 256
    ) -> None:
        window = min(WINDOW, block_size) if window is None else window
        if not 2 <= window <= block_size:
            raise ConfigError(f"UnitTextIndex window must be within 2..block_size ({block_size}), got {window}")
        self.embedder = embedder
        self.tokenizer = tokenizer
        self.n_init = n_init
        self.block_size = block_size
        self.window = window
        self.stride = window // 2
        self.batch = batch
        self.ids = array("i")  # the stream's token ids, as the cache holds them
        self._vectors = np.zeros((0, int(embedder.dim)), dtype=np.float16)  # (windows embedded, dim)
        self._words = WindowWords()  # the windows' words, read by `lexical` only (selectors "lexical*")
        self._breaks = np.zeros(0, dtype=np.int64)  # stream positions of tokens that end a blank line, ascending
        self._breaks_read = 0  # stream tokens read for them
        # per token id (-1 not yet decoded): 1 its text holds a blank line, 2 it starts with a newline, 4 it ends with one
        self._newlines = np.full(0, -1, dtype=np.int8)

    # ---- the stream ----------------------------------------------------------------------------
    def write(self, position: int, ids: Sequence[int] | np.ndarray) -> None:
        """The stream holds `ids` from `position` on (what was there from `position` is replaced: a
        rollback happened); windows that reach `position` lose their vectors."""
        if position < len(self.ids):
            del self.ids[position:]
            keep = max(0, (position - self.window - self.n_init) // self.stride + 1)
            self._vectors = self._vectors[: min(keep, len(self._vectors))]
            self._words.truncate(min(keep, len(self._words)))
            self._breaks = self._breaks[: int(np.searchsorted(self._breaks, position))]
            self._breaks_read = min(self._breaks_read, position)
        elif position > len(self.ids):  # tokens this index never saw (a restored stream): unknown text
            self.ids.extend([0] * (position - len(self.ids)))
        self.ids.frombytes(np.asarray(ids, dtype=np.intc).tobytes())  # C int, as array("i"); 1M ids: ~6 ms, not ~120

    @property
    def embedded(self) -> int:
        """Windows whose vectors are held."""
        return len(self._vectors)

    def nbytes(self) -> int:
        """Host bytes held: the ids, the windows' vectors and (once a lexical selector read them) words and
        paragraph breaks."""
        words = self._words.nbytes() + self._breaks.nbytes + self._newlines.nbytes
        return self.ids.itemsize * len(self.ids) + self._vectors.nbytes + words

    def bytes_per_token(self) -> float:
        """Host bytes per stream token: its id and its share of a window's fp16 vector."""
        return self.ids.itemsize + 2 * int(self.embedder.dim) / self.stride

    # ---- scoring -------------------------------------------------------------------------------
    def window_text(self, j: int) -> str:
        a = self.n_init + j * self.stride
        return self.tokenizer.decode(list(self.ids[a : a + self.window]), skip_special_tokens=True)

    def windows_for(self, n_units: int) -> int:
        """Windows that score the first n_units units: those starting before the last unit's end less
        half a window."""
        return (n_units * self.block_size - self.window // 2) // self.stride + 1 if n_units > 0 else 0

    def _embed_to(self, n_windows: int) -> None:
        done = len(self._vectors)
        if n_windows <= done:
            return
        parts = [self._vectors]
        for lo in range(done, n_windows, self.batch):
            hi = min(n_windows, lo + self.batch)
            vec = np.asarray(self.embedder.embed([self.window_text(j) for j in range(lo, hi)]), dtype=np.float32)
            parts.append(vec.astype(np.float16))
        self._vectors = np.concatenate(parts)

    def unit_windows(self, n_units: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(n_units,) first and last window of each unit: those at least half inside it (a window
        starting within half a window before the unit's first token up to half a window before its
        end)."""
        lo = torch.arange(n_units) * self.block_size - self.window // 2  # relative to n_init
        hi = lo + self.block_size
        first = torch.div(lo + self.stride - 1, self.stride, rounding_mode="floor").clamp_min(0)
        last = torch.div(hi, self.stride, rounding_mode="floor").clamp_max(self.windows_for(n_units) - 1)
        return first, last

    def _check(self, n_units: int) -> int:
        """The windows that score n_units units, all held (ConfigError otherwise)."""
        n_windows = self.windows_for(n_units)
        if self.n_init + (n_windows - 1) * self.stride + self.window // 2 > len(self.ids):
            raise ConfigError(
                f"the text index holds {len(self.ids):,} tokens, fewer than {n_units:,} units need: "
                "it must see every token the session reads (Session(llm, memory, embedder=...) from the start)"
            )
        return n_windows

    def lexical(
        self, question: str, n_units: int, rare: float = RARE, floor: int = RARE_FLOOR
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(n_units,) fp32 and (n_units, words) bool: per unit, the IDF-weighted share of the question's
        rare words its best window holds, and which (memllm/unit_lexical.py). Windows' words are read
        lazily, once, as their vectors are."""
        match = self.lexical_sides(question, n_units, rare, floor, reach=0)
        return match.score, match.held

    def lexical_sides(
        self, question: str, n_units: int, rare: float = RARE, floor: int = RARE_FLOOR, reach: int = PARAGRAPH_REACH
    ) -> LexicalMatch:
        """`lexical`; (n_units,) int8 the side the unit's words lie against: +1 where the windows with
        its best score reach into its last half window (or past its end; the sentence that holds them
        may go on in the next unit), -1 where they reach into its first half window (or before it),
        0 where both or neither (words spread over the unit, or none); and (n_units, 2) the units before
        and after (up to `reach`) into which the paragraph holding those windows goes on (`paragraph_reach`)."""
        if n_units <= 0:
            none = torch.zeros(0, dtype=torch.int8)
            return LexicalMatch(torch.zeros(0), torch.zeros(0, 0, dtype=torch.bool), none, none.view(0, 2))
        n_windows = self._check(n_units)
        for lo in range(len(self._words), n_windows, self.batch):
            self._words.extend(self.window_text(j) for j in range(lo, min(n_windows, lo + self.batch)))
        first, last = self.unit_windows(n_units)
        per_window, held = self._words.window_scores(question, n_windows, rare, floor)
        score, words_held, lo, hi = best_windows(per_window, held, first, last)
        return LexicalMatch(score, words_held, self.sides(score, lo, hi), self.paragraph_reach(score, lo, hi, reach))

    def sides(self, score: torch.Tensor, lo: np.ndarray, hi: np.ndarray) -> torch.Tensor:
        """(n_units,) int8, `lexical_sides`' sides from each unit's first and last best window (lo, hi, as
        unit_lexical.best_windows gives them) and its score (0 where the score is)."""
        start = torch.from_numpy(lo * self.stride)  # tokens after n_init
        end = torch.from_numpy(hi * self.stride + self.window)
        unit_start = torch.arange(score.numel()) * self.block_size
        half = self.window // 2
        after = end > unit_start + self.block_size - half
        before = start < unit_start + half
        sides = after.to(torch.int8) - before.to(torch.int8)
        return sides.masked_fill(score <= 0, 0)

    def paragraph_breaks(self, end: int) -> np.ndarray:
        """Stream positions below `end` of the tokens that end a blank line (a paragraph break: a token whose
        text holds two newlines, or one starting with a newline after one that ends with one), ascending.
        Read once, as the stream grows; each token id's text decoded once."""
        end = min(end, len(self.ids))
        if end > self._breaks_read:
            a = max(0, self._breaks_read - 1)  # the token before: a newline may end it
            seg = np.frombuffer(self.ids, dtype=np.intc)[a:end]
            if seg.size and int(seg.max()) >= len(self._newlines):
                grown = np.full(int(seg.max()) + 1, -1, dtype=np.int8)
                grown[: len(self._newlines)] = self._newlines
                self._newlines = grown
            ids = np.unique(seg)
            for t in ids[self._newlines[ids] < 0].tolist():
                piece = self.tokenizer.decode([t])
                self._newlines[t] = ("\n\n" in piece) | ("\n" == piece[:1]) << 1 | ("\n" == piece[-1:]) << 2
            bits = self._newlines[seg]
            brk = (bits & 1).astype(bool)
            brk[1:] |= ((bits[:-1] & 4) > 0) & ((bits[1:] & 2) > 0)
            new = a + np.flatnonzero(brk)
            self._breaks = np.concatenate([self._breaks, new[new >= self._breaks_read]])
            self._breaks_read = end
        return self._breaks[: int(np.searchsorted(self._breaks, end))]

    def paragraph_reach(self, score: torch.Tensor, lo: np.ndarray, hi: np.ndarray, most: int) -> torch.Tensor:
        """(n_units, 2) int8: per unit with a score, how many units before it and after it (up to `most`) the
        paragraph holding its best windows' words (first lo, last hi, as unit_lexical.best_windows gives them)
        goes on into: unit u + r is reached when no paragraph break lies between the middle of the last best
        window and its start, u - r when none lies between its end and the middle of the first. (The first
        best window holds a word in its second half, past the window before it; the last one in its first.)"""
        n = score.numel()
        out = np.zeros((n, 2), dtype=np.int8)
        if n == 0 or most <= 0:
            return torch.from_numpy(out)
        base, bs = self.n_init, self.block_size
        breaks = self.paragraph_breaks(base + n * bs)
        first, last = base + lo * self.stride + self.stride, base + hi * self.stride + self.stride  # their middles
        u = np.arange(n)

        def none_between(a: np.ndarray, b: np.ndarray) -> np.ndarray:
            return np.searchsorted(breaks, np.maximum(a, b)) == np.searchsorted(breaks, a)

        on = score.numpy() > 0
        back, ahead = on.copy(), on.copy()
        for r in range(1, most + 1):
            back &= (u - r >= 0) & none_between(base + (u - r + 1) * bs - 1, first)  # a break as its last token
            ahead &= (u + r < n) & none_between(last, base + (u + r) * bs + 1)  # ... or as its first
            out[:, 0] += back
            out[:, 1] += ahead
        return torch.from_numpy(out)

    def scores(self, question: str, n_units: int) -> torch.Tensor:
        """(n_units,) fp32: per unit, the best cosine of its windows' text with `question`."""
        if n_units <= 0:
            return torch.zeros(0)
        n_windows = self._check(n_units)
        self._embed_to(n_windows)
        q = np.asarray(self.embedder.embed([question]), dtype=np.float32)[0]
        cos = window_cosines(self._vectors[:n_windows], q)
        first, last = self.unit_windows(n_units)
        span = int((last - first).max()) + 1
        idx = first.unsqueeze(1) + torch.arange(span)
        inside = idx <= last.unsqueeze(1)
        return cos[idx.clamp_max(n_windows - 1)].masked_fill(~inside, float("-inf")).amax(dim=1)
