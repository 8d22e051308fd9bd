"""The school feed's renderers (schoolslink/feed_render.py via schoolslink/feeds.py): HTML escaping, the empty
feed, print and responsive CSS, no external requests, the JSON Schema, and CSV/JSON/HTML agreeing."""

from __future__ import annotations

import csv
import io
import json
import re
from datetime import date
from html.parser import HTMLParser
from typing import Any

import pytest

from schoolslink import feed_render, feeds

DAY = date(2026, 11, 25)
CONTACTS = [{"agreement": "demo-partnership", "agreement_version": "1.0", "trust_ods": "R9X",
             "trust_name": "Synthetic CYPMHS", "trust_link_worker": "Robin Link-Worker",
             "trust_link_worker_email": "robin.linkworker@cypmhs.example.nhs.uk",
             "school_link_contact": "Designated Safeguarding Lead",
             "school_link_contact_email": "dsl@school.example.sch.uk"}]


def _row(**kw: Any) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(feeds.COLUMNS, "")
    row.update(upn="R674123101121", surname="ASHBY", forename="Tomasz", trust_ods="R9X",
               referral_received="2026-09-14", status="Accepted: waiting for first appointment",
               status_code="accepted_waiting", days_waiting=72, next_appointment="2026-12-03",
               contact_name="Sam Worker", contact_role="Mental Health Nurse",
               contact_email="sam.worker@cypmhs.example.nhs.uk", trust_link_worker="Robin Link-Worker",
               trust_link_worker_email="robin.linkworker@cypmhs.example.nhs.uk", changed="", what_changed="")
    row.update(kw)
    return row


NOT_ACCEPTED = _row(upn="R201100018042", surname="<script>alert('x')</script>", forename="Ann & <b>Bo</b>",
                    status="Not accepted", status_code="not_accepted", days_waiting="", next_appointment="",
                    reason="The service judged the referral not appropriate for it",
                    signposting="Kooth: free online counselling; The young person's GP: can refer again",
                    signposting_contact="Kooth: https://www.kooth.com; SPA: spa.r9x@cypmhs.example.nhs.uk",
                    changed="new", what_changed="New in this feed")
CORRECTION = {**dict.fromkeys(feeds.COLUMNS, ""), "upn": "B801200005001", "surname": "CORR", "forename": "Ed",
              "trust_ods": "R9X", "status": feeds.CORRECTION_STATUS, "status_code": feeds.CORRECTION_CODE,
              "changed": "correction"}


def _docs(rows: list[dict[str, Any]], contacts: list[dict[str, Any]] | None = None
          ) -> tuple[dict[str, Any], dict[str, Any], dict[str, tuple[bytes, int]]]:
    c = CONTACTS if contacts is None else contacts
    full = feeds.feed_document("900001", DAY, rows, c, "school-feed-row@test", "full")
    changes = feeds.feed_document("900001", DAY, rows, c, "school-feed-row@test", "changes")
    return full, changes, feeds.render_feed(full, changes)


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.tags: list[str] = []
        self.headings: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        if re.fullmatch(r"h[1-6]", tag):
            self.headings.append(tag)
        for k, v in attrs:
            if k in ("src", "href", "action", "srcset", "poster", "data") and v is not None:
                self.urls.append(v)


def _parse(html: bytes) -> _Links:
    p = _Links()
    p.feed(html.decode("utf-8"))
    return p


def test_html_escapes_names_and_every_value() -> None:
    _, _, files = _docs([NOT_ACCEPTED])
    html = files["feed.html"][0].decode()
    assert "<script>" not in html and "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in html
    assert "<b>Bo</b>" not in html and "Ann &amp; &lt;b&gt;Bo&lt;/b&gt;" in html
    assert "script" not in _parse(files["feed.html"][0]).tags


def test_empty_feed_says_no_pupils_tonight() -> None:
    full, changes, files = _docs([])
    html = files["feed.html"][0].decode()
    assert "No pupils tonight" in html and "No changes tonight" in html
    assert files["feed.csv"][0].decode().splitlines() == [",".join(feeds.COLUMNS)]
    assert full["rows"] == [] and changes["rows"] == [] and feed_render.schema_errors(full) == []


def test_html_is_self_contained_printable_responsive_and_in_en_gb() -> None:
    _, _, files = _docs([CORRECTION, NOT_ACCEPTED, _row()])
    html = files["feed.html"][0].decode()
    page = _parse(files["feed.html"][0])
    assert '<html lang="en-GB">' in html
    assert "@media print" in html and "@media screen and (max-width" in html
    assert '<meta name="viewport"' in html
    for url in page.urls:  # no external request: only in-page anchors and mailto: links
        assert url.startswith(("#", "mailto:")), url
    assert not {"script", "link", "img", "iframe", "object", "embed"} & set(page.tags)
    assert "url(" not in html and "@import" not in html
    assert "https://www.kooth.com" in html  # a signposting link is shown as text, not followed
    assert page.headings[0] == "h1" and html.count("<h1") == 1
    assert "<caption" in html and 'scope="col"' in html


def test_status_is_given_as_text_not_colour_alone() -> None:
    _, _, files = _docs([CORRECTION, NOT_ACCEPTED, _row()])
    html = files["feed.html"][0].decode()
    for label in ("Not accepted", "Accepted: waiting for first appointment", "Correction"):
        assert re.search(r'class="nhsuk-tag[^"]*">\s*' + re.escape(label), html), label


def test_html_shows_nothing_the_csv_and_json_do_not() -> None:
    """Every value in the HTML's cells comes from the rows: an empty column stays empty (shown 'Not given')."""
    only_status = _row(referral_received="", days_waiting="", next_appointment="", contact_name="",
                       contact_role="", contact_email="")
    _, _, files = _docs([only_status])
    html = files["feed.html"][0].decode()
    assert "sam.worker" not in html and "Received" not in html and "Waiting" not in html
    assert "Not given" in html


def test_what_changed_names_only_columns_the_school_may_see_tonight() -> None:
    before = _row(status="Being assessed", status_code="being_assessed", next_appointment="2026-12-01")
    now = _row(changed="changed")
    allowed = {"referral_status", "next_appointment", "named_contact", "referral_received"}
    assert feeds._what_changed(now, before, allowed) == "Changed: status, next appointment"
    assert feeds._what_changed(now, before, {"referral_status"}) == "Changed: status"
    assert feeds._what_changed(now, None, allowed) == "Changed since the last feed"
    assert feeds._what_changed(_row(changed="new"), None, allowed) == "New in this feed"
    assert feeds._what_changed(_row(days_waiting=99), before, allowed) == ""


def test_csv_json_and_changes_agree_and_follow_the_schema() -> None:
    full, changes, files = _docs([CORRECTION, NOT_ACCEPTED, _row()])
    assert feed_render.schema_errors(full) == [] and feed_render.schema_errors(changes) == []
    assert full["$schema"] == feed_render.SCHEMA_ID == feed_render.schema()["$id"]
    assert list(feed_render.schema()["$defs"]["row"]["properties"]) == list(feeds.COLUMNS)
    from_csv = list(csv.DictReader(io.StringIO(files["feed.csv"][0].decode())))
    from_json = [{c: "" if v is None else str(v) for c, v in r.items()}
                 for r in json.loads(files["feed.json"][0])["rows"]]
    assert from_csv == from_json and len(from_csv) == 3
    assert [r["changed"] for r in changes["rows"]] == ["correction", "new"]
    assert list(csv.DictReader(io.StringIO(files["changes.csv"][0].decode()))) == from_csv[:2]
    assert changes["counts"] == {"rows": 2, "new": 1, "changed": 0, "corrections": 1}
    assert full["link_contacts"] == CONTACTS


def test_schema_refuses_an_unknown_column_and_a_bad_status() -> None:
    full, _, _ = _docs([_row()])
    bad = json.loads(json.dumps(full))
    bad["rows"][0]["nhs_number"] = "9990000018"
    bad["rows"][0]["status_code"] = "lost"
    errors = feed_render.schema_errors(bad)
    assert any("nhs_number" in e for e in errors) and any("lost" in e for e in errors)


@pytest.mark.parametrize("text, links", [
    ("write to a@b.nhs.uk or c@d.sch.uk", ["mailto:a@b.nhs.uk", "mailto:c@d.sch.uk"]),
    ("https://www.kooth.com", []),
    ("<a href='http://evil'>x</a>", []),
])
def test_only_email_addresses_become_links(text: str, links: list[str]) -> None:
    assert re.findall(r'href="([^"]+)"', str(feed_render.linked_emails(text))) == links


def test_long_dates() -> None:
    assert feed_render.long_date("2026-11-05") == "5 November 2026"
    assert feed_render.long_date("") == "" and feed_render.long_date("soon") == "soon"
