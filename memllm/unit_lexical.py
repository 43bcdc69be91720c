"""The question's rare words against the text index's windows: a lexical signal beside the MiniLM cosine
(issue 25, selectors "lexical" and "lexical_near").

A window's words are the lower-cased runs of letters and digits of its decoded text (the same windows
UnitTextIndex embeds). A question word is rare when it is in at most `rare` of the windows that score the
units (IDF from the stream itself); a window's score is the IDF-weighted share of the question's rare
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
from bisect import bisect_left
from collections.abc import Iterable

import numpy as np
import torch

WORD = re.compile(r"\w+")
RARE = 0.02  # a question word is rare when at most this share of the windows hold it


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


class WindowWords:
    """The word sets of the windows 0..len-1, with each word's windows (ascending)."""

    def __init__(self) -> None:
        self.sets: list[frozenset[str]] = []
        self.postings: dict[str, list[int]] = {}

    def __len__(self) -> int:
        return len(self.sets)

    def extend(self, texts: Iterable[str]) -> None:
        for text in texts:
            j = len(self.sets)
            got = frozenset(words(text))
            self.sets.append(got)
            for w in got:
                self.postings.setdefault(w, []).append(j)

    def truncate(self, n: int) -> None:
        """Keep the first n windows (a rollback rewrote the rest)."""
        while len(self.sets) > n:
            j = len(self.sets) - 1
            for w in self.sets.pop():
                at = self.postings[w]
                if at[-1] == j:
                    at.pop()
                if not at:
                    del self.postings[w]

    def unit_scores(
        self, question: str, first: torch.Tensor, last: torch.Tensor, n_windows: int, rare: float = RARE
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Units whose windows are first[u]..last[u] (of the first n_windows) -> ((n_units,) fp32 score,
        (n_units, rare words) bool: the words the unit's best window holds)."""
        n_units = first.numel()
        found: list[list[int]] = []
        for w in dict.fromkeys(words(question)):
            at = self.postings.get(w, [])
            at = at[: bisect_left(at, n_windows)]
            if 0 < len(at) <= rare * n_windows:
                found.append(at)
        if not found or n_units == 0:
            return torch.zeros(n_units), torch.zeros(n_units, len(found), dtype=torch.bool)
        idf = np.array([math.log(n_windows / len(at)) for at in found])
        weight = idf / max(idf.sum(), 1e-12)
        held = np.zeros((n_windows, len(found)), dtype=bool)
        for i, at in enumerate(found):
            held[at, i] = True
        per_window = held @ weight
        lo, hi = first.numpy(), last.numpy()
        span = int((hi - lo).max()) + 1
        idx = lo[:, None] + np.arange(span)
        vals = np.where(idx <= hi[:, None], per_window[np.minimum(idx, n_windows - 1)], -np.inf)
        best = idx[np.arange(n_units), vals.argmax(axis=1)]  # the first best window, as np.argmax
        return torch.from_numpy(per_window[best]).float(), torch.from_numpy(held[best])
