"""The HTML pages people read, opened in a real browser (Debian chromium, headless) and checked with axe-core.

(a) The monthly partnership summary, built from a state store seeded with known referrals: what is on the page
    (suppressed counts say "fewer than 5", rounded counts, the acceptance rate, waits, time to reach the school,
    the charts' text alternatives), no WCAG 2.2 A/AA violation, no request leaves the page, and nothing about a
    child; then the same from a real demo run (Airflow, Medplum): no pupil's name, UPN or NHS number anywhere.
(b) A school's nightly feed.html from the demo run: every pupil's status and named contact, the trust's link
    worker and the school's link contact are on the page, with no violations.

Phone (390x844) and desktop (1280x900) screenshots go to $SCHOOLSLINK_ARTIFACTS (default artifacts/screenshots/).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.browser import VIEWPORTS, check_page, describe_violations, require_chromium, screenshot_path

MONTH = "2026-11"
NIGHT = "2026-11-25"
KEY = "html-accessibility-key"
SYNC_RUN = "scheduled__2026-11-20T01:00:00+00:00"
SYNC_START = datetime(2026, 11, 20, 1, 0, tzinfo=UTC)
TRUST_CHANGED = datetime(2026, 11, 19, 15, 0, tzinfo=UTC)  # the trust's meta.lastUpdated of the changes
FEED_AT = datetime(2026, 11, 21, 2, 5, tzinfo=UTC)  # the first feed after the sync: 35 h 5 min after the change
PUPIL_NAME = "ZQXSEEDEDNAME"  # in the seeded learners' plain data: must never reach a summary


@pytest.fixture(autouse=True)
def _browser() -> None:
    require_chromium()


def _open(path: Path, test: str, *, label: str = "") -> dict[str, dict[str, Any]]:
    """Check the page at both viewports (desktop also in print media); {viewport: check_page's document}."""
    out = {}
    for vp in VIEWPORTS:
        doc = check_page(path, vp, screenshot_path(test, vp, label), print_media=vp == "desktop")
        assert doc["requests_blocked"] == [], doc["requests_blocked"]
        assert doc["violations"] == [], describe_violations(doc)
        assert Path(doc["screenshot"]).stat().st_size > 0
        out[vp] = doc
    return out


# -- (a) the summary, from a seeded store ---------------------------------------------------------------------


def _seed(engine: Any) -> None:
    """School 900001: 13 referrals in November (8 accepted, 3 not accepted '02', 2 waiting); school 900002: 9
    (4 accepted, 5 not accepted: 2 '01', 3 '03'); plus one restricted and one entered in error (never counted)
    and one from October. Six of 900001's accepted pupils are linked and in the school's feed; their change
    (ServiceRequest + EpisodeOfCare at TRUST_CHANGED, read by SYNC_RUN) first reached the school at FEED_AT."""
    from sqlalchemy import insert

    from schoolslink import ledger
    from schoolslink.model import Direction, Disclosure
    from schoolslink.store.schema import (
        feed_rows,
        learners,
        links,
        patients,
        runs,
        trust_appointments,
        trust_episodes,
        trust_referrals,
        watermarks,
    )

    pats: list[dict[str, Any]] = []
    refs: list[dict[str, Any]] = []
    eps: list[dict[str, Any]] = []
    appts: list[dict[str, Any]] = []
    seen_sr: dict[str, str] = {}
    seen_ep: dict[str, str] = {}
    lastupdated = TRUST_CHANGED.isoformat().replace("+00:00", "Z")

    def referral(i: int, school: str, received: date, *, rejection: str | None = None, restricted: bool = False,
                 status: str = "active", episode_start: date | None = None, attended: date | None = None) -> None:
        pats.append({"trust_ods": "R9X", "patient_ref": f"Patient/p{i}", "patient_key": f"pk{i}",
                     "school_urn": school, "verified": True, "restricted": restricted, "updated_run": SYNC_RUN})
        refs.append({"trust_ods": "R9X", "referral_ref": f"ServiceRequest/sr{i}", "patient_ref": f"Patient/p{i}",
                     "fhir_status": "revoked" if rejection else status, "received": received, "team_type": "F01",
                     "rejection_reason": rejection, "closure_reason": None, "transition": False,
                     "moved_area": False, "performer_ref": None, "version_id": "1", "updated_run": SYNC_RUN})
        seen_sr[f"sr{i}|1"] = lastupdated
        if episode_start:
            eps.append({"trust_ods": "R9X", "episode_ref": f"EpisodeOfCare/e{i}",
                        "referral_ref": f"ServiceRequest/sr{i}", "fhir_status": "waitlist", "start": episode_start,
                        "end": None, "care_manager_ref": None, "updated_run": SYNC_RUN})
            seen_ep[f"e{i}|1"] = lastupdated
        if attended:
            appts.append({"trust_ods": "R9X", "appointment_ref": f"Appointment/a{i}",
                          "referral_ref": f"ServiceRequest/sr{i}", "fhir_status": "fulfilled", "start": attended,
                          "updated_run": SYNC_RUN})
            eps.append({"trust_ods": "R9X", "episode_ref": f"EpisodeOfCare/e{i}",
                        "referral_ref": f"ServiceRequest/sr{i}", "fhir_status": "active",
                        "start": attended + timedelta(days=20), "end": None, "care_manager_ref": None,
                        "updated_run": SYNC_RUN})

    i = 0
    for d in (3, 5, 7, 9, 11, 13, 15, 17):  # 900001 accepted: waits 3..17 days, median 10, p90 15.6
        i += 1
        referral(i, "900001", date(2026, 11, 2), episode_start=date(2026, 11, 2) + timedelta(days=d))
    for _ in range(3):
        i += 1
        referral(i, "900001", date(2026, 11, 4), rejection="02")
    for _ in range(2):
        i += 1
        referral(i, "900001", date(2026, 11, 6))
    for d in (2, 4, 6, 8):  # 900002 accepted: first attended appointment 2..8 days on
        i += 1
        referral(i, "900002", date(2026, 11, 3), attended=date(2026, 11, 3) + timedelta(days=d))
    for code in ("01", "01", "03", "03", "03"):
        i += 1
        referral(i, "900002", date(2026, 11, 8), rejection=code)
    i += 1
    referral(i, "900001", date(2026, 11, 9), restricted=True, episode_start=date(2026, 11, 12))
    i += 1
    referral(i, "900001", date(2026, 11, 9), status="entered-in-error")
    i += 1
    referral(i, "900002", date(2026, 10, 20))

    with engine.begin() as conn:
        conn.execute(insert(patients), pats)
        conn.execute(insert(trust_referrals), refs)
        conn.execute(insert(trust_episodes), eps)
        conn.execute(insert(trust_appointments), appts)
        conn.execute(insert(watermarks), [
            {"source": "fhir:R9X", "resource_type": "ServiceRequest", "value": lastupdated, "seen": seen_sr},
            {"source": "fhir:R9X", "resource_type": "EpisodeOfCare", "value": lastupdated, "seen": seen_ep},
        ])
        conn.execute(insert(runs), [{"run_id": SYNC_RUN, "dag_id": "nhs_sync", "started_at": SYNC_START,
                                     "finished_at": SYNC_START + timedelta(minutes=10), "summary": {}}])
        lks = [f"lrn-seeded{n:02d}" for n in range(1, 7)]
        conn.execute(insert(learners), [{"learner_key": k, "school_urn": "900001", "match_hash": f"h{k}",
                                         "plain": {"upn": "R999100116001", "surname": PUPIL_NAME, "forename": "A"},
                                         "updated_run": "mis"} for k in lks])
        conn.execute(insert(links), [{"learner_key": k, "trust_ods": "R9X", "patient_key": f"pk{n}",
                                      "patient_ref": f"Patient/p{n}", "method": "verified_nhs_number+name+dob",
                                      "confidence": 1.0, "linked_run": SYNC_RUN} for n, k in enumerate(lks, 1)])
        conn.execute(insert(feed_rows), [{"school_urn": "900001", "learner_key": k, "trust_ods": "R9X",
                                          "content_hash": "h", "feed_date": date(2026, 11, 21)} for k in lks])

        def carried(at: datetime) -> None:
            ledger.append(conn, [Disclosure(
                run_id=f"feeds-{at.isoformat()}", dag_id="school_feeds", direction=Direction.TRUST_TO_SCHOOL,
                recipient="URN:900001", subject_key=k, data_items=("referral_received", "referral_status"),
                agreement_id="demo-partnership", agreement_version="1.0", consent_id="c", mapping_version="m",
                content_hash="h") for k in lks], at)

        carried(FEED_AT - timedelta(days=2))  # before the trust's change was read: not the night that carried it
        carried(FEED_AT)
        carried(FEED_AT + timedelta(days=1))


def test_monthly_summary_in_the_browser(sl_home: Path, tmp_path: Path) -> None:
    from schoolslink import summary
    from schoolslink.store.db import migrate

    _seed(migrate())
    out = tmp_path / "summaries" / MONTH
    counts = summary.build_summaries(MONTH, out)
    assert counts == summary.SummaryCounts(school_pages=2, trust_pages=1, referrals=22, changes_measured=6)
    assert sorted(p.name for p in out.iterdir()) == ["school-900001.html", "school-900002.html", "trust-R9X.html"]

    school = _open(out / "school-900001.html", "test_monthly_summary", label="school-900001")
    for vp, doc in school.items():
        text = doc["text"]
        assert doc["title"] == "School URN 900001: partnership summary, November 2026", vp
        assert doc["lang"] == "en-GB"
        assert "Referrals received\n15" in text  # 13 -> 15
        assert "Accepted\tfewer than 5" not in text and "Accepted\t10" in text  # 8 -> 10
        assert "Not accepted\tfewer than 5" in text  # 3: suppressed, never the number
        assert "Waiting for a decision\tfewer than 5" in text
        assert "The service judged the referral not appropriate for it\tfewer than 5" in text  # code 02 in words
        assert "The acceptance rate is not shown" in text  # 8 of 11 would give the 3 away
        assert "Median wait\t10 days" in text and "90th percentile wait\t16 days" in text
        assert "Changes that reached the school\t5" in text  # 6 -> 5
        assert "Median time\t35 hours" in text
        assert "Robin Link-Worker" in text
        # no pupil, no record reference, no pseudonym
        for secret in (PUPIL_NAME, "R999100116001", "lrn-seeded", "Patient/p", "ServiceRequest/", "pk1"):
            assert secret not in text
            assert secret not in (out / "school-900001.html").read_text()
    desktop = school["desktop"]
    assert "print" in desktop and "Not accepted\tfewer than 5" in desktop["print"]["text"]

    trust = _open(out / "trust-R9X.html", "test_monthly_summary", label="trust-R9X")["desktop"]
    text = trust["text"]
    assert "Referrals received\n20" in text  # 22 (the restricted, the entered-in-error and October's left out)
    assert "Accepted\t10\t55%" in text and "Not accepted\t10\t" in text
    assert "were accepted" in text and "60%" in text  # 12 of 20 decided
    assert "Duplicate referral: the service already has a referral for this young person\tfewer than 5" in text
    assert "The referral was incomplete: the service needs more information\tfewer than 5" in text
    assert "Median wait\t8 days" in text and "90th percentile wait\t15 days" in text
    assert "School URN 900001\t15\tnot shown\t10 days\t35 hours" in text
    assert "School URN 900002\t10\tnot shown\tnot shown\tnot shown" in text
    assert "Designated Safeguarding Lead" in text

    html = (out / "trust-R9X.html").read_text()
    # every chart is an image with a title and a description (its text alternative) and a data table beside it
    assert html.count('role="img"') == 4 and html.count("<desc id=") == 4
    assert html.count("(data for the chart above)") == 4
    assert "Referrals received each month, the 6 months to November 2026" in html
    assert "<script" not in html


# -- (a) again and (b): from a real demo run ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    home = tmp_path_factory.mktemp("html") / "home"
    cmd = [sys.executable, "-m", "schoolslink.cli", "demo", "--schools", "2", "--pupils", "300", "--seed", "3",
           "--date", NIGHT, "--out", str(home), "--json"]
    env = {**os.environ, "SCHOOLSLINK_HOME": str(home), "SCHOOLSLINK_KEY": KEY}
    env.pop("SCHOOLSLINK_DB_URL", None)
    res = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=900, env=env)
    assert res.returncode == 0, res.stderr[-4000:] + res.stdout[-2000:]
    assert json.loads(res.stdout.strip().splitlines()[-1])["ok"]
    yield home


def _manifest(home: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((home / "synth-manifest.json").read_text())
    return doc


@pytest.mark.slow
def test_summary_of_a_demo_run_carries_nothing_about_a_child(demo_home: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCHOOLSLINK_HOME", str(demo_home))
    monkeypatch.setenv("SCHOOLSLINK_KEY", KEY)
    monkeypatch.delenv("SCHOOLSLINK_DB_URL", raising=False)
    from schoolslink import summary

    out = tmp_path / MONTH
    counts = summary.build_summaries(MONTH, out)
    assert counts.trust_pages == 1 and counts.school_pages >= 2
    manifest = _manifest(demo_home)
    secrets = [v for c in manifest["cases"] for k, v in c.items()
               if k in {"upn", "nhs_number", "surname", "forename", "dob", "patient_id"} and v]
    # the synthetic trust's tell-tale values (clinical notes, phone numbers, ...): never on an aggregate page
    secrets += [str(m["value"]) for m in manifest.get("markers", []) if len(str(m.get("value", ""))) > 6]
    for page in sorted(out.glob("*.html")):
        html = page.read_text()
        leaked = [s for s in secrets if str(s) in html]
        assert not leaked, f"{page.name} carries pupil data"
        assert "lrn-" not in html and "ServiceRequest/" not in html
    school_urn = manifest["school_urns"][0]
    doc = _open(out / f"school-{school_urn}.html", "test_summary_of_a_demo_run", label=f"school-{school_urn}")
    assert "November 2026" in doc["desktop"]["text"]


@pytest.mark.slow
def test_school_feed_html_in_the_browser(demo_home: Path) -> None:
    manifest = _manifest(demo_home)
    urn = manifest["school_urns"][0]
    folder = demo_home / "out" / "feeds" / urn / NIGHT
    page = folder / "feed.html"
    assert page.exists(), f"the school's nightly feed has no feed.html: {sorted(p.name for p in folder.iterdir())}"
    rows = json.loads((folder / "feed.json").read_text())["rows"]
    expected = [c for c in manifest["cases"] if c["school_urn"] == urn and c["expect_trust_to_school"]]
    assert rows and expected
    docs = _open(page, "test_school_feed_html", label=f"feed-{urn}")
    for vp, doc in docs.items():
        text = doc["text"]
        assert "Robin Link-Worker" in text, vp  # the trust's link worker (agreements/demo-partnership.yaml)
        assert "robin.linkworker@cypmhs.example.nhs.uk" in text
        assert "Designated Safeguarding Lead" in text and "dsl@school.example.sch.uk" in text  # the school's
        for row in rows:
            assert row["surname"] in text.upper() and row["upn"] in text, (vp, row["status_code"])
            assert row["status"] in text, (vp, row["status_code"])
            if row["contact_name"]:
                assert row["contact_name"] in text and row["contact_email"] in text
        shown = {r["upn"] for r in rows}
        for case in expected:  # the pupils the synthetic trust expects the school to hear about
            if case["upn"] in shown:
                assert case["surname"] in text.upper()
