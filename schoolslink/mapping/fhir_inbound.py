"""Trust FHIR resources (R4, UK Core) -> the rows the state store keeps.

Patient is read, never written, and reduced at once to keyed pseudonyms: the NHS number becomes a
patient key, name and date of birth a match hash. A resource that cannot be read raises
`InboundError` with the field and reason (never its values), and is quarantined by reference.
"""

from __future__ import annotations

from datetime import date
from typing import Any

from schoolslink.constants import (
    CLOSURE_MOVED_AREA,
    CLOSURE_REASON_EXT,
    CONFIDENTIALITY_SYSTEM,
    EDUCATIONAL_ESTABLISHMENT_EXT,
    NHS_NUMBER_SYSTEM,
    NHS_NUMBER_VERIFICATION_EXT,
    OUR_META_SOURCE,
    OUR_TAG_CODE,
    OUR_TAG_SYSTEM,
    PURPOSE_SYSTEM,
    REJECTION_REASON_EXT,
    SCHOOL_URN_SYSTEM,
    TEAM_TYPE_EXT,
    TRANSITION_EXT,
)
from schoolslink.identifiers import is_valid_nhs_number
from schoolslink.keys import match_hash, patient_key
from schoolslink.model import Consent, ConsentDecision, ConsentGiver, Direction

Row = dict[str, Any]


class InboundError(ValueError):
    def __init__(self, field: str, reason: str) -> None:
        super().__init__(reason)
        self.field = field


def is_ours(res: Row) -> bool:
    meta = res.get("meta") or {}
    if meta.get("source") == OUR_META_SOURCE:
        return True
    return any(t.get("system") == OUR_TAG_SYSTEM and t.get("code") == OUR_TAG_CODE for t in meta.get("tag") or [])


def _ext(res: Row, url: str) -> Row | None:
    for e in res.get("extension") or []:
        if e.get("url") == url:
            return dict(e)
    return None


def _code(ext: Row | None) -> str | None:
    if not ext:
        return None
    codings = (ext.get("valueCodeableConcept") or {}).get("coding") or []
    return str(codings[0]["code"]) if codings and codings[0].get("code") else None


def _date(value: Any, field: str) -> date | None:
    if not value:
        return None
    try:
        return date.fromisoformat(str(value)[:10])
    except ValueError:
        raise InboundError(field, f"{field} is not a date") from None


def _ref(value: Any) -> str | None:
    if isinstance(value, dict) and value.get("reference"):
        return str(value["reference"])
    return None


def patient(res: Row) -> Row:
    ident = next((i for i in res.get("identifier") or [] if i.get("system") == NHS_NUMBER_SYSTEM), None)
    if ident is None or not ident.get("value"):
        raise InboundError("identifier", "Patient has no NHS number: it cannot be matched")
    nhs = str(ident["value"]).replace(" ", "")
    if not is_valid_nhs_number(nhs):
        raise InboundError("identifier", "Patient's NHS number fails the modulus 11 check")
    verified = _code(_ext(ident, NHS_NUMBER_VERIFICATION_EXT)) == "01"
    school = (_ext(res, EDUCATIONAL_ESTABLISHMENT_EXT) or {}).get("valueIdentifier") or {}
    urn = str(school["value"]) if school.get("system") == SCHOOL_URN_SYSTEM and school.get("value") else None
    names = res.get("name") or []
    name = next((n for n in names if n.get("use") == "official"), names[0] if names else {})
    family, given = name.get("family"), (name.get("given") or [None])[0]
    dob = _date(res.get("birthDate"), "birthDate")
    mh = match_hash(urn, family, given, dob.isoformat()) if urn and family and given and dob else None
    security = (res.get("meta") or {}).get("security") or []
    restricted = any(s.get("code") == "R" and s.get("system") in (None, CONFIDENTIALITY_SYSTEM) for s in security)
    return {"patient_ref": f"Patient/{res['id']}", "patient_key": patient_key(nhs), "school_urn": urn,
            "match_hash": mh, "verified": verified, "restricted": restricted,
            "version_id": (res.get("meta") or {}).get("versionId")}


def service_request(res: Row) -> Row:
    subject = _ref(res.get("subject"))
    if not subject or not subject.startswith("Patient/"):
        raise InboundError("subject", "ServiceRequest has no Patient subject")
    closure = _code(_ext(res, CLOSURE_REASON_EXT))
    transition = bool((_ext(res, TRANSITION_EXT) or {}).get("valueBoolean"))
    performers = res.get("performer") or []
    return {
        "referral_ref": f"ServiceRequest/{res['id']}", "patient_ref": subject,
        "fhir_status": str(res.get("status") or "unknown"),
        "received": _date(res.get("authoredOn"), "authoredOn"),
        "team_type": _code(_ext(res, TEAM_TYPE_EXT)),
        "rejection_reason": _code(_ext(res, REJECTION_REASON_EXT)),
        "closure_reason": closure,
        "transition": transition,
        "moved_area": closure == CLOSURE_MOVED_AREA and not transition,
        "performer_ref": _ref(performers[0]) if performers else None,
        "version_id": (res.get("meta") or {}).get("versionId"),
    }


def episode_of_care(res: Row) -> Row | None:
    refs = [_ref(r) for r in res.get("referralRequest") or []]
    referral = next((r for r in refs if r), None)
    if referral is None:
        return None  # an episode with no referral is not one a school asked about
    period = res.get("period") or {}
    return {"episode_ref": f"EpisodeOfCare/{res['id']}", "referral_ref": referral,
            "fhir_status": str(res.get("status") or "unknown"), "start": _date(period.get("start"), "period.start"),
            "end": _date(period.get("end"), "period.end"), "care_manager_ref": _ref(res.get("careManager"))}


def appointment(res: Row) -> Row | None:
    refs = [_ref(r) for r in res.get("basedOn") or []]
    referral = next((r for r in refs if r and r.startswith("ServiceRequest/")), None)
    if referral is None:
        return None
    return {"appointment_ref": f"Appointment/{res['id']}", "referral_ref": referral,
            "fhir_status": str(res.get("status") or "unknown"), "start": _date(res.get("start"), "start")}


def practitioner_role(res: Row) -> Row:
    email = next((t.get("value") for t in res.get("telecom") or [] if t.get("system") == "email"), None)
    codes = res.get("code") or []
    role = (codes[0].get("text") or ((codes[0].get("coding") or [{}])[0].get("display"))) if codes else None
    return {"role_ref": f"PractitionerRole/{res['id']}", "name": (res.get("practitioner") or {}).get("display"),
            "role": role, "email": email}


def consent(res: Row) -> Row | None:
    """A trust-side Consent naming a school as the recipient: the family's decision about trust -> school."""
    provision = res.get("provision") or {}
    urns = [
        str(a["reference"]["identifier"]["value"])
        for a in provision.get("actor") or []
        if ((a.get("reference") or {}).get("identifier") or {}).get("system") == SCHOOL_URN_SYSTEM
    ]
    patient_ref = _ref(res.get("patient"))
    if not urns or not patient_ref:
        return None
    purposes = [p.get("code") for p in provision.get("purpose") or [] if p.get("system") == PURPOSE_SYSTEM]
    period = provision.get("period") or {}
    giver = ((res.get("performer") or [{}])[0].get("display") or "parent").strip()
    return {
        "consent_ref": f"Consent/{res['id']}", "patient_ref": patient_ref, "school_urns": urns,
        "status": str(res.get("status") or "unknown"), "type": str(provision.get("type") or "permit"),
        "purposes": [p for p in purposes if p], "given_by": giver,
        "valid_from": _date(period.get("start") or res.get("dateTime"), "provision.period.start"),
        "valid_to": _date(period.get("end"), "provision.period.end"),
    }


def consent_record(row: Row, patient_key_of: dict[str, str], trust_ods: str) -> Consent | None:
    key = patient_key_of.get(row["patient_ref"])
    if key is None or row["valid_from"] is None:
        return None
    try:
        giver = ConsentGiver(row["given_by"])
    except ValueError:
        giver = ConsentGiver.PARENT
    status = row["status"]
    if status in {"entered-in-error", "draft", "proposed"}:
        return None
    decision = ConsentDecision.DENY if row["type"] == "deny" or status == "rejected" else ConsentDecision.PERMIT
    return Consent(
        consent_id=f"fhir:{trust_ods}:{row['consent_ref']}", subject_key=key, given_by=giver, decision=decision,
        directions=(Direction.TRUST_TO_SCHOOL,), purposes=tuple(row["purposes"]), valid_from=row["valid_from"],
        valid_to=row["valid_to"], withdrawn_on=row["valid_from"] if status == "inactive" else None,
    )


READERS = {
    "Patient": patient,
    "ServiceRequest": service_request,
    "EpisodeOfCare": episode_of_care,
    "Appointment": appointment,
    "PractitionerRole": practitioner_role,
    "Consent": consent,
}


def canonical(rtype: str, res: Row) -> Row | None:
    if not res.get("id"):
        raise InboundError("id", f"{rtype} has no id")
    try:
        return READERS[rtype](res)
    except InboundError:
        raise
    except (KeyError, TypeError, IndexError, AttributeError):
        raise InboundError("structure", f"{rtype} is not shaped as UK Core R4 expects") from None
