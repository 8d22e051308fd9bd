"""The full parse of stored HL7v2 messages (connectors/hl7v2/parse.py) and what each becomes (hl7_apply.read).

Synthetic messages only: 999-range NHS numbers with valid check digits, invented names. The message builders here
are also used by tests/integration/test_hl7_apply.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from connectors.hl7v2.parse import Hl7Refused, parse
from schoolslink import logfilter
from schoolslink.pipeline import hl7_apply
from schoolslink.pipeline.hl7_apply import MERGE, PATIENT, REFERRAL, read
from tests.paths import REPO

TRUST = "R9X"
TRUSTS = frozenset({TRUST})
NHS = "9990000018"
NHS_2 = "9990000026"
GOLDENS = REPO / "mappings" / "hl7v2-in"


# Building messages ---------------------------------------------------------------------------------------------


def seg(seg_id: str, **fields: str) -> str:
    """A segment from its fields by number (`f3="..."`); the ones not given are empty."""
    last = max((int(k[1:]) for k in fields), default=0)
    return "|".join([seg_id, *(fields.get(f"f{i}", "") for i in range(1, last + 1))])


def msh(message_type: str, control_id: str = "MSG0001", version: str = "2.4", facility: str = TRUST) -> str:
    return (f"MSH|^~\\&|RIO|{facility}|SCHOOLSLINK|SL|20261120093000||{message_type}|{control_id}|P|{version}"
            f"|||AL|NE|GBR")


def pid(nhs: str | None = NHS, mrn: str = "RX4000123", *, name: str = "ASHBY^TOMASZ^JAN^^^^L",
        dob: str = "20130401", sex: str = "M", status: str = "NSTS01", nhs_form: str = "^^^NHS^NH",
        address: str = "1 High Street^^Leeds^^LS1 6AE^^H") -> str:
    ids = "~".join(x for x in (f"{nhs}{nhs_form}" if nhs else "", f"{mrn}^^^{TRUST}^MR") if x)
    return seg("PID", f1="1", f3=ids, f5=name, f7=dob, f8=sex, f11=address, f32=status)


def message(*segments: str) -> bytes:
    return "\r".join(segments).encode()


def adt(event: str = "A08", *extra: str, control_id: str = "MSG0001", version: str = "2.4", facility: str = TRUST,
        **pid_args: Any) -> bytes:
    structure = {"A40": "ADT_A39", "A28": "ADT_A05", "A31": "ADT_A05"}.get(event, "ADT_A01")
    return message(msh(f"ADT^{event}^{structure}", control_id, version, facility),
                   seg("EVN", f1=event, f2="20261120093000"),
                   pid(**pid_args), *extra)


def ref(event: str = "I12", *, status: str = "A", referral_id: str = "REF0001", effective: str = "20261008",
        control_id: str = "MSG0201", team: str = "D06", nhs: str | None = NHS, mrn: str = "RX4000123") -> bytes:
    rf1 = seg("RF1", f1=status, f2="R", f3=team, f6=referral_id, f7=effective)
    return message(msh(f"REF^{event}^REF_I12", control_id), rf1, pid(nhs=nhs, mrn=mrn))


def merge(prior: str = "RX4000999", control_id: str = "MSG0101", **pid_args: Any) -> bytes:
    return adt("A40", seg("MRG", f1=f"{prior}^^^{TRUST}^MR"), control_id=control_id, **pid_args)


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SCHOOLSLINK_KEY", "test-key-not-secret")
    monkeypatch.setenv("SCHOOLSLINK_HOME", str(tmp_path / "home"))


def with_school(body: bytes) -> dict[str, Any]:
    """The patient mapping's output with a school named (read() names none: HL7v2 carries no school)."""
    return hl7_apply._map(PATIENT, parse(body).segments, school_urn="900001")


# Parsing each supported type -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("body", "message_type", "kind"), [
    *((adt(e), f"ADT^{e}", PATIENT) for e in ("A01", "A03", "A04", "A08", "A28", "A31")),
    (merge(), "ADT^A40", MERGE),
    *((ref(e), f"REF^{e}", REFERRAL) for e in ("I12", "I13", "I14")),
])
def test_each_supported_type_parses_and_reads(body: bytes, message_type: str, kind: str) -> None:
    parsed = parse(body)
    assert (parsed.message_type, parsed.version) == (message_type, "2.4")
    event = read(body, TRUSTS)
    assert (event.kind, event.message_type, event.trust_ods) == (kind, message_type, TRUST)
    if kind == REFERRAL:
        assert event.referral is not None and event.patient is None
        assert event.referral["patient_ref"] == "Patient/hl7:RX4000123"
    else:
        assert event.patient is not None and event.referral is None
        assert event.patient["patient_ref"] == "Patient/hl7:RX4000123"
        assert event.patient["patient_key"].startswith("pat-")
    assert (event.prior_ref == "Patient/hl7:RX4000999") is (kind == MERGE)


@pytest.mark.parametrize("version", ["2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6"])
def test_every_nhs_version_parses_to_the_same_view(version: str) -> None:
    parsed = parse(adt("A08", version=version))
    assert parsed.version == version
    assert parsed.segments["PID"] == parse(adt("A08")).segments["PID"]
    # PID-32 lies past what v2.3 defines: read by position all the same
    assert parsed.segments["PID"][0]["f32"] == [{"c1": "NSTS01"}]


def test_the_view_is_what_the_golden_tests_give() -> None:
    """The `given` views in mappings/hl7v2-in/*.tests.yaml are what parse.py makes of real messages."""
    cases = {c["name"]: c["given"] for f in ("hl7v2-adt-patient", "hl7v2-ref-referral", "hl7v2-adt-merge")
             for c in yaml.safe_load((GOLDENS / f"{f}.tests.yaml").read_text())["tests"]}
    sent = {
        "A08, v2.4 NHS style": message(
            msh("ADT^A08^ADT_A01"),
            seg("PID", f1="1", f3=f"{NHS}^^^NHS^NH~RX4000123^^^R9X^MR", f5="ASHBY^TOMASZ^JAN^^^^L", f7="20130401",
                f8="M", f11="1 High Street^^Leeds^^ls1 6ae^^H", f32="NSTS01"),
            seg("PD1", f3="High Street Surgery^^B82001^^^^^^^B82001")),
        "I12 new referral, accepted": message(
            msh("REF^I12^REF_I12", "MSG0201"), seg("RF1", f1="A^Accepted", f2="R", f3="D06", f6="REF0001",
                                                    f7="202610080915"),
            seg("PID", f3=f"{NHS}^^^NHS^NH~RX4000123^^^R9X^MR")),
        "A40: the prior patient": message(
            msh("ADT^A40^ADT_A39", "MSG0101"), seg("PID", f3=f"{NHS}^^^NHS^NH~RX4000123^^^R9X^MR"),
            seg("MRG", f1="RX4000999^^^R9X^MR")),
    }
    for prefix, body in sent.items():
        [given] = [g for name, g in cases.items() if name.startswith(prefix)]
        view = parse(body).segments
        for seg_id, occurrences in given.items():
            if seg_id == "MSH":  # the goldens give the MSH fields the mappings read
                assert {k: view["MSH"][0][k] for k in occurrences[0]} == occurrences[0]
            else:
                assert view[seg_id] == occurrences, (prefix, seg_id)


# Field variants ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("nhs_form", ["^^^NHS^NH", "^^^NHS", "^^^NHS^HN", "^^^NHS&2.16.840.1.113883.2.1.4.1&ISO^NH"])
def test_pid3_nhs_number_forms_give_one_patient_key(nhs_form: str) -> None:
    event = read(adt(nhs_form=nhs_form), TRUSTS)
    assert event.patient is not None
    assert event.patient["patient_key"] == read(adt(), TRUSTS).patient["patient_key"]  # type: ignore[index]


def test_local_identifier_as_pi_and_nhs_number_second() -> None:
    body = message(msh("ADT^A08"), seg("PID", f3=f"RX4000555^^^R9X^PI~{NHS}^^^NHS"))
    event = read(body, TRUSTS)
    assert event.patient is not None and event.patient["patient_ref"] == "Patient/hl7:RX4000555"


@pytest.mark.parametrize(("sex", "same_as"), [("M", "M"), ("1", "M"), ("F", "F"), ("2", "F")])
def test_pid8_sex_m_f_and_data_dictionary_codes(sex: str, same_as: str) -> None:
    assert with_school(adt(sex=sex))["match_keys"]["sex"] == with_school(adt(sex=same_as))["match_keys"]["sex"]
    assert with_school(adt(sex="M"))["match_keys"]["sex"] != with_school(adt(sex="F"))["match_keys"]["sex"]


@pytest.mark.parametrize("sex", ["U", "9", "O", "X", ""])
def test_pid8_unknown_or_other_is_left_out_of_matching(sex: str) -> None:
    assert "sex" not in with_school(adt(sex=sex))["match_keys"]


@pytest.mark.parametrize("dob", ["20130401", "201304011230", "20130401123045", "20130401123045.1234+0100"])
def test_pid7_dates_with_and_without_a_time(dob: str) -> None:
    out = with_school(adt(dob=dob))
    assert out["match_keys"]["dob"] == with_school(adt(dob="20130401"))["match_keys"]["dob"]
    assert out["match_hash"] == with_school(adt(dob="20130401"))["match_hash"]


@pytest.mark.parametrize(("status", "verified"), [("NSTS01", True), ("01", True), ("NSTS02", False), ("02", False),
                                                  ("", False)])
def test_pid32_nhs_number_status(status: str, verified: bool) -> None:
    event = read(adt(status=status), TRUSTS)
    assert event.patient is not None and event.patient["verified"] is verified


def test_pd1_gp_practice_and_protection_indicator() -> None:
    xon10 = read(adt("A08", seg("PD1", f3="High Street Surgery^^B82001^^^^^^^B82099")), TRUSTS)
    assert xon10.gp_practice == "B82099"  # the ODS code in XON-10 before XON-3
    xon3 = read(adt("A08", seg("PD1", f3="High Street Surgery^^B82001")), TRUSTS)
    assert xon3.gp_practice == "B82001"
    assert xon3.patient is not None and xon3.patient["restricted"] is False
    assert "gp_practice" not in xon3.patient  # rides on the event, never stored
    protected = read(adt("A08", seg("PD1", f3="Surgery^^B82001", f12="Y")), TRUSTS)
    assert protected.patient is not None and protected.patient["restricted"] is True
    assert read(adt("A08"), TRUSTS).gp_practice is None


def test_z_segments_are_kept_aside_and_never_read() -> None:
    body = adt("A08", "ZU1|1|CAMHS^Team&x~y|\\F\\odd", "PV1|1|O", "ZU8|anything at all^^^|")
    parsed = parse(body)
    assert parsed.z_segments == ("ZU1|1|CAMHS^Team&x~y|\\F\\odd", "ZU8|anything at all^^^|")
    assert not any(s.startswith("Z") for s in parsed.segments)
    assert "PV1" in parsed.segments
    assert read(body, TRUSTS).patient == read(adt("A08"), TRUSTS).patient


def test_escapes_line_feeds_and_latin1() -> None:
    body = message(msh("ADT^A08"), seg("PID", f3=f"{NHS}^^^NHS^NH~RX4000123^^^R9X^MR", f5="O\\S\\BRIEN^ANNE\\T\\B"))
    assert parse(body).segments["PID"][0]["f5"] == [{"c1": "O^BRIEN", "c2": "ANNE&B"}]
    assert parse(body.replace(b"\r", b"\n")).segments == parse(body).segments
    assert parse(body.replace(b"\r", b"\r\n")).segments == parse(body).segments
    latin = message(msh("ADT^A08"), seg("PID", f3=f"{NHS}^^^NHS^NH", f5="Z\xc9PHYR^LO\xcfC")).decode().encode("latin-1")
    assert parse(latin).segments["PID"][0]["f5"] == [{"c1": "Z\xc9PHYR", "c2": "LO\xcfC"}]


def test_name_parts_are_registered_with_the_log_filter() -> None:
    logfilter.forget_names()
    body = adt("A08", seg("PD1", f4="G123^PEVENSEY^ORLA"), seg("NK1", f1="1", f2="GRIMWADE^BRONAGH", f3="MTH"),
               name="QUILLFEATHER^MARIGOLD^^^^^L")
    assert "QUILLFEATHER" in logfilter.pseudonymise("seen QUILLFEATHER")
    parse(body)
    for name in ("QUILLFEATHER", "MARIGOLD", "GRIMWADE", "BRONAGH", "PEVENSEY", "ORLA"):
        assert name not in logfilter.pseudonymise(f"seen {name} today"), name
    logfilter.forget_names()


def test_referral_status_dates_and_namespace() -> None:
    event = read(ref("I12", status="A", effective="202610080915"), TRUSTS)
    assert event.referral is not None
    assert event.referral["referral_ref"] == "ServiceRequest/hl7:REF0001"  # ':' is never in a FHIR id
    assert (event.referral["fhir_status"], str(event.referral["received"])) == ("active", "2026-10-08")
    assert set(event.referral) == set(hl7_apply.REFERRAL_COLUMNS)
    for status, fhir in (("P", "draft"), ("R", "revoked"), ("E", "revoked")):
        assert read(ref("I13", status=status), TRUSTS).referral["fhir_status"] == fhir  # type: ignore[index]
    assert read(ref("I14", status="A"), TRUSTS).referral["fhir_status"] == "revoked"  # type: ignore[index]
    assert read(ref("I12", nhs=None), TRUSTS).referral is not None  # a referral may come before a trace


# Refusals: the field named, what to do, never a value --------------------------------------------------------


def refused(body: bytes) -> Hl7Refused:
    with pytest.raises(Hl7Refused) as caught:
        read(body, TRUSTS)
    exc = caught.value
    for value in (NHS, "20131301", "ASHBY", "TOMASZ", "RX4000123", "LS1 6AE", "soon", "20130401"):
        assert value not in exc.reason and value not in exc.field
    return exc


@pytest.mark.parametrize(("body", "field", "reason"), [
    (adt(dob="20131301"), "PID-7", "PID-7: date of birth (YYYYMMDD) is not a date"),
    (adt(dob="2013"), "PID-7", "PID-7: date of birth (YYYYMMDD) is not a date"),
    (adt(nhs=None), "PID-3", "PID-3: no NHS number (an identifier with assigning authority NHS): the patient cannot "
                             "be matched"),
    (adt(nhs="9990000019"), "PID-3", "PID-3: NHS number fails its check digit"),
    (message(msh("ADT^A08"), seg("PID", f3=f"{NHS}^^^NHS^NH")), "PID-3",
     "PID-3: no local patient identifier (identifier type MR or PI): the trust's patient cannot be referred to"),
    (message(msh("ADT^A40"), pid()), "MRG", "MRG: segment missing: an ADT^A40 message needs one"),
    (message(msh("ADT^A08"), seg("EVN", f1="A08")), "PID", "PID: segment missing: an ADT^A08 message needs one"),
    (adt("A05"), "MSH-9", "MSH-9: ADT^A05 is not a message type we apply"),
    (adt("A08", facility="RZZ"), "MSH-4", "MSH-4: trust RZZ is in no data sharing agreement"),
    (ref("I12", effective="soon"), "RF1-7", "RF1-7: effective date (YYYYMMDD) is not a date"),
    (ref("I13", status=""), "RF1-1", "RF1-1: referral status is missing or not one of A, P, R, E"),
    (ref("I12", referral_id=""), "RF1-6", "RF1-6: no originating referral identifier"),
    (merge(prior=""), "MRG-1", "MRG-1: no prior local patient identifier"),
    (adt(mrn="R" * 120), "PID-3", "PID-3: longer than we can keep (100 characters"),
    (message(msh("ADT^A08"), "PID|1", "SMITH went home"), "segment 3", "segment 3: not a segment HL7 v2.4 defines"),
    (adt(version="2.7"), "MSH-12", "MSH-12: version id not supported"),
    (b"PID|1||" + NHS.encode(), "MSH", "MSH: the message does not begin with an MSH segment"),
    (b"MSH|^~|RIO|R9X", "MSH-2", "MSH-1/MSH-2: the field separator and encoding characters"),
])
def test_refusals_name_the_field_and_never_quote_a_value(body: bytes, field: str, reason: str) -> None:
    exc = refused(body)
    assert exc.field == field
    assert exc.reason.startswith(reason), exc.reason
