"""Canonical school context -> UK Core Observations we own, each referencing the trust's own Patient.

One Observation per data item the agreement and the consent allow; never a Patient, never the UPN
(the subject is the trust's Patient reference; our learner key is a keyed pseudonym). Ids are keyed
HMACs of our own source keys, so a re-run yields the same resources.
"""

from __future__ import annotations

import hashlib
from datetime import date
from pathlib import Path
from typing import Any

from schoolslink.constants import (
    LEARNER_KEY_SYSTEM,
    OUR_META_SOURCE,
    OUR_TAG_CODE,
    OUR_TAG_SYSTEM,
    SCHOOL_CONTEXT_SYSTEM,
    SCHOOL_URN_SYSTEM,
)
from schoolslink.keys import resource_id

MAPPING_VERSION = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]

_DISPLAY = {
    "attendance_percent": "School attendance this academic year (percent of possible sessions)",
    "sen_provision": "Special educational needs provision",
    "exclusions_fixed_count": "Suspensions (fixed-period exclusions) this academic year",
    "year_group": "National curriculum year group",
}
_SEN = {
    "E": "Education, health and care plan",
    "K": "SEN support",
    "N": "No special educational need",
    "S": "Statement (legacy)",
}

ITEMS = tuple(_DISPLAY)


def context_items(plain: dict[str, Any]) -> dict[str, Any]:
    """The school-context values the canonical learner holds, by canonical item name."""
    possible = plain.get("attendance_sessions_possible")
    attended = plain.get("attendance_sessions_attended")
    attendance = None
    if possible and attended is not None and possible > 0:
        attendance = round(100.0 * attended / possible, 1)
    return {
        "attendance_percent": attendance,
        "sen_provision": plain.get("sen_provision") or None,
        "exclusions_fixed_count": plain.get("exclusions_fixed_count"),
        "year_group": plain.get("year_group") or None,
    }


def _value(item: str, value: Any) -> dict[str, Any]:
    if item == "attendance_percent":
        return {"valueQuantity": {"value": value, "unit": "%", "system": "http://unitsofmeasure.org", "code": "%"}}
    if item == "sen_provision":
        return {"valueCodeableConcept": {"coding": [{
            "system": f"{SCHOOL_CONTEXT_SYSTEM}-sen-provision", "code": value,
            "display": _SEN.get(value, value)}]}}
    if item == "exclusions_fixed_count":
        return {"valueInteger": int(value)}
    return {"valueString": str(value)}


def observations(
    *,
    learner_key: str,
    school_urn: str,
    trust_ods: str,
    patient_ref: str,
    values: dict[str, Any],
    allowed: frozenset[str],
    effective: date,
) -> list[dict[str, Any]]:
    """Observations for the allowed items that have a value. `allowed` is agreement ∩ consent."""
    out = []
    for item in ITEMS:
        if item not in allowed:
            continue
        value = values.get(item)
        if value is None:
            continue
        obs: dict[str, Any] = {
            "resourceType": "Observation",
            "id": resource_id("Observation", trust_ods, learner_key, item),
            "meta": {
                "source": OUR_META_SOURCE,
                "tag": [{"system": OUR_TAG_SYSTEM, "code": OUR_TAG_CODE}],
            },
            "identifier": [{"system": LEARNER_KEY_SYSTEM, "value": f"{learner_key}:{item}"}],
            "status": "final",
            "category": [{"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                "code": "social-history", "display": "Social History"}]}],
            "code": {"coding": [{"system": SCHOOL_CONTEXT_SYSTEM, "code": item, "display": _DISPLAY[item]}]},
            "subject": {"reference": patient_ref},
            "effectiveDateTime": effective.isoformat(),
            "performer": [{"identifier": {"system": SCHOOL_URN_SYSTEM, "value": school_urn},
                           "display": f"School URN {school_urn}"}],
            **_value(item, value),
        }
        out.append(obs)
    return out


def check(resources: list[dict[str, Any]]) -> list[str | None]:
    """Validate each resource with the fhir.resources R4B model: None when good, else the reason."""
    from fhir.resources.R4B.observation import Observation
    from pydantic import ValidationError

    results: list[str | None] = []
    for r in resources:
        if r.get("resourceType") == "Patient":
            results.append("we never write a Patient")
            continue
        try:
            Observation.model_validate(r)
            results.append(None)
        except ValidationError as exc:
            fields = sorted({".".join(str(p) for p in e["loc"]) for e in exc.errors()})
            results.append(f"invalid Observation: {', '.join(fields)[:200]}")
    return results
