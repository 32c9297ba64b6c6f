"""Parsing: every media type yields clean text, a heading structure and exact offsets."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from ragstream.infra.parsing import ParsedDocument, media_type_for_path, parse_document
from ragstream.infra.settings import ChunkingSettings
from ragstream.schemas.errors import (
    DocumentTooLarge,
    EmptyDocument,
    UnreadableDocument,
    UnsupportedMediaType,
)

SAMPLES = Path(__file__).resolve().parents[2] / "samples"


def _load_pdf_writer() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_pdfs", SAMPLES / "make_pdfs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def build_pdf() -> Callable[[str, list[str]], bytes]:
    writer: Callable[[str, list[str]], bytes] = _load_pdf_writer().build_pdf
    return writer


def _sections(doc: ParsedDocument) -> list[tuple[tuple[str, ...], str]]:
    return [(s.headings, doc.section_text(s)) for s in doc.sections]


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("a/b/handbook.md", "text/markdown"),
        ("x.MARKDOWN", "text/markdown"),
        ("notes.txt", "text/plain"),
        ("page.htm", "text/html"),
        ("page.html", "text/html"),
        ("spec.PDF", "application/pdf"),
        ("image.png", None),
        ("no_suffix", None),
    ],
)
def test_media_type_for_path(path: str, expected: str | None) -> None:
    assert media_type_for_path(path) == expected


MARKDOWN = b"""---
title: Travel Policy
owner: finance
---
# Travel

Book trips through **Wayfarer** at least _two weeks_ ahead.
See [the portal](https://example.invalid/portal) for details.

## Flights

- Economy for flights under `6h`, e.g. the LX-4471 demo trip
* Premium economy above that (cost_centre_code stays intact)

| Class | Limit |
|-------|-------|
| Economy | 900 EUR |

```
config:
    max_nights: 5   # a comment, not a heading
```

### Refunds

Changes cost\\* money.

Hotels
------

Up to 180 EUR per night.
"""


def test_markdown_headings_form_a_hierarchy() -> None:
    doc = parse_document(MARKDOWN, "text/markdown", source="travel.md")
    assert doc.title == "Travel Policy"  # front matter wins over the first heading
    assert [s.headings for s in doc.sections] == [
        ("Travel",),
        ("Travel", "Flights"),
        ("Travel", "Flights", "Refunds"),
        ("Travel", "Hotels"),
    ]
    assert doc.source == "travel.md"
    assert doc.media_type == "text/markdown"


def test_markdown_syntax_is_stripped_but_codes_and_code_blocks_survive() -> None:
    doc = parse_document(MARKDOWN, "text/markdown")
    flights = doc.section_text(doc.sections[1])
    assert "Book trips through Wayfarer at least two weeks ahead." in doc.text
    assert "See the portal for details." in doc.text
    assert "https://" not in doc.text and "**" not in doc.text
    assert "- Economy for flights under 6h, e.g. the LX-4471 demo trip" in flights
    assert "- Premium economy above that (cost_centre_code stays intact)" in flights
    assert "Economy | 900 EUR" in flights and "---" not in flights
    assert "config:\n    max_nights: 5   # a comment, not a heading" in flights
    assert "Changes cost* money." in doc.text
    assert "owner: finance" not in doc.text


def test_sections_hold_body_text_and_headings_sit_between_them() -> None:
    doc = parse_document(MARKDOWN, "text/markdown")
    first = doc.sections[0]
    assert doc.text.startswith("Travel\n\nBook trips")
    assert doc.text[first.char_start : first.char_start + 10] == "Book trips"
    assert doc.section_text(first).endswith("for details.")
    for before, after in zip(doc.sections, doc.sections[1:], strict=False):
        assert before.char_end < after.char_start
        between = doc.text[before.char_end : after.char_start]
        assert after.headings[-1] in between


def test_first_h1_is_the_title_without_front_matter() -> None:
    doc = parse_document(b"Intro line\n\n# Real Title\n\nBody.\n", "text/markdown")
    assert doc.title == "Real Title"
    assert _sections(doc) == [((), "Intro line"), (("Real Title",), "Body.")]


HTML = b"""<!DOCTYPE html>
<html><head><title>QR-208 Product Sheet</title>
<style>body { color: red }</style><script>var secret = "do not index";</script></head>
<body>
<nav><a href="/">Home</a> | <a href="/products">Products</a></nav>
<h1>QR-208 Arm</h1>
<p>A six-axis   arm
   for <b>light</b> assembly.<!-- internal note --></p>
<h2>Specifications</h2>
<ul><li>Payload: 8 kg</li><li>Reach: 920 mm</li></ul>
<table><tr><th>Mode</th><th>Speed</th></tr><tr><td>Fast</td><td>2 m/s</td></tr></table>
<h3>Power</h3><p>Runs on 48 V&nbsp;DC.<br>Idle draw 35 W.</p>
<script>alert("x")</script>
<h2>Support</h2><p>Call us.</p>
</body></html>"""


def test_html_keeps_content_and_heading_hierarchy() -> None:
    doc = parse_document(HTML, "text/html; charset=utf-8")
    assert doc.title == "QR-208 Product Sheet"
    assert _sections(doc) == [
        (("QR-208 Arm",), "A six-axis arm for light assembly."),
        (("QR-208 Arm", "Specifications"), "- Payload: 8 kg\n- Reach: 920 mm\n\nMode | Speed\nFast | 2 m/s"),
        (("QR-208 Arm", "Specifications", "Power"), "Runs on 48 V DC.\nIdle draw 35 W."),
        (("QR-208 Arm", "Support"), "Call us."),
    ]


def test_html_drops_scripts_styles_navigation_and_comments() -> None:
    doc = parse_document(HTML, "text/html")
    for noise in ("secret", "alert", "color: red", "Products", "internal note", "DOCTYPE"):
        assert noise not in doc.text


PLAIN = (
    "EXPENSES\n\n"
    "Claims are filed within thirty days\nof the purchase, with receipts.\n\n"
    "Meals\n=====\n\n"
    "Up to 45 EUR per day.\n- breakfast included\n- no alcohol\n\n"
    "Mileage\n-------\nPaid at 0,30 EUR per km.\n"
)


def test_plain_text_paragraphs_and_conservative_headings() -> None:
    doc = parse_document(PLAIN.encode(), "text/plain")
    assert doc.title == "EXPENSES"
    assert _sections(doc) == [
        (("EXPENSES",), "Claims are filed within thirty days of the purchase, with receipts."),
        (("Meals",), "Up to 45 EUR per day.\n- breakfast included\n- no alcohol"),
        (("Meals", "Mileage"), "Paid at 0,30 EUR per km."),
    ]


def test_plain_text_without_headings_is_one_section_titled_by_its_first_line() -> None:
    doc = parse_document(b"Short memo\nabout lunch.\n\nSecond paragraph.", "text/plain")
    assert doc.title == "Short memo about lunch."
    assert _sections(doc) == [((), "Short memo about lunch.\n\nSecond paragraph.")]


def test_text_is_normalised_nfc_without_controls_or_invisible_characters() -> None:
    raw = "Cafe\u0301 r\u00e9sum\u00e9\u200b \x07bell\ttab  and\u00adsoft\r\nnext line\r\n".encode()
    doc = parse_document(raw, "text/plain")
    assert doc.text == "Caf\u00e9 r\u00e9sum\u00e9 bell tab andsoft next line"


def test_legacy_windows_1252_text_decodes() -> None:
    doc = parse_document("Price: 12 \u20ac \u2013 caf\u00e9".encode("cp1252"), "text/plain")
    assert doc.text == "Price: 12 \u20ac \u2013 caf\u00e9"


def test_utf8_bom_and_declared_charset_are_honoured() -> None:
    assert parse_document("\ufeffHello".encode(), "text/plain").text == "Hello"
    latin = "Gr\u00fc\u00dfe".encode("latin-1")
    assert parse_document(latin, "text/plain; charset=ISO-8859-1").text == "Gr\u00fc\u00dfe"


def test_pdf_pages_become_sections_with_page_numbers(
    build_pdf: Callable[[str, list[str]], bytes],
) -> None:
    paragraphs = ["# Intro", "First page talks about the LX-4471 gripper. " * 3]
    paragraphs += [f"Filler paragraph {n} about torque limits and calibration." for n in range(60)]
    doc = parse_document(build_pdf("Gripper Guide", paragraphs), "application/pdf")
    assert doc.title == "Gripper Guide"  # from the PDF metadata
    assert len(doc.sections) >= 2
    assert [s.page for s in doc.sections] == list(range(1, len(doc.sections) + 1))
    assert all(s.headings == () for s in doc.sections)
    first = doc.section_text(doc.sections[0])
    assert first.startswith("Intro\n\nFirst page talks about the LX-4471 gripper.")
    assert "Filler paragraph 59 about torque limits" in doc.section_text(doc.sections[-1])


def test_pdf_line_breaks_are_joined_and_hyphenation_removed(
    build_pdf: Callable[[str, list[str]], bytes],
) -> None:
    lines = "Automatic tokeni-\nsation keeps the LX-\n4471 code and well-\nknown words.\nA new paragraph."
    doc = parse_document(build_pdf("T", [lines]), "application/pdf")
    assert (
        doc.text == "Automatic tokenisation keeps the LX-4471 code and wellknown words.\n\nA new paragraph."
    )


def test_pdf_pages_beyond_the_limit_are_not_read(build_pdf: Callable[[str, list[str]], bytes]) -> None:
    pdf = build_pdf("Long", [f"Paragraph {n} " + "words " * 60 for n in range(40)])
    full = parse_document(pdf, "application/pdf")
    assert len(full.sections) > 3
    capped = parse_document(pdf, "application/pdf", settings=ChunkingSettings(max_pdf_pages=2))
    assert [s.page for s in capped.sections] == [1, 2]


@pytest.mark.parametrize(
    ("data", "media_type"),
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "text/plain"),
        (bytes(range(256)) * 4, "text/markdown"),
        (b"%PDF-1.4\nthis is not really a pdf", "application/pdf"),
        (b"plain words, not a PDF at all", "application/pdf"),
        (b"", "application/pdf"),
    ],
)
def test_garbage_is_unreadable(data: bytes, media_type: str) -> None:
    with pytest.raises(UnreadableDocument):
        parse_document(data, media_type)


def test_truncated_and_cyclic_pdfs_are_unreadable(build_pdf: Callable[[str, list[str]], bytes]) -> None:
    pdf = build_pdf("T", ["Some text."])
    with pytest.raises(UnreadableDocument):
        parse_document(pdf[: len(pdf) // 2], "application/pdf")
    # A page tree that contains itself must fail fast, not loop.
    cyclic = pdf.replace(b"/Kids [", b"/Kids [2 0 R ").replace(b"/Count 1", b"/Count 2")
    with pytest.raises(UnreadableDocument):
        parse_document(cyclic, "application/pdf")


@pytest.mark.parametrize(
    ("data", "media_type"),
    [
        (b"", "text/plain"),
        (b"  \n\t\n \xe2\x80\x8b ", "text/plain"),
        ("\u200e\u200f \u2066".encode(), "text/plain"),
        (
            b"<html><head><title>Only a title</title></head><body><script>x()</script></body></html>",
            "text/html",
        ),
        (b"# Just a heading\n\n---\n", "text/markdown"),
    ],
)
def test_nothing_left_after_cleaning_is_empty(data: bytes, media_type: str) -> None:
    with pytest.raises(EmptyDocument):
        parse_document(data, media_type)


def test_blank_pdf_is_empty(build_pdf: Callable[[str, list[str]], bytes]) -> None:
    with pytest.raises(EmptyDocument):
        parse_document(build_pdf("Blank", ["   "]), "application/pdf")


@pytest.mark.parametrize("media_type", ["image/png", "application/msword", "", "text"])
def test_unsupported_media_types(media_type: str) -> None:
    with pytest.raises(UnsupportedMediaType):
        parse_document(b"hello", media_type)


def test_oversized_documents_are_refused() -> None:
    with pytest.raises(DocumentTooLarge):
        parse_document(b"a " * 100, "text/plain", settings=ChunkingSettings(max_document_bytes=100))


def test_every_sample_document_parses() -> None:
    corpus = SAMPLES / "corpus"
    files = sorted(p for p in corpus.rglob("*") if p.is_file())
    assert len(files) >= 30
    for path in files:
        media_type = media_type_for_path(path)
        assert media_type is not None, path
        doc = parse_document(path.read_bytes(), media_type, source=str(path))
        assert doc.title and doc.sections, path


def _corpus_texts() -> dict[str, str]:
    corpus = SAMPLES / "corpus"
    texts = {}
    for path in sorted(p for p in corpus.rglob("*") if p.is_file()):
        media_type = media_type_for_path(path)
        assert media_type is not None, path
        texts[path.relative_to(corpus).as_posix()] = parse_document(path.read_bytes(), media_type).text
    return texts


def test_restricted_facts_exist_only_in_their_scope() -> None:
    """Leak tests elsewhere rely on these terms being confined to one folder."""
    texts = _corpus_texts()
    scopes = yaml.safe_load((SAMPLES / "restricted_facts.yaml").read_text())
    assert {s["scope"] for s in scopes} == {"larkspur/hr-restricted", "globex"}
    for scope in scopes:
        for term in scope["terms"]:
            holders = {name for name, text in texts.items() if term.lower() in text.lower()}
            assert holders, f"{term!r} appears nowhere"
            assert all(name.startswith(scope["scope"] + "/") for name in holders), (term, holders)


def test_known_queries_point_at_real_documents() -> None:
    texts = _corpus_texts()
    queries = yaml.safe_load((SAMPLES / "queries.yaml").read_text())
    assert len(queries) >= 8
    for entry in queries:
        assert set(entry) <= {"query", "tenant", "groups", "expected_file", "kind", "also_relevant"}
        assert entry["kind"] in ("keyword", "semantic")
        assert entry["expected_file"].split("/")[0] == entry["tenant"]
        text = texts[entry["expected_file"]]
        if entry["kind"] == "keyword":  # the code in the query appears verbatim
            code = next(w for w in entry["query"].split() if w.isupper() or any(c.isdigit() for c in w))
            assert code in text, entry
