"""Trust FHIR resources -> state-store rows: Patients reduced to pseudonyms, bad resources refused with a field."""

from __future__ import annotations

from datetime import date

import pytest

from schoolslink.constants import (
    CLOSURE_REASON_EXT,
    EDUCATIONAL_ESTABLISHMENT_EXT,
    MHSDS_CLOSURE_REASON_SYSTEM,
    NHS_NUMBER_SYSTEM,
    NHS_NUMBER_VERIFICATION_EXT,
    OUR_META_SOURCE,
    PURPOSE_SYSTEM,
    SCHOOL_URN_SYSTEM,
)
from schoolslink.governance import register
from schoolslink.keys import match_hash, patient_key
from schoolslink.mapping import fhir_inbound as fin
from schoolslink.model import Consent, ConsentDecision, ConsentGiver, Direction


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCHOOLSLINK_KEY", "unit")


def patient(nhs: str = "9990000018", status: str = "01", **extra: object) -> dict[str, object]:
    return {
        "resourceType": "Patient", "id": "p1",
        "identifier": [{"system": NHS_NUMBER_SYSTEM, "value": nhs, "extension": [{
            "url": NHS_NUMBER_VERIFICATION_EXT, "valueCodeableConcept": {"coding": [{"code": status}]}}]}],
        "extension": [{"url": EDUCATIONAL_ESTABLISHMENT_EXT,
                       "valueIdentifier": {"system": SCHOOL_URN_SYSTEM, "value": "900001"}}],
        "name": [{"use": "official", "family": "Ashby", "given": ["Tomasz"]}], "birthDate": "2013-04-01",
        **extra,
    }


def test_patient_becomes_pseudonyms_only() -> None:
    row = fin.canonical("Patient", patient())
    assert row == {"patient_ref": "Patient/p1", "patient_key": patient_key("9990000018"), "school_urn": "900001",
                   "match_hash": match_hash("900001", "Ashby", "Tomasz", "2013-04-01"), "verified": True,
                   "restricted": False, "version_id": None}
    assert "9990000018" not in repr(row) and "Ashby" not in repr(row)


def test_unverified_and_restricted_patients_are_marked() -> None:
    assert fin.canonical("Patient", patient(status="02"))["verified"] is False  # type: ignore[index]
    restricted = patient(meta={"security": [{"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality",
                                             "code": "R"}]})
    assert fin.canonical("Patient", restricted)["restricted"] is True  # type: ignore[index]


def test_bad_nhs_number_is_refused_without_its_value() -> None:
    with pytest.raises(fin.InboundError) as exc:
        fin.canonical("Patient", patient(nhs="9990000019"))
    assert exc.value.field == "identifier" and "9990000019" not in str(exc.value)


def test_malformed_resources_are_refused_with_a_reason() -> None:
    with pytest.raises(fin.InboundError, match="no Patient subject"):
        fin.canonical("ServiceRequest", {"resourceType": "ServiceRequest", "id": "s", "subject": "Patient/1"})
    with pytest.raises(fin.InboundError, match="not a date"):
        fin.canonical("ServiceRequest", {"resourceType": "ServiceRequest", "id": "s",
                                         "subject": {"reference": "Patient/1"}, "authoredOn": "last week"})
    with pytest.raises(fin.InboundError, match="no id"):
        fin.canonical("Patient", {"resourceType": "Patient"})


def test_moved_area_is_closure_reason_03() -> None:
    sr = {"resourceType": "ServiceRequest", "id": "s", "status": "completed", "subject": {"reference": "Patient/1"},
          "extension": [{"url": CLOSURE_REASON_EXT, "valueCodeableConcept": {"coding": [
              {"system": MHSDS_CLOSURE_REASON_SYSTEM, "code": "03"}]}}]}
    row = fin.canonical("ServiceRequest", sr)
    assert row is not None and row["moved_area"] and row["closure_reason"] == "03"


def test_our_own_writes_are_recognised() -> None:
    assert fin.is_ours({"meta": {"source": OUR_META_SOURCE}})
    assert not fin.is_ours({"meta": {"source": "https://trust.example/epr"}})


# Consent ------------------------------------------------------------------------------------------------------


def consent(rid: str = "c1", status: str = "active", performer: list[dict[str, object]] | None = None,
            urns: tuple[str, ...] = ("900001",), kind: str = "permit", **extra: object) -> dict[str, object]:
    return {
        "resourceType": "Consent", "id": rid, "status": status, "patient": {"reference": "Patient/p1"},
        "dateTime": "2026-09-01T10:00:00+01:00",
        "performer": [{"reference": "RelatedPerson/rp1", "display": "Jo Bloggs"}] if performer is None else performer,
        "provision": {
            "type": kind, "period": {"start": "2026-09-02"},
            "actor": [{"reference": {"identifier": {"system": SCHOOL_URN_SYSTEM, "value": u}}} for u in urns],
            "purpose": [{"system": PURPOSE_SYSTEM, "code": "cypmhs-school-support"}],
        },
        **extra,
    }


KEYS = {"Patient/p1": "pat-key"}


def records(res: dict[str, object]) -> list[Consent]:
    row = fin.canonical("Consent", res)
    return fin.consent_records(row, KEYS, "R9X") if row is not None else []


@pytest.mark.parametrize(("performer", "giver"), [
    ({"reference": "Patient/p1", "display": "Alex Smith"}, ConsentGiver.YOUNG_PERSON),
    ({"reference": "https://trust.example/fhir/Patient/p1/_history/3"}, ConsentGiver.YOUNG_PERSON),
    ({"reference": "RelatedPerson/rp1", "display": "Young Person"}, ConsentGiver.PARENT),
    ({"type": "RelatedPerson", "identifier": {"value": "x"}}, ConsentGiver.PARENT),
    ({"reference": "Organization/la999", "display": "Anyshire County Council"}, ConsentGiver.LOCAL_AUTHORITY),
    ({"display": "young_person"}, ConsentGiver.YOUNG_PERSON),
    ({"display": "parent"}, ConsentGiver.PARENT),
    ({"display": "local_authority"}, ConsentGiver.LOCAL_AUTHORITY),
    ({"reference": "Practitioner/dr1", "display": "parent"}, ConsentGiver.PARENT),
])
def test_who_gave_a_consent_comes_from_the_performer_reference_type(performer: dict[str, object],
                                                                   giver: ConsentGiver) -> None:
    [c] = records(consent(performer=[performer]))
    assert c.given_by is giver


@pytest.mark.parametrize("performers", [
    [{"display": "Sam Smith"}],  # a person's name: not a category
    [{"display": "Parent"}],  # not exactly a category
    [{"reference": "Practitioner/dr1", "display": "Dr Who"}],
    [],
    [{"reference": "Patient/p1"}, {"reference": "RelatedPerson/rp1"}],  # the young person and a parent
    [{"reference": "Patient/someone-else"}],
])
def test_a_consent_whose_giver_cannot_be_told_is_refused_never_defaulted(performers: list[dict[str, object]]) -> None:
    res = consent(performer=performers)
    with pytest.raises(fin.InboundError) as exc:
        fin.canonical("Consent", res)
    assert exc.value.field == "performer" and "cannot tell who gave this consent" in str(exc.value)
    assert "Sam Smith" not in str(exc.value) and "someone-else" not in str(exc.value)


def test_one_record_per_school_named_each_scoped_to_that_school() -> None:
    recs = records(consent(urns=("900001", "900002", "900001")))
    assert [(c.consent_id, c.school_urn) for c in recs] == [
        ("fhir:R9X:Consent/c1:900001", "900001"), ("fhir:R9X:Consent/c1:900002", "900002")]
    assert all(c.subject_key == "pat-key" and c.decision is ConsentDecision.PERMIT for c in recs)
    assert all(c.directions == (Direction.TRUST_TO_SCHOOL,) and c.valid_from == date(2026, 9, 2) for c in recs)
    assert register.for_school(recs, "900002") == [recs[1]] and register.for_school(recs, "900003") == []
    assert fin.consent_id("R9X", "Consent/c1", "900001") == "fhir:R9X:Consent/c1:900001"


@pytest.mark.parametrize("status", ["entered-in-error", "draft", "proposed", "unknown-status"])
def test_a_consent_that_is_no_decision_yields_nothing(status: str) -> None:
    assert fin.canonical("Consent", consent(status=status)) is None
    # ...even when its performer would not be readable: it is retracted, not quarantined
    assert fin.canonical("Consent", consent(status=status, performer=[{"display": "Sam"}])) is None


def test_a_consent_whose_school_was_removed_yields_nothing() -> None:
    assert fin.canonical("Consent", consent(urns=())) is None


def test_an_inactive_consent_is_withdrawn_when_it_became_inactive() -> None:
    [c] = records(consent(status="inactive", meta={"lastUpdated": "2026-11-03T09:00:00.000Z"}))
    assert c.withdrawn_on == date(2026, 11, 3) and c.decision is ConsentDecision.PERMIT
    no_meta = consent(status="inactive")
    [c] = records(no_meta)
    assert c.withdrawn_on == date(2026, 9, 1)  # dateTime
    del no_meta["dateTime"]
    [c] = records(no_meta)
    assert c.withdrawn_on == date(2026, 9, 2)  # valid_from
    [c] = records(consent(status="active", meta={"lastUpdated": "2026-11-03T09:00:00.000Z"}))
    assert c.withdrawn_on is None


def test_rejected_or_deny_is_a_refusal_and_odd_provisions_are_refused() -> None:
    assert records(consent(kind="deny"))[0].decision is ConsentDecision.DENY
    assert records(consent(status="rejected"))[0].decision is ConsentDecision.DENY
    with pytest.raises(fin.InboundError) as exc:
        fin.canonical("Consent", consent(kind="maybe"))
    assert exc.value.field == "provision.type"
    with pytest.raises(fin.InboundError) as exc:
        fin.canonical("Consent", consent(urns=("9000011234567",)))
    assert exc.value.field == "provision.actor"


def test_a_consent_for_a_patient_not_held_here_yields_no_record() -> None:
    row = fin.canonical("Consent", consent())
    assert row is not None and fin.consent_records(row, {}, "R9X") == []
