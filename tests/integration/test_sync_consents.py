"""Trust Consents through `pull_trust` against the real FHIR peer, on both state-store backends.

A Consent's current version replaces what we stored for it: one record per school it names; marked
entered-in-error or stripped of a school, the records it no longer yields are forgotten so nothing keeps
permitting. The peer is shared by the session, so every resource id here carries its own random prefix.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from sqlalchemy import Engine, select

from connectors.fhir.client import FhirClient
from connectors.fhir.server import MedplumServer
from schoolslink.constants import (
    EDUCATIONAL_ESTABLISHMENT_EXT,
    NHS_NUMBER_SYSTEM,
    NHS_NUMBER_VERIFICATION_EXT,
    PURPOSE_SYSTEM,
    SCHOOL_URN_SYSTEM,
)
from schoolslink.identifiers import make_test_nhs_number
from schoolslink.mapping import fhir_inbound as fin
from schoolslink.pipeline import sync
from schoolslink.store.schema import consents, quarantine, trust_referrals

TRUST = "R9X"  # the trust agreements/demo-partnership.yaml names


@pytest.fixture()
def prefix() -> str:
    return "sc" + uuid.uuid4().hex[:12]


@pytest.fixture()
def peer(medplum: MedplumServer, monkeypatch: pytest.MonkeyPatch) -> MedplumServer:
    monkeypatch.setenv(f"SCHOOLSLINK_FHIR_BASE_{TRUST}", medplum.base_url)
    return medplum


def patient(pid: str) -> dict[str, Any]:
    return {
        "resourceType": "Patient", "id": pid,
        "extension": [{"url": EDUCATIONAL_ESTABLISHMENT_EXT,
                       "valueIdentifier": {"system": SCHOOL_URN_SYSTEM, "value": "900001"}}],
        "identifier": [{"system": NHS_NUMBER_SYSTEM, "value": make_test_nhs_number(uuid.uuid4().int % 900_000),
                        "extension": [{"url": NHS_NUMBER_VERIFICATION_EXT,
                                       "valueCodeableConcept": {"coding": [{"code": "01"}]}}]}],
        "name": [{"use": "official", "family": "Testperson", "given": ["Sam"]}], "birthDate": "2012-05-06",
    }


def consent(cid: str, pid: str, *, status: str = "active", urns: tuple[str, ...] = ("900001",),
            kind: str = "permit", performer: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "resourceType": "Consent", "id": cid, "status": status,
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope",
                              "code": "patient-privacy"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": f"Patient/{pid}"},
        "dateTime": "2026-09-01T10:00:00Z",
        "performer": [performer or {"display": "parent"}],
        "policyRule": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                                   "code": "OPTOUT" if kind == "deny" else "OPTIN"}]},
        "provision": {
            "type": kind, "period": {"start": "2026-09-01"},
            "actor": [{"role": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                                            "code": "IRCP"}]},
                       "reference": {"identifier": {"system": SCHOOL_URN_SYSTEM, "value": u}}} for u in urns],
            "purpose": [{"system": PURPOSE_SYSTEM, "code": "cypmhs-school-support"}],
        },
    }


def put(peer: MedplumServer, *resources: dict[str, Any]) -> None:
    with FhirClient(peer.base_url, timeout=30) as c:
        results = c.put_batch(list(resources))
    assert all(r.ok for r in results), [r.message for r in results if not r.ok]


def stored(store: Engine, cid: str) -> dict[str, tuple[str | None, str, Any]]:
    """consent_id -> (school_urn, decision, withdrawn_on) for every record stored for Consent/<cid>."""
    with store.connect() as conn:
        rows = conn.execute(select(consents.c.consent_id, consents.c.school_urn, consents.c.decision,
                                   consents.c.withdrawn_on)
                            .where(consents.c.consent_id.startswith(f"fhir:{TRUST}:Consent/{cid}:"))).all()
    return {r.consent_id: (r.school_urn, r.decision, r.withdrawn_on) for r in rows}


def test_entered_in_error_consent_stops_permitting(peer: MedplumServer, store: Engine, prefix: str) -> None:
    pid, cid = f"{prefix}-p", f"{prefix}-c"
    put(peer, patient(pid), consent(cid, pid))
    sync.pull_trust("run-1", TRUST)
    assert stored(store, cid) == {f"fhir:{TRUST}:Consent/{cid}:900001": ("900001", "permit", None)}

    put(peer, consent(cid, pid, status="entered-in-error"))
    counts = sync.pull_trust("run-2", TRUST)
    assert stored(store, cid) == {}
    assert counts["consents_forgotten"] >= 1


def test_one_record_per_school_and_a_removed_school_is_forgotten(peer: MedplumServer, store: Engine,
                                                                 prefix: str) -> None:
    pid, cid = f"{prefix}-p", f"{prefix}-c"
    put(peer, patient(pid), consent(cid, pid, urns=("900001", "900002")))
    sync.pull_trust("run-1", TRUST)
    assert {v[0] for v in stored(store, cid).values()} == {"900001", "900002"}

    put(peer, consent(cid, pid, urns=("900002",)))
    sync.pull_trust("run-2", TRUST)
    assert stored(store, cid) == {f"fhir:{TRUST}:Consent/{cid}:900002": ("900002", "permit", None)}

    put(peer, consent(cid, pid, urns=("900002",), status="inactive"))
    sync.pull_trust("run-3", TRUST)
    [(urn, decision, withdrawn)] = stored(store, cid).values()
    assert urn == "900002" and decision == "permit" and withdrawn is not None  # the day it became inactive


def test_an_unreadable_version_drops_permits_and_keeps_refusals(peer: MedplumServer, store: Engine,
                                                                prefix: str) -> None:
    pid, permit, deny = f"{prefix}-p", f"{prefix}-permit", f"{prefix}-deny"
    put(peer, patient(pid), consent(permit, pid),
        consent(deny, pid, kind="deny", performer={"reference": f"Patient/{pid}"}))
    sync.pull_trust("run-1", TRUST)
    assert [v[1] for v in stored(store, deny).values()] == ["deny"] and len(stored(store, permit)) == 1

    who_knows = {"display": "Dr A Clinician"}  # a person's name: cannot tell who gave it
    put(peer, consent(permit, pid, performer=who_knows), consent(deny, pid, kind="deny", performer=who_knows))
    sync.pull_trust("run-2", TRUST)
    assert stored(store, permit) == {}  # fail closed: no permit from a version we cannot read
    assert [v[1] for v in stored(store, deny).values()] == ["deny"]  # ...and the refusal still stands
    with store.connect() as conn:
        q = conn.execute(select(quarantine.c.record, quarantine.c.field, quarantine.c.reason)
                         .where(quarantine.c.run_id == "run-2", quarantine.c.record.like(f"Consent/{prefix}%"))).all()
    assert {(r.record, r.field) for r in q} == {(f"Consent/{permit}", "performer"), (f"Consent/{deny}", "performer")}
    assert not any("Clinician" in r.reason for r in q)


def test_one_type_failing_does_not_stop_the_others(peer: MedplumServer, store: Engine, prefix: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    pid, cid = f"{prefix}-p", f"{prefix}-c"
    sr = {"resourceType": "ServiceRequest", "id": f"{prefix}-sr", "status": "active", "intent": "order",
          "subject": {"reference": f"Patient/{pid}"}, "authoredOn": "2026-09-01"}
    put(peer, patient(pid), sr, consent(cid, pid))

    def broken(res: dict[str, Any]) -> dict[str, Any]:
        raise RuntimeError("a reader bug, with a value 9990000018 in its message")

    monkeypatch.setitem(fin.READERS, "ServiceRequest", broken)
    counts = sync.pull_trust("run-1", TRUST)  # each bad ServiceRequest is quarantined; the pull goes on
    assert counts["pulled_quarantined"] >= 1 and counts["pulled_Consent"] >= 1
    assert len(stored(store, cid)) == 1
    with store.connect() as conn:
        reasons = conn.execute(select(quarantine.c.reason).where(
            quarantine.c.run_id == "run-1", quarantine.c.record == f"ServiceRequest/{prefix}-sr")).scalars().all()
        assert reasons == ["ServiceRequest could not be read (RuntimeError)"]
        assert conn.execute(select(trust_referrals.c.referral_ref)
                            .where(trust_referrals.c.referral_ref == f"ServiceRequest/{prefix}-sr")).all() == []

    # A whole type failing (here: its store write) keeps its watermark, lets the others finish, then raises
    # with no value in the message.
    monkeypatch.setitem(fin.READERS, "ServiceRequest", fin.service_request)
    put(peer, {**sr, "authoredOn": "2026-09-02"}, consent(cid, pid, urns=("900003",)))
    real_store = sync._store

    def store_fails_for_referrals(conn: Any, run_id: str, trust: str, rtype: str, batch: Any, counts: Any) -> None:
        if rtype == "ServiceRequest":
            raise RuntimeError("database said: value 9990000018 too long")
        real_store(conn, run_id, trust, rtype, batch, counts)

    monkeypatch.setattr(sync, "_store", store_fails_for_referrals)
    with pytest.raises(Exception, match="ServiceRequest: RuntimeError") as exc:
        sync.pull_trust("run-2", TRUST)
    assert "9990000018" not in str(exc.value) and exc.value.__cause__ is None
    assert [v[0] for v in stored(store, cid).values()] == ["900003"]  # Consents pulled after the failure

    monkeypatch.setattr(sync, "_store", real_store)
    sync.pull_trust("run-3", TRUST)  # the watermark stayed: the referral is read now
    with store.connect() as conn:
        assert conn.execute(select(trust_referrals.c.referral_ref)
                            .where(trust_referrals.c.referral_ref == f"ServiceRequest/{prefix}-sr")).all()
