"""The school feed's files, from one feed document: CSV (MIS import), JSON (with its published JSON Schema) and
an accessible, self-contained HTML page in NHS.UK style (docs/feeds.md).

Every format renders the same rows and the same header facts (the link contacts): the HTML adds layout and
wording, never data. The HTML is one file (styles inline, no scripts, no external requests), responsive (a
table on wide screens, stacked cards on narrow ones), printable, lang="en-GB", and gives every status as text.
Pure functions of the document: no I/O except reading the packaged template and schema.
"""

from __future__ import annotations

import csv
import io
import json
import re
from datetime import date
from functools import cache
from pathlib import Path
from typing import Any

from jinja2 import ChainableUndefined, ChoiceLoader, Environment, FileSystemLoader, PackageLoader, select_autoescape
from markupsafe import Markup, escape

SCHEMA_PATH = Path(__file__).resolve().parent / "schemas" / "school-feed.schema.json"
TEMPLATES = Path(__file__).resolve().parent / "templates"
SCHEMA_ID = "https://schemas.schoolslink.org.uk/school-feed/2/school-feed.schema.json"
SEPARATOR = "; "  # between services in the signposting columns (schoolslink.governance.signposting)

_EMAIL = re.compile(r"[A-Za-z0-9._%+'-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December")


def csv_bytes(columns: tuple[str, ...], rows: list[dict[str, Any]]) -> bytes:
    """RFC 4180 CSV, UTF-8, CRLF, a header row then one row per pupil and trust; empty = not filled."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\r\n", extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue().encode("utf-8")


def json_bytes(doc: dict[str, Any]) -> bytes:
    return (json.dumps(doc, indent=1, ensure_ascii=False) + "\n").encode("utf-8")


@cache
def schema() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    return doc


def schema_errors(doc: dict[str, Any]) -> list[str]:
    """Where a feed document breaks the published schema (empty: it conforms)."""
    from jsonschema import Draft202012Validator

    v = Draft202012Validator(schema(), format_checker=Draft202012Validator.FORMAT_CHECKER)
    return [f"{'/'.join(str(p) for p in e.absolute_path) or '(top)'}: {e.message}"
            for e in sorted(v.iter_errors(doc), key=lambda e: list(e.absolute_path))]


# HTML ----------------------------------------------------------------------------------------------------------


def long_date(value: Any) -> str:
    """2026-11-25 -> 25 November 2026 (anything else unchanged)."""
    if not value:
        return ""
    try:
        d = date.fromisoformat(str(value))
    except ValueError:
        return str(value)
    return f"{d.day} {_MONTHS[d.month - 1]} {d.year}"


def linked_emails(text: Any) -> Markup:
    """Escape text, and make each email address in it a mailto: link (nothing else becomes a link)."""
    s = "" if text is None else str(text)
    out: list[str] = []
    pos = 0
    for m in _EMAIL.finditer(s):
        out.append(str(escape(s[pos:m.start()])))
        addr = escape(m.group(0))
        out.append(f'<a class="nhsuk-link" href="mailto:{addr}">{addr}</a>')
        pos = m.end()
    out.append(str(escape(s[pos:])))
    return Markup("".join(out))  # noqa: S704 - every piece above is escaped


def split_services(text: Any) -> list[str]:
    return [p for p in ("" if text is None else str(text)).split(SEPARATOR) if p.strip()]


@cache
def _env() -> Environment:
    env = Environment(
        loader=ChoiceLoader([FileSystemLoader(str(TEMPLATES)), PackageLoader("nhsuk_frontend_jinja")]),
        autoescape=select_autoescape(default=True, default_for_string=True),
        undefined=ChainableUndefined,
        trim_blocks=True,
        extensions=["jinja2.ext.do"],
        lstrip_blocks=True,
    )
    env.filters["long_date"] = long_date
    env.filters["linked_emails"] = linked_emails
    env.filters["services"] = split_services
    return env


def html_bytes(full: dict[str, Any], changes: dict[str, Any]) -> bytes:
    """The feed as one accessible HTML page: contacts, corrections and changes tonight, then every pupil."""
    page = _env().get_template("school-feed.html.jinja").render(full=full, changes=changes)
    # the macros leave blank lines: drop them (smaller file, same page)
    return ("\n".join(line.rstrip() for line in page.splitlines() if line.strip()) + "\n").encode("utf-8")
