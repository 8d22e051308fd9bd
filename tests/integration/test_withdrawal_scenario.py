"""A consent withdrawal in the middle of a multi-night scenario, end to end through the DAGs (Airflow, Medplum).

Night 1 the pupil's school context reaches the trust and the pupil is in the school's feed. Before night 2
the school's register records the withdrawal. Night 2 nothing more is disclosed about the pupil in either
direction: no delivery to the trust, no row in the school's feed, no plain data kept; the trust is sent a
notice (a Communication we own) that consent was withdrawn, as the agreement asks; the ledger still verifies.
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

pytestmark = pytest.mark.slow
KEY = "withdrawal-scenario-key"
NIGHTS = ("2026-11-25", "2026-11-26")


def _demo(home: Path, base: str, night: str, *extra: str) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "schoolslink.cli", "demo", "--schools", "2", "--pupils", "300", "--seed", "3",
           "--date", night, "--out", str(home), "--fhir-base", base, "--clean-input", "--json", *extra]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=900,
                         env={**os.environ, "SCHOOLSLINK_HOME": str(home), "SCHOOLSLINK_KEY": KEY})
    assert res.returncode == 0, res.stderr[-4000:] + res.stdout[-2000:]
    doc: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
    return doc


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
    from schoolslink.keys import learner_key
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
        night2 = list(conn.execute(select(ledger).where(ledger.c.subject_key == key, ledger.c.seq > night1_last))
                      .mappings())
        plain = conn.execute(select(learners.c.plain).where(learners.c.learner_key == key)).scalar()
    eng.dispose()
    assert [r["data_items"] for r in night2] == ["withdrawal_notice"]  # the notice only: no item about the child
    assert plain is None
    res = subprocess.run([sys.executable, "-m", "schoolslink.cli", "audit", "verify", "--json"], capture_output=True,
                         text=True, env={**os.environ, "SCHOOLSLINK_HOME": str(home), "SCHOOLSLINK_KEY": KEY})
    assert res.returncode == 0 and json.loads(res.stdout)["ok"]
