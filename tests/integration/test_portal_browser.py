"""The school portal in a real browser (Debian chromium, headless, driven by peers/browser/portal_flow.mjs), on feeds
the pipeline really built for two schools (tests/integration/test_portal_fixtures.py).

- A DSL at one school and an SMHL at the other each sign in (password, then the TOTP code) and see only their own
  pupils: the feed, a pupil's page with its timeline, the history, the summary, a CSV download. Every address of
  the other school's (its feed, a pupil, a file, and its pupil id under their own school) answers 404, is refused
  in the portal's audit log, and shows nothing about a child; what they saw is in the ledger, found by
  `schoolslink audit query --recipient portal:<id>` and by the pupil's UPN.
- A school admin manages users (adds a school admin: password and TOTP set-up shown once; may not add a DSL, whose
  credentials it would then hold; disables one) and sees no pupil.
- A trust link worker sees the trust's summary only.
- A session past its expiry (absolute, then idle) is refused: the browser lands on the sign-in page, told why.
- axe-core finds no WCAG 2.2 A/AA violation on any page, at desktop and phone sizes (and in print for the
  feed); each page is asserted to show what it should. Screenshots go to $SCHOOLSLINK_ARTIFACTS.
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from tests.integration import test_portal_fixtures as fx
from tests.integration.test_portal_fixtures import (
    MONTH,
    NIGHTS,
    Seeded,
    User,
    add_user,
    check,
    checks,
    cli,
    flow,
    pupil_url,
    running_portal,
    sign_in_steps,
)

seeded = fx.seeded  # the module fixture: feeds the pipeline built for two schools

NIGHT = NIGHTS[1].isoformat()


@pytest.fixture(scope="module")
def portal(seeded: Seeded, tmp_path_factory: pytest.TempPathFactory) -> Any:
    add_user(seeded, "dsl.a@school-a.example.sch.uk", "dsl", "900001")
    add_user(seeded, "smhl.b@school-b.example.sch.uk", "smhl", "900002")
    add_user(seeded, "admin.a@school-a.example.sch.uk", "school_admin", "900001")
    add_user(seeded, "teacher.a@school-a.example.sch.uk", "smhl", "900001")
    add_user(seeded, "link.worker@cypmhs.example.nhs.uk", "link_worker", "R9X")
    with running_portal(seeded, tmp_path_factory.mktemp("portal-log") / "portal.log") as server:
        yield server


def _events(seeded: Seeded, user: User) -> list[dict[str, Any]]:
    doc = json.loads(cli(seeded, "portal", "events", "--user", user.user_id, "--json").stdout)
    events: list[dict[str, Any]] = doc["events"]
    return events


def _nothing_about(text: str, seeded: Seeded, urn: str) -> None:
    """No surname or UPN of the school `urn`'s pupils in `text`."""
    leaked = [s for s in seeded.surnames(urn) | seeded.upns(urn) if s in text.upper()]
    assert not leaked, f"pupil data of school {urn} shown"


@pytest.mark.parametrize(("email", "urn", "other"), [("dsl.a@school-a.example.sch.uk", "900001", "900002"),
                                                     ("smhl.b@school-b.example.sch.uk", "900002", "900001")])
def test_each_school_sees_only_its_own_pupils(seeded: Seeded, portal: Any, tmp_path: Path, email: str, urn: str,
                                              other: str) -> None:
    user, base = seeded.users[email], portal.base_url
    test = f"test_portal_school_{urn}"
    mine, theirs = seeded.rows[urn][0], seeded.rows[other][0]
    changed = next((r for r in seeded.rows[urn] if r["upn"] == seeded.changed_upn), None)
    shown = changed or mine
    steps = [
        *sign_in_steps(base, user, test, checked=True),
        check("feed", test, printed=True),
        {"goto": pupil_url(base, urn, shown)}, check("pupil", test),
        {"goto": f"{base}/schools/{urn}/feeds"}, check("history", test),
        {"goto": f"{base}/schools/{urn}/feeds/{NIGHTS[0].isoformat()}"}, check("earlier-feed", test),
        {"goto": f"{base}/schools/{urn}/summaries"}, check("summaries", test),
        {"goto": f"{base}/schools/{urn}/summaries/{MONTH}"}, check("summary", test, printed=True),
        {"fetch": f"{base}/schools/{urn}/feeds/{NIGHT}/files/feed.csv"},
        # the other school's addresses, typed in directly
        {"goto": f"{base}/schools/{other}/feeds/{NIGHT}"},
        {"goto": f"{base}/schools/{other}"},
        {"goto": pupil_url(base, other, theirs)},
        {"goto": pupil_url(base, urn, theirs)},  # their pupil's id under my school
        {"fetch": f"{base}/schools/{other}/feeds/{NIGHT}/files/feed.csv"},
        {"fetch": f"{base}/schools/{other}/feeds/{NIGHT}/files/changes.json"},
        {"goto": f"{base}/schools/{other}/summaries/{MONTH}"}, check("not-found", test),
        {"click": "button:has-text('Sign out')"}, check("signed-out", test),
        {"goto": f"{base}/schools/{urn}/feeds/{NIGHT}"},
    ]
    res = flow(steps, tmp=tmp_path)
    pages = checks(res)

    feed = pages["feed"]["text"]
    assert pages["feed"]["url"].endswith(f"/schools/{urn}/feeds/{NIGHT}")  # signed in, straight to tonight's feed
    assert f"Referral status on {NIGHTS[1].day} November 2026" in feed and f"School URN {urn}" in feed
    for row in seeded.rows[urn]:
        assert f"{row['surname']}, {row['forename']}" in feed and row["upn"] in feed
        if row["status"]:
            assert row["status"] in feed
        if row["contact_email"]:
            assert row["contact_email"] in feed
    assert "Robin Link-Worker" in feed and "Download for your MIS" in feed
    assert "feed.csv" in feed and "changes.json" in feed
    assert "print_text" in pages["feed"] and mine["surname"] in pages["feed"]["print_text"]

    pupil = pages["pupil"]["text"]
    assert f"{shown['surname']}, {shown['forename']}" in pupil and "What the school was told, and when" in pupil
    if shown["contact_email"]:
        assert shown["contact_email"] in pupil  # the named contact, as a mailto link
    if changed is not None:  # its timeline: first in the feed on night 1, the status change on night 2
        assert "First in the school's feed" in pupil and "Changed: status" in pupil
        assert f"{NIGHTS[1].day} November 2026" in pupil and "Being assessed" in pupil
    assert f"{NIGHTS[0].day} November 2026" in pages["history"]["text"]
    assert "This is an earlier night's feed" in pages["earlier-feed"]["text"]
    assert "November 2026" in pages["summaries"]["text"]
    summary = pages["summary"]["text"]
    assert "Key figures" in summary and "Referrals received" in summary and "fewer than 5" in summary

    download = next(r for r in res if r.get("url") == f"{base}/schools/{urn}/feeds/{NIGHT}/files/feed.csv")
    assert download["status"] == 200 and "attachment" in download["headers"]["content-disposition"]
    assert all(r["upn"] in download["body"] for r in seeded.rows[urn])
    assert download["headers"]["cache-control"] == "no-store"

    typed = {pupil_url(base, urn, theirs)}
    refused = [r for r in res if "label" not in r and (other in r.get("url", "") or r.get("url") in typed)]
    assert refused and all(r["status"] == 404 for r in refused), [(r["url"], r["status"]) for r in refused]
    for r in res:
        _nothing_about(r.get("text", "") + r.get("body", ""), seeded, other)
    assert "Page not found" in pages["not-found"]["text"]
    assert "You have signed out" in pages["signed-out"]["text"]
    assert res[-1]["url"].endswith("/sign-in")  # after sign-out the feed is behind sign-in again

    events = _events(seeded, user)
    kinds = [e["event"] for e in events]
    assert "sign_in" in kinds and "sign_out" in kinds and "view_summary" in kinds
    refusals = [e for e in events if e["event"] == "refused"]
    assert len(refusals) >= 7 and {e["organisation"] for e in refusals} == {other, urn}
    assert not any(r["upn"] in json.dumps(events) or r["surname"] in json.dumps(events) for r in seeded.rows[other])

    got = json.loads(cli(seeded, "audit", "query", "--recipient", f"portal:{user.user_id}", "--json").stdout)
    tasks = {e["task_id"] for e in got["entries"]}
    assert {"feed_page", "pupil_page", "download:feed.csv"} <= tasks
    assert all(e["dag_id"] == "portal" and e["direction"] == "trust_to_school" for e in got["entries"])
    pupil_views = [e for e in got["entries"] if e["task_id"] == "pupil_page"]
    assert len(pupil_views) == 1 and pupil_views[0]["agreement"] == "demo-partnership"
    assert pupil_views[0]["consent_id"] != "none"
    # the auditor finds the view from the child's side too
    by_upn = json.loads(cli(seeded, "audit", "query", "--upn", "-", "--json", stdin=shown["upn"] + "\n").stdout)
    view = next(e for e in by_upn["entries"] if e["recipient"] == f"portal:{user.user_id}"
                and e["task_id"] == "pupil_page")
    feed_entry = next(e for e in by_upn["entries"] if e["recipient"] == f"URN:{urn}")  # the feed that told the school
    assert feed_entry["seq"] < view["seq"] and feed_entry["subject_key"] == view["subject_key"]


def test_pages_on_a_phone(seeded: Seeded, portal: Any, tmp_path: Path) -> None:
    user, base, urn = seeded.users["dsl.a@school-a.example.sch.uk"], portal.base_url, "900001"
    test = "test_portal_phone"
    row = seeded.rows[urn][0]
    res = flow([
        *sign_in_steps(base, user, test, "phone", checked=True),
        check("feed", test, "phone"),
        {"goto": pupil_url(base, urn, row)}, check("pupil", test, "phone"),
        {"goto": f"{base}/schools/{urn}/feeds"}, check("history", test, "phone"),
        {"goto": f"{base}/schools/{urn}/summaries/{MONTH}"}, check("summary", test, "phone"),
    ], viewport="phone", tmp=tmp_path)
    pages = checks(res)
    assert f"{row['surname']}, {row['forename']}" in pages["feed"]["text"]
    # narrow screens: each table row is a card whose values are labelled
    assert "Pupil" in pages["feed"]["text"] and "CYPMHS contact" in pages["feed"]["text"]
    assert f"{row['surname']}, {row['forename']}" in pages["pupil"]["text"]


def test_a_school_admin_manages_users_and_sees_no_pupil(seeded: Seeded, portal: Any, tmp_path: Path) -> None:
    admin, base, urn = seeded.users["admin.a@school-a.example.sch.uk"], portal.base_url, "900001"
    teacher = seeded.users["teacher.a@school-a.example.sch.uk"]
    test = "test_portal_admin"
    res = flow([
        *sign_in_steps(base, admin, test),
        check("users", test),
        {"fill": {"#email": "new.dsl@school-a.example.sch.uk"}},
        {"click": "button:has-text('Add user')"}, check("add-error", test),  # no role chosen
    ], tmp=tmp_path)
    pages = checks(res)
    users = pages["users"]["text"]
    assert "Portal users" in users and admin.email in users and teacher.email in users
    assert "smhl.b@school-b.example.sch.uk" not in users  # another school's user
    assert "Choose a role" in pages["add-error"]["text"] and "There is a problem" in pages["add-error"]["text"]

    res = flow([
        *sign_in_steps(base, admin, test),
        {"fill": {"#email": "new.dsl@school-a.example.sch.uk"}},
        {"select": {"#role": "dsl"}},
        {"click": "button:has-text('Add user')"}, check("add-dsl-refused", test),
        {"goto": f"{base}/admin/users"},
        {"fill": {"#email": "new.admin@school-a.example.sch.uk"}},
        {"select": {"#role": "school_admin"}},
        {"click": "button:has-text('Add user')"}, check("added", test),
        {"goto": f"{base}/admin/users"},
        {"click": f"button:has-text('Disable {teacher.email}')"}, check("after-disable", test),
        {"goto": f"{base}/schools/{urn}"},
        {"goto": f"{base}/schools/{urn}/feeds/{NIGHT}"},
        {"goto": pupil_url(base, urn, seeded.rows[urn][0])},
        {"fetch": f"{base}/schools/{urn}/feeds/{NIGHT}/files/feed.csv"},
        {"goto": f"{base}/schools/{urn}/summaries/{MONTH}"},
    ], tmp=tmp_path)
    pages = checks(res)
    refused = pages["add-dsl-refused"]["text"]
    assert "There is a problem" in refused and "added by the portal's operator" in refused
    assert "otpauth://" not in refused and "First password" not in refused
    added = pages["added"]["text"]
    assert "User added: new.admin@school-a.example.sch.uk" in added and "otpauth://totp/" in added
    assert "Shown once" in added
    assert "Disabled" in pages["after-disable"]["text"]
    school_pages = [r for r in res if r.get("url", "").startswith(f"{base}/schools/")]
    assert len(school_pages) == 5 and all(r["status"] == 404 for r in school_pages)
    for r in res:
        _nothing_about(r.get("text", "") + r.get("body", ""), seeded, urn)
    listed = json.loads(cli(seeded, "portal", "user", "list", "--school", urn, "--json").stdout)["users"]
    assert {u["email"]: u["disabled"] for u in listed}[teacher.email] is True
    assert any(u["email"] == "new.admin@school-a.example.sch.uk" and u["role"] == "school_admin" for u in listed)
    assert "new.dsl@school-a.example.sch.uk" not in {u["email"] for u in listed}


def test_a_link_worker_sees_the_trust_summary_only(seeded: Seeded, portal: Any, tmp_path: Path) -> None:
    worker, base = seeded.users["link.worker@cypmhs.example.nhs.uk"], portal.base_url
    test = "test_portal_link_worker"
    res = flow([
        *sign_in_steps(base, worker, test),
        check("summaries", test),
        {"goto": f"{base}/trusts/R9X/summaries/{MONTH}"}, check("summary", test),
        {"goto": f"{base}/schools/900001/feeds/{NIGHT}"},
        {"goto": f"{base}/schools/900001/summaries/{MONTH}"},
        {"goto": f"{base}/trusts/RXX/summaries/{MONTH}"},
    ], tmp=tmp_path)
    pages = checks(res)
    assert pages["summaries"]["url"].endswith("/trusts/R9X/summaries")
    assert "Trust R9X" in pages["summaries"]["text"]
    assert "Referrals received" in pages["summary"]["text"] and "School URN 900001" in pages["summary"]["text"]
    assert [r["status"] for r in res[-3:]] == [404, 404, 404]
    for r in res:
        for urn in ("900001", "900002"):
            _nothing_about(r.get("text", ""), seeded, urn)


@pytest.mark.parametrize("how", ["absolute", "idle"])
def test_a_session_past_its_expiry_is_refused(seeded: Seeded, portal: Any, tmp_path: Path, how: str) -> None:
    """Signed in, the feed opens; then (the browser waiting) the session passes its absolute end, or sits idle
    longer than allowed; the same browser, with the same cookie, is sent to sign in and told why."""
    from schoolslink.store.db import engine
    from schoolslink.store.schema import portal_sessions

    user, base, urn = seeded.users["dsl.a@school-a.example.sch.uk"], portal.base_url, "900001"
    test = f"test_portal_expiry_{how}"
    t = portal_sessions.c

    def expire() -> None:
        with engine().begin() as conn:
            newest = conn.execute(select(t.session_hash, t.created_at).where(  # this browser's: the newest
                t.user_id == user.user_id, t.kind == "session", t.ended_at.is_(None)).order_by(t.created_at.desc())
            ).first()
            assert newest is not None
            session, began = newest
            past = {"absolute": {"expires_at": began},  # its absolute end: the moment it began
                    "idle": {"last_seen_at": began - timedelta(hours=1)}}[how]  # untouched for an hour
            conn.execute(update(portal_sessions).where(t.session_hash == session).values(**past))

    feed = f"{base}/schools/{urn}/feeds/{NIGHT}"
    res = flow([*sign_in_steps(base, user, test), {"goto": feed}, {"pause": "expire"}, {"goto": feed},
                check("session-ended", test), {"fetch": f"{feed}/files/feed.csv"}],
               tmp=tmp_path, on_pause={"expire": expire})
    before, after, download = res[-5], res[-3], res[-1]
    assert before["status"] == 200 and before["url"] == feed
    assert after["url"] == f"{base}/sign-in?ended=1"
    page = checks(res)["session-ended"]["text"]
    assert "Your session has ended" in page and "Sign in" in page
    _nothing_about(page, seeded, urn)
    assert download["status"] == 303 and download["headers"]["location"].startswith("/sign-in")
    _nothing_about(download["body"], seeded, urn)
    assert "session_ended" in [e["event"] for e in _events(seeded, user)]  # and the portal's log says so
