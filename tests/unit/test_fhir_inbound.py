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
from schoolslink.keys import match_hash, match_keys, patient_key
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
                   "restricted": False, "version_id": None,
                   "match_keys": match_keys("900001", surname="Ashby", forename="Tomasz", dob="2013-04-01")}
    assert "9990000018" not in repr(row) and "Ashby" not in repr(row) and "2013" not in repr(row)


def test_unverified_and_restricted_patients_are_marked() -> None:
    assert fin.canonical("Patient", patient(status="02"))["verified"] is False  # type: ignore[index]
    restricted = patient(meta={"security": [{"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality",
                                             "code": "R"}]})
    assert fin.canonical("Patient", restricted)["restricted"] is True  # type: ignore[index]
    very = patient(meta={"security": [{"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality",
                                       "code": "V"}]})
    assert fin.canonical("Patient", very)["restricted"] is True  # type: ignore[index]  (very restricted)
    normal = patient(meta={"security": [{"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality",
                                         "code": "N"}]})
    assert fin.canonical("Patient", normal)["restricted"] is False  # type: ignore[index]


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


# The declarative readers (mappings/fhir-in) ------------------------------------------------------------------


def test_each_type_is_read_by_its_mapping_with_golden_tests_beside_it() -> None:
    from schoolslink.mapping.engine import MAPPINGS_DIR, load_mappings
    from schoolslink.mapping.goldens import run_goldens

    ms = load_mappings(MAPPINGS_DIR / "fhir-in")
    assert {spec[0] for spec in fin.MAPPINGS.values()} == set(ms.mappings)
    results = run_goldens(ms)
    assert results and all(r.ok for r in results), [r.message for r in results if not r.ok]
    # The readers keep their public names (tools and tests call them directly).
    assert fin.READERS == {"Patient": fin.patient, "ServiceRequest": fin.service_request,
                           "EpisodeOfCare": fin.episode_of_care, "Appointment": fin.appointment,
                           "PractitionerRole": fin.practitioner_role, "Consent": fin.consent}


def test_the_mappings_name_the_systems_and_extensions_the_pipeline_uses() -> None:
    from schoolslink import constants as c
    from schoolslink.mapping.engine import MAPPINGS_DIR

    text = {p.stem: p.read_text() for p in (MAPPINGS_DIR / "fhir-in").glob("*.yaml") if ".tests" not in p.name}
    uses = {
        "fhir-patient-match": [c.NHS_NUMBER_SYSTEM, c.NHS_NUMBER_VERIFICATION_EXT, c.EDUCATIONAL_ESTABLISHMENT_EXT,
                               c.SCHOOL_URN_SYSTEM],
        "fhir-service-request-referral": [c.TEAM_TYPE_EXT, c.REJECTION_REASON_EXT, c.CLOSURE_REASON_EXT,
                                          c.TRANSITION_EXT, f'"{c.CLOSURE_MOVED_AREA}"'],
        "fhir-consent": [c.SCHOOL_URN_SYSTEM, c.PURPOSE_SYSTEM],
    }
    for mapping, values in uses.items():
        for v in values:
            assert v in text[mapping], (mapping, v)


@pytest.mark.parametrize("status", ["active", "inactive", "rejected", "draft", "proposed", "entered-in-error", ""])
def test_the_consent_mapping_yields_a_row_for_exactly_the_statuses_used(status: str) -> None:
    row = fin.canonical("Consent", consent(status=status))
    assert (row is not None) is (status in fin.CONSENT_STATUSES_USED)


def test_rows_have_every_column_and_dates_as_dates() -> None:
    sr = {"resourceType": "ServiceRequest", "id": "s", "subject": {"reference": "Patient/1"},
          "authoredOn": "2026-09-01T10:00:00+01:00"}
    row = fin.canonical("ServiceRequest", sr)
    assert row == {"referral_ref": "ServiceRequest/s", "patient_ref": "Patient/1", "fhir_status": "unknown",
                   "received": date(2026, 9, 1), "team_type": None, "rejection_reason": None, "closure_reason": None,
                   "transition": False, "moved_area": False, "performer_ref": None, "version_id": None}
    assert list(row) == list(fin.MAPPINGS["ServiceRequest"][1])
    eoc = {"resourceType": "EpisodeOfCare", "id": "e", "status": "finished", "referralRequest": [{"reference": "x"}],
           "period": {"start": "2026-09-01", "end": "2026-10-01T09:00:00Z"}}
    assert fin.canonical("EpisodeOfCare", eoc) == {
        "episode_ref": "EpisodeOfCare/e", "referral_ref": "x", "fhir_status": "finished", "start": date(2026, 9, 1),
        "end": date(2026, 10, 1), "care_manager_ref": None}
    row = fin.canonical("Consent", consent(provision={"type": "permit", "actor": [
        {"reference": {"identifier": {"system": SCHOOL_URN_SYSTEM, "value": "900001"}}}]}))
    assert row is not None and row["purposes"] == [] and row["valid_from"] == date(2026, 9, 1)


@pytest.mark.parametrize(("rtype", "res", "field"), [
    ("Patient", patient(birthDate="2013-02-30"), "birthDate"),
    ("Patient", patient(nhs=""), "identifier"),
    ("EpisodeOfCare", {"resourceType": "EpisodeOfCare", "id": "e", "referralRequest": [{"reference": "x"}],
                       "period": {"end": "9990000018"}}, "period.end"),
    ("Appointment", {"resourceType": "Appointment", "id": "a", "basedOn": [{"reference": "ServiceRequest/1"}],
                     "start": "9990000018"}, "start"),
    ("Consent", consent(provision={"type": "permit", "period": {"start": "2026-13-01"}, "actor": [
        {"reference": {"identifier": {"system": SCHOOL_URN_SYSTEM, "value": "900001"}}}]}), "provision.period.start"),
    ("Consent", consent(patient={"reference": "Group/9990000018"}), "patient"),
])
def test_a_field_the_mapping_cannot_read_is_named_never_its_value(rtype: str, res: dict[str, object],
                                                                  field: str) -> None:
    with pytest.raises(fin.InboundError) as exc:
        fin.canonical(rtype, res)
    assert exc.value.field == field and "9990000018" not in str(exc.value) and "2013-02-30" not in str(exc.value)


def test_an_episode_or_appointment_with_no_referral_is_not_read_even_with_a_bad_date() -> None:
    assert fin.canonical("EpisodeOfCare", {"resourceType": "EpisodeOfCare", "id": "e",
                                           "period": {"start": "x"}}) is None
    assert fin.canonical("Appointment", {"resourceType": "Appointment", "id": "a", "start": "x",
                                         "basedOn": [{"reference": "CarePlan/1"}]}) is None


# Fail closed on resources not shaped as R4 says (the mappings read a wrongly-typed element as absent) ----------


@pytest.mark.parametrize("meta", [{"security": {"code": "R"}}, {"security": ["R"]}, ["R"], "R"])
def test_a_patient_whose_security_labels_cannot_be_read_is_refused_not_taken_as_unrestricted(meta: object) -> None:
    with pytest.raises(fin.InboundError) as exc:
        fin.canonical("Patient", patient(meta=meta))
    assert exc.value.field == "meta.security"


@pytest.mark.parametrize("provision", [
    ["permit"],
    {"type": "deny", "actor": {"reference": {"identifier": {"system": SCHOOL_URN_SYSTEM, "value": "900001"}}}},
    {"type": "deny", "actor": ["900001"]},
    {"type": "deny", "actor": [{"reference": "Organization/school"}]},
])
def test_a_consent_whose_schools_cannot_be_read_is_refused_so_its_stored_refusals_stay(provision: object) -> None:
    # Read as absent, these would make a refusal "no decision" and forget it: refused instead (sync keeps refusals
    # of a Consent it cannot read).
    with pytest.raises(fin.InboundError) as exc:
        fin.canonical("Consent", consent(status="rejected", provision=provision))
    assert exc.value.field == "structure"


@pytest.mark.parametrize("provision", [
    {"type": "deny", "period": ["2026-09-02"], "actor": [
        {"reference": {"identifier": {"system": SCHOOL_URN_SYSTEM, "value": "900001"}}}]},
    {"type": "deny", "purpose": {"system": PURPOSE_SYSTEM, "code": "cypmhs-school-support"}, "actor": [
        {"reference": {"identifier": {"system": SCHOOL_URN_SYSTEM, "value": "900001"}}}]},
])
def test_a_consent_whose_period_or_purposes_cannot_be_read_is_refused(provision: object) -> None:
    with pytest.raises(fin.InboundError) as exc:
        fin.canonical("Consent", consent(provision=provision))
    assert exc.value.field == "structure"
    # ...but a Consent that is no decision is still no decision (forgotten), whatever its period.
    assert fin.canonical("Consent", consent(status="draft", provision=provision)) is None


@pytest.mark.parametrize(("rtype", "res"), [
    ("ServiceRequest", {"resourceType": "ServiceRequest", "id": "s", "subject": {"reference": "Patient/1"},
                        "status": {"code": "active"}}),
    ("ServiceRequest", {"resourceType": "ServiceRequest", "id": "s", "subject": {"reference": "Patient/1"},
                        "performer": [{"reference": ["PractitionerRole/1"]}]}),
    ("Patient", patient(extension=[{"url": EDUCATIONAL_ESTABLISHMENT_EXT,
                                    "valueIdentifier": {"system": SCHOOL_URN_SYSTEM, "value": ["900001"]}}])),
    ("PractitionerRole", {"resourceType": "PractitionerRole", "id": "r", "practitioner": {"display": 7}}),
])
def test_an_object_or_number_where_r4_has_text_is_refused_never_stored(rtype: str, res: dict[str, object]) -> None:
    with pytest.raises(fin.InboundError) as exc:
        fin.canonical(rtype, res)
    assert exc.value.field == "structure" and str(exc.value) == f"{rtype} is not shaped as UK Core R4 expects"


def test_the_fhir_functions_are_the_ones_registered_and_cannot_be_registered_twice() -> None:
    from schoolslink.mapping import functions, functions_fhir

    names = ["fhir_date", "fhir_ref", "fhir_required", "fhir_reference", "fhir_reference_tail", "fhir_first_reference",
             "fhir_one_of", "patient_key", "match_hash", "is_restricted", "fhir_school_urns", "consent_giver"]
    for name in names:  # nothing imported later (functions_mis, ...) has replaced one
        assert functions.REGISTRY[name].fn is getattr(functions_fhir, name), name
    with pytest.raises(RuntimeError, match="registered twice"):
        functions_fhir._register("fhir_date", 1)
