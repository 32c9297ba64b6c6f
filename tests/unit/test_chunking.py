"""Chunking: token bounds hold, offsets map back exactly, sections and words stay whole."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from ragstream.infra.chunking import Chunker, ChunkSpan, tokenizer_path
from ragstream.infra.parsing import ParsedDocument, Section, parse_document
from ragstream.schemas.errors import ConfigError, EmptyDocument

SAMPLES = Path(__file__).resolve().parents[2] / "samples"

WORDS = (
    "the robot arm moves LX-4471 payload across a calibrated floor while sensors report "
    "torque, speed and 48V battery state; operators (trained) review logs every shift "
    "co-ordination Zürich naïve émigré 3.5mm QR-208/B"
).split()


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    tok = Tokenizer.from_file(str(tokenizer_path()))
    tok.no_truncation()
    tok.no_padding()
    return tok


@pytest.fixture(scope="module")
def chunker() -> Chunker:
    return Chunker(max_tokens=64, overlap_tokens=16)


def _count(tokenizer: Tokenizer, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False).ids)


def _random_markdown(rng: random.Random) -> bytes:
    parts = ["# Random document"]
    for n in range(rng.randint(1, 6)):
        if rng.random() < 0.6:
            parts.append("#" * rng.randint(2, 3) + f" Section {n}")
        for _ in range(rng.randint(1, 6)):
            sentences = []
            for _ in range(rng.randint(1, 8)):
                words = [rng.choice(WORDS) for _ in range(rng.randint(1, 30))]
                sentences.append(" ".join(words) + rng.choice([".", "!", "?", ";", ""]))
            parts.append(" ".join(sentences))
    return "\n\n".join(parts).encode()


def _is_boundary(text: str, pos: int) -> bool:
    return pos <= 0 or pos >= len(text) or text[pos - 1].isspace() or text[pos].isspace()


@pytest.mark.parametrize("seed", range(12))
def test_random_documents_respect_every_chunk_invariant(
    seed: int, chunker: Chunker, tokenizer: Tokenizer
) -> None:
    doc = parse_document(_random_markdown(random.Random(seed)), "text/markdown")
    spans = chunker.chunk(doc)
    for section in doc.sections:
        in_section = [s for s in spans if section.char_start <= s.char_start < section.char_end]
        assert in_section, "every section yields chunks"
        for span in in_section:
            assert span.text == doc.text[span.char_start : span.char_end]
            assert span.char_end <= section.char_end, "no chunk crosses its section"
            assert span.headings == section.headings
            assert span.token_count == _count(tokenizer, span.text) <= chunker.max_tokens
            assert _is_boundary(doc.text, span.char_start) and _is_boundary(doc.text, span.char_end)
        # Together the chunks cover the whole section: no text is lost.
        assert in_section[0].char_start == section.char_start
        assert in_section[-1].char_end == section.char_end
        for before, after in zip(in_section, in_section[1:], strict=False):
            assert after.char_start <= before.char_end, "gap between consecutive chunks"
            assert after.char_end > before.char_end, "each chunk moves forward"
            overlap = _count(tokenizer, doc.text[after.char_start : before.char_end])
            assert 0 < overlap <= chunker.overlap_tokens


def test_overlap_repeats_the_tail_of_the_previous_chunk(tokenizer: Tokenizer) -> None:
    text = " ".join(f"word{n}" for n in range(400))
    spans = Chunker(max_tokens=50, overlap_tokens=10).chunk(parse_document(text.encode(), "text/plain"))
    assert len(spans) > 3
    for before, after in zip(spans, spans[1:], strict=False):
        shared = before.text[after.char_start - before.char_start :]
        assert after.text.startswith(shared)
        assert 6 <= _count(tokenizer, shared) <= 10


def test_chunks_end_at_paragraphs_then_sentences() -> None:
    para = " ".join(["The gripper closes gently around the part."] * 6)  # about 54 tokens
    doc = parse_document("\n\n".join([para] * 6).encode(), "text/plain")
    spans = Chunker(max_tokens=120, overlap_tokens=0).chunk(doc)
    assert all(s.text.endswith("part.") for s in spans)
    assert all(doc.text[s.char_end : s.char_end + 2] in ("\n\n", "") for s in spans)

    one_paragraph = parse_document(" ".join(["The gripper closes gently."] * 40).encode(), "text/plain")
    spans = Chunker(max_tokens=64, overlap_tokens=0).chunk(one_paragraph)
    assert len(spans) > 2 and all(s.text.endswith("gently.") for s in spans)


def test_headings_and_pages_travel_with_chunks() -> None:
    md = (
        b"# Handbook\n\nWelcome text.\n\n## Leave\n\n"
        + b"Annual leave is 27 days. " * 40
        + b"\n\n## Travel\n\nBook early."
    )
    spans = Chunker(max_tokens=64, overlap_tokens=8).chunk(parse_document(md, "text/markdown"))
    headings = [s.headings for s in spans]
    assert headings[0] == ("Handbook",)
    assert headings[-1] == ("Handbook", "Travel") and spans[-1].text == "Book early."
    assert headings.count(("Handbook", "Leave")) > 2
    assert all(s.page is None for s in spans)


def test_pdf_chunks_carry_page_numbers() -> None:
    pdf = (SAMPLES / "corpus" / "larkspur" / "public" / "warehouse-floor-safety.pdf").read_bytes()
    doc = parse_document(pdf, "application/pdf")
    spans = Chunker(max_tokens=200, overlap_tokens=40).chunk(doc)
    assert {s.page for s in spans} == {s.page for s in doc.sections} == {1, 2}
    assert any("QR-208" in s.text and s.page == 1 for s in spans)


def test_a_word_longer_than_a_chunk_is_split_without_breaking_the_bound(tokenizer: Tokenizer) -> None:
    monster = "-".join(["LX-4471"] * 60)  # no whitespace, hundreds of tokens
    doc = parse_document(f"Before it. {monster} After it.".encode(), "text/plain")
    spans = Chunker(max_tokens=32, overlap_tokens=4).chunk(doc)
    assert all(_count(tokenizer, s.text) <= 32 for s in spans)
    assert spans[0].char_start == 0 and spans[-1].text.endswith("After it.")


def test_output_is_deterministic() -> None:
    data = _random_markdown(random.Random(99))
    first = Chunker(64, 16).chunk(parse_document(data, "text/markdown"))
    second = Chunker(64, 16).chunk(parse_document(data, "text/markdown"))
    assert first == second and all(isinstance(s, ChunkSpan) for s in first)


def test_short_document_is_one_chunk() -> None:
    spans = Chunker(200, 40).chunk(parse_document(b"Only a sentence.", "text/plain"))
    assert [(s.text, s.char_start, s.char_end, s.token_count) for s in spans] == [
        ("Only a sentence.", 0, 16, 4)
    ]


def test_constructor_does_no_io_and_validates_sizes(tmp_path: Path) -> None:
    lazy = Chunker(200, 40, tokenizer_path=tmp_path / "missing.json")  # no error yet
    with pytest.raises(ConfigError):
        lazy.chunk(parse_document(b"text", "text/plain"))
    with pytest.raises(ConfigError):
        Chunker(100, 60)
    with pytest.raises(ConfigError):
        Chunker(0, 0)


def test_a_100_kb_document_chunks_quickly(chunker: Chunker) -> None:
    rng = random.Random(7)
    data = b""
    while len(data) < 100_000:
        data += b"\n\n" + _random_markdown(rng)
    doc = parse_document(data, "text/markdown")
    chunker.count_tokens("warm up")
    started = time.perf_counter()
    spans = chunker.chunk(doc)
    elapsed_s = time.perf_counter() - started
    assert len(spans) > 100
    assert elapsed_s < 1.0, f"chunking 100 KB took {elapsed_s:.3f} s"  # ~40 ms unloaded; headroom for CI


def test_parsed_document_from_outside_the_parser_is_chunked() -> None:
    doc = ParsedDocument(
        text="Title\n\nalpha beta gamma",
        title="Title",
        sections=(Section(("Title",), 7, 23, None),),
        media_type="text/plain",
    )
    (span,) = Chunker(16, 4).chunk(doc)
    assert (span.text, span.headings) == ("alpha beta gamma", ("Title",))


def test_a_document_without_tokens_is_empty() -> None:
    doc = ParsedDocument(
        text="\u0301\u0301", title="", sections=(Section((), 0, 2, None),), media_type="text/plain"
    )
    with pytest.raises(EmptyDocument):
        Chunker(16, 4).chunk(doc)
