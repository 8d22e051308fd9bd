"""What the pipeline published, as the portal reads it: each school's nightly feed folders (docs/feeds.md) and the
monthly partnership summaries (docs/partnership-summary.md). Read-only.

A feed folder is used only when it is complete and every file read matches its manifest's SHA-256 (a folder
being swapped in, or changed by hand, is refused with `FeedUnavailable`). Folders whose name starts with a dot
are work in progress and ignored.

Pupil ids in the portal's addresses are `pupil_id(urn, row)`: a keyed hash (the id key, outside the database) of
the school, the UPN and the trust: unguessable, the same every night, and different for the same child at
another school, so an id is meaningless outside its school. Never a UPN.

A pupil's timeline is what the school was told, night by night: the referral date, then each night's row in
changes.json (new, changed, or a correction) up to the night shown. It reads only what the feeds carried.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

from markupsafe import Markup

from schoolslink import keys
from schoolslink.feeds import CORRECTION_CODE, feed_dir
from schoolslink.settings import feeds_dir, out_dir

DOWNLOADS = ("feed.csv", "feed.json", "changes.csv", "changes.json")  # what a school may download for its MIS
_DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_MONTH = re.compile(r"^\d{4}-(0[1-9]|1[0-2])$")
_MAIN = re.compile(r'<main id="main-content">(.*)</main>', re.DOTALL)


class FeedUnavailable(Exception):
    """The feed folder is missing, incomplete, or a file does not match its manifest."""


def pupil_id(urn: str, row: dict[str, Any]) -> str:
    return keys.pseudonym("portal-pupil", f"{urn}\x1f{str(row.get('upn', '')).upper()}\x1f{row.get('trust_ods', '')}",
                          length=32)


def feed_dates(urn: str) -> list[date]:
    """The nights the school has a published feed for, newest first."""
    folder = feeds_dir() / urn
    if not re.fullmatch(r"\d{6,7}", urn) or not folder.is_dir():
        return []
    days = [date.fromisoformat(p.name) for p in folder.iterdir()
            if _DAY.match(p.name) and (p / "manifest.json").is_file()]
    return sorted(days, reverse=True)


def history(urn: str) -> list[tuple[date, int | None, int | None]]:
    """Each night's feed, newest first: (night, rows, changed rows) from its manifest (None: unreadable)."""
    out: list[tuple[date, int | None, int | None]] = []
    for day in feed_dates(urn):
        try:
            _folder, manifest = _manifest(urn, day)
            out.append((day, int(manifest["rows"]), int(manifest["changes"])))
        except (FeedUnavailable, KeyError, TypeError, ValueError):
            out.append((day, None, None))
    return out


def _read(folder: Path, manifest: dict[str, Any], name: str) -> bytes:
    meta = (manifest.get("files") or {}).get(name)
    if not isinstance(meta, dict):
        raise FeedUnavailable(f"{name} is not in the feed's manifest")
    try:
        data = (folder / name).read_bytes()
    except OSError:
        raise FeedUnavailable(f"{name} is missing from the feed folder") from None
    if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
        raise FeedUnavailable(f"{name} does not match the feed's manifest (changed after it was built)")
    return data


def _manifest(urn: str, day: date) -> tuple[Path, dict[str, Any]]:
    folder = feed_dir(urn, day)
    try:
        manifest: dict[str, Any] = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise FeedUnavailable("the feed has no readable manifest") from None
    if manifest.get("school_urn") != urn or manifest.get("date") != day.isoformat():
        raise FeedUnavailable("the feed's manifest is for another school or night")
    return folder, manifest


_PARSED: OrderedDict[str, dict[str, Any]] = OrderedDict()  # SHA-256 -> parsed JSON: a re-built feed is read again
_PARSED_MAX = 256
_LOCK = threading.Lock()


def _doc(folder: Path, manifest: dict[str, Any], name: str) -> dict[str, Any]:
    """A feed JSON file, checked against the manifest, parsed once per content (treat as read-only)."""
    data = _read(folder, manifest, name)
    digest = str(manifest["files"][name]["sha256"])  # _read checked the bytes against it
    with _LOCK:
        doc = _PARSED.get(digest)
    if doc is None:
        doc = json.loads(data)
        if not isinstance(doc, dict):
            raise FeedUnavailable(f"{name} is not a feed document")
        with _LOCK:
            _PARSED[digest] = doc
            while len(_PARSED) > _PARSED_MAX:
                _PARSED.popitem(last=False)
    return doc


def download(urn: str, day: date, name: str) -> tuple[bytes, str, int]:
    """(bytes, media type, rows) of a downloadable feed file, checked against the manifest."""
    if name not in DOWNLOADS:
        raise FeedUnavailable(f"{name} is not a downloadable feed file")
    folder, manifest = _manifest(urn, day)
    meta = manifest["files"].get(name) or {}
    return _read(folder, manifest, name), str(meta.get("media_type") or "application/octet-stream"), \
        int(meta.get("rows") or 0)


@dataclass(frozen=True, slots=True)
class Feed:
    urn: str
    day: date
    manifest: dict[str, Any]
    full: dict[str, Any]
    changes: dict[str, Any]
    ids: dict[str, int] = field(default_factory=dict)  # pupil id -> index in full["rows"]

    @property
    def rows(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = self.full.get("rows", [])
        return rows

    def row(self, pid: str) -> dict[str, Any] | None:
        i = self.ids.get(pid)
        return self.rows[i] if i is not None else None

    def id_of(self, row: dict[str, Any]) -> str:
        return pupil_id(self.urn, row)


def load(urn: str, day: date) -> Feed:
    folder, manifest = _manifest(urn, day)
    full, changes = _doc(folder, manifest, "feed.json"), _doc(folder, manifest, "changes.json")
    if full.get("school_urn") != urn or changes.get("school_urn") != urn:
        raise FeedUnavailable("the feed's files are for another school")
    feed = Feed(urn, day, manifest, full, changes)
    feed.ids.update({pupil_id(urn, r): i for i, r in enumerate(feed.rows)})
    return feed


@dataclass(frozen=True, slots=True)
class Event:
    day: date
    what: str  # plain English
    status: str = ""
    status_code: str = ""
    next_appointment: str = ""


def timeline(feed: Feed, row: dict[str, Any]) -> list[Event]:
    """What the school was told about this pupil's referral with this trust, oldest first, up to `feed`'s night."""
    pid = feed.id_of(row)
    events: list[Event] = []
    if row.get("referral_received"):
        try:
            events.append(Event(date.fromisoformat(str(row["referral_received"])), "Referral received by the trust"))
        except ValueError:
            pass
    for day in sorted(d for d in feed_dates(feed.urn) if d <= feed.day):
        try:
            folder, manifest = _manifest(feed.urn, day)
            changes = _doc(folder, manifest, "changes.json")
        except FeedUnavailable:
            continue  # a night whose folder is gone or damaged says nothing
        for r in changes.get("rows", []):
            if pupil_id(feed.urn, r) != pid:
                continue
            if r.get("status_code") == CORRECTION_CODE:
                what = "Correction: the trust sent earlier rows in error; disregard them"
            elif r.get("changed") == "new":
                what = "First in the school's feed"
            else:
                what = str(r.get("what_changed") or "Changed")
            events.append(Event(day, what, str(r.get("status") or ""), str(r.get("status_code") or ""),
                                str(r.get("next_appointment") or "")))
    return sorted(events, key=lambda e: e.day)


# -- the monthly partnership summary ---------------------------------------------------------------------------


def summary_months(kind: str, code: str) -> list[str]:
    """The months with a summary page for this school (`school`, URN) or trust (`trust`, ODS), newest first."""
    base = out_dir() / "summaries"
    if not base.is_dir():
        return []
    return sorted((p.name for p in base.iterdir() if _MONTH.match(p.name) and (p / f"{kind}-{code}.html").is_file()),
                  reverse=True)


def summary_body(kind: str, code: str, month: str) -> Markup:
    """The summary page's main content (built by schoolslink.summary from counts under disclosure control; its
    text is escaped there), to show inside the portal's own page."""
    if not _MONTH.match(month):
        raise FeedUnavailable("not a month")
    try:
        html = (out_dir() / "summaries" / month / f"{kind}-{code}.html").read_text(encoding="utf-8")
    except OSError:
        raise FeedUnavailable("no summary for that month") from None
    m = _MAIN.search(html)
    if m is None:
        raise FeedUnavailable("the summary page has no main content")
    return Markup(m.group(1))  # noqa: S704 - a page schoolslink.summary built, every text in it escaped
