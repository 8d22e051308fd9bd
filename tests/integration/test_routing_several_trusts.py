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


def test_a_pupil_who_moves_school_is_announced_to_the_trust_that_knew_them_with_the_new_area(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Night 1 learner 0 is at school 950900 and linked to trust RA1. Night 2 they are on school 950901's roll:
    RA1 gets one move notice (a Communication we own) saying the new school is in RB2's area, by the
    postcode-district table; the notice never names the new school; night 3 it is not sent again."""
    home = tmp_path / "home"
    upns, per_trust = _inputs(home)
    new_urn = "950901"
    agreement = _agreement("RA1", TRUSTS["RA1"])
    agreement["parties"]["schools"]["urns"] = [URN, new_urn]
    agreement["notices"] = {"move": True}
    (home / "agreements" / "RA1.yaml").write_text(json.dumps(agreement))
    (home / "agreements" / "routing").mkdir()
    (home / "agreements" / "routing" / "postcode-districts.yaml").write_text(
        f'schools: {{"{URN}": ZZ1, "{new_urn}": ZZ4}}\ndistricts: {{ZZ1: RA1, ZZ4: RB2}}\n')
    for k, v in {"SCHOOLSLINK_HOME": str(home), "SCHOOLSLINK_KEY": "routing-test",
                 "SCHOOLSLINK_AGREEMENTS": str(home / "agreements"),
                 "SCHOOLSLINK_DB_URL": f"sqlite:///{home / 'state.db'}"}.items():
        monkeypatch.setenv(k, v)
    from schoolslink.pipeline import ingest, sync

    export = (home / "landing" / "mis" / URN / "export.xml").read_text()
    with MedplumServer(log_path=tmp_path / "a.log") as a:
        monkeypatch.setenv("SCHOOLSLINK_FHIR_BASE_RA1", a.base_url)
        with FhirClient(a.base_url) as client:
            assert all(r.ok for r in client.put_batch(per_trust["RA1"]))

        def night(n: int, day: date) -> dict[str, Any]:
            sync.pull_trust(f"r{n}", "RA1")
            sync.match_all(f"r{n}")
            parts = [ingest.govern_map(f"r{n}", ingest.parse_validate(f"r{n}", c, day), day)
                     for c in ingest.plan(f"r{n}", 1)]
            return ingest.deliver(f"r{n}", parts, day, datetime.combine(day, datetime.min.time(), tzinfo=UTC))

        night(1, DAY)
        # Learner 0 leaves 950900 (its next full export no longer lists them) and is on 950901's roll.
        first = export.index("<Pupil>")
        second = export.index("<Pupil>", first + 1)
        (home / "landing" / "mis" / URN / "export2.xml").write_text(export[:first] + export[second:])
        moved = export.replace(f"<URN>{URN}</URN>", f"<URN>{new_urn}</URN>").replace("<Estab>3900</Estab>",
                                                                                      "<Estab>3901</Estab>")
        (home / "landing" / "mis" / new_urn).mkdir(parents=True)
        (home / "landing" / "mis" / new_urn / "export.xml").write_text(
            moved[:moved.index("<CTFpupilData>") + len("<CTFpupilData>")] + export[first:second]
            + "</CTFpupilData></CTfile>")
        day2 = date(2026, 11, 27)
        counts = night(2, day2)
        assert counts.get("move_notices_sent") == 1
        with FhirClient(a.base_url) as client:
            notices = client.all_resources("Communication")
        assert len(notices) == 1
        [n] = notices
        assert n["subject"]["reference"] == "Patient/rt-ra1-0" and n["category"][0]["coding"][0]["code"] == \
            "moved-school"
        assert n["about"][0]["identifier"]["value"] == "RB2" and "RB2" in n["payload"][0]["contentString"]
        assert new_urn not in json.dumps(n) and upns[0] not in json.dumps(n)
        assert night(3, date(2026, 11, 28)).get("move_notices_sent", 0) == 0
