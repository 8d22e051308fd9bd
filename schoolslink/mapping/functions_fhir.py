"""Mapping functions for reading FHIR resources (registered into the one registry in functions.py).

The trust-FHIR readers (`mappings/fhir-in/`) use these. A resource that cannot be read raises `InboundError`
(a ValueError) naming the field and the reason, never a value: the mapping engine reports it as a mapping error
and `fhir_inbound` re-raises it as it is, so the resource is quarantined by reference with that field.

functions.py imports this module at its end, after `register` is defined: so the registry is reached through
the module (`_f.register`), never imported by name at the top.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import date
from typing import Any

from schoolslink import keys
from schoolslink.constants import CONFIDENTIALITY_SYSTEM
from schoolslink.identifiers import is_valid_nhs_number
from schoolslink.mapping import functions as _f
from schoolslink.model import ConsentGiver


class InboundError(ValueError):
    """A trust resource that cannot be read: `field` names the element, the message says why (never a value)."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(reason)
        self.field = field


def _register(name: str, min_args: int, max_args: int | None = None) -> Callable[[Callable[..., Any]],
                                                                                Callable[..., Any]]:
    """`functions.register`, refusing a name another module already registered (one registry, no shadowing)."""
    if name in _f.REGISTRY:
        raise RuntimeError(f"mapping function {name!r} is registered twice")
    return _f.register(name, min_args, max_args)


_fromiso = date.fromisoformat


@_register("fhir_date", 2, 4)
def fhir_date(value: Any, field: Any, value2: Any = None, field2: Any = None) -> str | None:
    """An ISO date from a FHIR date or dateTime (`value`, else `value2`); refuses a malformed one naming its field."""
    if not value:
        if not value2:
            return None
        value, field = value2, field2
    text = value[:10] if type(value) is str else str(value)[:10]
    try:
        d = _fromiso(text)
    except ValueError:
        raise InboundError(str(field), f"{field} is not a date") from None
    # YYYY-MM-DD is the one 10-character form with these dashes that fromisoformat takes: it is already ISO.
    return text if text[4:5] == "-" and text[7:8] == "-" else d.isoformat()


@_register("fhir_ref", 2)
def fhir_ref(rtype: Any, rid: Any) -> str | None:
    """The relative reference 'Type/id' of a resource, from its type and id."""
    if rid is None or rid == "":
        return None
    return f"{rtype}/{rid}"


@_register("fhir_required", 3)
def fhir_required(value: Any, field: Any, reason: Any) -> Any:
    """The value, or a refusal naming the field with the reason given (a resource we cannot use without it)."""
    if value is None or value == "":
        raise InboundError(str(field), str(reason))
    return value


@_register("fhir_reference", 4)
def fhir_reference(value: Any, rtype: Any, field: Any, reason: Any) -> str:
    """A reference 'Type/id' to a resource of `rtype`; anything else is refused with the field and reason given."""
    if isinstance(value, str) and value.startswith(f"{rtype}/"):
        return value
    raise InboundError(str(field), str(reason))


@_register("fhir_reference_tail", 1)
def fhir_reference_tail(value: Any) -> str | None:
    """'Type/id' from a relative, absolute or versioned (`.../_history/n`) reference."""
    if not value:
        return None
    return "/".join(str(value).split("/_history/")[0].split("/")[-2:])


@_register("fhir_first_reference", 1, 2)
def fhir_first_reference(refs: Any, rtype: Any = None) -> str | None:
    """The first `reference` in a list of References (of `rtype`, when given)."""
    prefix = f"{rtype}/" if rtype else ""
    for r in refs or ():
        if isinstance(r, dict) and r.get("reference"):
            ref = str(r["reference"])
            if ref.startswith(prefix):
                return ref
    return None


@_register("fhir_one_of", 4, 12)
def fhir_one_of(value: Any, field: Any, reason: Any, *allowed: Any) -> str:
    """The value as text if it is one of the codes allowed; anything else is refused with the field and reason."""
    text = str(value)
    if text not in allowed:
        raise InboundError(str(field), str(reason))
    return text


@_register("patient_key", 1)
def patient_key(nhs_number: Any) -> str:
    """The keyed pseudonym of a Patient's NHS number; refuses a missing one or one failing the modulus 11 check."""
    if not nhs_number:
        raise InboundError("identifier", "Patient has no NHS number: it cannot be matched")
    nhs = str(nhs_number).replace(" ", "")
    if not is_valid_nhs_number(nhs):
        raise InboundError("identifier", "Patient's NHS number fails the modulus 11 check")
    return keys.patient_key(nhs)


@_register("match_hash", 4)
def match_hash(school_urn: Any, family: Any, given: Any, dob_iso: Any) -> str | None:
    """The keyed match hash of school URN, surname, forename and ISO date of birth; nothing unless all four."""
    if not (school_urn and family and given and dob_iso):
        return None
    return keys.match_hash(str(school_urn), str(family), str(given), str(dob_iso))


@_register("match_keys", 8)
def match_keys(school_urn: Any, family: Any, given: Any, usual_family: Any, usual_given: Any, dob_iso: Any,
               gender: Any, postcode: Any) -> dict[str, str] | None:
    """The keyed attribute hashes of a Patient at the school it names (scored matching); nothing without a school."""
    return keys.match_keys(school_urn, surname=family, forename=given, dob=dob_iso, preferred_surname=usual_family,
                           preferred_forename=usual_given, sex=gender, postcode=postcode)


@_register("is_restricted", 1)
def is_restricted(meta: Any) -> bool:
    """True if `meta.security` holds the confidentiality code R (restricted) or V (very restricted), in its
    system or with none.

    Fails closed: a `meta` or `meta.security` not shaped as R4 says is refused, never read as "not restricted"."""
    if not meta:
        return False
    security = meta.get("security") if isinstance(meta, dict) else None
    if not isinstance(meta, dict) or not isinstance(security or [], list) \
            or not all(isinstance(s, dict) for s in security or ()):
        raise InboundError("meta.security", "meta.security is not a list of codings: cannot tell if restricted")
    return any(s.get("code") in ("R", "V") and s.get("system") in (None, CONFIDENTIALITY_SYSTEM)
               for s in security or ())


@_register("fhir_school_urns", 1)
def fhir_school_urns(urns: Any) -> list[str] | None:
    """The school URNs a Consent names, each once, in order; refuses one that is not 6 digits."""
    if not urns:
        return None
    out = list(dict.fromkeys(str(u).strip() for u in urns))
    if any(not (u.isascii() and u.isdigit() and len(u) == 6) for u in out):
        raise InboundError("provision.actor", "Consent names a school by a URN that is not 6 digits")
    return out


# Who gave a Consent ------------------------------------------------------------------------------------------

_GIVER_BY_REFERENCE_TYPE = {
    "Patient": ConsentGiver.YOUNG_PERSON,
    "RelatedPerson": ConsentGiver.PARENT,
    "Organization": ConsentGiver.LOCAL_AUTHORITY,
}
_GIVER_CATEGORIES = frozenset(g.value for g in ConsentGiver)


def reference_type(ref: dict[str, Any]) -> str | None:
    """The resource type a Reference points at: its `type`, else read from `reference` (relative or absolute)."""
    if ref.get("type"):
        return str(ref["type"])
    parts = str(ref.get("reference") or "").split("/_history/")[0].split("/")
    return parts[-2] if len(parts) >= 2 and parts[-1] else None


@_register("consent_giver", 2)
def consent_giver(performers: Any, patient_ref: Any) -> str:
    """Who gave a Consent (young_person, parent, local_authority), from each performer's reference type (a display
    name is a person's name, not a category); a bare display counts only if it is exactly a category. Never
    guessed: a performer of another kind, performers of different kinds, none, or the young person's own
    reference to a different Patient are refused."""
    givers: set[ConsentGiver] = set()
    for performer in performers or ():
        performer = performer if isinstance(performer, dict) else {}
        rtype = reference_type(performer)
        if rtype in _GIVER_BY_REFERENCE_TYPE:
            if (rtype == "Patient" and performer.get("reference")
                    and fhir_reference_tail(performer["reference"]) != patient_ref):
                raise InboundError("performer", "Consent performer is a different Patient from the one the "
                                                "consent is about: cannot tell who gave this consent")
            givers.add(_GIVER_BY_REFERENCE_TYPE[rtype])
        elif performer.get("display") in _GIVER_CATEGORIES:
            givers.add(ConsentGiver(performer["display"]))
        else:
            raise InboundError("performer", "Consent performer is neither a Patient, RelatedPerson or Organization "
                                            "reference nor a giver category: cannot tell who gave this consent")
    if not givers:
        raise InboundError("performer", "Consent has no performer: cannot tell who gave this consent")
    if len(givers) > 1:
        raise InboundError("performer", "Consent performers are of different kinds: cannot tell who gave this "
                                        "consent")
    return givers.pop().value
