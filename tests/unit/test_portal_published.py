"""How the portal reads what the pipeline published: feed folders written with the feed module's own renderers
(schoolslink/feeds.py), pupil ids that are keyed, stable and school-scoped, a pupil's timeline across nights,
refusal of a folder that does not match its manifest, and the partnership summary's content."""

from __future__ import annotations

import hashlib
import json
from datetime import date
from pathlib import Path
from typing import Any

import pytest

from schoolslink import feeds
from schoolslink.portal import published
from schoolslink.portal.published import FeedUnavailable

URN = "900001"
NIGHTS = (date(2026, 11, 24), date(2026, 11, 25), date(2026, 11, 26))


def _row(**kw: Any) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(feeds.COLUMNS, "")
    row.update(upn="R674123101121", surname="ASHBY", forename="Tomasz", trust_ods="R9X",
               referral_received="2026-09-14", status="Being assessed", status_code="being_assessed",
               days_waiting=72, contact_name="Sam Worker", contact_email="sam.worker@cypmhs.example.nhs.uk")
    row.update(kw)
    return row


def write_feed(urn: str, day: date, rows: list[dict[str, Any]]) -> Path:
    """A feed folder as the pipeline writes it: the feed module's documents and files, and their manifest."""
    full = feeds.feed_document(urn, day, rows, [], "m1", "full")
    changes = feeds.feed_document(urn, day, rows, [], "m1", "changes")
    files = feeds.render_feed(full, changes)
    folder = feeds.feed_dir(urn, day)
    folder.mkdir(parents=True)
    for name, (data, _n) in files.items():
        (folder / name).write_bytes(data)
    (folder / "manifest.json").write_text(json.dumps({
        "school_urn": urn, "date": day.isoformat(), "rows": len(full["rows"]), "changes": len(changes["rows"]),
        "files": {
            name: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "rows": n,
                   "media_type": "text/csv; charset=utf-8" if name.endswith(".csv") else "application/json"}
            for name, (data, n) in files.items()}}))
    return folder


@pytest.fixture()
def nights(sl_home: Path) -> list[Path]:
    other = _row(upn="A201100018042", surname="BELL", forename="Cara", status="In treatment",
                 status_code="in_treatment")
    return [
        write_feed(URN, NIGHTS[0], [_row(changed="new", what_changed="New in this feed"), other]),
        write_feed(URN, NIGHTS[1], [_row(status="Accepted: waiting for first appointment",
                                         status_code="accepted_waiting", next_appointment="2026-12-03",
                                         changed="changed", what_changed="Changed: status, next appointment"),
                                    other]),
        write_feed(URN, NIGHTS[2], [_row(status="Accepted: waiting for first appointment",
                                         status_code="accepted_waiting", next_appointment="2026-12-03"),
                                    {**dict.fromkeys(feeds.COLUMNS, ""), "upn": "A201100018042",
                                     "surname": "BELL", "forename": "Cara", "trust_ods": "R9X",
                                     "status": feeds.CORRECTION_STATUS, "status_code": feeds.CORRECTION_CODE,
                                     "changed": "correction"}]),
    ]


def test_pupil_ids_are_keyed_stable_and_school_scoped(sl_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    row = _row()
    pid = published.pupil_id(URN, row)
    assert pid.startswith("por-") and len(pid) == 4 + 32
    assert row["upn"] not in pid and row["upn"].lower() not in pid
    assert published.pupil_id(URN, {**row, "surname": "CHANGED", "status": "x"}) == pid  # the same every night
    assert published.pupil_id("900002", row) != pid  # the same child at another school: another id
    assert published.pupil_id(URN, {**row, "trust_ods": "RXX"}) != pid  # another trust's referral
    monkeypatch.setenv("SCHOOLSLINK_ID_KEY", "another-installation")
    assert published.pupil_id(URN, row) != pid  # unguessable without the key


def test_a_feed_and_its_rows_by_pupil_id(nights: list[Path]) -> None:
    assert published.feed_dates(URN) == sorted(NIGHTS, reverse=True)
    feed = published.load(URN, NIGHTS[2])
    assert [r["surname"] for r in feed.rows] == ["ASHBY", "BELL"]
    assert feed.row(feed.id_of(feed.rows[1])) is feed.rows[1]
    assert feed.row("por-" + "0" * 32) is None
    data, media_type, rows = published.download(URN, NIGHTS[2], "feed.csv")
    assert data.startswith(b"upn,surname") and media_type.startswith("text/csv") and rows == 2
    for name in ("feed.html", "manifest.json", "../feed.csv"):
        with pytest.raises(FeedUnavailable):
            published.download(URN, NIGHTS[2], name)


def test_the_history_from_each_nights_manifest(nights: list[Path]) -> None:
    (nights[0] / "manifest.json").write_text("{not json")
    assert published.history(URN) == [(NIGHTS[2], 2, 1), (NIGHTS[1], 2, 1), (NIGHTS[0], None, None)]


def test_work_in_progress_and_incomplete_folders_are_not_feeds(nights: list[Path]) -> None:
    base = nights[0].parent
    (base / ".2026-11-27.tmp").mkdir()
    (base / "2026-11-28").mkdir()  # no manifest yet
    (base / "notes").mkdir()
    assert published.feed_dates(URN) == sorted(NIGHTS, reverse=True)
    assert published.feed_dates("../900001") == [] and published.feed_dates("900009") == []


@pytest.mark.parametrize("damage", ["changed", "missing", "other school"])
def test_a_folder_that_does_not_match_its_manifest_is_refused(nights: list[Path], damage: str) -> None:
    folder = nights[1]
    if damage == "changed":
        doc = json.loads((folder / "feed.json").read_text())
        doc["rows"][0]["status"] = "Discharged"
        (folder / "feed.json").write_text(json.dumps(doc))
    elif damage == "missing":
        (folder / "changes.json").unlink()
    else:
        manifest = json.loads((folder / "manifest.json").read_text())
        (folder / "manifest.json").write_text(json.dumps({**manifest, "school_urn": "900002"}))
    with pytest.raises(FeedUnavailable):
        published.load(URN, NIGHTS[1])


def test_a_pupils_timeline_is_what_each_night_told_the_school(nights: list[Path]) -> None:
    feed = published.load(URN, NIGHTS[2])
    ashby, bell = feed.rows
    events = published.timeline(feed, ashby)
    assert [(e.day, e.what, e.status) for e in events] == [
        (date(2026, 9, 14), "Referral received by the trust", ""),
        (NIGHTS[0], "First in the school's feed", "Being assessed"),
        (NIGHTS[1], "Changed: status, next appointment", "Accepted: waiting for first appointment"),
    ]
    assert events[-1].next_appointment == "2026-12-03"
    assert [e.what for e in published.timeline(feed, bell)][-1].startswith("Correction")
    # up to the night shown only
    earlier = published.load(URN, NIGHTS[0])
    assert [e.day for e in published.timeline(earlier, earlier.rows[0])] == [date(2026, 9, 14), NIGHTS[0]]


def test_the_summary_page_content(sl_home: Path) -> None:
    folder = sl_home / "out" / "summaries" / "2026-11"
    folder.mkdir(parents=True)
    (folder / "school-900001.html").write_text('<html><body><header>x</header><main id="main-content"><h1>Nov</h1>'
                                               "<p>Totals</p></main></body></html>")
    (folder / "trust-R9X.html").write_text("<html></html>")
    assert published.summary_months("school", URN) == ["2026-11"] and published.summary_months("school", "9") == []
    assert str(published.summary_body("school", URN, "2026-11")) == "<h1>Nov</h1><p>Totals</p>"
    for month in ("2026-13", "../2026-11", "2026-10"):
        with pytest.raises(FeedUnavailable):
            published.summary_body("school", URN, month)
    with pytest.raises(FeedUnavailable, match="no main content"):
        published.summary_body("trust", "R9X", "2026-11")
