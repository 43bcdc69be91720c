"""Whether an answer is fit to be remembered: degenerate answers (loops, repeated sentences) are not.

`degenerate("a mix of a mix of a mix of ...")` returns the reason ("repeats itself: ..."), or None for
an ordinary answer. Knows nothing of models or stores.
"""

from __future__ import annotations

import re
from collections import Counter


def degenerate(text: str, *, n: int = 4, min_words: int = 12, max_repeat_share: float = 0.5) -> str | None:
    """The reason `text` looks degenerate, or None. Degenerate: among its word n-grams, the share of
    repeats (n-grams seen before in the text) exceeds `max_repeat_share`; or a sentence of 4+ words
    occurs three times or more."""
    words = re.findall(r"\w+", text.lower())
    if len(words) >= min_words:
        grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
        repeats = len(grams) - len(set(grams))
        if grams and repeats / len(grams) > max_repeat_share:
            return f"repeats itself: {repeats} of {len(grams)} {n}-word sequences are repeats"
    sentences = [s.strip().lower() for s in re.split(r"[.!?\n]+", text) if len(s.split()) >= 4]
    if sentences:
        sentence, count = Counter(sentences).most_common(1)[0]
        if count >= 3:
            return f"the sentence {sentence[:40]!r} occurs {count} times"
    return None


__all__ = ["degenerate"]
