"""The text index over memory units: token memory and text memory as one (issue 25's hybrid selection).

Each unit of the context memory holds `block_size` tokens of the stream (unit u: tokens n_init +
u * block_size ...). This index keeps the stream's token ids (int32, 4 bytes a token) and, for every
unit, a sentence embedding of the unit's text with `margin` tokens of its neighbours on each side (a
sentence cut at a unit border still reads whole). A question's text is embedded and scored against
every unit (cosine); the question selector (context/select.py) reads the units this nominates beside
those the question's attention finds. Units are embedded lazily, when a question needs their scores,
so reading a document costs nothing here; a rollback (Session.answering) that rewrites the stream
drops the vectors of the units it touched.

Knows nothing of attention, caches or models: ids in, (n_units,) scores out.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from memllm.errors import ConfigError


class UnitTextIndex:
    """embedder: a memllm Embedder (embed(texts) -> (n, dim) float32, rows unit-norm); tokenizer: the
    model's (decode ids -> text); n_init, block_size: the context memory's; margin: tokens of each
    neighbour embedded with a unit (default a quarter unit: 32 of 128); batch: texts per embed call."""

    def __init__(
        self, embedder: Any, tokenizer: Any, n_init: int, block_size: int, margin: int | None = None, batch: int = 256
    ) -> None:
        margin = block_size // 4 if margin is None else margin
        if not 0 <= margin <= block_size:
            raise ConfigError(f"UnitTextIndex margin must be within 0..block_size ({block_size}), got {margin}")
        self.embedder = embedder
        self.tokenizer = tokenizer
        self.n_init = n_init
        self.block_size = block_size
        self.margin = margin
        self.batch = batch
        self.ids = array("i")  # the stream's token ids, as the cache holds them
        self._vectors = np.zeros((0, int(embedder.dim)), dtype=np.float16)  # (units embedded, dim)

    # ---- the stream ----------------------------------------------------------------------------
    def write(self, position: int, ids: Sequence[int]) -> None:
        """The stream holds `ids` from `position` on (what was there from `position` is replaced: a
        rollback happened); units whose text reaches `position` lose their vectors."""
        if position < len(self.ids):
            del self.ids[position:]
            keep = max(0, (position - self.margin - self.n_init) // self.block_size)
            self._vectors = self._vectors[: min(keep, len(self._vectors))]
        elif position > len(self.ids):  # tokens this index never saw (a restored stream): unknown text
            self.ids.extend([0] * (position - len(self.ids)))
        self.ids.extend(int(t) for t in ids)

    @property
    def embedded(self) -> int:
        """Units whose vectors are held."""
        return len(self._vectors)

    def nbytes(self) -> int:
        return self.ids.itemsize * len(self.ids) + self._vectors.nbytes

    def bytes_per_token(self) -> float:
        """Host bytes per stream token: its id and its share of a unit's vector."""
        return self.ids.itemsize + 2 * int(self.embedder.dim) / self.block_size

    # ---- scoring -------------------------------------------------------------------------------
    def unit_text(self, u: int) -> str:
        lo = self.n_init + u * self.block_size
        a, b = max(self.n_init, lo - self.margin), lo + self.block_size + self.margin
        return self.tokenizer.decode(list(self.ids[a:b]), skip_special_tokens=True)

    def _embed_to(self, n_units: int) -> None:
        done = len(self._vectors)
        if n_units <= done:
            return
        parts = [self._vectors]
        for lo in range(done, n_units, self.batch):
            hi = min(n_units, lo + self.batch)
            vec = np.asarray(self.embedder.embed([self.unit_text(u) for u in range(lo, hi)]), dtype=np.float32)
            parts.append(vec.astype(np.float16))
        self._vectors = np.concatenate(parts)

    def scores(self, question: str, n_units: int) -> torch.Tensor:
        """(n_units,) fp32 cosine of each of the first n_units units' text with `question`."""
        if n_units <= 0:
            return torch.zeros(0)
        if self.n_init + n_units * self.block_size > len(self.ids):
            raise ConfigError(
                f"the text index holds {len(self.ids):,} tokens, fewer than {n_units:,} units need: "
                "it must see every token the session reads (Session(llm, memory, embedder=...) from the start)"
            )
        self._embed_to(n_units)
        q = np.asarray(self.embedder.embed([question]), dtype=np.float32)[0]
        return torch.from_numpy(self._vectors[:n_units].astype(np.float32) @ q)
