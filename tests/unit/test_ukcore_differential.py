"""The fast output check accepts and refuses exactly what the trusted path does (R4B models + UK Core rules).

Records are generated (good ones through the real mapping, then bad ones by mutating them in the
ways mappings and data really go wrong); every one is checked both ways and the verdicts compared.
"""

from __future__ import annotations

import copy
import random
from collections import Counter
from typing import Any

import pytest

from schoolslink.mapping.engine import MappingError, load_mappings
from schoolslink.mapping.ukcore import check, check_slow

N_RECORDS = 1500  # x 4 resources each, plus every mutation below: about 30,000 comparisons


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCHOOLSLINK_KEY", "differential")


def _record(rng: random.Random, i: int) -> dict[str, Any]:
    return {
        "learner_key": f"lrn-{rng.getrandbits(64):016x}", "school_urn": str(900001 + i % 500), "trust_ods": "R9X",
        "patient_ref": f"Patient/pat-{i:06d}", "effective": f"2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
        "values": {
            "attendance_percent": rng.choice([None, round(rng.uniform(40, 100), 1), 100, 0]),
            "sen_provision": rng.choice([None, "E", "K", "N", "S"]),
            "exclusions_fixed_count": rng.choice([None, 0, 1, 7]),
            "year_group": rng.choice([None, "R", "7", "11", "N1"]),
        },
    }


def _set(r: dict[str, Any], path: list[Any], value: Any) -> dict[str, Any]:
    out = copy.deepcopy(r)
    node: Any = out
    for p in path[:-1]:
        node = node[p]
    if value is _DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return out


_DELETE = object()
MUTATIONS: list[tuple[str, list[Any], Any]] = [
    ("no status", ["status"], _DELETE),
    ("status outside the value set", ["status"], "done"),
    ("status with a space at the end", ["status"], "final "),
    ("id with forbidden characters", ["id"], "sl_bad id!"),
    ("id too long", ["id"], "a" * 65),
    ("no id", ["id"], _DELETE),
    ("effective not a date", ["effectiveDateTime"], "26/11/2026"),
    ("effective impossible month", ["effectiveDateTime"], "2026-13-01"),
    ("effective a date-time without zone", ["effectiveDateTime"], "2026-11-26T10:00:00"),
    ("effective a date-time with zone", ["effectiveDateTime"], "2026-11-26T10:00:00Z"),
    ("subject not a Patient", ["subject", "reference"], "Group/1"),
    ("subject empty", ["subject", "reference"], ""),
    ("subject an unknown element", ["subject", "referenz"], "Patient/1"),
    ("no code", ["code"], _DELETE),
    ("code coding without a system", ["code", "coding", 0, "system"], _DELETE),
    ("code empty coding list", ["code", "coding"], []),
    ("category not a list", ["category"], {"coding": []}),
    ("identifier system not absolute", ["identifier", 0, "system"], "learner-key"),
    ("identifier is the NHS number with a bad check digit", ["identifier", 0],
     {"system": "https://fhir.nhs.uk/Id/nhs-number", "value": "9990000019"}),
    ("identifier is a good NHS number", ["identifier", 0],
     {"system": "https://fhir.nhs.uk/Id/nhs-number", "value": "9990000018"}),
    ("identifier value empty", ["identifier", 0, "value"], ""),
    ("performer ODS identifier not an ODS code", ["performer", 0, "identifier"],
     {"system": "https://fhir.nhs.uk/Id/ods-organization-code", "value": "not an ods code"}),
    ("performer good ODS identifier", ["performer", 0, "identifier"],
     {"system": "https://fhir.nhs.uk/Id/ods-organization-code", "value": "R9X"}),
    ("meta.source someone else's", ["meta", "source"], "https://trust.example/epr"),
    ("meta missing", ["meta"], _DELETE),
    ("an element R4 does not have", ["colour"], "blue"),
    ("a second value[x]", ["valueString"], "extra"),
    ("valueString empty", ["valueBoolean"], "yes"),
    ("resourceType Patient", ["resourceType"], "Patient"),
    ("display empty", ["code", "coding", 0, "display"], ""),
    ("display a number", ["code", "coding", 0, "display"], 7),
]
VALUE_MUTATIONS: dict[str, list[tuple[str, Any]]] = {
    "valueQuantity": [("quantity value text", {"value": "93.1"}), ("quantity value a bool", {"value": True}),
                      ("quantity unknown element", {"value": 1, "unitz": "%"})],
    "valueInteger": [("integer a float", 1.5), ("integer a bool", True), ("integer too big", 2**31),
                     ("integer as text", "3")],
    "valueString": [("string empty", ""), ("string only spaces", "   "), ("string a number", 9)],
    "valueCodeableConcept": [("concept coding not a list", {"coding": {"code": "K"}}),
                             ("concept text empty", {"text": ""})],
}


def _verdict(r: dict[str, Any]) -> tuple[bool, bool]:
    return (check(r) == [], check_slow(r) == [])


def test_fast_and_trusted_paths_agree_on_generated_good_and_bad_records() -> None:
    rng = random.Random(20261126)
    cm = load_mappings().compile("school-context-observations")
    tally: Counter[str] = Counter()
    disagreements = []
    for i in range(N_RECORDS):
        try:
            resources = cm.run(_record(rng, i), record_key=f"rec-{i}").get("resources", [])
        except MappingError:
            tally["mapping error"] += 1
            continue
        for r in resources:
            cases = [("as mapped", r)]
            name, path, value = MUTATIONS[rng.randrange(len(MUTATIONS))]
            cases.append((name, _set(r, path, value)))
            value_key = next(k for k in r if k.startswith("value"))
            vname, vvalue = rng.choice(VALUE_MUTATIONS[value_key])
            cases.append((vname, _set(r, [value_key], vvalue)))
            for label, case in cases:
                fast, slow = _verdict(case)
                tally[f"{'accepted' if slow else 'refused'}"] += 1
                if fast != slow:
                    disagreements.append((label, fast, slow))
    # Every mutation once more, deterministically, on one resource of each value type.
    samples = {next(k for k in r if k.startswith("value")): r
               for r in cm.run(_record(random.Random(1), 1))["resources"]}
    for r in samples.values():
        for name, path, value in MUTATIONS:
            fast, slow = _verdict(_set(r, path, value))
            if fast != slow:
                disagreements.append((name, fast, slow))
    for key, r in samples.items():
        for name, value in VALUE_MUTATIONS[key]:
            fast, slow = _verdict(_set(r, [key], value))
            if fast != slow:
                disagreements.append((name, fast, slow))
    assert disagreements == []
    assert tally["accepted"] > 4000 and tally["refused"] > 4000, tally
