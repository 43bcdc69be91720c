"""Reading documents for question answering: files, stdin, PDF, HTML -> text with line numbers.

`read_document(path)` returns a `Document` (name, text, kind, encoding, notes). Text files are UTF-8
(a BOM is honoured, UTF-16 with a BOM too); other bytes are decoded with a reported fallback
(cp1252, else latin-1) and the fallback is written in `notes`, never hidden. Empty input, binary data
(NUL bytes, or text that decodes to control characters) is refused with an `InputError` that says
what was found and what to do. Reading is bounded before it starts: a file, device, pipe or stdin
larger than what can be read and tokenised within the memory budget (memllm.limits: host memory, the
container's cgroup limit, RLIMIT_AS) is refused with a `MemoryLimitError`, without reading it whole. PDF goes through
pypdf, HTML through the standard library's parser. Knows nothing of models, memory or the CLI.
"""

from __future__ import annotations

import bisect
import os
import stat
import sys
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import IO

from memllm.errors import InputError, MemoryLimitError
from memllm.limits import (
    MAX_DOCUMENT_BYTES,
    READ_BYTES_PER_BYTE,
    MemoryBudget,
    available_memory,
    human_bytes,
    memory_budget,
    read_limited,
)

__all__ = ["Document", "available_memory", "human_bytes", "read_document", "read_text", "document_from_bytes"]

STDIN = "-"
TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".rst", ".log", ".csv", ".json", ".text")
HTML_SUFFIXES = (".html", ".htm", ".xhtml")
FALLBACK_ENCODINGS = ("cp1252", "latin-1")
MAX_CONTROL_SHARE = 0.05  # more control characters than this after decoding: not text


@dataclass
class Document:
    """One document's text. `name` is the path given (or '<stdin>'); `notes` are things the reader
    should be told (a fallback encoding, pages without text). Lines are numbered from 1."""

    name: str
    text: str
    kind: str = "text"  # text | markdown | html | pdf
    encoding: str = "utf-8"
    notes: list[str] = field(default_factory=list)
    _line_starts: list[int] | None = field(default=None, repr=False, compare=False)

    def line_of(self, offset: int) -> int:
        """1-based line number of character `offset`."""
        if self._line_starts is None:
            starts = [0]
            find = self.text.find
            i = find("\n")
            while i >= 0:
                starts.append(i + 1)
                i = find("\n", i + 1)
            self._line_starts = starts
        return bisect.bisect_right(self._line_starts, max(0, offset))

    def lines(self, start: int, end: int) -> tuple[int, int]:
        """First and last line (1-based) of the character span [start, end)."""
        return self.line_of(start), self.line_of(max(start, end - 1))

    def to_dict(self) -> dict:
        return {"name": self.name, "text": self.text, "kind": self.kind, "encoding": self.encoding,
                "notes": list(self.notes)}  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict) -> Document:
        return cls(data["name"], data["text"], data.get("kind", "text"), data.get("encoding", "utf-8"),
                   list(data.get("notes", [])))  # fmt: skip


# ---------------------------------------------------------------------------------------- bytes -> text
def _control_share(text: str) -> float:
    if not text:
        return 0.0
    sample = text[:200_000]
    bad = sum(1 for ch in sample if (ord(ch) < 32 and ch not in "\t\n\r\f") or 0x7F <= ord(ch) < 0xA0)
    return bad / len(sample)


def decode_text(data: bytes, name: str) -> tuple[str, str, list[str]]:
    """(text, encoding, notes) for the bytes of a text file; InputError for binary data."""
    notes: list[str] = []
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16"), "utf-16", notes
        except UnicodeDecodeError as exc:
            raise InputError(
                f"{name}: starts with a UTF-16 byte order mark but is not valid UTF-16 ({exc.reason})"
            ) from None
    nul = data.find(b"\x00", 0, 1 << 20)
    if nul >= 0:
        raise InputError(
            f"{name} looks binary (a NUL byte at offset {nul}), not text: give a .txt, .md, .html or .pdf file"
        )
    try:
        text, encoding = data.decode("utf-8-sig"), "utf-8"
    except UnicodeDecodeError as exc:
        bad = exc.start
        for encoding in FALLBACK_ENCODINGS:
            try:
                text = data.decode(encoding)
                break
            except UnicodeDecodeError:
                continue
        notes.append(
            f"{name} is not valid UTF-8 (byte 0x{data[bad]:02x} at offset {bad}): decoded as {encoding}"
        )
    share = _control_share(text)
    if share > MAX_CONTROL_SHARE:
        raise InputError(
            f"cannot decode {name}: read as {encoding}, {share:.0%} of its characters are control characters "
            "(binary data?): give a text, HTML or PDF file"
        )
    return text.replace("\r\n", "\n").replace("\r", "\n"), encoding, notes


# ---------------------------------------------------------------------------------------- HTML
class _HTMLText(HTMLParser):
    """Visible text of an HTML page: script/style/head dropped, block elements on their own lines."""

    SKIP = {"script", "style", "noscript", "template", "svg", "head"}
    BLOCK = {"p", "div", "br", "li", "ul", "ol", "tr", "table", "section", "article", "header", "footer",
             "h1", "h2", "h3", "h4", "h5", "h6", "pre", "blockquote", "hr", "title", "dd", "dt", "main", "nav"}  # fmt: skip

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip = 0
        self.title: list[str] = []
        self.in_title = False

    def handle_starttag(self, tag: str, attrs) -> None:
        if tag == "title":
            self.in_title = True
        elif tag in self.SKIP:
            self.skip += 1
        if tag in self.BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self.in_title = False
        elif tag in self.SKIP and self.skip:
            self.skip -= 1
        if tag in self.BLOCK:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if self.in_title:
            self.title.append(data)
        elif not self.skip:
            self.parts.append(data)

    def text(self) -> str:
        lines = [" ".join(line.split()) for line in "".join(self.parts).split("\n")]
        out: list[str] = []
        for line in lines:  # collapse runs of empty lines to one
            if line or (out and out[-1]):
                out.append(line)
        title = " ".join("".join(self.title).split())
        body = "\n".join(out).strip()
        return f"{title}\n\n{body}" if title and body else title or body


def html_to_text(html: str) -> str:
    parser = _HTMLText()
    parser.feed(html)
    parser.close()
    return parser.text()


# ---------------------------------------------------------------------------------------- PDF
def pdf_to_text(data: bytes, name: str) -> tuple[str, list[str]]:
    """Text of every page (pages separated by a blank line), and notes on pages without text."""
    import io

    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise InputError(f"{name} is an encrypted PDF: decrypt it first (e.g. qpdf --decrypt)")
        pages = [page.extract_text() or "" for page in reader.pages]
    except InputError:
        raise
    except (PdfReadError, ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
        raise InputError(
            f"{name} looks like a PDF but pypdf cannot read it: check the file (truncated?)"
        ) from exc
    empty = [i + 1 for i, p in enumerate(pages) if not p.strip()]
    if len(empty) == len(pages):
        raise InputError(
            f"{name}: none of its {len(pages)} PDF page(s) has extractable text (scanned images?): run OCR first"
        )
    notes = [f"{name}: page(s) {', '.join(map(str, empty))} have no extractable text"] if empty else []
    return "\n\n".join(p.strip("\n") for p in pages), notes


# ---------------------------------------------------------------------------------------- entry points
def _kind_of(name: str, data: bytes) -> str:
    suffix = Path(name).suffix.lower()
    if data.startswith(b"%PDF-") or suffix == ".pdf":
        return "pdf"
    if suffix in HTML_SUFFIXES:
        return "html"
    head = data[:512].lstrip().lower()
    if suffix not in TEXT_SUFFIXES and head.startswith((b"<!doctype html", b"<html")):
        return "html"
    return "markdown" if suffix in (".md", ".markdown") else "text"


def document_from_bytes(data: bytes, name: str, available: int | None = None) -> Document:
    """A Document from raw bytes (kind from the name's suffix and the content)."""
    _check_size(len(data), name, _budget(available))
    if not data.strip():
        raise InputError(f"{name} is empty: nothing to read")
    kind = _kind_of(name, data)
    notes: list[str] = []
    encoding = "utf-8"
    if kind == "pdf":
        text, notes = pdf_to_text(data, name)
        encoding = "pdf"
    else:
        text, encoding, notes = decode_text(data, name)
        if kind == "html":
            text = html_to_text(text)
    if not text.strip():
        raise InputError(f"{name} has no text (after {kind} extraction): nothing to read")
    return Document(name, text, kind, encoding, notes)


def _budget(available: int | None) -> MemoryBudget:
    return memory_budget() if available is None else MemoryBudget(available, None, "host memory")


def _allowed(budget: MemoryBudget) -> int:
    return max(0, min(MAX_DOCUMENT_BYTES, budget.available // READ_BYTES_PER_BYTE))


def _check_size(size: int, name: str, budget: MemoryBudget, at_least: bool = False) -> None:
    allowed = _allowed(budget)
    if size <= allowed:
        return
    if allowed >= MAX_DOCUMENT_BYTES:
        why = f"the most memllm reads as one document is {human_bytes(MAX_DOCUMENT_BYTES)}"
    else:
        why = (f"reading and tokenising takes about {READ_BYTES_PER_BYTE} bytes of memory per byte of text "
               f"and {budget.describe()}, so the most it can read is {human_bytes(allowed)}")  # fmt: skip
    size_text = f"more than {human_bytes(allowed)}" if at_least else human_bytes(size)
    raise MemoryLimitError(f"{name} is {size_text}: {why}: split the document or give it more memory")


def _read_stream(stream: IO[bytes], name: str, available: int | None) -> bytes:
    """Read a stream of unknown size (stdin, a pipe, a device) without holding more than allowed; a
    binary start (NUL bytes) is refused after the first chunk, not after the whole stream."""
    budget = _budget(available)
    allowed = _allowed(budget)
    head, more = read_limited(stream, min(allowed, 1 << 20))
    if not head.startswith(b"%PDF-"):
        nul = head.find(b"\x00")
        if nul >= 0:
            raise InputError(
                f"{name} looks binary (a NUL byte at offset {nul}), not text: give a .txt, .md, .html or .pdf file"
            )
    if not more:
        return head
    rest, more = read_limited(stream, allowed - len(head))
    if more:
        _check_size(allowed + 1, name, budget, at_least=True)
    return head + rest


def read_document(path: str | os.PathLike[str], stdin: IO[bytes] | None = None,
                  available: int | None = None) -> Document:  # fmt: skip
    """Read a file (or stdin for '-') into a Document; InputError with the reason when it cannot,
    MemoryLimitError (before reading it) when it is too large for the memory this process may use."""
    name = str(path)
    if name == STDIN:
        data = _read_stream(stdin if stdin is not None else sys.stdin.buffer, "<stdin>", available)
        return document_from_bytes(data, "<stdin>", available)
    p = Path(name).expanduser()
    if not p.exists():
        raise InputError(f"{name}: no such file")
    if p.is_dir():
        raise InputError(f"{name} is a directory: give the files in it (e.g. {name}/*.txt)")
    try:
        with open(p, "rb") as fh:
            st = os.fstat(fh.fileno())
            if stat.S_ISREG(st.st_mode):
                budget = _budget(available)
                _check_size(st.st_size, name, budget)
                data, _ = read_limited(fh, _allowed(budget))
            else:  # a device (/dev/zero), a FIFO, a socket: no size to trust
                data = _read_stream(fh, name, available)
    except OSError as exc:
        raise InputError(f"cannot read {name}: {exc.strerror or exc}") from exc
    return document_from_bytes(data, name, available)


def read_text(text: str, name: str = "text") -> Document:
    """A Document from a string given in code (no decoding)."""
    if not isinstance(text, str):
        raise InputError(f"expected text (str) for {name}, got {type(text).__name__}")
    if not text.strip():
        raise InputError(f"{name} is empty: nothing to read")
    return Document(name, text, "text", "utf-8", [])
