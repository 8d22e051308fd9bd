"""Output checks for the FHIR we write: the `fhir.resources` R4B models plus our UK Core rules.

Two paths that must agree (a differential test shows they do):
- `check_slow`: the trusted path. Build the R4B model (structure, types, cardinality, FHIR
  primitive patterns), then apply `ukcore_rules`.
- `check`: the fast path used in runs. For the shapes our mappings produce it checks the same
  structure directly on the dict, then `ukcore_rules`; anything outside those shapes goes to the
  slow path, so the fast path never accepts what the trusted path would refuse.

UK Core rules we rely on (R4B checks structure, not profiles): never a Patient; identifier systems
are absolute URIs and the NHS number system carries a valid NHS number; ODS identifiers use the ODS
system with an ODS-shaped code; references to a Patient are `Patient/<id>`; an Observation has
status from its value set, a coded `code`, a subject and exactly one value; resources we own carry
our meta.source.
"""

from __future__ import annotations

import re
from typing import Any

from schoolslink.constants import NHS_NUMBER_SYSTEM, ODS_ORGANISATION_SYSTEM, OUR_META_SOURCE
from schoolslink.identifiers import is_valid_nhs_number
from schoolslink.mapping.engine import ConstDict, ConstList

ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
CODE = re.compile(r"[^\s]+( [^\s]+)*")
URI = re.compile(r"\S*")
DATE_TIME = re.compile(
    r"([0-9]([0-9]([0-9][1-9]|[1-9]0)|[1-9]00)|[1-9]000)(-(0[1-9]|1[0-2])(-(0[1-9]|[1-2][0-9]|3[0-1])"
    r"(T([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]{1,9})?(Z|(\+|-)((0[0-9]|1[0-3]):[0-5][0-9]|14:00)))?)?)?"
)
REFERENCE = re.compile(r"[A-Z][A-Za-z]+/[A-Za-z0-9\-.]{1,64}")
ODS_CODE = re.compile(r"[A-Z0-9]{3,10}")
OBS_STATUS = frozenset({"registered", "preliminary", "final", "amended", "corrected", "cancelled",
                        "entered-in-error", "unknown"})
VALUE_KEYS = ("valueQuantity", "valueCodeableConcept", "valueString", "valueInteger", "valueBoolean",
              "valueDateTime")

_FALLBACK = object()
_DICT = (dict, ConstDict)
_LIST = (list, ConstList)
# Verdicts on constant output parts (shared by every record of a mapping), by identity. The object is
# kept in the entry and compared, so a reused id can never return another object's verdict.
_MEMO: dict[tuple[str, int], tuple[Any, Any]] = {}


def _memo(kind: str, obj: Any, fn: Any) -> bool | object:
    key = (kind, id(obj))
    hit = _MEMO.get(key)
    if hit is not None and hit[0] is obj:
        return hit[1]  # type: ignore[no-any-return]
    verdict: bool | object = fn(obj)
    if len(_MEMO) < 4096:
        _MEMO[key] = (obj, verdict)
    return verdict


def _s(v: Any) -> bool:
    """A FHIR string: text, not empty, not only white space at the ends beyond what FHIR allows."""
    return v.__class__ is str and v != "" and v.strip() != ""


def _uri(v: Any) -> bool:
    return v.__class__ is str and v != "" and URI.fullmatch(v) is not None


def _code(v: Any) -> bool:
    return v.__class__ is str and CODE.fullmatch(v) is not None


def _coding(c: Any) -> bool | object:
    if c.__class__ is ConstDict:
        return _memo("coding", c, _coding_plain)
    return _coding_plain(c)


def _coding_plain(c: Any) -> bool | object:
    if c.__class__ not in _DICT or not c or not set(c) <= {"system", "code", "display"}:
        return _FALLBACK
    return (("system" not in c or _uri(c["system"])) and ("code" not in c or _code(c["code"]))
            and ("display" not in c or _s(c["display"])))


def _concept(cc: Any) -> bool | object:
    if cc.__class__ is ConstDict:
        return _memo("concept", cc, _concept_plain)
    return _concept_plain(cc)


def _concept_plain(cc: Any) -> bool | object:
    if cc.__class__ not in _DICT or not cc or not set(cc) <= {"coding", "text"}:
        return _FALLBACK
    if "text" in cc and not _s(cc["text"]):
        return False
    codings = cc.get("coding")
    return True if codings is None else _each_plain(codings, _coding)


def _identifier(i: Any) -> bool | object:
    if i.__class__ not in _DICT or not i or not set(i) <= {"system", "value"}:
        return _FALLBACK
    return ("system" not in i or _uri(i["system"])) and ("value" not in i or _s(i["value"]))


def _reference(r: Any) -> bool | object:
    if r.__class__ not in _DICT or not r:
        return _FALLBACK
    if set(r) <= {"reference", "display"}:
        return ("reference" not in r or _s(r["reference"])) and ("display" not in r or _s(r["display"]))
    if set(r) <= {"identifier", "display"}:
        ident = _identifier(r.get("identifier"))
        if ident is not True:
            return ident
        return "display" not in r or _s(r["display"])
    return _FALLBACK


def _meta(m: Any) -> bool | object:
    if m.__class__ not in _DICT or not m or not set(m) <= {"source", "tag"}:
        return _FALLBACK
    if "source" in m and not _uri(m["source"]):
        return False
    tags = m.get("tag")
    return True if tags is None else _each_plain(tags, _coding)


def _each(values: Any, check: Any) -> bool | object:
    if values.__class__ is ConstList:
        return _memo(check.__name__, values, lambda v: _each_plain(v, check))
    return _each_plain(values, check)


def _each_plain(values: Any, check: Any) -> bool | object:
    if values.__class__ not in _LIST or not values:
        return _FALLBACK
    for v in values:
        r: bool | object = check(v)
        if r is not True:
            return r
    return True


_OBS_KEYS = frozenset({"resourceType", "id", "meta", "identifier", "status", "category", "code", "subject",
                       "effectiveDateTime", "performer", *VALUE_KEYS})


def _observation_structure(r: dict[str, Any]) -> bool | object:
    """R4B's structural checks, for the Observation shapes our mappings make; _FALLBACK for any other shape.

    Returns True only when every element is one the trusted path would accept; on anything else
    (another shape, or a fault) it returns _FALLBACK and the trusted path decides and names the fields.
    """
    if not r.keys() <= _OBS_KEYS:
        return _FALLBACK
    v = r.get("id")
    if v is not None and not (v.__class__ is str and ID.fullmatch(v)):
        return _FALLBACK
    v = r.get("status")
    if v is None or not _code(v):
        return _FALLBACK
    v = r.get("code")
    if v is None or _concept(v) is not True:
        return _FALLBACK
    v = r.get("meta")
    if v is not None and _meta(v) is not True:
        return _FALLBACK
    v = r.get("subject")
    if v is not None and _reference(v) is not True:
        return _FALLBACK
    for key, each in (("identifier", _identifier), ("category", _concept), ("performer", _reference)):
        v = r.get(key)
        if v is not None and _each(v, each) is not True:
            return _FALLBACK
    v = r.get("effectiveDateTime")
    if v is not None and not (v.__class__ is str and DATE_TIME.fullmatch(v)):
        return _FALLBACK
    found = 0
    for k in VALUE_KEYS:
        if k not in r:
            continue
        found += 1
        v = r[k]
        if k == "valueQuantity":
            if v.__class__ not in _DICT or not v or not v.keys() <= {"value", "unit", "system", "code"}:
                return _FALLBACK
            if not (("value" not in v or v["value"].__class__ in (int, float))
                    and ("unit" not in v or _s(v["unit"])) and ("system" not in v or _uri(v["system"]))
                    and ("code" not in v or _code(v["code"]))):
                return _FALLBACK
        elif k == "valueCodeableConcept":
            if _concept(v) is not True:
                return _FALLBACK
        elif k == "valueString":
            if not _s(v):
                return _FALLBACK
        elif k == "valueInteger":
            if not (v.__class__ is int and -(2**31) <= v < 2**31):
                return _FALLBACK
        else:
            return _FALLBACK
    return found <= 1 or _FALLBACK


def _walk_identifiers(node: Any, out: list[dict[str, Any]]) -> None:
    if node.__class__ in _DICT:
        if "system" in node and "value" in node and node.keys() <= {"system", "value", "use", "type", "extension",
                                                                     "period", "assigner"}:
            out.append(node)
        for v in node.values():
            _walk_identifiers(v, out)
    elif node.__class__ in _LIST:
        for v in node:
            _walk_identifiers(v, out)


def ukcore_rules(r: dict[str, Any]) -> list[str]:
    """The UK Core and schoolslink rules that R4B's structural models do not check."""
    problems: list[str] = []
    rtype = r.get("resourceType")
    if rtype == "Patient":
        return ["we never write a Patient"]
    if (r.get("meta") or {}).get("source") != OUR_META_SOURCE:
        problems.append("meta.source must mark the resource as ours")
    if "id" not in r:
        problems.append("id is required: we write by PUT with deterministic ids")
    idents: list[dict[str, Any]] = []
    _walk_identifiers({k: v for k, v in r.items() if k != "meta"}, idents)
    for ident in idents:
        system, value = ident.get("system"), ident.get("value")
        if not isinstance(system, str) or not system.startswith(("http://", "https://", "urn:")):
            problems.append("identifier.system must be an absolute URI")
        elif system == NHS_NUMBER_SYSTEM and not (isinstance(value, str) and is_valid_nhs_number(value)):
            problems.append("NHS number identifier fails the modulus 11 check")
        elif system == ODS_ORGANISATION_SYSTEM and not (isinstance(value, str) and ODS_CODE.fullmatch(value)):
            problems.append("ODS code is not an ODS code")
    if rtype == "Observation":
        if r.get("status") not in OBS_STATUS:
            problems.append("Observation.status is not in the FHIR value set")
        codings = (r.get("code") or {}).get("coding") or []
        if not any(isinstance(c, dict) and c.get("system") and c.get("code") for c in codings):
            problems.append("Observation.code needs a coding with a system and a code")
        subject = (r.get("subject") or {}).get("reference")
        if not (isinstance(subject, str) and subject.startswith("Patient/") and REFERENCE.fullmatch(subject)):
            problems.append("Observation.subject must reference the trust's Patient as Patient/<id>")
        if sum(1 for k in r if k.startswith("value")) != 1:
            problems.append("Observation needs exactly one value[x]")
    return problems


def check_slow(r: dict[str, Any]) -> list[str]:
    """The trusted path: fhir.resources R4B model, then our UK Core rules."""
    from fhir.resources.R4B import get_fhir_model_class
    from pydantic import ValidationError

    rtype = r.get("resourceType")
    if rtype == "Patient":
        return ["we never write a Patient"]
    try:
        model = get_fhir_model_class(str(rtype))
    except (KeyError, ValueError):
        return [f"{rtype!r} is not a FHIR R4 resource type"]
    try:
        model.model_validate(r)
    except ValidationError as exc:
        fields = sorted({".".join(str(p) for p in e["loc"]) for e in exc.errors()})
        return [f"not valid FHIR R4: {', '.join(fields)[:200]}"]
    except (ValueError, TypeError) as exc:
        return [f"not valid FHIR R4: {type(exc).__name__}"]
    return ukcore_rules(r)


def _identifier_problem(i: dict[str, Any]) -> str | None:
    system, value = i.get("system"), i.get("value")
    if system is None or value is None:
        return None if system is None and value is None else _generic_identifier_problem(i)
    if not system.startswith(("http://", "https://", "urn:")):
        return "identifier.system must be an absolute URI"
    if system == NHS_NUMBER_SYSTEM and not is_valid_nhs_number(value):
        return "NHS number identifier fails the modulus 11 check"
    if system == ODS_ORGANISATION_SYSTEM and not ODS_CODE.fullmatch(value):
        return "ODS code is not an ODS code"
    return None


def _generic_identifier_problem(i: dict[str, Any]) -> str | None:
    found: list[dict[str, Any]] = []
    _walk_identifiers(i, found)
    for ident in found:
        probs = ukcore_rules({"resourceType": "_", "meta": {"source": OUR_META_SOURCE}, "id": "x",
                              "identifier": [ident]})
        if probs:
            return probs[0]
    return None


def _fast_observation(r: dict[str, Any]) -> list[str] | object:
    """Structure (as R4B checks it) and UK Core rules in one pass, for the Observation shapes we make."""
    ok = _observation_structure(r)
    if ok is not True:
        return _FALLBACK  # another shape, or refused: the trusted path decides and names the fields
    problems: list[str] = []
    meta = r.get("meta")
    if meta is None or meta.get("source") != OUR_META_SOURCE:
        problems.append("meta.source must mark the resource as ours")
    if "id" not in r:
        problems.append("id is required: we write by PUT with deterministic ids")
    for i in r.get("identifier", ()):
        p = _identifier_problem(i)
        if p:
            problems.append(p)
    for ref in (r.get("subject"), *r.get("performer", ())):
        if ref is not None and "identifier" in ref:
            p = _identifier_problem(ref["identifier"])
            if p:
                problems.append(p)
    if r["status"] not in OBS_STATUS:
        problems.append("Observation.status is not in the FHIR value set")
    if not any(c.get("system") and c.get("code") for c in r["code"].get("coding", ())):
        problems.append("Observation.code needs a coding with a system and a code")
    subject = (r.get("subject") or {}).get("reference")
    if not (subject.__class__ is str and subject.startswith("Patient/") and REFERENCE.fullmatch(subject)):
        problems.append("Observation.subject must reference the trust's Patient as Patient/<id>")
    if not any(k in r for k in VALUE_KEYS):
        problems.append("Observation needs exactly one value[x]")
    return problems


def check(r: dict[str, Any]) -> list[str]:
    """The fast path: the same answer as check_slow, without building models for the shapes we make."""
    if r.__class__ not in _DICT:
        return ["a resource must be a JSON object"]
    if r.get("resourceType") == "Observation":
        out = _fast_observation(r)
        if out is not _FALLBACK:
            return out  # type: ignore[return-value]
    return check_slow(r)
