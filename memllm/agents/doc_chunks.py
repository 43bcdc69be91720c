"""Token-aware document layout: token offsets of a document, and its cut into chunks with char spans.

`TokenizedDocument` keeps the token ids of one document and each token's character span (from a
fast tokenizer's offset mapping), so that token positions in a context memory map back to characters
and lines of the source. `chunk_spans` cuts a document into chunks of about `chunk_tokens` tokens at
paragraph boundaries (a long paragraph at line, sentence or word boundaries). Knows nothing of
models, stores or memory.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass

from memllm.documents import Document

_PARA = re.compile(r"\n[ \t]*\n\s*")
# Where a piece too long for a chunk is cut, best first: a sentence's end, a line's end, a word's end (the last
# one past the piece's middle at the best level that has one): a cut at any word end split a needle sentence
# from its value ("... project is " | "c3f91ecb-..."), so a chunk held the question's words and not the answer.
_SOFT = (re.compile(r"(?<=[.!?])\s+"), re.compile(r"\n"), re.compile(r"\s+"))


@dataclass
class TokenizedDocument:
    """ids: token ids of the document text; starts/ends: each token's character span in the text."""

    doc: Document
    ids: list[int]
    starts: list[int]
    ends: list[int]

    @classmethod
    def build(cls, doc: Document, tokenizer) -> TokenizedDocument:
        enc = tokenizer(doc.text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        offsets = enc.get("offset_mapping")
        if offsets is None or len(offsets) != len(ids):  # slow tokenizer: spread tokens evenly
            n = max(1, len(ids))
            step = len(doc.text) / n
            starts = [int(i * step) for i in range(len(ids))]
            ends = [int((i + 1) * step) for i in range(len(ids))]
        else:
            starts = [int(s) for s, _ in offsets]
            ends = [int(e) for _, e in offsets]
        return cls(doc, ids, starts, ends)

    def __len__(self) -> int:
        return len(self.ids)

    def char_span(self, tok_start: int, tok_end: int) -> tuple[int, int]:
        """Characters covered by tokens [tok_start, tok_end) (clipped to the document)."""
        tok_start = max(0, min(tok_start, len(self.ids) - 1))
        tok_end = max(tok_start + 1, min(tok_end, len(self.ids)))
        return self.starts[tok_start], max(self.starts[tok_start], self.ends[tok_end - 1])

    def tokens_in(self, start: int, end: int) -> int:
        """How many tokens start within characters [start, end)."""
        return bisect.bisect_left(self.starts, end) - bisect.bisect_left(self.starts, start)


def _split_long(td: TokenizedDocument, start: int, end: int, chunk_tokens: int) -> list[tuple[int, int]]:
    """Cut [start, end) into pieces of <= chunk_tokens tokens, preferring sentence, then line, then word ends (_SOFT)."""
    out = []
    text = td.doc.text
    while td.tokens_in(start, end) > chunk_tokens:
        first = bisect.bisect_left(td.starts, start)
        hard = td.starts[min(first + chunk_tokens, len(td.starts) - 1)]  # start of the first token too many
        cut = hard
        for level in _SOFT:
            ends = [m.end() for m in level.finditer(text, start, hard) if m.end() > start + (hard - start) // 2]
            if ends:
                cut = ends[-1]
                break
        if cut <= start:
            cut = hard
        out.append((start, cut))
        start = cut
    if text[start:end].strip():
        out.append((start, end))
    return out


def chunk_spans(td: TokenizedDocument, chunk_tokens: int = 192) -> list[tuple[int, int]]:
    """Character spans of the chunks of a document: consecutive paragraphs packed up to chunk_tokens."""
    text = td.doc.text
    paras: list[tuple[int, int]] = []
    pos = 0
    for m in _PARA.finditer(text):
        if text[pos : m.start()].strip():
            paras.append((pos, m.start()))
        pos = m.end()
    if text[pos:].strip():
        paras.append((pos, len(text)))
    pieces: list[tuple[int, int]] = []
    for s, e in paras:
        pieces.extend(_split_long(td, s, e, chunk_tokens))
    chunks: list[tuple[int, int]] = []
    cur: tuple[int, int] | None = None
    for s, e in pieces:
        if cur is not None and td.tokens_in(cur[0], e) <= chunk_tokens:
            cur = (cur[0], e)
        else:
            if cur is not None:
                chunks.append(cur)
            cur = (s, e)
    if cur is not None:
        chunks.append(cur)
    return chunks
