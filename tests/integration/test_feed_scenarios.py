"""The school's status feed, end to end through the DAGs (Airflow, Medplum): two nights of `schoolslink demo`.

Night 1 checks what a school reads for each kind of referral the synthetic trust seeds: accepted and waiting
(referral date, days waiting, named contact), not accepted (the reason in plain English and the trust's
signposting for that reason), discharged (closure reason and signposting), moved to adult services (the
transition flag); the link contacts at the top; every file of the folder (CSV, JSON against its published
schema, the changes-only files, the HTML page) and the manifest's row counts and SHA-256.
Between the nights one family withdraws consent and a person unlinks another pupil's match as wrong.
Night 2: the withdrawn pupil is in no file of the feed, the wrong match is one correction row (in the full and
the changes files and the page), and pupils whose referral did not change are not in the changes (their days
waiting grew by one: that alone is no change).

The seed is the first whose synthetic trust has every case the scenario needs at this small size (synth.py
seeds every status; which pupils get which depends on the seed).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from markupsafe import escape as html_escape

from connectors.fhir.server import MedplumServer
from tests.integration.demo_cli import run_demo

pytestmark = pytest.mark.slow
KEY = "feed-scenario-key"
NIGHTS = ("2026-11-25", "2026-11-26")
SCHOOLS, PUPILS = 2, 300
NEEDED = ("accepted_waiting", "not_accepted", "discharged", "moved_to_adult_services")
FILES = {"feed.csv", "feed.json", "changes.csv", "changes.json", "feed.html", "manifest.json"}


def _trust_consented(home: Path) -> set[str]:
    return {r["resource"]["patient"]["reference"].split("/")[1]
            for b in (home / "seed" / "fhir").glob("bundle-*.json")
            for r in json.loads(b.read_text())["entry"] if r["resource"]["resourceType"] == "Consent"}


def _pick_seed() -> tuple[int, dict[str, dict[str, Any]]]:
    """The first seed whose trust has, among pupils the school may hear about, one of each NEEDED status and two
    more consented pupils (one to withdraw, one to unlink) at one school; and the cases chosen."""
    from schoolslink.synth import synthesise

    with tempfile.TemporaryDirectory() as d:
        for seed in range(1, 60):
            m = synthesise(Path(d), schools=SCHOOLS, pupils=PUPILS, seed=seed, as_of=date.fromisoformat(NIGHTS[0]))
            consented = _trust_consented(Path(d))
            cases = [c.to_dict() for c in m.cases if c.expect_trust_to_school]
            chosen: dict[str, dict[str, Any]] = {}
            for status in NEEDED:
                hit = next((c for c in cases if c["referral_status"] == status), None)
                if hit is not None:
                    chosen[status] = hit
            used = {c["upn"] for c in chosen.values()}
            spare = [c for c in cases if c["case"] == "consented" and c["upn"] not in used
                     and c["referral_status"] in ("accepted_waiting", "in_treatment", "being_assessed", "received")]
            withdraw = next((c for c in spare if c["patient_id"] not in consented), None)
            unlink = next((c for c in spare if withdraw and c["upn"] != withdraw["upn"]
                           and c["school_urn"] == withdraw["school_urn"]), None)
            if len(chosen) == len(NEEDED) and withdraw and unlink:
                return seed, {**chosen, "withdraw": withdraw, "unlink": unlink}
    raise AssertionError("no seed gives every feed scenario at this size: check schoolslink/synth.py")


def _demo(home: Path, base: str, seed: int, night: str, *extra: str) -> dict[str, Any]:
    doc, _ = run_demo(home, base, night, *extra, schools=SCHOOLS, pupils=PUPILS, seed=seed, key=KEY)
    assert doc["ok"]
    return doc


def _folder(home: Path, urn: str, night: str) -> Path:
    return home / "out" / "feeds" / urn / night


def _rows(home: Path, urn: str, night: str, name: str = "feed.json") -> dict[str, dict[str, Any]]:
    return {r["upn"]: r for r in json.loads((_folder(home, urn, night) / name).read_text())["rows"]}


def _check_folder(folder: Path) -> dict[str, Any]:
    """Every file is there, the manifest's hashes and counts hold, the JSON follows its schema, CSV = JSON."""
    from schoolslink.feed_render import SCHEMA_ID, schema_errors

    assert {p.name for p in folder.iterdir()} == FILES
    assert not list(folder.parent.glob(".*"))  # nothing staged or half-swapped is left beside it
    manifest = json.loads((folder / "manifest.json").read_text())
    assert set(manifest["files"]) == FILES - {"manifest.json"}
    for name, meta in manifest["files"].items():
        data = (folder / name).read_bytes()
        assert meta["sha256"] == hashlib.sha256(data).hexdigest() and meta["bytes"] == len(data), name
    full: dict[str, Any] = json.loads((folder / "feed.json").read_text())
    changes = json.loads((folder / "changes.json").read_text())
    for doc, kind in ((full, "full"), (changes, "changes")):
        assert doc["$schema"] == SCHEMA_ID and doc["kind"] == kind and doc["feed_version"] == "2"
        assert schema_errors(doc) == []
        name = "feed" if kind == "full" else "changes"
        from_csv = list(csv.DictReader(io.StringIO((folder / f"{name}.csv").read_text(encoding="utf-8"))))
        assert from_csv == [{c: "" if v is None else str(v) for c, v in r.items()} for r in doc["rows"]]
        assert manifest["files"][f"{name}.csv"]["rows"] == manifest["files"][f"{name}.json"]["rows"] == \
            len(doc["rows"])
    assert manifest["rows"] == len(full["rows"]) and manifest["changes"] == len(changes["rows"])
    assert changes["rows"] == [r for r in full["rows"] if r["changed"]]
    html = (folder / "feed.html").read_text(encoding="utf-8")
    assert '<html lang="en-GB">' in html and "<script" not in html and 'src="' not in html
    assert html.index("Changes tonight") < html.index("All pupils tonight")
    for c in full["link_contacts"]:
        assert c["trust_link_worker_email"] in html and c["trust_link_worker"] in html
    return full


def test_the_school_feed_through_two_nights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seed, cases = _pick_seed()
    home = tmp_path / "home"
    monkeypatch.setenv("SCHOOLSLINK_HOME", str(home))
    monkeypatch.setenv("SCHOOLSLINK_KEY", KEY)
    from schoolslink.governance.signposting import load_signposting
    from schoolslink.keys import learner_key
    from schoolslink.mapping.engine import load_mappings

    repo = Path(__file__).resolve().parents[2]
    signposting = load_signposting(repo / "agreements" / "signposting" / "R9X.yaml")
    tables = load_mappings().tables
    code_of = {status: {text: code for code, text in tables[name].codes.items()}
               for status, name in (("not_accepted", "mhsds-referral-rejection-reason"),
                                    ("discharged", "mhsds-referral-closure-reason"))}
    env = {**os.environ, "SCHOOLSLINK_HOME": str(home), "SCHOOLSLINK_KEY": KEY}

    with MedplumServer(log_path=tmp_path / "medplum.log") as server:
        _demo(home, server.base_url, seed, NIGHTS[0])
        manifest = json.loads((home / "synth-manifest.json").read_text())
        urns = manifest["school_urns"]
        night1 = {urn: _check_folder(_folder(home, urn, NIGHTS[0])) for urn in urns}
        rows1 = {r["upn"]: r for doc in night1.values() for r in doc["rows"]}

        # The top of every feed: the school's link contact and the trust's named link worker.
        for doc in night1.values():
            [top] = doc["link_contacts"]
            assert (top["trust_ods"], top["trust_link_worker"], top["trust_link_worker_email"]) == \
                ("R9X", "Robin Link-Worker", "robin.linkworker@cypmhs.example.nhs.uk")
            assert top["school_link_contact_email"] == "dsl@school.example.sch.uk"
            assert all(r["changed"] == "new" and r["what_changed"] == "New in this feed" for r in doc["rows"])

        waiting = rows1[cases["accepted_waiting"]["upn"]]
        assert waiting["status"] == "Accepted: waiting for first appointment"
        received = date.fromisoformat(waiting["referral_received"])
        assert waiting["days_waiting"] == (date.fromisoformat(NIGHTS[0]) - received).days > 0
        assert waiting["contact_name"] and waiting["contact_email"].endswith(".nhs.uk")
        assert waiting["trust_link_worker"] == "Robin Link-Worker"
        assert waiting["reason"] == waiting["signposting"] == ""

        for status, label in (("not_accepted", "Not accepted"), ("discharged", "Discharged")):
            row = rows1[cases[status]["upn"]]
            assert row["status"] == label and row["reason"], status
            assert row["days_waiting"] == "" and row["next_appointment"] == ""
            expected = signposting.for_outcome(status, code_of[status].get(row["reason"]))
            assert expected is not None
            assert (row["signposting"], row["signposting_contact"]) == (expected.text, expected.contact), status
            assert "NHS 111, option 2" in row["signposting"]  # every entry ends with the crisis line
            html = (_folder(home, cases[status]["school_urn"], NIGHTS[0]) / "feed.html").read_text()
            assert html_escape(expected.services[0].name) in html

        adult = rows1[cases["moved_to_adult_services"]["upn"]]
        assert adult["status"] == "Moved to adult services" and adult["transition"] == "yes"
        assert adult["signposting"] == ""

        # Between the nights: a family withdraws consent; a person finds another pupil's match wrong.
        withdraw, unlink = cases["withdraw"], cases["unlink"]
        urn = withdraw["school_urn"]
        assert withdraw["upn"] in rows1 and unlink["upn"] in rows1
        from connectors.storage.landing import LandingZone

        with LandingZone(home / "landing").sealed("consent", urn)[-1].open() as f:
            register = list(csv.DictReader(io.StringIO(f.read().decode("utf-8-sig"))))
        for r in register:
            if r["upn"] == withdraw["upn"]:
                r["withdrawn_on"] = NIGHTS[1]
        out = io.StringIO()
        w = csv.DictWriter(out, fieldnames=list(register[0]))
        w.writeheader()
        w.writerows(register)
        (home / "landing" / "consent" / f"{urn}.csv").write_text(out.getvalue(), encoding="utf-8")
        res = subprocess.run([sys.executable, "-m", "schoolslink.cli", "match", "review", "unlink",
                              learner_key(unlink["upn"]), "R9X", "--by", "Sam Reviewer", "--reason",
                              "the trust record is another child", "--json"], capture_output=True, text=True, env=env)
        assert res.returncode == 0, res.stderr

        _demo(home, server.base_url, seed, NIGHTS[1], "--keep")
        night2 = {u: _check_folder(_folder(home, u, NIGHTS[1])) for u in urns}

    folder = _folder(home, urn, NIGHTS[1])
    # The withdrawn pupil is in no file of tonight's feed.
    for p in folder.iterdir():
        text = p.read_text(encoding="utf-8")
        assert withdraw["upn"] not in text and withdraw["surname"] not in text, p.name
    # The wrong match: one correction row, identity and the correction only, in the full and changes files.
    for name in ("feed.json", "changes.json"):
        [correction] = [r for r in json.loads((folder / name).read_text())["rows"] if r["upn"] == unlink["upn"]]
        assert (correction["status_code"], correction["changed"]) == ("entered-in-error", "correction")
        assert {c for c, v in correction.items() if v} == \
            {"upn", "surname", "forename", "trust_ods", "status", "status_code", "changed"}
    html = (folder / "feed.html").read_text(encoding="utf-8")
    assert html.count(unlink["upn"]) == 2 and "Correction" in html  # in the changes and in the full list
    # Nothing else changed: a pupil still waiting waited one more day, which is not a change.
    rows2 = {r["upn"]: r for doc in night2.values() for r in doc["rows"]}
    still = rows2[cases["accepted_waiting"]["upn"]]
    assert still["days_waiting"] == waiting["days_waiting"] + 1
    assert still["changed"] == "" and still["what_changed"] == ""
    changes2 = [r for u in urns for r in json.loads((_folder(home, u, NIGHTS[1]) / "changes.json").read_text())["rows"]]
    assert unlink["upn"] in {r["upn"] for r in changes2} and withdraw["upn"] not in {r["upn"] for r in changes2}
    # anything else in tonight's changes really changed (an appointment passed, a pupil neared 18), and says what
    for r in changes2:
        if r["changed"] == "changed":
            assert r["what_changed"].startswith("Changed: "), r["what_changed"]
    assert len(changes2) < len(rows2)
