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


# Consent statuses (R4): only these yield a record; the rest (entered-in-error, draft, proposed, or anything
# unrecognised) mean the trust holds no decision here, so whatever we stored for the resource is forgotten.
CONSENT_STATUSES_USED = frozenset({"active", "inactive", "rejected"})
_GIVER_BY_REFERENCE_TYPE = {
    "Patient": ConsentGiver.YOUNG_PERSON,
    "RelatedPerson": ConsentGiver.PARENT,
    "Organization": ConsentGiver.LOCAL_AUTHORITY,
}


def consent_id(trust_ods: str, consent_ref: str, school_urn: str) -> str:
    """The stored id of one school's part of a trust Consent (one record per school the Consent names)."""
    return f"{consent_id_prefix(trust_ods, consent_ref)}{school_urn}"


def consent_id_prefix(trust_ods: str, consent_ref: str) -> str:
    """What every stored id of this trust Consent starts with (see `consent_id`)."""
    return f"fhir:{trust_ods}:{consent_ref}:"


def _reference_type(ref: Row) -> str | None:
    """The resource type a Reference points at: its `type`, else read from `reference` (relative or absolute)."""
    if ref.get("type"):
        return str(ref["type"])
    parts = str(ref.get("reference") or "").split("/_history/")[0].split("/")
    return parts[-2] if len(parts) >= 2 and parts[-1] else None


def _tail(reference: str) -> str:
    return "/".join(reference.split("/_history/")[0].split("/")[-2:])


def _giver(res: Row, patient_ref: str) -> ConsentGiver:
    """Who gave the consent, from each performer's reference type (a display name is a person's name, not a
    category); a bare display counts only if it is exactly a category. Never guessed: unknown raises."""
    givers: set[ConsentGiver] = set()
    for performer in res.get("performer") or []:
        performer = performer if isinstance(performer, dict) else {}
        rtype = _reference_type(performer)
        if rtype in _GIVER_BY_REFERENCE_TYPE:
            if rtype == "Patient" and performer.get("reference") and _tail(str(performer["reference"])) != patient_ref:
                raise InboundError("performer", "Consent performer is a different Patient from the one the "
                                                "consent is about: cannot tell who gave this consent")
            givers.add(_GIVER_BY_REFERENCE_TYPE[rtype])
        elif performer.get("display") in {g.value for g in ConsentGiver}:
            givers.add(ConsentGiver(performer["display"]))
        else:
            raise InboundError("performer", "Consent performer is neither a Patient, RelatedPerson or Organization "
                                            "reference nor a giver category: cannot tell who gave this consent")
    if not givers:
        raise InboundError("performer", "Consent has no performer: cannot tell who gave this consent")
    if len(givers) > 1:
        raise InboundError("performer", "Consent performers are of different kinds: cannot tell who gave this "
                                        "consent")
    return givers.pop()


def consent(res: Row) -> Row | None:
    """A trust-side Consent naming one or more schools as recipients: the family's decision about trust -> school.

    None when it yields no record (a status that is no decision, no school named, no patient): the caller
    then forgets whatever it stored for this Consent. A Consent whose giver cannot be told raises.
    """
    status = str(res.get("status") or "unknown")
    provision = res.get("provision") or {}
    urns = list(dict.fromkeys(
        str(a["reference"]["identifier"]["value"]).strip()
        for a in provision.get("actor") or []
        if ((a.get("reference") or {}).get("identifier") or {}).get("system") == SCHOOL_URN_SYSTEM
        and a["reference"]["identifier"].get("value")
    ))
    patient_ref = _ref(res.get("patient"))
    if status not in CONSENT_STATUSES_USED or not urns or not patient_ref:
        return None
    patient_ref = _tail(patient_ref)
    if not patient_ref.startswith("Patient/"):
        raise InboundError("patient", "Consent patient is not a Patient reference")
    if any(not (u.isascii() and u.isdigit() and len(u) == 6) for u in urns):
        raise InboundError("provision.actor", "Consent names a school by a URN that is not 6 digits")
    kind = str(provision.get("type") or "permit")
    if kind not in {"permit", "deny"}:
        raise InboundError("provision.type", "Consent provision.type is neither permit nor deny")
    purposes = [p.get("code") for p in provision.get("purpose") or [] if p.get("system") == PURPOSE_SYSTEM]
    period = provision.get("period") or {}
    valid_from = _date(period.get("start") or res.get("dateTime"), "provision.period.start")
    if valid_from is None:
        raise InboundError("provision.period.start", "Consent has neither provision.period.start nor dateTime: "
                                                     "cannot tell from when it counts")
    became_inactive = None
    if status == "inactive":
        became_inactive = (_date((res.get("meta") or {}).get("lastUpdated"), "meta.lastUpdated")
                           or _date(res.get("dateTime"), "dateTime"))
    return {
        "consent_ref": f"Consent/{res['id']}", "patient_ref": patient_ref, "school_urns": urns,
        "status": status, "type": kind,
        "purposes": [p for p in purposes if p], "given_by": _giver(res, patient_ref).value,
        "valid_from": valid_from,
        "valid_to": _date(period.get("end"), "provision.period.end"),
        "inactive_on": became_inactive,
    }


def consent_records(row: Row, patient_key_of: dict[str, str], trust_ods: str) -> list[Consent]:
    """One record per school the Consent names (`consent_id`), each scoped to that school; none when the
    patient is not known here or the status is no decision."""
    key = patient_key_of.get(row["patient_ref"])
    status = row["status"]
    if key is None or row["valid_from"] is None or status not in CONSENT_STATUSES_USED:
        return []
    giver = ConsentGiver(row["given_by"])
    decision = ConsentDecision.DENY if row["type"] == "deny" or status == "rejected" else ConsentDecision.PERMIT
    withdrawn_on = (row.get("inactive_on") or row["valid_from"]) if status == "inactive" else None
    return [
        Consent(
            consent_id=consent_id(trust_ods, row["consent_ref"], urn), subject_key=key, given_by=giver,
            decision=decision, directions=(Direction.TRUST_TO_SCHOOL,), purposes=tuple(row["purposes"]),
            valid_from=row["valid_from"], valid_to=row["valid_to"], withdrawn_on=withdrawn_on, school_urn=urn,
        )
        for urn in row["school_urns"]
    ]


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
