"""Trust FHIR resources -> state-store rows: Patients reduced to pseudonyms, bad resources refused with a field."""

from __future__ import annotations

import pytest

from schoolslink.constants import (
    CLOSURE_REASON_EXT,
    EDUCATIONAL_ESTABLISHMENT_EXT,
    MHSDS_CLOSURE_REASON_SYSTEM,
    NHS_NUMBER_SYSTEM,
    NHS_NUMBER_VERIFICATION_EXT,
    OUR_META_SOURCE,
    SCHOOL_URN_SYSTEM,
)
from schoolslink.keys import match_hash, patient_key
from schoolslink.mapping import fhir_inbound as fin


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
