"""Governance events in the middle of multi-night scenarios, end to end through the DAGs (Airflow, Medplum).

A consent withdrawal: night 1 the pupil's school context reaches the trust and the pupil is in the school's
feed; before night 2 the school's register records the withdrawal; night 2 nothing more is disclosed about
the pupil in either direction (no delivery, no feed row, no plain data kept), the trust is sent a notice (a
Communication we own) that consent was withdrawn, as the agreement asks, and the ledger still verifies.

A wrong match: night 1 a pupil is linked and their school context sent; a person unlinks the link as wrong;
night 2 every resource sent under it is re-sent entered-in-error and the school's feed carries a correction.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, func, select

from connectors.fhir.client import FhirClient
from connectors.fhir.server import MedplumServer
from tests.integration.demo_cli import run_demo

pytestmark = pytest.mark.slow
KEY = "withdrawal-scenario-key"
NIGHTS = ("2026-11-25", "2026-11-26")


def _demo(home: Path, base: str, night: str, *extra: str) -> dict[str, Any]:
    return run_demo(home, base, night, *extra, key=KEY)[0]


def _register_text(home: Path, urn: str) -> str:
    from connectors.storage.landing import LandingZone

    with LandingZone(home / "landing").sealed("consent", urn)[-1].open() as f:
        return f.read().decode("utf-8-sig")


def _feed_upns(home: Path, urn: str, night: str) -> set[str]:
    doc = json.loads((home / "out" / "feeds" / urn / night / "feed.json").read_text())
    return {row["upn"] for row in doc["rows"]}


def test_a_withdrawal_stops_every_later_disclosure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("SCHOOLSLINK_HOME", str(home))
    monkeypatch.setenv("SCHOOLSLINK_KEY", KEY)
    from schoolslink.keys import learner_key, ledger_subject
    from schoolslink.store.schema import learners, ledger

    with MedplumServer(log_path=tmp_path / "medplum.log") as server:
        first = _demo(home, server.base_url, NIGHTS[0])
        assert first["ok"]
        manifest = json.loads((home / "synth-manifest.json").read_text())
        trust_consented = {
            r["resource"]["patient"]["reference"].split("/")[1]
            for b in (home / "seed" / "fhir").glob("bundle-*.json")
            for r in json.loads(b.read_text())["entry"] if r["resource"]["resourceType"] == "Consent"}
        case = next(c for c in manifest["cases"] if c["case"] == "consented" and c["patient_id"] not in
                    trust_consented)
        urn, upn, key = case["school_urn"], case["upn"], learner_key(case["upn"])
        assert upn in _feed_upns(home, urn, NIGHTS[0])
        with FhirClient(server.base_url) as client:
            before = [o for o in client.all_resources("Observation")
                      if o["subject"]["reference"] == f"Patient/{case['patient_id']}"]
        assert before, "night 1 sent the pupil's school context"

        # Before night 2 the school exports its register again, with the pupil's consent withdrawn.
        rows = list(csv.DictReader(io.StringIO(_register_text(home, urn))))
        assert any(r["upn"] == upn for r in rows)
        for r in rows:
            if r["upn"] == upn:
                r["withdrawn_on"] = NIGHTS[1]
        out = io.StringIO()
        w = csv.DictWriter(out, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
        (home / "landing" / "consent" / f"{urn}.csv").write_text(out.getvalue(), encoding="utf-8")

        eng = create_engine(f"sqlite:///{home / 'state.db'}")
        with eng.connect() as conn:
            night1_last = conn.execute(select(func.max(ledger.c.seq))).scalar()
        eng.dispose()
        second = _demo(home, server.base_url, NIGHTS[1], "--keep")
        assert second["ok"]
        assert upn not in _feed_upns(home, urn, NIGHTS[1])
        assert second["summaries"]["mis_ingest"]["withdrawal_notices_sent"] >= 1
        with FhirClient(server.base_url) as client:
            notices = [c for c in client.all_resources("Communication")
                       if c.get("subject", {}).get("reference") == f"Patient/{case['patient_id']}"]
        assert len(notices) == 1 and notices[0]["status"] == "completed"
        assert upn not in json.dumps(notices) and case["surname"] not in json.dumps(notices)

    eng = create_engine(f"sqlite:///{home / 'state.db'}")
    with eng.connect() as conn:
        night2 = list(conn.execute(select(ledger).where(ledger.c.subject_key == ledger_subject(key),
                                                        ledger.c.seq > night1_last))
                      .mappings())
        plain = conn.execute(select(learners.c.plain).where(learners.c.learner_key == key)).scalar()
    eng.dispose()
    assert [r["data_items"] for r in night2] == ["withdrawal_notice"]  # the notice only: no item about the child
    assert plain is None
    res = subprocess.run([sys.executable, "-m", "schoolslink.cli", "audit", "verify", "--json"], capture_output=True,
                         text=True, env={**os.environ, "SCHOOLSLINK_HOME": str(home), "SCHOOLSLINK_KEY": KEY})
    assert res.returncode == 0 and json.loads(res.stdout)["ok"]


def test_a_wrong_match_found_between_nights_is_retracted_through_the_dags(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Night 1 a pupil is linked and their school context sent; a person finds the link wrong and unlinks it
    (`schoolslink match review unlink`); night 2, through the DAGs, every resource sent under it is re-sent as
    entered-in-error, the school's feed carries one correction row, and nothing more is sent under the link."""
    home = tmp_path / "home"
    monkeypatch.setenv("SCHOOLSLINK_HOME", str(home))
    monkeypatch.setenv("SCHOOLSLINK_KEY", KEY)
    from schoolslink.keys import learner_key

    env = {**os.environ, "SCHOOLSLINK_HOME": str(home), "SCHOOLSLINK_KEY": KEY}
    with MedplumServer(log_path=tmp_path / "medplum.log") as server:
        assert _demo(home, server.base_url, NIGHTS[0])["ok"]
        manifest = json.loads((home / "synth-manifest.json").read_text())
        case = next(c for c in manifest["cases"] if c["case"] == "consented")
        urn, key = case["school_urn"], learner_key(case["upn"])
        with FhirClient(server.base_url) as client:
            ours = [o for o in client.all_resources("Observation")
                    if o["subject"]["reference"] == f"Patient/{case['patient_id']}"]
        assert ours and all(o["status"] == "final" for o in ours)

        res = subprocess.run([sys.executable, "-m", "schoolslink.cli", "match", "review", "unlink", key, "R9X",
                              "--by", "Sam Reviewer", "--reason", "the trust record is another child", "--json"],
                             capture_output=True, text=True, env=env)
        assert res.returncode == 0, res.stderr
        assert case["upn"] not in res.stdout and case["surname"] not in res.stdout

        second = _demo(home, server.base_url, NIGHTS[1], "--keep")
        assert second["ok"]
        assert second["summaries"]["mis_ingest"]["retracted"] == len(ours)
        with FhirClient(server.base_url) as client:
            after = {o["id"]: o for o in client.all_resources("Observation")
                     if o["subject"]["reference"] == f"Patient/{case['patient_id']}"}
            assert {o["id"] for o in ours} == set(after)
            assert all(o["status"] == "entered-in-error" for o in after.values())
            assert all(client.history_count("Observation", i) == 2 for i in after)
        doc = json.loads((home / "out" / "feeds" / urn / NIGHTS[1] / "feed.json").read_text())
        rows = [r for r in doc["rows"] if r["upn"] == case["upn"]]
        assert [r["status_code"] for r in rows] == ["entered-in-error"]

    res = subprocess.run([sys.executable, "-m", "schoolslink.cli", "audit", "verify", "--json"], capture_output=True,
                         text=True, env=env)
    assert res.returncode == 0 and json.loads(res.stdout)["ok"]
