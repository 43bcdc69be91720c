"""The question's rare words against the text index's windows: a lexical signal beside the MiniLM cosine
(issue 25, the "lexical" selector, the default).

A window's words are the lower-cased runs of letters and digits of its decoded text (the same windows
UnitTextIndex embeds). A question word is rare when it is in at most `rare` of the windows that score the
units, or in at most RARE_FLOOR of them (IDF from the stream itself); a window's score is the IDF-weighted share of the question's rare
words it holds (1.0: all of them), a unit's the best of its windows', and the words a unit holds are
that window's. Where a question names something the stream mentions rarely (a key, a name), the units
that hold all of it stand apart from those that hold part of it (a sentence of the same shape about
another key): what the MiniLM cosine and the attention rank alike. Measured offline:
benchmarks/RESULTS.md, "A lexical signal, replayed offline".

Knows nothing of models or attention: texts in, (n_units,) scores out.
"""

from __future__ import annotations

import math
import re
import sys
from array import array
from collections.abc import Iterable

import numpy as np
import torch

WORD = re.compile(r"\w+")
RARE = 0.02  # a question word is rare when at most this share of the windows hold it
RARE_FLOOR = 16  # ... or at most this many: in a short stream 2% is a word said once or twice (4K: 3 windows)


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


class WindowWords:
    """The distinct words of windows 0..len-1, compact: one flat int32 array of word ids into a vocabulary
    with each window's offset into it (~4 bytes a word a window holds: ~6 B a stream token with 48-token
    windows every 24 tokens, where Python sets and postings lists held ~176 B)."""

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}
        self._names: list[str] = []  # id -> word
        self._name_bytes = 0
        self._ids = array("i")  # C int: int32 here, as np.intc
        self._offsets = array("q", [0])  # window j's ids: _ids[_offsets[j]:_offsets[j + 1]]

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def extend(self, texts: Iterable[str]) -> None:
        for text in texts:
            for w in dict.fromkeys(words(text)):
                wid = self.vocab.get(w)
                if wid is None:
                    wid = self.vocab[w] = len(self._names)
                    self._names.append(w)
                    self._name_bytes += sys.getsizeof(w)
                self._ids.append(wid)
            self._offsets.append(len(self._ids))

    def truncate(self, n: int) -> None:
        """Keep the first n windows (a rollback rewrote the rest); the vocabulary stays."""
        if n < len(self):
            del self._ids[self._offsets[n] :]
            del self._offsets[n + 1 :]

    def window(self, j: int) -> frozenset[str]:
        """Window j's words."""
        return frozenset(self._names[i] for i in self._ids[self._offsets[j] : self._offsets[j + 1]])

    def nbytes(self) -> int:
        """Host bytes held: the ids, the offsets and the vocabulary (its words and dict, approximately)."""
        return (self._ids.itemsize * len(self._ids) + self._offsets.itemsize * len(self._offsets)
                + self._name_bytes + sys.getsizeof(self.vocab) + sys.getsizeof(self._names))  # fmt: skip

    def holding(self, question_words: list[str], n_windows: int) -> tuple[list[str], list[np.ndarray]]:
        """The question's words found in the first n_windows windows, in its order, with the windows
        (ascending) that hold each."""
        known = [w for w in question_words if w in self.vocab]
        if not known or n_windows <= 0:
            return [], []
        end = self._offsets[n_windows]
        flat = np.frombuffer(self._ids, dtype=np.intc, count=end).copy() if end else np.zeros(0, np.intc)
        wids = np.array([self.vocab[w] for w in known], dtype=np.intc)
        pos = np.flatnonzero(np.isin(flat, wids))
        win = np.searchsorted(np.frombuffer(self._offsets, dtype=np.int64, count=n_windows + 1).copy(), pos,
                              side="right") - 1  # fmt: skip
        got = flat[pos]
        found, at = [], []
        for w, wid in zip(known, wids.tolist(), strict=True):
            windows = win[got == wid]
            if windows.size:
                found.append(w)
                at.append(windows)
        return found, at

    def window_scores(
        self, question: str, n_windows: int, rare: float = RARE, floor: int = RARE_FLOOR
    ) -> tuple[np.ndarray, np.ndarray]:
        """The first n_windows windows -> ((n_windows,) each window's IDF-weighted share of the question's rare
        words, (n_windows, rare words) bool: which it holds)."""
        most = max(rare * n_windows, floor)
        found = [at for at in self.holding(list(dict.fromkeys(words(question))), n_windows)[1] if len(at) <= most]
        held = np.zeros((max(n_windows, 0), len(found)), dtype=bool)
        if not found:
            return np.zeros(max(n_windows, 0)), held
        idf = np.array([math.log(n_windows / len(at)) for at in found])
        weight = idf / max(idf.sum(), 1e-12)
        for i, at in enumerate(found):
            held[at, i] = True
        return held @ weight, held

    def unit_scores(
        self, question: str, first: torch.Tensor, last: torch.Tensor, n_windows: int, rare: float = RARE,
        floor: int = RARE_FLOOR,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Units whose windows are first[u]..last[u] (of the first n_windows) -> ((n_units,) fp32 score,
        (n_units, rare words) bool: the words the unit's best window holds)."""
        per_window, held = self.window_scores(question, n_windows, rare, floor)
        score, words_held, _, _ = best_windows(per_window, held, first, last)
        return score, words_held


def best_windows(
    per_window: np.ndarray, held: np.ndarray, first: torch.Tensor, last: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
    """Windows' scores and words (window_scores), units whose windows are first[u]..last[u] -> per unit:
    (n_units,) fp32 its best window's score, (n_units, words) bool that window's words (the first best
    window, as np.argmax), and (n_units,) the first and the last of its windows with that score."""
    n_units = first.numel()
    n_windows = per_window.shape[0]
    if held.shape[1] == 0 or n_units == 0 or n_windows == 0:
        none = np.zeros(n_units, dtype=np.int64)
        return torch.zeros(n_units), torch.zeros(n_units, held.shape[1], dtype=torch.bool), none, none
    lo, hi = first.numpy(), last.numpy()
    span = int((hi - lo).max()) + 1
    idx = lo[:, None] + np.arange(span)
    vals = np.where(idx <= hi[:, None], per_window[np.minimum(idx, n_windows - 1)], -np.inf)
    top = vals.max(axis=1)
    at_top = vals == top[:, None]
    first_best = idx[np.arange(n_units), vals.argmax(axis=1)]
    last_best = idx[np.arange(n_units), span - 1 - at_top[:, ::-1].argmax(axis=1)]
    return (torch.from_numpy(per_window[first_best]).float(), torch.from_numpy(held[first_best]), first_best,
            last_best)  # fmt: skip
