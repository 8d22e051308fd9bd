"""One school, two trusts: each learner's records go only to the trust whose patient (and referral) names them,
over that trust's own endpoint and under that trust's own agreement; the school's feed shows each trust's rows.

Two real Medplum servers on loopback stand for the two trusts' FHIR systems. Learners 0 and 1 are known to
trust A only, learner 2 to trust B only, learner 3 to both (say, a move between areas): A's agreement carries
attendance, B's carries SEN provision and year group.
"""

from __future__ import annotations

import json
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pytest

from connectors.fhir.client import FhirClient
from connectors.fhir.server import MedplumServer
from schoolslink.constants import (
    EDUCATIONAL_ESTABLISHMENT_EXT,
    NHS_NUMBER_SYSTEM,
    NHS_NUMBER_VERIFICATION_EXT,
    PURPOSE_SUPPORT,
    SCHOOL_URN_SYSTEM,
)
from schoolslink.identifiers import make_test_nhs_number, make_upn

pytestmark = pytest.mark.slow
DAY = date(2026, 11, 26)
URN = "950900"
TRUSTS = {"RA1": ("attendance_percent",), "RB2": ("sen_provision", "year_group")}
KNOWN_TO = [("RA1",), ("RA1",), ("RB2",), ("RA1", "RB2")]


def _agreement(ods: str, items: tuple[str, ...]) -> dict[str, Any]:
    return {
        "id": f"routing-{ods}", "version": "1.0", "effective_from": "2026-09-01", "effective_to": "2027-08-31",
        "lawful_basis": {"article6": "UK GDPR Art. 6(1)(e)", "article9": "UK GDPR Art. 9(2)(h)"},
        "parties": {"trusts": [{"ods": ods, "name": f"Trust {ods}", "link_worker": {
            "name": f"Link {ods}", "email": f"link.{ods.lower()}@trust.example.nhs.uk"}}], "schools": {"urns": [URN]}},
        "purposes": [PURPOSE_SUPPORT], "consent": {"required": True},
        "directions": {"school_to_trust": {"items": list(items)}, "trust_to_school": {"items": ["referral_status"]}},
        "link_contacts": [{"school": "*", "name": "DSL", "email": "dsl@school.example.sch.uk"}],
    }


def _inputs(home: Path) -> tuple[list[str], dict[str, list[dict[str, Any]]]]:
    upns, pupils, rows = [], [], ["record_id,upn,given_by,decision,directions,purposes,valid_from,valid_to,"
                                  "withdrawn_on,competent,child_protection,do_not_tell_parent"]
    per_trust: dict[str, list[dict[str, Any]]] = {ods: [] for ods in TRUSTS}
    for i, known in enumerate(KNOWN_TO):
        upn, surname, dob = make_upn(999, 3900, i + 1), f"Routing{chr(65 + i)}", f"2012-0{i + 1}-1{i}"
        upns.append(upn)
        pupils.append(f"<Pupil><UPN>{upn}</UPN><Surname>{surname}</Surname><Forename>Pupil</Forename><DOB>{dob}"
                      f"</DOB><Sex>F</Sex><BasicDetails><NCyearActual>8</NCyearActual></BasicDetails><SENhistory>"
                      f"<SEN><StartDate>2025-09-01</StartDate><SENprovision>K</SENprovision></SEN></SENhistory>"
                      f"<Attendance><YearData><Year>2026</Year><SessionsPossible>200</SessionsPossible>"
                      f"<AttendanceSessions>190</AttendanceSessions></YearData></Attendance></Pupil>")
        rows.append(f"{i + 1},{upn},parent,permit,school_to_trust;trust_to_school,{PURPOSE_SUPPORT},2026-09-01,,,"
                    "false,false,false")
        for ods in known:
            pid = f"rt-{ods.lower()}-{i}"
            per_trust[ods] += [{
                "resourceType": "Patient", "id": pid,
                "extension": [{"url": EDUCATIONAL_ESTABLISHMENT_EXT,
                               "valueIdentifier": {"system": SCHOOL_URN_SYSTEM, "value": URN}}],
                "identifier": [{"system": NHS_NUMBER_SYSTEM, "value": make_test_nhs_number(7000 + i),
                                "extension": [{"url": NHS_NUMBER_VERIFICATION_EXT,
                                               "valueCodeableConcept": {"coding": [{"code": "01"}]}}]}],
                "name": [{"use": "official", "family": surname, "given": ["Pupil"]}], "birthDate": dob,
            }, {"resourceType": "ServiceRequest", "id": f"sr-{pid}", "status": "active", "intent": "order",
                "subject": {"reference": f"Patient/{pid}"}, "authoredOn": "2026-10-01"}]
    mis = home / "landing" / "mis" / URN
    mis.mkdir(parents=True)
    (mis / "export.xml").write_text(
        '<?xml version="1.0" encoding="UTF-8"?><CTfile><Header><DocumentName>Common Transfer File</DocumentName>'
        f"<CTFversion>25.0</CTFversion><DateTime>{DAY.isoformat()}T01:00:00</DateTime><DocumentQualifier>full"
        f"</DocumentQualifier><SourceSchool><LEA>999</LEA><Estab>3900</Estab><URN>{URN}</URN><SchoolName>Routing"
        f"</SchoolName></SourceSchool></Header><CTFpupilData>{''.join(pupils)}</CTFpupilData></CTfile>")
    (home / "landing" / "consent").mkdir(parents=True)
    (home / "landing" / "consent" / f"{URN}.csv").write_text("\n".join(rows) + "\n")
    (home / "agreements").mkdir()
    for ods, items in TRUSTS.items():
        (home / "agreements" / f"{ods}.yaml").write_text(json.dumps(_agreement(ods, items)))
    return upns, per_trust


def test_each_trust_gets_only_its_own_learners_under_its_own_agreement(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    upns, per_trust = _inputs(home)
    monkeypatch.setenv("SCHOOLSLINK_HOME", str(home))
    monkeypatch.setenv("SCHOOLSLINK_KEY", "routing-test")
    monkeypatch.setenv("SCHOOLSLINK_AGREEMENTS", str(home / "agreements"))
    monkeypatch.setenv("SCHOOLSLINK_DB_URL", f"sqlite:///{home / 'state.db'}")
    from schoolslink.feeds import build_school_feeds
    from schoolslink.pipeline import ingest, sync

    with MedplumServer(log_path=tmp_path / "a.log") as a, MedplumServer(log_path=tmp_path / "b.log") as b:
        servers = {"RA1": a, "RB2": b}
        for ods, server in servers.items():
            monkeypatch.setenv(f"SCHOOLSLINK_FHIR_BASE_{ods}", server.base_url)
            with FhirClient(server.base_url) as client:
                assert all(r.ok for r in client.put_batch(per_trust[ods]))
        at = datetime(2026, 11, 26, 2, tzinfo=UTC)
        assert sync.trusts_to_pull() == ["RA1", "RB2"]
        for ods in sync.trusts_to_pull():
            sync.pull_trust("r1", ods)
        sync.match_all("r1")
        [chunk] = ingest.plan("r1", 1)
        part = ingest.govern_map("r1", ingest.parse_validate("r1", chunk, DAY), DAY)
        ingest.deliver("r1", [part], DAY, at)
        build_school_feeds("r1", [URN], DAY, at)

        got: dict[str, dict[int, set[str]]] = {}
        for ods, server in servers.items():
            with FhirClient(server.base_url) as client:
                for o in client.all_resources("Observation"):
                    i = int(o["subject"]["reference"].rsplit("-", 1)[1])
                    got.setdefault(ods, {}).setdefault(i, set()).add(o["code"]["coding"][0]["code"])
                    assert o["subject"]["reference"].startswith(f"Patient/rt-{ods.lower()}-")  # its own patient
    assert got == {ods: {i: set(items) for i, known in enumerate(KNOWN_TO) if ods in known}
                   for ods, items in TRUSTS.items()}

    feed = json.loads((home / "out" / "feeds" / URN / DAY.isoformat() / "feed.json").read_text())
    seen = sorted((r["upn"], r["trust_ods"]) for r in feed["rows"])
    assert seen == sorted((upns[i], ods) for i, known in enumerate(KNOWN_TO) for ods in known)
    workers = {c["trust_ods"]: c["trust_link_worker_email"] for c in feed["link_contacts"]}
    assert workers == {ods: f"link.{ods.lower()}@trust.example.nhs.uk" for ods in TRUSTS}
