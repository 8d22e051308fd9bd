"""The synthetic trust: deterministic, well-formed, and its cases and markers say what they claim."""

from __future__ import annotations

import csv
import json
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from schoolslink import synth
from schoolslink.constants import (
    EDUCATIONAL_ESTABLISHMENT_EXT,
    NHS_NUMBER_SYSTEM,
    NHS_NUMBER_VERIFICATION_EXT,
    ODS_ORGANISATION_SYSTEM,
    PURPOSE_SUPPORT,
    SCHOOL_URN_SYSTEM,
)
from schoolslink.governance.consent import ConsentFacts, decide
from schoolslink.identifiers import is_temporary_upn, is_valid_nhs_number, is_valid_uln, is_valid_upn
from schoolslink.model import Consent, ConsentDecision, ConsentGiver, Direction, ReferralStatus
from schoolslink.status import derive

AS_OF = synth.DEFAULT_AS_OF
REGISTER_COLUMNS = [
    "record_id", "upn", "given_by", "decision", "directions", "purposes", "valid_from", "valid_to",
    "withdrawn_on", "competent", "child_protection", "do_not_tell_parent",
]
PUPIL_ORDER = [
    "UPN", "UniqueLearnerNumber", "Surname", "Forename", "MiddleNames", "PreferredSurname", "PreferredForename",
    "FormerUPN", "DOB", "Sex", "Gender", "BasicDetails", "LookedAfter", "AdoptedFromCare", "SENhistory", "Address",
    "Contacts", "Attendance", "Exclusions", "LeavingDate",
]
TOKEN = re.compile(r"\w+")
# referral status -> (ServiceRequest.status, EpisodeOfCare.status or None, closure reason)
SHAPES: dict[str, tuple[str, str | None, str | None]] = {
    "received": ("draft", None, None),
    "being_assessed": ("active", None, None),
    "accepted_waiting": ("active", "waitlist", None),
    "in_treatment": ("active", "active", None),
    "not_accepted": ("revoked", None, None),
    "discharged": ("completed", "finished", "discharge"),
    "moved_to_adult_services": ("completed", "finished", "08"),
    "moved_area": ("completed", "finished", "03"),
}


# A parsed synthetic trust ----------------------------------------------------------------------------------


@dataclass
class Trust:
    home: Path
    manifest: synth.SynthManifest
    ctf: dict[str, etree._Element] = field(default_factory=dict)  # by URN
    ctf_path: dict[str, Path] = field(default_factory=dict)
    pupils: dict[str, dict[str, Any]] = field(default_factory=dict)  # by UPN
    register: dict[str, list[dict[str, str]]] = field(default_factory=dict)  # by URN
    bundles: dict[Path, dict[str, Any]] = field(default_factory=dict)
    resources: dict[str, dict[str, Any]] = field(default_factory=dict)  # 'Type/id'
    bundle_of: dict[str, Path] = field(default_factory=dict)  # 'Type/id' -> file


def _text(el: etree._Element | None) -> str:
    return (el.text or "").strip() if el is not None else ""


def load(home: Path, manifest: synth.SynthManifest) -> Trust:
    t = Trust(home, manifest)
    for urn in manifest.school_urns:
        path = home / "landing" / "mis" / urn / f"ctf-{urn}-{manifest.as_of.isoformat()}.xml"
        root = etree.parse(str(path)).getroot()
        t.ctf[urn], t.ctf_path[urn] = root, path
        for p in root.iter("Pupil"):
            upn = _text(p.find("UPN"))
            assert upn not in t.pupils, "UPN used twice in the trust"
            t.pupils[upn] = {
                "urn": urn,
                "el": p,
                "surname": _text(p.find("Surname")),
                "forename": _text(p.find("Forename")),
                "dob": date.fromisoformat(_text(p.find("DOB"))),
                "nhs": _text(p.find("BasicDetails/NHSnumber")),
                "lac": _text(p.find("LookedAfter/InCare")) == "true",
                "adopted": _text(p.find("AdoptedFromCare")) == "true",
            }
        with (home / "landing" / "consent" / f"{urn}.csv").open(newline="", encoding="utf-8") as f:
            t.register[urn] = list(csv.DictReader(f))
    for path in sorted((home / "seed" / "fhir").glob("bundle-*.json")):
        bundle = json.loads(path.read_text(encoding="utf-8"))
        t.bundles[path] = bundle
        for e in bundle["entry"]:
            r = e["resource"]
            key = f"{r['resourceType']}/{r['id']}"
            assert key not in t.resources, f"{key} written twice"
            t.resources[key] = r
            t.bundle_of[key] = path
    return t


@pytest.fixture(scope="module")
def trust(tmp_path_factory: pytest.TempPathFactory) -> Trust:
    home = tmp_path_factory.mktemp("synth-default")
    return load(home, synth.synthesise(home))


def _files(home: Path) -> dict[str, bytes]:
    return {str(p.relative_to(home)): p.read_bytes() for p in sorted(home.rglob("*")) if p.is_file()}


# Determinism and sizes -------------------------------------------------------------------------------------


def test_same_arguments_give_byte_identical_output(tmp_path: Path) -> None:
    a = synth.synthesise(tmp_path / "a", schools=4, pupils=900, seed=11)
    b = synth.synthesise(tmp_path / "b", schools=4, pupils=900, seed=11)
    fa, fb = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert fa.keys() == fb.keys()
    assert [k for k in fa if fa[k] != fb[k]] == []
    assert a == b
    c = synth.synthesise(tmp_path / "c", schools=4, pupils=900, seed=12)
    assert _files(tmp_path / "c") != fa
    assert c.cases != a.cases


def test_rerun_in_place_replaces_everything(tmp_path: Path) -> None:
    synth.synthesise(tmp_path, schools=3, pupils=6000, seed=1)  # more bundles than the second run
    synth.synthesise(tmp_path, schools=2, pupils=300, seed=2)
    fresh = tmp_path.parent / (tmp_path.name + "-fresh")
    synth.synthesise(fresh, schools=2, pupils=300, seed=2)
    again = {k: v for k, v in _files(tmp_path).items() if not k.startswith("landing/")}
    assert again == {k: v for k, v in _files(fresh).items() if not k.startswith("landing/")}


def test_pupils_spread_with_the_remainder_first(tmp_path: Path) -> None:
    m = synth.synthesise(tmp_path, schools=4, pupils=1003)
    sizes = [len(etree.parse(str(p)).getroot().findall("CTFpupilData/Pupil"))
             for p in sorted((tmp_path / "landing" / "mis").glob("*/*.xml"))]
    assert sizes == [251, 251, 251, 250]
    assert m.counts["pupils"] == 1003
    assert m.school_urns == ["900001", "900002", "900003", "900004"]


@pytest.mark.parametrize(("schools", "pupils"), [(1, 1), (1, 40), (3, 30), (2, 400)])
def test_tiny_trusts_are_consistent(tmp_path: Path, schools: int, pupils: int) -> None:
    m = synth.synthesise(tmp_path, schools=schools, pupils=pupils)
    t = load(tmp_path, m)
    assert len(t.pupils) == pupils
    assert len(m.cases) == m.counts["patients"] == round(pupils * synth.REFERRED_SHARE)
    assert all(c.upn in t.pupils for c in m.cases)


def test_arguments_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        synth.synthesise(tmp_path, schools=0)
    with pytest.raises(ValueError):
        synth.synthesise(tmp_path, schools=5, pupils=4)
    with pytest.raises(ValueError):
        synth.synthesise(tmp_path, schools=10, first_urn=999995)


def test_manifest_file_round_trips(trust: Trust) -> None:
    loaded = synth.load_manifest(trust.home / synth.MANIFEST_NAME)
    assert loaded == trust.manifest
    d = json.loads((trust.home / synth.MANIFEST_NAME).read_text())
    assert d["counts"]["patients"] == 600 and d["trust_ods"] == "R9X"
    assert set(d["cases"][0]) >= {
        "case", "school_urn", "upn", "nhs_number", "surname", "forename", "dob", "patient_id",
        "expect_linked", "expect_school_to_trust", "expect_trust_to_school",
    }


# Identifiers -----------------------------------------------------------------------------------------------


def test_every_upn_is_valid_and_some_are_temporary(trust: Trust) -> None:
    upns = list(trust.pupils)
    assert len(upns) == trust.manifest.counts["pupils"]
    assert all(is_valid_upn(u) for u in upns)
    assert all(u[1:4] == "999" for u in upns)
    assert sum(is_temporary_upn(u) for u in upns) >= 5
    formers = [_text(f) for p in trust.pupils.values() for f in p["el"].findall("FormerUPN")]
    assert formers and all(is_valid_upn(f) and f not in trust.pupils for f in formers)
    ulns = [_text(p["el"].find("UniqueLearnerNumber")) for p in trust.pupils.values()]
    assert all(is_valid_uln(u) for u in ulns if u)


def test_every_nhs_number_is_a_valid_test_number_and_unique(trust: Trust) -> None:
    patients = [r for r in trust.resources.values() if r["resourceType"] == "Patient"]
    numbers = [r["identifier"][0]["value"] for r in patients]
    in_ctf = [p["nhs"] for p in trust.pupils.values() if p["nhs"]]
    assert len(in_ctf) > 500
    for n in numbers + in_ctf:
        assert n.startswith("999") and is_valid_nhs_number(n)
    assert len(set(numbers)) == len(numbers)
    assert len(set(in_ctf)) == len(in_ctf)
    by_upn = {c.upn: c.nhs_number for c in trust.manifest.cases}
    patient_numbers = set(numbers)
    for upn, p in trust.pupils.items():  # a number in a CTF belongs to that pupil's Patient, or to no Patient
        if p["nhs"]:
            assert by_upn.get(upn, p["nhs"]) == p["nhs"]
            if upn not in by_upn:
                assert p["nhs"] not in patient_numbers


# The CTF ---------------------------------------------------------------------------------------------------


def test_ctf_files_follow_the_contract_shape(trust: Trust) -> None:
    ay = 2026
    for i, urn in enumerate(trust.manifest.school_urns):
        root = trust.ctf[urn]
        assert root.tag == "CTfile"
        assert [c.tag for c in root] == ["Header", "CTFpupilData"]
        h = root.find("Header")
        assert [c.tag for c in h] == ["DocumentName", "CTFversion", "DateTime", "DocumentQualifier", "SupplierID",
                                      "SourceSchool", "DestSchool"]
        assert _text(h.find("DocumentQualifier")) == "full"
        assert _text(h.find("DateTime")) == "2026-11-25T18:00:00"
        src = h.find("SourceSchool")
        assert (_text(src.find("LEA")), _text(src.find("Estab")), _text(src.find("URN"))) == (
            "999", str(1001 + i), urn)
        assert _text(src.find("AcademicYear")) == str(ay)
        version = _text(h.find("CTFversion"))
        assert version in ("24.0", "25.0")
        for p in root.iter("Pupil"):
            tags = [c.tag for c in p]
            assert tags == sorted(tags, key=PUPIL_ORDER.index), tags
            assert ("Gender" in tags) == (version == "24.0") and ("Sex" in tags) == (version == "25.0")
            assert _text(p.find("Sex") if version == "25.0" else p.find("Gender")) in ("M", "F")
            year = _text(p.find("BasicDetails/NCyearActual"))
            y = 0 if year == "R" else int(year)
            dob = date.fromisoformat(_text(p.find("DOB")))
            assert date(ay - 5 - y, 9, 1) <= dob < date(ay - 4 - y, 9, 1)
            assert 4 <= synth._age_on(dob, AS_OF) <= 18
            assert p.find("Address/BS7666Address/Postcode") is not None
            assert p.find("Address/BS7666Address/Street") is not None
            contact = p.find("Contacts/Contact")
            assert _text(contact.find("Surname")) and _text(contact.find("Phones/Phone/PhoneNo"))
            for yd in p.iter("YearData"):
                n = {c.tag: int(_text(c)) for c in yd if c.tag != "Year"}
                assert n["SessionsPossible"] == (
                    n["AttendanceSessions"] + n["SessionsAuthorised"] + n["SessionsUnauthorised"])
    versions = Counter(_text(r.find("Header/CTFversion")) for r in trust.ctf.values())
    assert versions == {"25.0": 18, "24.0": 2}


def test_ctf_roll_has_the_expected_mix(trust: Trust) -> None:
    pupils = list(trust.pupils.values())
    n = len(pupils)
    sen = Counter(_text(p["el"].find("SENhistory/SEN/SENprovision")) or "N" for p in pupils)
    assert 0.80 < sen["N"] / n < 0.90 and 0.09 < sen["K"] / n < 0.15 and 0.015 < sen["E"] / n < 0.045
    leavers = sum(p["el"].find("LeavingDate") is not None for p in pupils)
    assert 0.01 < leavers / n < 0.03
    lac = sum(p["lac"] for p in pupils)
    assert 0.005 < lac / n < 0.02
    assert sum(p["adopted"] for p in pupils) >= 5
    assert sum(p["el"].find("Exclusions") is not None for p in pupils) >= 50
    ages = Counter(synth._age_on(p["dob"], AS_OF) for p in pupils)
    assert min(ages) == 4 and max(ages) == 18


def test_connector_reads_every_ctf_and_register_without_complaint(trust: Trust, monkeypatch: pytest.MonkeyPatch
                                                                   ) -> None:
    ctf = pytest.importorskip("connectors.mis.ctf")
    register = pytest.importorskip("connectors.mis.consent_register")
    monkeypatch.setenv("SCHOOLSLINK_KEY", "test-key-not-secret")
    reader = ctf.CtfReader()
    total = 0
    for urn, path in trust.ctf_path.items():
        result = reader.read(path)
        assert result.quarantined == []
        assert [w for w in result.warnings if w.record != "header"] == []
        total += len(result.learners)
        reg = register.read_register(trust.home / "landing" / "consent" / f"{urn}.csv", urn)
        assert reg.quarantined == []
    assert total == 6000


def test_names_are_unique_except_the_deliberate_partners(trust: Trust) -> None:
    pairs = Counter((p["surname"], p["forename"]) for p in trust.pupils.values())
    dupes = {k for k, v in pairs.items() if v > 1}
    kinds = {(c.surname, c.forename): c.case for c in trust.manifest.cases}
    assert dupes and all(kinds.get(k) == "name_dob_duplicate" and pairs[k] == 2 for k in dupes)
    for c in trust.manifest.cases:
        same_name = [p for p in trust.pupils.values() if (p["surname"], p["forename"]) == (c.surname, c.forename)]
        same_surname = [p for p in trust.pupils.values() if p["surname"] == c.surname]
        if c.case == "name_dob_duplicate":
            assert len(same_name) == 2 and {p["urn"] for p in same_name} == {c.school_urn}
            assert {p["dob"].isoformat() for p in same_name} == {c.dob}
        elif c.case == "twins":
            assert len(same_name) == 1 and len(same_surname) == 2
            other = next(p for p in same_surname if p["forename"] != c.forename)
            assert other["urn"] == c.school_urn and other["dob"].isoformat() == c.dob
        else:
            assert len(same_surname) == 1
    forenames = Counter(p["forename"] for p in trust.pupils.values())
    assert forenames.most_common(1)[0][1] > 1  # ordinary forenames are shared, as in life


# The consent register --------------------------------------------------------------------------------------


def test_consent_registers_have_the_contract_columns_and_values(trust: Trust) -> None:
    for urn, rows in trust.register.items():
        with (trust.home / "landing" / "consent" / f"{urn}.csv").open(encoding="utf-8") as f:
            assert f.readline().strip().split(",") == REGISTER_COLUMNS
        ids = [r["record_id"] for r in rows]
        assert len(set(ids)) == len(ids)
        for r in rows:
            assert trust.pupils[r["upn"]]["urn"] == urn
            assert r["given_by"] in ("parent", "young_person", "local_authority")
            assert r["decision"] in ("permit", "deny")
            assert set(r["directions"].split(";")) <= {"school_to_trust", "trust_to_school"}
            assert r["purposes"].split(";") == [PURPOSE_SUPPORT]
            assert date.fromisoformat(r["valid_from"]) <= AS_OF
            for col in ("valid_to", "withdrawn_on"):
                assert r[col] == "" or date.fromisoformat(r[col])
            for col in ("competent", "child_protection", "do_not_tell_parent"):
                assert r[col] in ("true", "false")


def test_consent_rows_say_what_each_kind_needs(trust: Trust) -> None:
    rows_by_upn: dict[str, list[dict[str, str]]] = defaultdict(list)
    for rows in trust.register.values():
        for r in rows:
            rows_by_upn[r["upn"]].append(r)
    for c in trust.manifest.cases:
        rows = rows_by_upn.get(c.upn, [])
        if c.case == "no_consent":
            assert rows == []
        elif c.case == "parents_disagree":
            assert sorted(r["decision"] for r in rows) == ["deny", "permit"]
            assert {r["given_by"] for r in rows} == {"parent"}
        else:
            assert len(rows) == 1
        if c.case == "withdrawn":
            assert rows[0]["withdrawn_on"] and date.fromisoformat(rows[0]["withdrawn_on"]) < AS_OF
        if c.case == "expired":
            assert date.fromisoformat(rows[0]["valid_to"]) < AS_OF
        if c.case == "school_to_trust_only":
            assert rows[0]["directions"] == "school_to_trust"
        if c.case == "looked_after":
            assert rows[0]["given_by"] == "local_authority"
        if c.case == "young_person_consents":
            assert rows[0]["given_by"] == "young_person" and 16 <= synth._age_on(date.fromisoformat(c.dob), AS_OF) <= 17
        if c.case == "child_protection":
            assert rows[0]["child_protection"] == "true"
        if c.case == "do_not_tell_parent":
            assert rows[0]["do_not_tell_parent"] == "true"


# The trust's FHIR data -------------------------------------------------------------------------------------


def test_bundles_are_batches_of_puts(trust: Trust) -> None:
    assert trust.bundles
    for path, b in trust.bundles.items():
        assert re.fullmatch(r"bundle-\d{4}\.json", path.name)
        assert b["resourceType"] == "Bundle" and b["type"] == "batch"
        assert 0 < len(b["entry"]) <= synth.BUNDLE_LIMIT
        for e in b["entry"]:
            r = e["resource"]
            assert e["request"] == {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}
            assert re.fullmatch(r"[A-Za-z0-9\-.]{1,64}", r["id"])
    kinds = Counter(k.split("/")[0] for k in trust.resources)
    assert kinds["Patient"] == kinds["ServiceRequest"] == 600
    assert kinds["PractitionerRole"] == 20 and kinds["Organization"] == 1
    assert kinds["EpisodeOfCare"] > 0 and kinds["Appointment"] > 0 and kinds["Consent"] > 0
    org = trust.resources["Organization/org-r9x"]
    assert org["identifier"] == [{"system": ODS_ORGANISATION_SYSTEM, "value": "R9X"}]


def test_references_resolve_and_a_pupils_resources_share_a_bundle(trust: Trust) -> None:
    def refs(x: Any) -> list[str]:
        if isinstance(x, dict):
            out = [x["reference"]] if isinstance(x.get("reference"), str) else []
            return out + [r for v in x.values() for r in refs(v)]
        if isinstance(x, list):
            return [r for v in x for r in refs(v)]
        return []

    for key, r in trust.resources.items():
        for ref in refs(r):
            assert ref in trust.resources, f"{key} -> {ref}"
            if ref.startswith("Patient/") or ref.startswith("ServiceRequest/"):
                assert trust.bundle_of[ref] == trust.bundle_of[key]


def test_patients_agree_with_the_ctf(trust: Trust) -> None:
    for c in trust.manifest.cases:
        pat = trust.resources[f"Patient/{c.patient_id}"]
        pupil = trust.pupils[c.upn]
        ident = pat["identifier"][0]
        assert ident["system"] == NHS_NUMBER_SYSTEM and ident["value"] == c.nhs_number
        ext = ident["extension"][0]
        assert ext["url"] == NHS_NUMBER_VERIFICATION_EXT
        assert ext["valueCodeableConcept"]["coding"][0]["code"] == ("02" if c.case == "unverified_nhs" else "01")
        school = pat["extension"][0]
        assert school["url"] == EDUCATIONAL_ESTABLISHMENT_EXT
        assert school["valueIdentifier"] == {"system": SCHOOL_URN_SYSTEM, "value": c.school_urn}
        security = pat.get("meta", {}).get("security", [])
        assert (security == [{"system": synth.CONFIDENTIALITY_SYSTEM, "code": "R", "display": "restricted"}]) == (
            c.case == "restricted")
        same = (pat["name"][0]["family"], pat["name"][0]["given"][0], pat["birthDate"]) == (
            pupil["surname"], pupil["forename"], pupil["dob"].isoformat())
        assert same == (c.case != "no_roll_match")
        sex = _text(pupil["el"].find("Sex")) or _text(pupil["el"].find("Gender"))
        assert pat["gender"] == {"M": "male", "F": "female"}[sex]
        assert (c.surname, c.forename, c.dob, c.school_urn) == (
            pupil["surname"], pupil["forename"], pupil["dob"].isoformat(), pupil["urn"])


def test_referrals_read_back_to_their_status(trust: Trust) -> None:
    """The FHIR shape of each status (module docstring) gives the status back through status.derive."""
    episodes = defaultdict(list)
    appointments = defaultdict(list)
    for r in trust.resources.values():
        if r["resourceType"] == "EpisodeOfCare":
            episodes[r["referralRequest"][0]["reference"]].append({"fhir_status": r["status"]})
        elif r["resourceType"] == "Appointment":
            appointments[r["basedOn"][0]["reference"]].append(
                {"start": date.fromisoformat(r["start"][:10]), "fhir_status": r["status"]})
    seen: Counter[str] = Counter()
    for c in trust.manifest.cases:
        sr_ref = "ServiceRequest/sr-" + c.patient_id.split("-")[1]
        sr = trust.resources[sr_ref]
        assert sr["subject"] == {"reference": f"Patient/{c.patient_id}"}
        assert AS_OF.toordinal() - 183 <= date.fromisoformat(sr["authoredOn"]).toordinal() < AS_OF.toordinal()
        ext = {e["url"]: e for e in sr["extension"]}
        code = {
            u: e["valueCodeableConcept"]["coding"][0]["code"] for u, e in ext.items() if "valueCodeableConcept" in e
        }
        assert synth.TEAM_TYPE_EXT in code
        assert sr["reasonCode"][0]["coding"][0]["system"] == synth.PRIMARY_REASON_SYSTEM
        referral = {
            "fhir_status": sr["status"],
            "transition": ext.get(synth.TRANSITION_EXT, {}).get("valueBoolean", False),
            "moved_area": code.get(synth.CLOSURE_REASON_EXT) == "03",
            "rejection_reason": code.get(synth.REJECTION_REASON_EXT),
            "closure_reason": code.get(synth.CLOSURE_REASON_EXT),
        }
        got = derive(referral, episodes[sr_ref], appointments[sr_ref], AS_OF)
        assert got.status.value == c.referral_status, (c.patient_id, referral)
        # The representation documented in the module docstring, exactly.
        sr_status, episode, closure = SHAPES[c.referral_status]
        assert sr["status"] == sr_status
        assert [e["fhir_status"] for e in episodes[sr_ref]] == ([episode] if episode else [])
        if closure == "discharge":
            assert referral["closure_reason"] in ("01", "02", "04", "05", "07", "08", "09")
        else:
            assert referral["closure_reason"] == closure
        assert referral["transition"] == (c.referral_status == "moved_to_adult_services")
        assert (referral["rejection_reason"] is not None) == (c.referral_status == "not_accepted")
        fulfilled = [a for a in appointments[sr_ref] if a["fhir_status"] == "fulfilled"]
        assert bool(fulfilled) == (c.referral_status == "in_treatment")
        assert all(a["start"] < AS_OF for a in fulfilled)
        if c.referral_status == "not_accepted":
            assert referral["rejection_reason"] in ("01", "02", "03")
        if c.referral_status in ("accepted_waiting", "in_treatment"):
            assert all(a["start"] > AS_OF for a in appointments[sr_ref] if a["fhir_status"] == "booked")
        if c.referral_status == "moved_to_adult_services":
            assert synth._age_on(date.fromisoformat(c.dob), AS_OF) >= 17
        seen[c.referral_status] += 1
    assert set(seen) == {s.value for s in ReferralStatus}
    assert all(n >= 2 for n in seen.values())


def test_practitioner_roles_name_a_worker_with_direct_email_and_phone(trust: Trust) -> None:
    roles = [r for r in trust.resources.values() if r["resourceType"] == "PractitionerRole"]
    emails = set()
    for r in roles:
        name = r["practitioner"]["display"]
        assert len(name.split()) == 2 and r["code"][0]["text"]
        telecom = {t["system"]: t["value"] for t in r["telecom"]}
        first, last = name.lower().split()
        assert telecom["email"] == f"{first}.{last}@cypmhs.example.nhs.uk"
        assert re.fullmatch(r"01632 960\d{3}", telecom["phone"])
        emails.add(telecom["email"])
    assert len(emails) == 20


def test_fhir_consents_name_the_school(trust: Trust) -> None:
    by_patient = {f"Patient/{c.patient_id}": c for c in trust.manifest.cases}
    consents = [r for r in trust.resources.values() if r["resourceType"] == "Consent"]
    assert consents
    for r in consents:
        c = by_patient[r["patient"]["reference"]]
        actor = r["provision"]["actor"][0]["reference"]["identifier"]
        assert actor == {"system": SCHOOL_URN_SYSTEM, "value": c.school_urn}
        assert r["provision"]["purpose"] == [{"system": synth.PURPOSE_SYSTEM, "code": PURPOSE_SUPPORT}]
        assert r["provision"]["type"] == ("deny" if c.case == "refused" else "permit")
        assert c.case in ("consented", "young_person_consents", "refused")


# Cases and their expectations ------------------------------------------------------------------------------


def test_every_kind_appears_at_least_twice(trust: Trust) -> None:
    kinds = Counter(c.case for c in trust.manifest.cases)
    assert set(kinds) == set(synth.CASE_KINDS)
    assert min(kinds.values()) >= 2
    assert kinds["consented"] > len(trust.manifest.cases) / 2
    assert kinds == trust.manifest.cases_by_kind
    assert len({c.patient_id for c in trust.manifest.cases}) == 600


def test_expectations_follow_the_governance_rules(trust: Trust) -> None:
    """Recompute each case's flags from the files alone, with the real consent rules."""
    roll: dict[tuple[str, str, str, str], int] = Counter()
    for p in trust.pupils.values():
        roll[(p["urn"], p["surname"].upper(), p["forename"].upper(), p["dob"].isoformat())] += 1
    rows_by_upn: dict[str, list[dict[str, str]]] = defaultdict(list)
    for rows in trust.register.values():
        for r in rows:
            rows_by_upn[r["upn"]].append(r)
    for c in trust.manifest.cases:
        pat = trust.resources[f"Patient/{c.patient_id}"]
        pupil = trust.pupils[c.upn]
        rows = rows_by_upn[c.upn]
        verified = pat["identifier"][0]["extension"][0]["valueCodeableConcept"]["coding"][0]["code"] == "01"
        urn = pat["extension"][0]["valueIdentifier"]["value"]
        key = (urn, pat["name"][0]["family"].upper(), pat["name"][0]["given"][0].upper(), pat["birthDate"])
        sensitive = (
            pupil["lac"] or pupil["adopted"] or "security" in pat.get("meta", {})
            or any(r["child_protection"] == "true" or r["do_not_tell_parent"] == "true" for r in rows)
        )
        linked = verified and roll[key] == 1 and not sensitive
        assert linked == c.expect_linked, c

        records = [
            Consent(
                consent_id=r["record_id"], subject_key=c.upn, given_by=ConsentGiver(r["given_by"]),
                decision=ConsentDecision(r["decision"]),
                directions=tuple(Direction(d) for d in r["directions"].split(";")),
                purposes=tuple(r["purposes"].split(";")), valid_from=date.fromisoformat(r["valid_from"]),
                valid_to=date.fromisoformat(r["valid_to"]) if r["valid_to"] else None,
                withdrawn_on=date.fromisoformat(r["withdrawn_on"]) if r["withdrawn_on"] else None,
            )
            for r in rows
        ]
        facts = ConsentFacts(
            age_years=synth._age_on(pupil["dob"], AS_OF),
            competent=any(r["competent"] == "true" for r in rows),
            looked_after=pupil["lac"],
        )
        for direction, expected in ((Direction.SCHOOL_TO_TRUST, c.expect_school_to_trust),
                                    (Direction.TRUST_TO_SCHOOL, c.expect_trust_to_school)):
            allowed = linked and decide(records, facts, direction, PURPOSE_SUPPORT, AS_OF).allowed
            assert allowed == expected, (c, direction)
        if c.case in synth._UNDER_16_KINDS:  # still a child when the pipeline runs months later
            assert synth._age_on(pupil["dob"], date(2027, 5, 26)) < 16


# Markers ---------------------------------------------------------------------------------------------------


def test_markers_are_unique_and_found_exactly_where_they_should_be(trust: Trust) -> None:
    m = trust.manifest
    values = [x.value for x in m.markers]
    assert len(set(values)) == len(values)
    assert {x.where for x in m.markers} == {"nhs", "school", "both"}
    items = Counter(x.item for x in m.markers)
    assert set(items) == {"address", "parent_contact", "upn", "surname", "forename", "nhs_number",
                          "referral_reason", "appointment_note", "contact_phone", "referral_id"}
    assert items["upn"] == items["address"] == items["parent_contact"] == items["referral_reason"] == len(m.cases)
    assert items["contact_phone"] == 20
    assert items["appointment_note"] == m.counts["appointments"]

    files = [*trust.ctf_path.values(), *(trust.home / "landing" / "consent").glob("*.csv"), *trust.bundles]
    texts = {f: f.read_text(encoding="utf-8") for f in files}
    tokens = {f: set(TOKEN.findall(t)) for f, t in texts.items()}

    def found(value: str) -> set[Path]:
        if " " in value:
            return {f for f, t in texts.items() if value in t}
        return {f for f, ts in tokens.items() if value in ts}

    case_of: dict[str, synth.SynthCase] = {}
    for c in m.cases:
        for v in (c.upn, c.surname, c.forename, c.nhs_number):
            case_of.setdefault(v, c)
    patient_of = {}
    for key, r in trust.resources.items():
        if r["resourceType"] == "ServiceRequest":
            pid = r["subject"]["reference"]
            patient_of[r["identifier"][0]["value"]] = pid
            patient_of[TOKEN.findall(r["reasonCode"][0]["text"])[-1]] = pid
        elif r["resourceType"] == "Appointment":
            patient_of[TOKEN.findall(r["comment"])[-1]] = r["participant"][0]["actor"]["reference"]
    street_of = {}
    for c in m.cases:
        el = trust.pupils[c.upn]["el"]
        street_of[_text(el.find("Address/BS7666Address/Street")).split()[0]] = c
        street_of[_text(el.find("Contacts/Contact/Surname"))] = c
    first_bundle = min(trust.bundles)

    for x in m.markers:
        where = found(x.value)
        if x.item == "contact_phone":
            assert where == {first_bundle}, x
            continue
        if x.item in ("referral_reason", "appointment_note", "referral_id"):
            assert where == {trust.bundle_of[patient_of[x.value]]}, x
            continue
        if x.item in ("address", "parent_contact"):
            c = street_of[x.value]
            assert where == {trust.ctf_path[c.school_urn]}, x
            continue
        c = case_of[x.value]
        ctf = trust.ctf_path[c.school_urn]
        csv_file = trust.home / "landing" / "consent" / f"{c.school_urn}.csv"
        pat_ref = f"Patient/{c.patient_id}"
        pat = trust.resources[pat_ref]
        bundle = trust.bundle_of[pat_ref]
        if x.item == "upn":
            assert where == ({ctf} if c.case == "no_consent" else {ctf, csv_file}), x
        elif x.item == "surname":
            assert where == {ctf} | ({bundle} if pat["name"][0]["family"] == x.value else set()), x
        elif x.item == "forename":
            assert where == {ctf} | ({bundle} if pat["name"][0]["given"][0] == x.value else set()), x
        elif x.item == "nhs_number":
            assert where == {bundle} | ({ctf} if trust.pupils[c.upn]["nhs"] else set()), x
        else:
            pytest.fail(f"unexpected marker item {x.item}")


def test_marker_sides_follow_the_expectations(trust: Trust) -> None:
    m = trust.manifest
    by_value = {(x.item, x.value): x.where for x in m.markers}
    for c in m.cases:
        assert by_value[("upn", c.upn)] == "nhs"
        assert (("surname", c.surname) in by_value) == (not c.expect_school_to_trust)
        assert (("forename", c.forename) in by_value) == (not c.expect_school_to_trust)
        want = {(False, False): "both", (False, True): "nhs", (True, False): "school"}.get(
            (c.expect_school_to_trust, c.expect_trust_to_school))
        assert by_value.get(("nhs_number", c.nhs_number)) == want
        sr = trust.resources["ServiceRequest/sr-" + c.patient_id.split("-")[1]]
        rf = sr["identifier"][0]["value"]
        assert re.fullmatch(r"RF[A-Z2-9]{8}", rf)
        assert (("referral_id", rf) in by_value) == (not c.expect_trust_to_school)
    for x in m.markers:
        if x.item in ("address", "parent_contact", "referral_reason", "appointment_note"):
            assert re.fullmatch(r"MK[B-DF-HJ-NP-TV-XZ]{10}", x.value)
