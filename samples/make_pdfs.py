"""Writes the demo corpus's PDF documents with a tiny pure-Python PDF writer.

The PDFs are committed; run this again only after editing the texts below:

    .venv/bin/python samples/make_pdfs.py

The writer emits uncompressed text streams in the standard Helvetica fonts (WinAnsi
encoding), so any PDF library can extract the text and the output is byte-for-byte
deterministic. Paragraphs starting with "# " are set as bold headings; paragraphs that
contain newlines are set line by line as given, others are wrapped.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

__all__ = ["build_pdf", "main"]

# A5 pages, so that even short documents span more than one page.
_PAGE_WIDTH_PT = 420
_PAGE_HEIGHT_PT = 595
_MARGIN_PT = 42
_BODY_SIZE_PT = 10
_HEADING_SIZE_PT = 13
_LEADING_PT = 14
_WRAP_CHARS = 66
_LINES_PER_PAGE = (_PAGE_HEIGHT_PT - 2 * _MARGIN_PT) // _LEADING_PT


def _escape(text: str) -> bytes:
    raw = text.encode("cp1252")
    return raw.replace(b"\\", b"\\\\").replace(b"(", b"\\(").replace(b")", b"\\)")


def _layout(paragraphs: list[str]) -> list[list[tuple[str, str]]]:
    """Wrap paragraphs into pages of (font, line) pairs; "" lines are blank."""
    lines: list[tuple[str, str]] = []
    for para in paragraphs:
        if para.startswith("# "):
            lines.append(("F2", para[2:].strip()))
        elif "\n" in para:  # already broken into lines by the caller
            lines.extend(("F1", line) for line in para.split("\n"))
        else:
            lines.extend(("F1", line) for line in textwrap.wrap(para, _WRAP_CHARS, break_on_hyphens=False))
        lines.append(("F1", ""))
    pages: list[list[tuple[str, str]]] = []
    while lines:
        page, lines = lines[:_LINES_PER_PAGE], lines[_LINES_PER_PAGE:]
        while page and not page[-1][1]:
            page.pop()
        if page:
            pages.append(page)
    return pages


def _content_stream(page: list[tuple[str, str]]) -> bytes:
    out = [b"BT", b"%d TL" % _LEADING_PT, b"%d %d Td" % (_MARGIN_PT, _PAGE_HEIGHT_PT - _MARGIN_PT)]
    for font, line in page:
        size = _HEADING_SIZE_PT if font == "F2" else _BODY_SIZE_PT
        out.append(b"/%s %d Tf" % (font.encode(), size))
        out.append(b"(" + _escape(line) + b") Tj T*")
    out.append(b"ET")
    return b"\n".join(out) + b"\n"


def build_pdf(title: str, paragraphs: list[str]) -> bytes:
    """Render paragraphs as a multi-page PDF whose Info dictionary carries `title`."""
    pages = _layout(paragraphs)
    objects: list[bytes] = []  # object n is objects[n - 1]
    objects.append(b"<< /Type /Catalog /Pages 2 0 R >>")
    objects.append(b"")  # Pages, filled in once the page objects are numbered
    objects.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>")
    objects.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica-Bold /Encoding /WinAnsiEncoding >>")
    objects.append(b"<< /Title (" + _escape(title) + b") /Producer (ragstream samples/make_pdfs.py) >>")
    page_ids: list[int] = []
    for page in pages:
        stream = _content_stream(page)
        objects.append(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"endstream")
        content_id = len(objects)
        objects.append(
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 %d %d] "
            b"/Resources << /Font << /F1 3 0 R /F2 4 0 R >> >> /Contents %d 0 R >>"
            % (_PAGE_WIDTH_PT, _PAGE_HEIGHT_PT, content_id)
        )
        page_ids.append(len(objects))
    kids = b" ".join(b"%d 0 R" % i for i in page_ids)
    objects[1] = b"<< /Type /Pages /Kids [" + kids + b"] /Count %d >>" % len(page_ids)

    body = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets: list[int] = []
    for number, obj in enumerate(objects, start=1):
        offsets.append(len(body))
        body += b"%d 0 obj\n" % number + obj + b"\nendobj\n"
    xref_at = len(body)
    body += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    for offset in offsets:
        body += b"%010d 00000 n \n" % offset
    body += b"trailer\n<< /Size %d /Root 1 0 R /Info 5 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        xref_at,
    )
    return bytes(body)


# --- the corpus's PDF documents --------------------------------------------------------------

_WAREHOUSE_SAFETY = (
    "Larkspur Robotics - Warehouse Floor Safety Standard",
    [
        "# Warehouse Floor Safety Standard",
        "This standard applies to everyone who enters the assembly and dispatch floor at the "
        "Tillbury Works site, including visitors, contractors and office staff passing through. "
        "It was last revised by the Site Safety Committee in March and replaces all earlier "
        "versions. Supervisors must brief new starters on it during their first shift.",
        "# Personal protective equipment",
        "Safety footwear with a composite toe cap is required beyond the yellow line. High-visibility "
        "vests in orange are worn by forklift drivers; everyone else wears the green vest issued at "
        "reception. Hearing protection is mandatory inside the test cage while the QR-208 arm runs its "
        "endurance cycle, because the gearbox reaches 88 decibels at full speed.",
        "# Robot test cages",
        "Every robot under test operates inside a fenced cage with an interlocked gate. Opening the "
        "gate cuts power to the drive bus within 40 milliseconds. Never bypass an interlock, even for a "
        "quick adjustment; bypassing one is treated as a serious safety breach. Before entering a cage, "
        "apply your personal padlock to the isolation switch and attach a tag with your name and the "
        "time. Only the person who applied a lock may remove it.",
        "# Forklifts and pallet movers",
        "Pedestrians keep to the walkways painted in grey. Forklifts give way to pedestrians at the "
        "marked crossings but you must still make eye contact with the driver before crossing. The "
        "speed limit on the floor is 8 km/h, reduced to walking pace near the charging bay. Battery "
        "charging for pallet movers happens only in bay C, which has its own extraction fan.",
        "# Reporting incidents",
        "Report every injury, near miss or damaged guard on the same day using the SafeFloor form on "
        "the intranet, or tell your supervisor, who files it for you. Near misses matter: the committee "
        "reviews them each fortnight and most of our guard improvements started as near-miss reports. "
        "The first-aid room is next to goods-in and is staffed from 07:00 to 19:00. Outside those "
        "hours, call the security desk on extension 4400.",
        "# Emergency evacuation",
        "When the two-tone siren sounds, stop work, make any robot safe with the red mushroom button "
        "if it is within reach, and walk to assembly point B in the north car park. Do not return for "
        "belongings. Fire wardens wear red caps and will check the floor is clear. The site holds an "
        "unannounced evacuation drill twice a year.",
    ],
)

_ANNUAL_REVIEW = (
    "Larkspur Robotics - Annual Performance Review Guide",
    [
        "# Annual Performance Review Guide",
        "Larkspur runs one performance review cycle per year, opening on the first working day of "
        "October and closing on the last working day of November. The review looks back over the "
        "previous twelve months and sets goals for the next. It is a conversation, not a form-filling "
        "exercise, and the written record should be short.",
        "# Before the meeting",
        "Employees write a self-assessment of no more than one page covering what went well, what was "
        "hard and what they want to learn next. Managers gather feedback from two or three colleagues "
        "the employee nominates. Feedback is collected in the PeopleDesk tool and is shown to the "
        "employee with the names attached, so write it as you would say it in person.",
        "# Ratings",
        "We use a three-point scale: Growing, Strong and Exceptional. Most people who are settled in "
        "their role are rated Strong, and that is a good outcome. Managers calibrate ratings together "
        "in a short session per department so that the same standard applies across teams. Nobody is "
        "given a rating without a conversation first.",
        "# Goals",
        "Agree three to five goals for the coming year. At least one goal should be about learning. "
        "Goals can be revisited at the mid-year check-in in April, and it is normal to change them "
        "when priorities shift. Record goals in PeopleDesk so they can be found at the next review.",
        "# Pay and promotion",
        "Pay changes take effect on 1 January and are communicated in December. Promotion cases are "
        "written by the manager and reviewed by a panel from outside the team. Employees may also "
        "propose themselves for promotion by writing to their manager before the cycle opens.",
        "# If you disagree",
        "If you disagree with your review, first talk to your manager. If that does not resolve it, "
        "you can ask your manager's manager or an HR partner for a second look within 20 working days "
        "of receiving the written review.",
    ],
)

_ORCHID_SPEC = (
    "Globex Dynamics - Orchid Controller Datasheet",
    [
        "# Orchid Controller GX-9000",
        "The GX-9000 Orchid is a programmable irrigation controller for greenhouses and vertical farms. "
        "One unit manages up to 64 valve zones and reads up to 32 soil moisture probes over a two-wire "
        "bus. It replaces the older GX-7100 Fern controller, whose support ends in December.",
        "# Electrical",
        "Supply voltage is 24 V AC, 50 or 60 Hz, with a maximum draw of 45 VA when all zones are idle "
        "and 3 VA per open valve. Each valve output is protected by a resettable fuse rated at 0.75 A. "
        "The two-wire sensor bus carries both power and data over up to 900 metres of cable.",
        "# Scheduling",
        "Schedules are written in the Globex Tendril language or set from the Tendril mobile app. The "
        "controller stores 400 schedule entries and keeps time for 14 days without power using a "
        "supercapacitor. A rain-delay input can pause all schedules for a configurable period.",
        "# Environment and certification",
        "Operating temperature is minus 10 to plus 55 degrees Celsius at up to 95 percent relative "
        "humidity. The enclosure is rated IP66. The unit is certified to the usual electrical safety "
        "and radio standards for Europe and North America.",
    ],
)

#: (path under samples/corpus, title, paragraphs)
DOCUMENTS: tuple[tuple[str, str, list[str]], ...] = (
    ("larkspur/public/warehouse-floor-safety.pdf", *_WAREHOUSE_SAFETY),
    ("larkspur/public/annual-performance-review-guide.pdf", *_ANNUAL_REVIEW),
    ("globex/orchid-gx9000-datasheet.pdf", *_ORCHID_SPEC),
)


def main() -> None:
    corpus = Path(__file__).resolve().parent / "corpus"
    for rel_path, title, paragraphs in DOCUMENTS:
        target = corpus / rel_path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(build_pdf(title, paragraphs))
        print(f"wrote {target.relative_to(corpus.parent)}")


if __name__ == "__main__":
    main()
