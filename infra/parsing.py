"""Turn document bytes into clean text with a heading structure the chunker can follow.

Every parser feeds one `_Builder`, so all media types give the same shape: the cleaned text
(paragraphs separated by a blank line, headings on their own paragraph) and `Section`s that
point into it by char offsets. A section is the body under one heading path (headings
themselves are not part of any section: chunks carry them as context instead), or one page
of a PDF. Offsets are into `ParsedDocument.text`, which is what gets chunked and stored.
"""

from __future__ import annotations

import io
import logging
import re
import time
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import PurePath

from ragstream.infra.settings import ChunkingSettings
from ragstream.schemas.errors import (
    DocumentTooLarge,
    EmptyDocument,
    UnreadableDocument,
    UnsupportedMediaType,
)

__all__ = [
    "SUPPORTED_MEDIA_TYPES",
    "ParsedDocument",
    "Section",
    "media_type_for_path",
    "parse_document",
]

log = logging.getLogger(__name__)

TEXT_PLAIN = "text/plain"
TEXT_MARKDOWN = "text/markdown"
TEXT_HTML = "text/html"
APPLICATION_PDF = "application/pdf"
SUPPORTED_MEDIA_TYPES: tuple[str, ...] = (TEXT_PLAIN, TEXT_MARKDOWN, TEXT_HTML, APPLICATION_PDF)

_ALIASES = {
    "text/x-markdown": TEXT_MARKDOWN,
    "application/xhtml+xml": TEXT_HTML,
    "application/x-pdf": APPLICATION_PDF,
}
_SUFFIXES = {
    ".txt": TEXT_PLAIN,
    ".text": TEXT_PLAIN,
    ".md": TEXT_MARKDOWN,
    ".markdown": TEXT_MARKDOWN,
    ".html": TEXT_HTML,
    ".htm": TEXT_HTML,
    ".pdf": APPLICATION_PDF,
}
_MAX_TITLE_CHARS = 200


@dataclass(frozen=True, slots=True)
class Section:
    """A run of body text under one heading path (or one PDF page)."""

    headings: tuple[str, ...]
    """Heading path, outermost first."""
    char_start: int
    char_end: int
    page: int | None = None
    """1-based page number, for paged media."""


@dataclass(frozen=True, slots=True)
class ParsedDocument:
    """Cleaned text plus the sections that partition its body."""

    text: str
    title: str
    sections: tuple[Section, ...]
    media_type: str
    source: str = ""

    def section_text(self, section: Section) -> str:
        return self.text[section.char_start : section.char_end]


def media_type_for_path(path: str | PurePath) -> str | None:
    """Media type by file suffix, or None when the suffix is not one we parse."""
    return _SUFFIXES.get(PurePath(path).suffix.lower())


def parse_document(
    data: bytes,
    media_type: str,
    *,
    source: str = "",
    settings: ChunkingSettings | None = None,
) -> ParsedDocument:
    """Parse and clean a document.

    Args:
        data: the raw bytes.
        media_type: e.g. "text/markdown"; a `charset` parameter is honoured for text types.
        source: where the document came from, kept for logs and citations.
        settings: size and work limits; defaults to `ChunkingSettings()`.

    Raises:
        UnsupportedMediaType: the media type is not one of `SUPPORTED_MEDIA_TYPES`.
        DocumentTooLarge: the bytes or the extracted text exceed the configured limits.
        UnreadableDocument: the bytes are not what the media type claims (corrupt PDF,
            binary data sent as text, an encrypted PDF).
        EmptyDocument: nothing is left after cleaning.
    """
    limits = settings or ChunkingSettings()
    kind, charset = _split_media_type(media_type)
    if kind not in SUPPORTED_MEDIA_TYPES:
        raise UnsupportedMediaType(f"unsupported media type {media_type!r} ({source or 'no source'})")
    if len(data) > limits.max_document_bytes:
        raise DocumentTooLarge(
            f"{source or 'document'} is {len(data)} bytes, over the limit of {limits.max_document_bytes}"
        )
    builder = _Builder()
    if kind == APPLICATION_PDF:
        _parse_pdf(data, builder, limits, source)
    else:
        text = _decode_text(data, charset, source)
        if kind == TEXT_MARKDOWN:
            _parse_markdown(text, builder)
        elif kind == TEXT_HTML:
            _parse_html(text, builder, source)
        else:
            _parse_plain(text, builder)
    parsed = builder.finish(kind, source)
    if len(parsed.text) > limits.max_text_chars:
        raise DocumentTooLarge(
            f"{source or 'document'} has {len(parsed.text)} chars of text, over {limits.max_text_chars}"
        )
    if not parsed.sections:
        raise EmptyDocument(f"{source or 'document'} ({kind}) has no text left after cleaning")
    return parsed


# --- shared cleaning ----------------------------------------------------------------------

# Invisible or layout-only characters that only get in the way of matching and tokenising.
_DROP_CHARS = dict.fromkeys(
    [
        0xAD,
        0x200B,
        0x200C,
        0x200D,
        0x200E,
        0x200F,
        0x2060,
        0xFEFF,
        *range(0x202A, 0x202F),
        *range(0x2066, 0x206A),
    ],
    None,
)  # soft hyphen, zero-width characters, BOM, bidi marks
_SPACE_RUN = re.compile(r"[^\S\n]+")
# Unicode category Cc without tab and newline (carriage returns are gone after decoding).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _clean(text: str) -> str:
    """NFC, no control or invisible characters, single spaces, trimmed lines."""
    text = _CONTROL.sub(" ", unicodedata.normalize("NFC", text).translate(_DROP_CHARS))
    lines = (_SPACE_RUN.sub(" ", line).strip() for line in text.split("\n"))
    return "\n".join(line for line in lines if line)


def _clean_code(text: str) -> str:
    """Like `_clean`, but keeps indentation: code is matched literally."""
    text = unicodedata.normalize("NFC", text).translate(_DROP_CHARS).replace("\t", "    ")
    text = _CONTROL.sub(" ", text)
    lines = [line.rstrip() for line in text.split("\n")]
    while lines and not lines[0]:
        lines.pop(0)
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines)


class _Builder:
    """Collects headings and paragraphs, tracking char offsets of sections."""

    def __init__(self) -> None:
        self._parts: list[str] = []
        self._pos = 0
        self._stack: list[tuple[int, str]] = []
        self._sections: list[Section] = []
        self._open: tuple[int, int] | None = None
        self._page: int | None = None
        self.title: str | None = None
        self.first_heading: str | None = None

    def _append(self, text: str) -> tuple[int, int]:
        if self._parts:
            self._parts.append("\n\n")
            self._pos += 2
        start = self._pos
        self._parts.append(text)
        self._pos += len(text)
        return start, self._pos

    def _close(self) -> None:
        if self._open is not None:
            headings = tuple(h for _, h in self._stack)
            self._sections.append(Section(headings, self._open[0], self._open[1], self._page))
            self._open = None

    def heading(self, level: int, raw: str) -> None:
        text = _clean(raw).replace("\n", " ")
        if not text:
            return
        self._close()
        while self._stack and self._stack[-1][0] >= level:
            self._stack.pop()
        self._stack.append((level, text))
        if self.first_heading is None:
            self.first_heading = text
        if level == 1 and self.title is None:
            self.title = text
        self._append(text)

    def paragraph(self, raw: str, *, code: bool = False) -> None:
        text = _clean_code(raw) if code else _clean(raw)
        if not text:
            return
        start, end = self._append(text)
        self._open = (self._open[0] if self._open else start, end)

    def page(self, number: int) -> None:
        """Start a new page: a page is its own section, with no heading path."""
        self._close()
        self._page = number

    def finish(self, media_type: str, source: str) -> ParsedDocument:
        self._close()
        text = "".join(self._parts)
        title = self.title or self.first_heading or text.split("\n", 1)[0]
        return ParsedDocument(
            text=text,
            title=title[:_MAX_TITLE_CHARS].strip(),
            sections=tuple(self._sections),
            media_type=media_type,
            source=source,
        )


def _split_media_type(media_type: str) -> tuple[str, str | None]:
    kind, _, params = media_type.partition(";")
    kind = kind.strip().lower()
    charset = None
    for param in params.split(";"):
        key, _, value = param.partition("=")
        if key.strip().lower() == "charset" and value.strip():
            charset = value.strip().strip('"').lower()
    return _ALIASES.get(kind, kind), charset


# More than this share of control or replacement characters means binary data, not text.
_MAX_JUNK_RATIO = 0.05


def _decode_text(data: bytes, charset: str | None, source: str) -> str:
    """UTF-8 (or the declared charset), then Windows-1252; binary data is refused."""
    name = source or "document"
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        candidates = ["utf-16"]
    elif b"\x00" in data[:8192]:
        raise UnreadableDocument(f"{name} claims to be text but contains NUL bytes")
    else:
        candidates = [c for c in (charset, "utf-8-sig", "cp1252") if c]
    text: str | None = None
    for encoding in candidates:
        try:
            text = data.decode(encoding)
            break
        except (UnicodeDecodeError, LookupError):
            continue
    if text is None:
        text = data.decode("utf-8", errors="replace")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    junk = len(_CONTROL.findall(text)) + text.count("\ufffd")
    if text and junk / len(text) > _MAX_JUNK_RATIO:
        raise UnreadableDocument(f"{name} does not decode as text ({junk} of {len(text)} chars are junk)")
    return text


# --- plain text and shared paragraph handling ----------------------------------------------

_LIST_ITEM = re.compile(r"^(?:[-*+\u2022]\s+|\d{1,3}[.)]\s+|\|)")


def _join_soft_wraps(lines: list[str], hard: list[bool] | None = None) -> str:
    """Join hard-wrapped lines into one line; list items and table rows keep their breaks.

    `hard[i]` marks lines that start a line of their own; by default list items and rows.
    """
    flags = hard if hard is not None else [bool(_LIST_ITEM.match(line)) for line in lines]
    out: list[str] = []
    row_open = False  # the previous line is a table row, which nothing continues
    for line, own_line in zip(lines, flags, strict=True):
        if out and not own_line and not row_open:
            out[-1] = f"{out[-1]} {line}"
        else:
            out.append(line)
        row_open = own_line and " | " in line and not line.startswith(("- ", "* "))
    return "\n".join(out)


def _blocks(lines: list[str]) -> Iterator[list[str]]:
    """Runs of non-blank lines."""
    block: list[str] = []
    for line in lines:
        if line.strip():
            block.append(line)
        elif block:
            yield block
            block = []
    if block:
        yield block


_UNDERLINE = re.compile(r"^\s*(=+|-+)\s*$")


def _is_caps_heading(line: str) -> bool:
    letters = [ch for ch in line if ch.isalpha()]
    return (
        len(letters) >= 3
        and len(line) <= 60
        and all(ch.isupper() for ch in letters)
        and not line.rstrip().endswith((".", ",", ";"))
    )


def _parse_plain(text: str, builder: _Builder) -> None:
    """Paragraphs by blank lines. Headings only where unambiguous: an underlined line
    (`===` level 1, `---` level 2) or a one-line ALL-CAPS paragraph (level 2, or 1 if first)."""
    for n, block in enumerate(_blocks(text.split("\n"))):
        lines = list(block)
        while len(lines) >= 2 and _UNDERLINE.match(lines[1]) and len(lines[1].strip()) >= 3:
            builder.heading(1 if lines[1].strip()[0] == "=" else 2, lines[0])
            lines = lines[2:]
        if len(lines) == 1 and _is_caps_heading(lines[0].strip()):
            builder.heading(1 if n == 0 else 2, lines[0])
        elif lines:
            builder.paragraph(_join_soft_wraps([ln.strip() for ln in lines]))


# --- markdown ------------------------------------------------------------------------------

_FENCE = re.compile(r"^\s{0,3}(`{3,}|~{3,})")
_ATX = re.compile(r"^\s{0,3}(#{1,6})(?:\s+(.*?))?(?:\s+#+)?\s*$")
_RULE = re.compile(r"^\s{0,3}([-*_])(?:\s*\1){2,}\s*$")
_SETEXT = re.compile(r"^\s{0,3}(=+|-+)\s*$")
_REF_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s+\S+")
_TABLE_SEP = re.compile(r"^\s*\|?\s*:?-{2,}:?\s*(\|\s*:?-{2,}:?\s*)*\|?\s*$")
_QUOTE = re.compile(r"^\s{0,3}>\s?")
_BULLET = re.compile(r"^(\s*)[*+]\s+")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1")
_INLINE_RULES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"!\[([^\]]*)\]\([^)]*\)"), r"\1"),  # image -> alt text
    (re.compile(r"\[([^\]]+)\]\([^)]*\)"), r"\1"),  # link -> text
    (re.compile(r"\[([^\]]+)\]\[[^\]]*\]"), r"\1"),  # reference link -> text
    (re.compile(r"<(https?://[^>\s]+)>"), r"\1"),  # autolink
    (re.compile(r"</?[A-Za-z][A-Za-z0-9]*(?:\s[^<>]*)?/?>"), ""),  # inline html tags
    (re.compile(r"(\*\*|__)(?=\S)(.+?)(?<=\S)\1"), r"\2"),  # strong
    (re.compile(r"(?<![\w*])\*(?=\S)(.+?)(?<=\S)\*(?![\w*])"), r"\1"),  # emphasis
    (re.compile(r"(?<!\w)_(?=\S)(.+?)(?<=\S)_(?!\w)"), r"\1"),  # emphasis; keeps snake_case
    (re.compile(r"~~(?=\S)(.+?)(?<=\S)~~"), r"\1"),  # strikethrough
    (re.compile(r"\\([\\`*_{}\[\]()#+\-.!|>~])"), r"\1"),  # escapes
)


_INLINE_TRIGGER = re.compile(r"[\[<*_~\\]")


def _strip_inline(line: str) -> str:
    """Remove markdown emphasis and link syntax; code spans are kept verbatim."""
    out: list[str] = []
    pos = 0
    for match in _CODE_SPAN.finditer(line):
        out.append(_strip_inline_plain(line[pos : match.start()]))
        out.append(match.group(2).strip())
        pos = match.end()
    out.append(_strip_inline_plain(line[pos:]))
    return "".join(out)


def _strip_inline_plain(text: str) -> str:
    if not _INLINE_TRIGGER.search(text):
        return text  # most lines carry no markup; skip the ten substitutions
    for pattern, repl in _INLINE_RULES:
        text = pattern.sub(repl, text)
    return text


def _table_row(line: str) -> str:
    cells = [_strip_inline(c.strip()) for c in line.strip().strip("|").split("|")]
    return " | ".join(cells)


def _front_matter(lines: list[str], builder: _Builder) -> list[str]:
    """Drop a leading YAML front matter block; its `title:` becomes the title."""
    if not lines or lines[0].strip() != "---":
        return lines
    for i in range(1, min(len(lines), 200)):
        if lines[i].strip() in ("---", "..."):
            for meta in lines[1:i]:
                key, _, value = meta.partition(":")
                if key.strip().lower() == "title" and value.strip():
                    builder.title = _clean(value.strip().strip("'\"")).replace("\n", " ") or None
            return lines[i + 1 :]
    return lines


def _parse_markdown(text: str, builder: _Builder) -> None:
    lines = _front_matter(text.split("\n"), builder)
    para: list[str] = []
    hard: list[bool] = []

    def flush() -> None:
        if para:
            builder.paragraph(_join_soft_wraps(para, hard))
            para.clear()
            hard.clear()

    i = 0
    while i < len(lines):
        line = lines[i]
        fence = _FENCE.match(line)
        if fence:
            flush()
            marker = fence.group(1)
            code: list[str] = []
            i += 1
            while i < len(lines) and not lines[i].strip().startswith(marker):
                code.append(lines[i])
                i += 1
            builder.paragraph("\n".join(code), code=True)
            i += 1
            continue
        atx = _ATX.match(line)
        if atx:
            flush()
            builder.heading(len(atx.group(1)), _strip_inline(atx.group(2) or ""))
        elif para and len(para) == 1 and _SETEXT.match(line) and not _LIST_ITEM.match(para[0]):
            hard.pop()
            builder.heading(1 if line.strip()[0] == "=" else 2, para.pop())
        elif not line.strip() or _RULE.match(line):
            flush()
        elif _REF_DEF.match(line) or _TABLE_SEP.match(line):
            pass
        elif line.lstrip().startswith("|"):
            para.append(_table_row(line))
            hard.append(True)
        else:
            stripped = _BULLET.sub(r"\1- ", _QUOTE.sub("", line)).strip()
            hard.append(bool(_LIST_ITEM.match(stripped)))
            para.append(_strip_inline(stripped))
        i += 1
    flush()


# --- html ----------------------------------------------------------------------------------

_HTML_DROP = frozenset(
    {"script", "style", "nav", "noscript", "template", "svg", "iframe", "object", "embed", "head", "form"}
)
_HTML_BLOCKS = frozenset(
    {
        "p", "div", "section", "article", "main", "header", "footer", "aside", "blockquote",
        "ul", "ol", "dl", "table", "figure", "figcaption", "address", "hr", "details",
        "summary", "body", "html",
    }
)  # fmt: skip
_HTML_HEADINGS = {f"h{n}": n for n in range(1, 7)}
_WHITESPACE = re.compile(r"\s+")
_ROW_END = re.compile(r"[ \t]*\|[ \t]*(?=\n|$)")


def _parse_html(text: str, builder: _Builder, source: str) -> None:
    try:
        from bs4 import BeautifulSoup
        from bs4.element import Comment, Declaration, Doctype, NavigableString, Tag
        from bs4.element import ProcessingInstruction as PI
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise UnsupportedMediaType("text/html needs beautifulsoup4: pip install beautifulsoup4") from exc
    try:
        soup = BeautifulSoup(text, "html.parser")
    except Exception as exc:  # bs4 raises assorted errors on pathological markup
        raise UnreadableDocument(f"{source or 'document'} is not parseable HTML: {exc}") from exc

    title_tag = soup.find("title")
    if title_tag is not None and title_tag.get_text(strip=True):
        builder.title = _clean(title_tag.get_text(" ", strip=True)).replace("\n", " ")

    buffer: list[str] = []

    def flush() -> None:
        if buffer:
            # Table cells end in " | "; drop the separator dangling at each row's end.
            builder.paragraph(_ROW_END.sub("", "".join(buffer)))
            buffer.clear()

    # An explicit stack instead of recursion: hostile nesting depth cannot blow the stack.
    stack: list[tuple[object, bool]] = [(soup, False)]
    while stack:
        node, leaving = stack.pop()
        if isinstance(node, NavigableString):
            if not isinstance(node, Comment | Declaration | Doctype | PI):
                buffer.append(_WHITESPACE.sub(" ", str(node)))  # source newlines are spaces
            continue
        if not isinstance(node, Tag):
            continue
        name = node.name.lower()
        if leaving:
            if name in ("li", "dt", "dd", "tr"):
                buffer.append("\n")
            elif name in ("td", "th"):
                buffer.append(" | ")
            elif name in _HTML_BLOCKS:
                flush()
            continue
        if name in _HTML_DROP:
            continue
        if name in _HTML_HEADINGS:
            flush()
            builder.heading(_HTML_HEADINGS[name], node.get_text(" ", strip=True))
            continue
        if name == "pre":
            flush()
            builder.paragraph(node.get_text(), code=True)
            continue
        if name == "br":
            buffer.append("\n")
            continue
        if name in _HTML_BLOCKS:
            flush()
        if name == "li":
            buffer.append("- ")
        stack.append((node, True))
        stack.extend((child, False) for child in reversed(node.contents))
    flush()


# --- pdf -----------------------------------------------------------------------------------

_SENTENCE_END = (".", "!", "?", ":", ";")


def _pdf_page_paragraphs(raw: str) -> list[str]:
    """Rebuild paragraphs from extracted lines.

    PDF text has a line break at every visual line. A line that ends a sentence and is
    shorter than the column, or is much shorter than the column (a heading), ends a
    paragraph; other breaks are soft wraps. A hyphen at a wrap before a lowercase letter
    is a hyphenation and is removed.
    """
    lines = [ln.strip() for ln in _clean(raw).split("\n") if ln.strip()]
    if not lines:
        return []
    column = max(len(ln) for ln in lines)
    paragraphs: list[str] = []
    current = ""
    for n, line in enumerate(lines):
        if not current:
            current = line
        elif current.endswith("-") and len(current) > 1 and current[-2].isalpha() and line[:1].islower():
            current = current[:-1] + line
        elif current.endswith("-"):
            current += line
        else:
            current = f"{current} {line}"
        short = len(line) < 0.6 * column
        ends = line.endswith(_SENTENCE_END) and len(line) < 0.9 * column
        if n == len(lines) - 1 or short or ends or _LIST_ITEM.match(lines[n + 1]):
            paragraphs.append(current)
            current = ""
    return paragraphs


def _parse_pdf(data: bytes, builder: _Builder, limits: ChunkingSettings, source: str) -> None:
    try:
        from pypdf import PdfReader
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise UnsupportedMediaType("application/pdf needs pypdf: pip install pypdf") from exc
    name = source or "document"
    started = time.monotonic()
    # pypdf raises many exception types on damaged files (its own, ValueError, KeyError,
    # RecursionError...). At this boundary any failure means "this PDF cannot be read".
    try:
        reader = PdfReader(io.BytesIO(data), strict=False)
        if reader.is_encrypted and not reader.decrypt(""):
            raise UnreadableDocument(f"{name} is an encrypted PDF")
        page_count = len(reader.pages)
        meta = reader.metadata
        meta_title = meta.title if meta is not None else None
    except UnreadableDocument:
        raise
    except Exception as exc:
        raise UnreadableDocument(f"{name} is not a readable PDF: {type(exc).__name__}: {exc}") from exc
    if isinstance(meta_title, str) and _clean(meta_title):
        builder.title = _clean(meta_title).replace("\n", " ")
    if page_count > limits.max_pdf_pages:
        log.warning("%s has %d pages; indexing the first %d", name, page_count, limits.max_pdf_pages)
    for index in range(min(page_count, limits.max_pdf_pages)):
        if time.monotonic() - started > limits.pdf_time_budget_s:
            raise UnreadableDocument(
                f"{name}: text extraction exceeded {limits.pdf_time_budget_s} s at page {index + 1}"
            )
        try:
            raw = reader.pages[index].extract_text()
        except Exception as exc:
            raise UnreadableDocument(
                f"{name}: page {index + 1} is not readable: {type(exc).__name__}: {exc}"
            ) from exc
        builder.page(index + 1)
        for paragraph in _pdf_page_paragraphs(raw or ""):
            builder.paragraph(paragraph)
