"""Trust FHIR resources (R4, UK Core) -> the rows the state store keeps.

Each resource type is read by a declarative mapping in `mappings/fhir-in/` (field by field, with golden tests
beside each); this module runs the compiled mapping and turns its JSON-ish output into the row the store keeps:
every column present (None where the resource has nothing) and ISO dates as `datetime.date`.

Patient is read, never written, and reduced at once to keyed pseudonyms: the NHS number becomes a
patient key, name and date of birth a match hash, and each attribute scored matching compares (names, date of
birth, gender, home postcode) a keyed hash in `match_keys` (schoolslink/governance/scoring.py). A resource that
cannot be read raises `InboundError` with the field and reason (never its values), and is quarantined by reference.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import date
from typing import Any

from schoolslink.constants import OUR_META_SOURCE, OUR_TAG_CODE, OUR_TAG_SYSTEM
from schoolslink.mapping.engine import MAPPINGS_DIR, load_mappings
from schoolslink.mapping.functions_fhir import InboundError
from schoolslink.model import Consent, ConsentDecision, ConsentGiver, Direction

__all__ = [
    "CONSENT_STATUSES_USED", "MAPPINGS", "READERS", "InboundError", "Row", "appointment", "canonical", "consent",
    "consent_id", "consent_id_prefix", "consent_records", "episode_of_care", "is_ours", "patient", "practitioner_role",
    "service_request",
]

Row = dict[str, Any]

# The mapping that reads each type, the columns of its row (in order) and which of them are dates.
MAPPINGS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "Patient": ("fhir-patient-match",
                ("patient_ref", "patient_key", "school_urn", "match_hash", "verified", "restricted", "version_id",
                 "match_keys"),
                ()),
    "ServiceRequest": ("fhir-service-request-referral",
                       ("referral_ref", "patient_ref", "fhir_status", "received", "team_type", "rejection_reason",
                        "closure_reason", "transition", "moved_area", "performer_ref", "version_id"),
                       ("received",)),
    "EpisodeOfCare": ("fhir-episode-of-care",
                      ("episode_ref", "referral_ref", "fhir_status", "start", "end", "care_manager_ref"),
                      ("start", "end")),
    "Appointment": ("fhir-appointment", ("appointment_ref", "referral_ref", "fhir_status", "start"), ("start",)),
    "PractitionerRole": ("fhir-practitioner-role-contact", ("role_ref", "name", "role", "email"), ()),
    "Consent": ("fhir-consent",
                ("consent_ref", "patient_ref", "school_urns", "status", "type", "purposes", "given_by", "valid_from",
                 "valid_to", "inactive_on"),
                ("valid_from", "valid_to", "inactive_on")),
}
# Columns that hold a list of codes (every other column holds one value); the first may be empty, not None (the
# engine leaves every empty value out of its output).
_LIST_COLUMNS = frozenset({"school_urns", "purposes"})
_EMPTY_LISTS = frozenset({"purposes"})
# Columns that hold a JSON object of keyed hashes the mapping builds itself (text values only).
_KEY_COLUMNS = frozenset({"match_keys"})
_SCALARS = frozenset({str, bool})  # every FHIR element we keep is text (code, id, reference, date) or a flag we make

# Loaded when this module is imported, so a broken mapping file stops the pull at once (the DAG fails to import,
# naming the file and line) instead of quarantining every resource as unreadable. Only the trust readers are
# loaded here (they use no fragments or code tables): a mapping elsewhere being edited cannot stop the pull.
_MAPPING_SET = load_mappings(MAPPINGS_DIR / "fhir-in")


def is_ours(res: Row) -> bool:
    meta = res.get("meta") or {}
    if meta.get("source") == OUR_META_SOURCE:
        return True
    return any(t.get("system") == OUR_TAG_SYSTEM and t.get("code") == OUR_TAG_CODE for t in meta.get("tag") or [])


def _reader(rtype: str, mapping: str, columns: tuple[str, ...], dates: tuple[str, ...]) -> Callable[[Row], Row | None]:
    """The compiled mapping for one type, wrapped to give the stored row: None when the mapping maps the
    resource to nothing (it is not one we keep), every column present, dates as `date`.

    The compiled function is called directly (not through `CompiledMapping.run`): it is the hot path of the pull,
    and an `InboundError` raised inside it must reach the caller as it is, with its field.
    """
    cm = _MAPPING_SET.compile(mapping)
    fn = cm.fn
    ctx = {"mapping_version": cm.version}
    template = dict.fromkeys(columns)
    list_columns = frozenset(columns) & _LIST_COLUMNS
    key_columns = frozenset(columns) & _KEY_COLUMNS
    empty_lists = tuple(c for c in columns if c in _EMPTY_LISTS)
    fromiso = date.fromisoformat
    shape_error = f"{rtype} is not shaped as UK Core R4 expects"

    def read(res: Row) -> Row | None:
        out = fn(res, ctx)[0]
        if not out:
            return None
        if not _SCALARS.issuperset(map(type, out.values())):
            # A path reads whatever JSON sits there: an object or array where R4 has a single value would reach the
            # store (and fail the whole batch). Such a resource is not shaped as R4 says: refuse it.
            for c, v in out.items():
                if type(v) not in _SCALARS and not (
                        c in list_columns and type(v) is list and _SCALARS.issuperset(map(type, v))) and not (
                        c in key_columns and type(v) is dict and all(type(x) is str for x in v.values())):
                    raise InboundError("structure", shape_error)
        row = template.copy()
        row.update(out)
        for c in dates:
            v = out.get(c)
            if v:
                row[c] = fromiso(v)
        for c in empty_lists:
            if c not in out:
                row[c] = []
        return row

    read.__name__ = read.__qualname__ = f"read_{rtype}"
    read.__doc__ = f"A trust {rtype} -> its stored row (mapping {mapping}), or None when it is not one we keep."
    return read


# Consent statuses (R4): only these yield a record; the rest (entered-in-error, draft, proposed, or anything
# unrecognised) mean the trust holds no decision here, so whatever we stored for the resource is forgotten.
CONSENT_STATUSES_USED = frozenset({"active", "inactive", "rejected"})  # as fhir-consent.yaml's $when lists them


def consent_id(trust_ods: str, consent_ref: str, school_urn: str) -> str:
    """The stored id of one school's part of a trust Consent (one record per school the Consent names)."""
    return f"{consent_id_prefix(trust_ods, consent_ref)}{school_urn}"


def consent_id_prefix(trust_ods: str, consent_ref: str) -> str:
    """What every stored id of this trust Consent starts with (see `consent_id`)."""
    return f"fhir:{trust_ods}:{consent_ref}:"


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


def _shaped(value: Any, kind: type) -> bool:
    return not value or isinstance(value, kind)


def _consent_shape(res: Row, *, whole: bool) -> None:
    """Fail closed on a Consent not shaped as R4 says. The mapping reads an element of the wrong JSON type as
    absent; for a Consent that could turn a refusal into "no decision" (forgotten) or drop its period or purposes,
    so such a Consent is refused instead, and its stored refusals stay. `whole`: also the parts read once the
    Consent is known to be a decision (its period, purposes and meta)."""
    provision = res.get("provision")
    ok = _shaped(provision, dict)
    if ok and provision:
        actors = provision.get("actor")
        ok = _shaped(actors, list) and all(
            isinstance(a, dict) and _shaped(a.get("reference"), dict)
            and _shaped((a.get("reference") or {}).get("identifier"), dict)
            for a in actors or ())
        if ok and whole:
            purposes = provision.get("purpose")
            ok = (_shaped(purposes, list) and all(isinstance(p, dict) for p in purposes or ())
                  and _shaped(provision.get("period"), dict))
    if ok and whole:
        ok = _shaped(res.get("meta"), dict)
    if not ok:
        raise InboundError("structure", "Consent is not shaped as UK Core R4 expects")


def _fail_closed_consent(read: Callable[[Row], Row | None]) -> Callable[[Row], Row | None]:
    def read_consent(res: Row) -> Row | None:
        """A trust Consent naming schools -> its row (mapping fhir-consent), or None when it is no decision."""
        _consent_shape(res, whole=False)
        row = read(res)
        if row is not None:
            _consent_shape(res, whole=True)
        return row

    return read_consent



# The reader of each type (each a public name, as before the mappings: tests and tools call them directly).
patient = _reader("Patient", *MAPPINGS["Patient"])
service_request = _reader("ServiceRequest", *MAPPINGS["ServiceRequest"])
episode_of_care = _reader("EpisodeOfCare", *MAPPINGS["EpisodeOfCare"])
appointment = _reader("Appointment", *MAPPINGS["Appointment"])
practitioner_role = _reader("PractitionerRole", *MAPPINGS["PractitionerRole"])
consent = _fail_closed_consent(_reader("Consent", *MAPPINGS["Consent"]))

READERS: dict[str, Callable[[Row], Row | None]] = {
    "Patient": patient,
    "ServiceRequest": service_request,
    "EpisodeOfCare": episode_of_care,
    "Appointment": appointment,
    "PractitionerRole": practitioner_role,
    "Consent": consent,
}


def canonical(rtype: str, res: Row) -> Row | None:
    """The stored row for a trust resource, or None when it is not one we keep (an episode or appointment with no
    referral, a Consent that is no decision). Raises `InboundError` naming the field, never a value."""
    if not res.get("id"):
        raise InboundError("id", f"{rtype} has no id")
    try:
        return READERS[rtype](res)
    except InboundError:
        raise
    except (KeyError, TypeError, IndexError, AttributeError, ValueError):
        raise InboundError("structure", f"{rtype} is not shaped as UK Core R4 expects") from None
