"""The readable part of an access package: `report.pdf`, rendered with fpdf2 from the same document as
`data.json` (so the two always say the same thing).

One section per table, each with what article 15(1) asks (purpose, legal basis, source, retention) and
the person's records with labelled columns: a grid when the table is narrow, one label/value card per
record otherwise. Then the archived originals, what the downstream systems hold, the recipients, the
person's rights and how to complain. Every page carries the request id and the page number.

Text is set in DejaVu Sans (engine/fonts, subset to Latin, Greek and Cyrillic and embedded again, subset,
into each PDF). A character the font lacks is shown as U+FFFD and the report says so: `data.json` holds
the exact value.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

FONTS = Path(__file__).resolve().parent / "fonts"
FAMILY = "DejaVu"
REPLACEMENT = "\ufffd"
GRID_MAX_COLUMNS = 5  # wider tables get one label/value card per record
EMPTY = "—"


@lru_cache(maxsize=1)
def _glyphs() -> frozenset[int]:
    """The code points the embedded font can draw (both faces are subset alike)."""
    from fontTools.ttLib import TTFont  # type: ignore[import-untyped]  # fontTools ships no type information

    return frozenset(TTFont(FONTS / "DejaVuSans.ttf").getBestCmap())


ISO_INSTANT = re.compile(r"^(\d{4}-\d{2}-\d{2})T(\d{2}:\d{2})(:\d{2})?(\.\d+)?(Z|[+-]\d{2}:\d{2})?$")


def instant(value: str) -> str:
    """An ISO 8601 instant for a reader: `2026-01-10T09:30:00+00:00` -> `2026-01-10 09:30 UTC`."""
    match = ISO_INSTANT.fullmatch(value)
    if not match:
        return value
    day, minutes, seconds, _, zone = match.groups()
    shown = f"{day} {minutes}{seconds if seconds and seconds != ':00' else ''}"
    if zone in ("Z", "+00:00"):
        return f"{shown} UTC"
    return f"{shown} (UTC{zone})" if zone else shown


def label(column: str) -> str:
    """A column name as a label: `first_name` -> `First name`, `attributes.FIRSTNAME` -> `Attributes › FIRSTNAME`."""
    parts = [p.replace("_", " ") for p in column.split(".")]
    text = " › ".join(parts)
    return text[:1].upper() + text[1:]


class _Pdf:
    """fpdf2 document with the report's header, footer and text helpers."""

    def __init__(self, request_id: str, heading: str) -> None:
        from fpdf import FPDF

        outer = self

        class Document(FPDF):
            def header(self) -> None:
                self.set_font(FAMILY, size=8)
                self.set_text_color(90)
                self.cell(0, 5, outer.text(heading), new_x="LMARGIN", new_y="NEXT")
                self.ln(2)
                self.set_text_color(0)

            def footer(self) -> None:
                self.set_y(-12)
                self.set_font(FAMILY, size=8)
                self.set_text_color(90)
                self.cell(0, 5, outer.text(f"Request {request_id} · page {self.page_no()} of {{nb}}"), align="C")
                self.set_text_color(0)

        self.replaced = False
        self.pdf = Document(format="A4", unit="mm")
        self.pdf.set_auto_page_break(auto=True, margin=16)
        self.pdf.set_margins(16, 14, 16)
        self.pdf.add_font(FAMILY, "", str(FONTS / "DejaVuSans.ttf"))
        self.pdf.add_font(FAMILY, "B", str(FONTS / "DejaVuSans-Bold.ttf"))
        self.pdf.set_title(f"Access request {request_id}")
        self.pdf.set_creator("warehouse-gdpr")
        self.pdf.alias_nb_pages()
        self.pdf.add_page()

    def text(self, value: object) -> str:
        """A value as the font can show it (None as a dash, booleans as yes/no)."""
        if value is None or value == "":
            return EMPTY
        if value is True or value is False:
            return "yes" if value else "no"
        raw = instant(value) if isinstance(value, str) else str(value)
        glyphs = _glyphs()
        shown = "".join(c if ord(c) in glyphs or c in "\n\t" else REPLACEMENT for c in raw)
        if shown != raw:
            self.replaced = True
        return shown

    def heading(self, text: str, size: float = 14) -> None:
        pdf = self.pdf
        if pdf.will_page_break(30):
            pdf.add_page()
        pdf.ln(3)
        pdf.set_font(FAMILY, "B", size)
        pdf.multi_cell(0, size * 0.5, self.text(text), new_x="LMARGIN", new_y="NEXT")
        pdf.ln(1.5)
        pdf.set_font(FAMILY, size=9.5)

    def paragraph(self, text: str, size: float = 9.5) -> None:
        self.pdf.set_font(FAMILY, size=size)
        self.pdf.multi_cell(0, 4.8, self.text(text), align="L", new_x="LMARGIN", new_y="NEXT")
        self.pdf.ln(1.5)

    def pairs(self, rows: Sequence[tuple[str, object]], widths: tuple[float, float] = (0.28, 0.72)) -> None:
        """A two-column label/value table (labels in bold)."""
        from fpdf.fonts import FontFace

        pdf = self.pdf
        pdf.set_font(FAMILY, size=9)
        with pdf.table(col_widths=widths, first_row_as_headings=False, text_align="LEFT",
                       line_height=4.6, padding=1.2, borders_layout="HORIZONTAL_LINES") as table:
            for name, value in rows:
                row = table.row()
                row.cell(self.text(name), style=FontFace(emphasis="BOLD"))
                row.cell(self.text(value))
        pdf.ln(2)

    def grid(self, columns: list[str], rows: list[dict[str, Any]]) -> None:
        from fpdf.fonts import FontFace

        pdf = self.pdf
        pdf.set_font(FAMILY, size=8.5)
        with pdf.table(first_row_as_headings=True, text_align="LEFT", line_height=4.4, padding=1,
                       headings_style=FontFace(emphasis="BOLD", fill_color=(232, 236, 241)),
                       repeat_headings=1) as table:
            head = table.row()
            for column in columns:
                head.cell(self.text(label(column)))
            for record in rows:
                row = table.row()
                for column in columns:
                    row.cell(self.text(record.get(column)))
        pdf.ln(2)

    def records(self, columns: list[str], rows: list[dict[str, Any]]) -> None:
        if not rows:
            self.paragraph("No record.")
            return
        if len(columns) <= GRID_MAX_COLUMNS:
            self.grid(columns, rows)
            return
        for i, record in enumerate(rows, 1):
            self.pdf.set_font(FAMILY, "B", 9)
            if self.pdf.will_page_break(20):
                self.pdf.add_page()
            self.pdf.cell(0, 5, f"Record {i} of {len(rows)}", new_x="LMARGIN", new_y="NEXT")
            self.pairs([(label(c), record.get(c)) for c in columns])

    def output(self) -> bytes:
        return bytes(self.pdf.output())


def _plain(text: str) -> str:
    """Policy wording for the page: Markdown code marks dropped."""
    return re.sub(r"`([^`]*)`", r"\1", text)


def render(document: dict[str, Any]) -> bytes:
    """report.pdf of an access package, from its `data.json` document (access.build_document).

    fontTools, which fpdf2 calls to subset the font, logs at INFO the glyphs a document uses (the letters of
    the person's data): its logger is held at WARNING while rendering."""
    subsetter = logging.getLogger("fontTools")
    level = subsetter.level
    subsetter.setLevel(logging.WARNING)
    try:
        return _render(document)
    finally:
        subsetter.setLevel(level)


def _render(document: dict[str, Any]) -> bytes:
    request = document["request"]
    about = document["about"]
    controller = about["controller"]
    doc = _Pdf(request["request_id"], f"{controller.get('name') or 'The controller'} · right of access "
                                      "(GDPR art. 15)")
    pdf = doc.pdf
    pdf.set_font(FAMILY, "B", 20)
    pdf.multi_cell(0, 10, doc.text("Your personal data"), new_x="LMARGIN", new_y="NEXT")
    pdf.ln(2)
    doc.pairs([
        ("Request", request["request_id"]),
        ("Received on", request["received_at"]),
        ("Answered on", request["generated_at"][:10]),
        ("Controller", ", ".join(v for v in (controller.get("name"), controller.get("address")) if v)),
        ("Contact", controller.get("contact")),
        *([("Data protection officer", controller["dpo"])] if controller.get("dpo") else []),
    ])
    doc.paragraph(
        "This report lists every piece of personal data we hold about you: each table of our customer "
        "database that holds a record of yours, the originals we keep encrypted in our archive, and what the "
        "services we use hold on our behalf. For each one it says why we process it, on which legal basis, "
        "where it comes from and how long we keep it. The same data is attached as data.json and as CSV files "
        "(csv/), readable by a machine."
    )
    summary = [(s["title"], f"{len(s['rows'])} record(s)") for s in document["warehouse"]]
    summary += [(s["title"], f"{len(s['rows'])} record(s)") for s in document["archive"]]
    summary += [(d["recipient"], d["status"]) for d in document["downstream"]]
    doc.heading("Summary", 13)
    doc.pairs(summary, (0.6, 0.4))

    number = 0
    for section in document["warehouse"]:
        number += 1
        doc.heading(f"{number}. {section['title']}")
        doc.pairs([
            ("Where", section["table"]),
            ("Purpose", section["purpose"]),
            ("Legal basis", section["legal_basis"]),
            ("Source", section["source"]),
            ("Retention", "\n".join(_plain(r) for r in section["retention"])),
        ])
        doc.records(section["columns"], section["rows"])

    if document["archive"]:
        number += 1
        doc.heading(f"{number}. Archived originals")
        doc.paragraph(
            "When a record is pseudonymised at the end of its retention period, the original is kept encrypted "
            "in a restricted archive only where a legal obligation requires it, and destroyed at the date shown."
        )
        for section in document["archive"]:
            doc.heading(section["title"], 11.5)
            doc.records(section["columns"], section["rows"])

    if document["downstream"]:
        number += 1
        doc.heading(f"{number}. Held by the services we use")
        for answer in document["downstream"]:
            doc.heading(f"{answer['recipient']}: {answer['status']}", 11.5)
            for part in answer["sections"]:
                if len(answer["sections"]) > 1:
                    doc.paragraph(label(part["name"]))
                doc.records(part["columns"], part["rows"])

    number += 1
    doc.heading(f"{number}. Who receives your data")
    doc.pairs([(r["name"], r["detail"]) for r in about["recipients"]] or [("Recipients", "none")])
    if about["transfers"]:
        doc.paragraph("Transfers outside the European Economic Area: " + "; ".join(about["transfers"]) + ".")
    number += 1
    doc.heading(f"{number}. Automated decisions and profiling")
    doc.paragraph(about["automated_decisions"])
    number += 1
    doc.heading(f"{number}. Your rights")
    doc.paragraph(about["rights"])
    doc.paragraph(about["complaint"])
    if doc.replaced:
        doc.paragraph(f"Some characters cannot be shown in this PDF and appear as {REPLACEMENT}; data.json holds "
                      "the exact values.", size=8.5)
    return doc.output()
