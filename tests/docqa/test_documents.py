"""Reading documents: formats, encodings, and every bad input refused with its exact message."""

from __future__ import annotations

import io

import pytest

from memllm.documents import Document, html_to_text, human_bytes, read_document
from memllm.errors import InputError, MemoryLimitError
from tests.docqa.pdfgen import make_pdf


def write(tmp_path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def refused(path, **kw) -> str:
    with pytest.raises((InputError, MemoryLimitError)) as info:
        read_document(path, **kw)
    assert info.value.exit_code == (8 if isinstance(info.value, MemoryLimitError) else 7)
    return str(info.value)


# ---- good input -------------------------------------------------------------------------------
def test_text_and_markdown_with_lines(tmp_path):
    p = write(tmp_path, "a.md", b"# Title\r\n\r\nfirst line\r\nsecond line\n")
    doc = read_document(p)
    assert doc.kind == "markdown" and doc.encoding == "utf-8" and doc.notes == []
    assert doc.text == "# Title\n\nfirst line\nsecond line\n"
    start = doc.text.index("second")
    assert doc.line_of(0) == 1 and doc.line_of(start) == 4
    assert doc.lines(doc.text.index("first"), start + 6) == (3, 4)


def test_utf8_bom_and_utf16(tmp_path):
    assert read_document(write(tmp_path, "b.txt", "\ufeffhé".encode())).text == "hé"
    doc = read_document(write(tmp_path, "u.txt", "hello wörld".encode("utf-16")))
    assert doc.text == "hello wörld" and doc.encoding == "utf-16"


def test_cp1252_fallback_is_reported(tmp_path):
    p = write(tmp_path, "w.txt", "say \u201chi\u201d to Zo\u00eb".encode("cp1252"))
    doc = read_document(p)
    assert doc.text == "say \u201chi\u201d to Zo\u00eb"
    assert doc.encoding == "cp1252"
    assert doc.notes == [f"{p} is not valid UTF-8 (byte 0x93 at offset 4): decoded as cp1252"]


def test_latin1_fallback_when_cp1252_fails(tmp_path):
    p = write(tmp_path, "l.txt", b"caf\xe9 \x81 is a fine place to eat")
    doc = read_document(p)
    assert doc.encoding == "latin-1" and doc.text == "caf\u00e9 \x81 is a fine place to eat"
    assert doc.notes == [f"{p} is not valid UTF-8 (byte 0xe9 at offset 3): decoded as latin-1"]


def test_html_to_text(tmp_path):
    html = (
        "<!DOCTYPE html><html><head><title>The  Report</title><style>p {color: red}</style>"
        "<script>var x = 1;</script></head><body><h1>Results</h1><p>Sales rose&nbsp;5%&amp;more.</p>"
        "<ul><li>one</li><li>two</li></ul></body></html>"
    )
    doc = read_document(write(tmp_path, "r.html", html.encode()))
    assert doc.kind == "html"
    assert doc.text == "The Report\n\nResults\n\nSales rose 5%&more.\n\none\n\ntwo"
    assert html_to_text("<p>a</p><p>b</p>") == "a\n\nb"


def test_pdf_pages(tmp_path):
    p = write(tmp_path, "p.pdf", make_pdf([["Hello PDF world", "second line"], ["Page two"]]))
    doc = read_document(p)
    assert doc.kind == "pdf" and doc.notes == []
    assert "Hello PDF world" in doc.text and "Page two" in doc.text
    assert doc.text.index("Hello") < doc.text.index("Page two")


def test_pdf_page_without_text_is_noted(tmp_path):
    p = write(tmp_path, "p.pdf", make_pdf([["Only page one"], []]))
    assert read_document(p).notes == [f"{p}: page(s) 2 have no extractable text"]


def test_stdin():
    doc = read_document("-", stdin=io.BytesIO(b"from a pipe\n"))
    assert doc.name == "<stdin>" and doc.text == "from a pipe\n"
    html = read_document("-", stdin=io.BytesIO(b"<!doctype html><p>piped page</p>"))
    assert html.kind == "html" and html.text == "piped page"


def test_document_round_trip():
    doc = Document("x.txt", "a\nb", "text", "cp1252", ["n"])
    assert Document.from_dict(doc.to_dict()) == doc


def test_human_bytes():
    assert [human_bytes(n) for n in (100, 2048, 3 * 1024**2, 1.5 * 1024**3)] == [
        "100 bytes", "2.0 KiB", "3.0 MiB", "1.50 GiB",
    ]  # fmt: skip


# ---- bad input: exact messages -------------------------------------------------------------------
def test_empty_file(tmp_path):
    p = write(tmp_path, "e.txt", b"")
    assert refused(p) == f"{p} is empty: nothing to read"


def test_whitespace_only_file(tmp_path):
    p = write(tmp_path, "w.txt", b" \n\t\n")
    assert refused(p) == f"{p} is empty: nothing to read"


def test_empty_stdin():
    assert refused("-", stdin=io.BytesIO(b"")) == "<stdin> is empty: nothing to read"


def test_binary_file(tmp_path):
    p = write(tmp_path, "x.bin", b"\x7fELF\x02\x01\x01\x00\x00\x00")
    assert refused(p) == (
        f"{p} looks binary (a NUL byte at offset 7), not text: give a .txt, .md, .html or .pdf file"
    )


def test_undecodable_file(tmp_path):
    p = write(tmp_path, "g.txt", b"\x01\x02\x03\xff" * 50)
    assert refused(p) == (
        f"cannot decode {p}: read as cp1252, 75% of its characters are control characters "
        "(binary data?): give a text, HTML or PDF file"
    )


def test_bad_utf16(tmp_path):
    p = write(tmp_path, "h.txt", b"\xff\xfeA\x00\x00\xd8")
    assert (
        refused(p)
        == f"{p}: starts with a UTF-16 byte order mark but is not valid UTF-16 (unexpected end of data)"
    )


def test_missing_file_and_directory(tmp_path):
    missing = str(tmp_path / "nope.txt")
    assert refused(missing) == f"{missing}: no such file"
    assert (
        refused(str(tmp_path)) == f"{tmp_path} is a directory: give the files in it (e.g. {tmp_path}/*.txt)"
    )


def test_larger_than_host_memory(tmp_path):
    p = write(tmp_path, "big.txt", b"x" * 5000)
    why = "reading and tokenising takes about 200 bytes of memory per byte of text and only"
    assert refused(p, available=409600) == (
        f"{p} is 4.9 KiB: {why} 400.0 KiB of host memory is available, so the most it can read is "
        "2.0 KiB: split the document or give it more memory"
    )
    assert refused("-", stdin=io.BytesIO(b"y" * 3000), available=204800) == (
        f"<stdin> is more than 1.0 KiB: {why} 200.0 KiB of host memory is available, so the most it can "
        "read is 1.0 KiB: split the document or give it more memory"
    )


def test_corrupt_pdf(tmp_path):
    p = write(tmp_path, "c.pdf", b"%PDF-1.4\n1 0 obj\n<< /Type /Catalog /Pages 9 0 R >>\ngarbage")
    assert refused(p) == f"{p} looks like a PDF but pypdf cannot read it: check the file (truncated?)"


def test_pdf_without_text(tmp_path):
    p = write(tmp_path, "s.pdf", make_pdf([[], []]))
    assert refused(p) == (
        f"{p}: none of its 2 PDF page(s) has extractable text (scanned images?): run OCR first"
    )


def test_html_without_text(tmp_path):
    p = write(tmp_path, "n.html", b"<html><script>only()</script></html>")
    assert refused(p) == f"{p} has no text (after html extraction): nothing to read"
