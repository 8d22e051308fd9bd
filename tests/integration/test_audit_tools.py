"""The auditor's tools on a state store the real pipeline filled (`schoolslink demo`: Airflow, Medplum, 2 schools).

(a) `audit query` by a pupil's UPN and by the same child's NHS number (from the synthetic manifest) returns the
    ledger entries about that child, both directions, and none about any other child; CSV and JSON agree; the
    identifier is never printed, not even when it fails its check (exit 2).
(b) `audit report RUN_ID --out FILE` renders in headless Chromium with no axe-core WCAG 2.2 A/AA violation and no
    request leaving the page, shows the run's counts, every quarantine reason and the recipients, and holds no
    pupil's UPN, name or NHS number and no subject pseudonym. An unknown run id is exit 1.
(c) `audit export-fhir`: every AuditEvent validates with fhir.resources' R4B model, a re-export is identical, and a
    PUT to the FHIR peer (Medplum) twice leaves one version of each AuditEvent.
(d) the commands through `schoolslink.cli.main` (cli.py calls `register_audit` under its `audit` parser).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, select

from tests.browser import VIEWPORTS, check_page, describe_violations, require_chromium, screenshot_path

KEY = "audit-tools-test-key"
NIGHT = "2026-11-25"


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One demo run (its own FHIR peer), the environment pointing at it for the module's tests."""
    home = tmp_path_factory.mktemp("audit") / "home"
    env = {**os.environ, "SCHOOLSLINK_HOME": str(home), "SCHOOLSLINK_KEY": KEY}
    env.pop("SCHOOLSLINK_DB_URL", None)
    cmd = [sys.executable, "-m", "schoolslink.cli", "demo", "--schools", "2", "--pupils", "300", "--seed", "3",
           "--date", NIGHT, "--out", str(home), "--json"]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=900, env=env)
    assert res.returncode == 0, res.stderr[-4000:] + res.stdout[-2000:]
    doc = json.loads(res.stdout.strip().splitlines()[-1])
    assert doc["ok"]
    manifest = json.loads((home / "synth-manifest.json").read_text())
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SCHOOLSLINK_HOME", str(home))
        mp.setenv("SCHOOLSLINK_KEY", KEY)
        mp.delenv("SCHOOLSLINK_DB_URL", raising=False)
        mp.delenv("SCHOOLSLINK_KEY_PREVIOUS", raising=False)
        yield {"home": home, "runs": {r["dag_id"]: r["run_id"] for r in doc["runs"]}, "manifest": manifest}


def _ledger(home: Path) -> list[dict[str, Any]]:
    from schoolslink.store.schema import ledger

    eng = create_engine(f"sqlite:///{home / 'state.db'}")
    with eng.connect() as conn:
        rows = [dict(r) for r in conn.execute(select(ledger).order_by(ledger.c.seq)).mappings()]
    eng.dispose()
    return rows


def _case(demo: dict[str, Any], n: int = 0) -> dict[str, Any]:
    """The n-th consented child the manifest expects to be shared both ways, with entries both ways."""
    from schoolslink.keys import learner_key, ledger_subject

    rows = _ledger(demo["home"])
    found = []
    for c in demo["manifest"]["cases"]:
        if c["case"] == "consented" and c["expect_school_to_trust"] and c["expect_trust_to_school"]:
            dirs = {r["direction"] for r in rows if r["subject_key"] == ledger_subject(learner_key(c["upn"]))}
            if dirs == {"school_to_trust", "trust_to_school"}:
                found.append(c)
    assert len(found) > n, "the demo shares at least two consented children both ways"
    return dict(found[n])


def _identifiers(manifest: dict[str, Any]) -> list[str]:
    """Every pupil identifier and name the manifest holds: none may reach an auditor's page or export."""
    out = []
    for c in manifest["cases"]:
        out += [c["upn"], c["nhs_number"], c["surname"], c["forename"]]
    return [v for v in out if v]


def _query_ns(**kw: Any) -> argparse.Namespace:
    base: dict[str, Any] = {"nhs_number": None, "upn": None, "subject_key": None, "recipient": None,
                            "agreement": None, "run": None, "since": None, "until": None, "direction": None,
                            "out": None, "format": None, "json": False}
    return argparse.Namespace(**{**base, **kw})


def _run_query(capsys: pytest.CaptureFixture[str], **kw: Any) -> tuple[int, str, str]:
    from schoolslink.audit.commands import cmd_audit_query

    capsys.readouterr()
    code = cmd_audit_query(_query_ns(**kw))
    out = capsys.readouterr()
    return code, out.out, out.err


# -- (a) query ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_query_by_upn_and_by_nhs_number_finds_that_child_and_no_other(demo: dict[str, Any],
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from schoolslink.keys import learner_key, ledger_subject, patient_key

    case, other = _case(demo, 0), _case(demo, 1)
    mine = {ledger_subject(learner_key(case["upn"])), ledger_subject(patient_key(case["nhs_number"]))}
    rows = _ledger(demo["home"])
    expected = [r["seq"] for r in rows if r["subject_key"] in mine]
    theirs = {r["seq"] for r in rows if r["subject_key"] == ledger_subject(learner_key(other["upn"]))}
    assert expected and theirs

    code, out, err = _run_query(capsys, upn=case["upn"], json=True)
    assert code == 0, err
    by_upn = json.loads(out)  # one JSON document, nothing else
    assert [e["seq"] for e in by_upn["entries"]] == expected
    assert {e["direction"] for e in by_upn["entries"]} == {"school_to_trust", "trust_to_school"}
    assert {e["subject_key"] for e in by_upn["entries"]} <= mine
    assert not theirs & {e["seq"] for e in by_upn["entries"]}
    assert by_upn["filters"]["subject"]["kind"] == "upn"

    # The same child by NHS number (typed with spaces), as the trust knows them.
    nhs = case["nhs_number"]
    code, out, err = _run_query(capsys, nhs_number=f"{nhs[:3]} {nhs[3:6]} {nhs[6:]}", json=True)
    assert code == 0, err
    by_nhs = json.loads(out)
    assert by_nhs["entries"] == by_upn["entries"]
    for text in (json.dumps(by_upn), json.dumps(by_nhs)):
        assert case["upn"] not in text and nhs not in text

    # Each entry answers who, what, when, under which consent and agreement.
    for e in by_upn["entries"]:
        assert e["recipient"].startswith(("ODS:", "URN:")) and e["data_items"] and e["at"].endswith("+00:00")
        assert e["agreement"] and e["agreement_version"] and e["consent_id"] and len(e["entry_hash"]) == 64
    assert "task_id" in by_upn["columns"] or "task_id" not in rows[0]  # shown when the ledger has it

    # CSV (stdout and file) says the same as JSON.
    code, out, _ = _run_query(capsys, upn=case["upn"])
    assert code == 0
    parsed = list(csv.DictReader(io.StringIO(out)))
    assert list(parsed[0]) == by_upn["columns"]
    assert [int(r["seq"]) for r in parsed] == expected
    for r, e in zip(parsed, by_upn["entries"], strict=True):
        for col in by_upn["columns"]:
            want = ",".join(e[col]) if col == "data_items" else ("" if e[col] is None else str(e[col]))
            assert r[col] == want, col
    csv_file = demo["home"] / "audit-out" / "child.csv"
    code, out, _ = _run_query(capsys, nhs_number=nhs, out=str(csv_file), json=True)
    assert code == 0 and json.loads(out)["count"] == len(expected)
    assert csv_file.read_text() == _run_query(capsys, upn=case["upn"])[1]


@pytest.mark.slow
def test_query_filters_by_recipient_agreement_run_and_time(demo: dict[str, Any],
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    rows = _ledger(demo["home"])
    urn = next(r["recipient"] for r in rows if r["recipient"].startswith("URN:"))
    code, out, _ = _run_query(capsys, recipient=urn.lower(), json=True)
    doc = json.loads(out)
    assert code == 0 and doc["count"] == sum(1 for r in rows if r["recipient"] == urn)
    assert {e["recipient"] for e in doc["entries"]} == {urn}

    run = demo["runs"]["mis_ingest"]
    code, out, _ = _run_query(capsys, run=run, agreement=rows[0]["agreement_id"], direction="school_to_trust",
                              json=True)
    assert json.loads(out)["count"] == sum(1 for r in rows if r["run_id"] == run) > 0

    day = rows[0]["at"].date().isoformat()  # the day the demo ran (UTC; the same day in UK time at these hours)
    code, out, _ = _run_query(capsys, since=day, until=day, json=True)
    assert json.loads(out)["count"] == len(rows)
    code, out, _ = _run_query(capsys, since="2099-01-01", json=True)
    assert code == 0 and json.loads(out)["count"] == 0
    code, out, _ = _run_query(capsys, since="yesterday", json=True)
    assert code == 2 and "YYYY-MM-DD" in json.loads(out)["error"]


@pytest.mark.slow
def test_an_identifier_that_fails_its_check_is_a_usage_error_and_never_echoed(
        demo: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    case = _case(demo)
    nhs = case["nhs_number"]
    bad_nhs = nhs[:9] + str((int(nhs[9]) + 1) % 10)
    code, out, err = _run_query(capsys, nhs_number=bad_nhs, json=True)
    assert code == 2 and out.count("\n") == 1
    assert "check digit" in json.loads(out)["error"] and bad_nhs not in out + err

    bad_upn = ("A" if case["upn"][0] != "A" else "B") + case["upn"][1:]
    code, out, err = _run_query(capsys, upn=bad_upn)
    assert code == 2 and out == "" and "check letter" in err and bad_upn not in err

    code, out, err = _run_query(capsys, upn="12345")
    assert code == 2 and "13 characters" in err
    code, out, err = _run_query(capsys, recipient="URN:ABC")
    assert code == 2 and "URN" in err


# -- (b) the run report ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_run_report_is_accessible_and_shows_counts_quarantine_and_recipients_without_pupil_data(
        demo: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    require_chromium()
    from schoolslink.audit.commands import cmd_audit_report
    from schoolslink.store.schema import quarantine, runs

    home = demo["home"]
    rows = _ledger(home)
    eng = create_engine(f"sqlite:///{home / 'state.db'}")
    with eng.connect() as conn:
        reasons = {r for (r,) in conn.execute(select(quarantine.c.reason)
                                              .where(quarantine.c.run_id == demo["runs"]["mis_ingest"]))}
    eng.dispose()
    assert reasons, "the demo's bad school exports are quarantined"
    forbidden = _identifiers(demo["manifest"])
    subjects = {r["subject_key"] for r in rows}

    pages = {}
    for dag in ("mis_ingest", "school_feeds"):
        run = demo["runs"][dag]
        out = home / "audit-out" / f"{dag}.html"
        capsys.readouterr()
        code = cmd_audit_report(argparse.Namespace(run_id=run, out=str(out), json=True))
        doc = json.loads(capsys.readouterr().out)
        assert code == 0 and doc["ok"] and doc["verify"]["ok"]
        assert doc["ledger_entries"] == sum(1 for r in rows if r["run_id"] == run)
        html = out.read_text(encoding="utf-8")
        for value in forbidden:
            assert value not in html, "a pupil identifier or name reached the report"
        assert not any(s in html for s in subjects), "a subject pseudonym reached the report"
        for vp in VIEWPORTS:
            page = check_page(out, vp, screenshot_path("audit_run_report", vp, dag), print_media=vp == "desktop")
            assert page["requests_blocked"] == [], page["requests_blocked"]
            assert page["violations"] == [], describe_violations(page)
            assert page["lang"] == "en-GB"
        pages[dag] = page["text"]

    ingest = pages["mis_ingest"]
    eng = create_engine(f"sqlite:///{home / 'state.db'}")
    with eng.connect() as conn:
        summary = dict(conn.execute(select(runs.c.summary).where(runs.c.run_id == demo["runs"]["mis_ingest"]))
                       .scalar() or {})
    eng.dispose()
    assert demo["runs"]["mis_ingest"] in ingest and "mis_ingest" in ingest
    assert "Pupil records read from school exports" in ingest and f"{summary['read']:,}" in ingest
    assert "No active consent covers the data items" in ingest  # refused by consent, with its count
    for reason in reasons:
        assert reason in ingest
    assert "ODS:R9X" in ingest and "attendance_percent" in ingest
    assert "Ledger check: passed" in ingest
    assert "learners" in ingest and "Validation results" in ingest
    feeds = pages["school_feeds"]
    school_recipients = {r["recipient"] for r in rows if r["run_id"] == demo["runs"]["school_feeds"]}
    assert school_recipients and all(rcpt in feeds for rcpt in school_recipients)


@pytest.mark.slow
def test_an_unknown_run_is_refused(demo: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    from schoolslink.audit.commands import cmd_audit_export_fhir, cmd_audit_report

    out = demo["home"] / "audit-out" / "nothing.html"
    capsys.readouterr()
    assert cmd_audit_report(argparse.Namespace(run_id="manual__1999-01-01", out=str(out), json=True)) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is False and "no run" in doc["error"] and not out.exists()
    assert cmd_audit_export_fhir(argparse.Namespace(run="manual__1999-01-01", out=str(out), trust=None,
                                                    json=False)) == 1
    assert "no run" in capsys.readouterr().err


# -- (c) FHIR AuditEvent export ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_auditevents_validate_with_r4b_and_a_second_put_adds_no_version(demo: dict[str, Any], medplum: Any,
                                                                        monkeypatch: pytest.MonkeyPatch,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from fhir.resources.R4B.auditevent import AuditEvent
    from fhir.resources.R4B.bundle import Bundle

    from connectors.fhir.client import FhirClient
    from schoolslink.audit.auditevent import auditevent_id
    from schoolslink.audit.commands import cmd_audit_export_fhir

    home = demo["home"]
    rows = _ledger(home)
    first, second = home / "audit-out" / "ae-1.json", home / "audit-out" / "ae-2.json"
    for path in (first, second):
        assert cmd_audit_export_fhir(argparse.Namespace(run=None, out=str(path), trust=None, json=True)) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["auditevents"] == len(rows)
    assert first.read_bytes() == second.read_bytes()  # deterministic: a re-export is the same PUTs
    text = first.read_text()
    for value in _identifiers(demo["manifest"]):
        assert value not in text
    bundle = json.loads(text)
    Bundle.model_validate(bundle)
    assert bundle["type"] == "batch" and len(bundle["entry"]) == len(rows)
    by_hash = {r["entry_hash"]: r for r in rows}
    for entry in bundle["entry"]:
        ae = entry["resource"]
        AuditEvent.model_validate(ae)
        assert entry["request"] == {"method": "PUT", "url": f"AuditEvent/{ae['id']}"}
        data = ae["entity"][1]
        row = by_hash[data["what"]["identifier"]["value"]]
        assert ae["id"] == auditevent_id(row["entry_hash"])
        assert ae["type"]["code"] == "110106" and ae["action"] in ("R", "E")
        assert ae["entity"][0]["what"]["identifier"]["value"] == row["subject_key"]
        details = {d["type"]: d["valueString"] for d in data["detail"]}
        assert details["agreement"] == row["agreement_id"] and details["consent_id"] == row["consent_id"]
        assert details["data_items"] == row["data_items"]
        assert ae["agent"][1]["who"]["identifier"]["value"] == row["recipient"].split(":", 1)[1]

    # One run only, and to the trust's FHIR server: what the trust received, PUT twice.
    trust = demo["manifest"]["trust_ods"]
    monkeypatch.setenv(f"SCHOOLSLINK_FHIR_BASE_{trust}", medplum.base_url)
    run = demo["runs"]["mis_ingest"]
    to_trust = [r for r in rows if r["run_id"] == run and r["recipient"] == f"ODS:{trust}"]
    assert to_trust
    capsys.readouterr()
    assert cmd_audit_export_fhir(argparse.Namespace(run=run, out=None, trust=trust, json=True)) == 0
    once = json.loads(capsys.readouterr().out)
    assert once["ok"] and once["written"] == len(to_trust) and once["already_held"] == 0
    assert cmd_audit_export_fhir(argparse.Namespace(run=run, out=None, trust=trust, json=True)) == 0
    twice = json.loads(capsys.readouterr().out)
    assert twice["written"] == 0 and twice["already_held"] == len(to_trust)
    with FhirClient(medplum.base_url) as client:
        for r in to_trust:
            assert client.history_count("AuditEvent", auditevent_id(r["entry_hash"])) == 1
        held = client.read("AuditEvent", auditevent_id(to_trust[0]["entry_hash"]))
    assert held["recorded"].startswith(to_trust[0]["at"].date().isoformat())
    assert held["entity"][0]["what"]["identifier"]["value"] == to_trust[0]["subject_key"]
    # only what the trust received: no AuditEvent of a school feed reached the trust's server
    feed_ids = {auditevent_id(r["entry_hash"]) for r in rows if r["recipient"].startswith("URN:")}
    with FhirClient(medplum.base_url) as client:
        on_server = {ae["id"] for ae in client.all_resources("AuditEvent")}
    assert feed_ids and not feed_ids & on_server


# -- (d) through the CLI ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_audit_commands_through_cli_main(demo: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    from schoolslink.cli import main

    case = _case(demo)
    capsys.readouterr()
    assert main(["audit", "query", "--upn", case["upn"], "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] and doc["count"] > 0 and case["upn"] not in json.dumps(doc)
    out = demo["home"] / "audit-out" / "cli-report.html"
    assert main(["audit", "report", demo["runs"]["mis_ingest"], "--out", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] and out.exists()
    assert main(["audit", "report", "no-such-run", "--out", str(out)]) == 1
    assert main(["audit", "query", "--nhs-number", "123"]) == 2
    assert main(["audit", "export-fhir"]) == 2  # --out or --trust is required
