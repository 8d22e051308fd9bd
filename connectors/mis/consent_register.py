"""The school's consent register export (CSV; columns in docs/formats.md).

A row that cannot be read is quarantined by position (`row#N`) with the column and reason; the UPN
stays in the file. The mappings issue moves the column map into a declarative mapping.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

from schoolslink.keys import learner_key
from schoolslink.model import Consent, ConsentDecision, ConsentGiver, Direction

COLUMNS = (
    "record_id", "upn", "given_by", "decision", "directions", "purposes", "valid_from", "valid_to",
    "withdrawn_on", "competent", "child_protection", "do_not_tell_parent",
)


@dataclass(slots=True)
class RegisterFlags:
    competent: bool = False
    child_protection: bool = False
    do_not_tell_parent: bool = False


@dataclass(slots=True)
class ConsentRegister:
    consents: list[Consent] = field(default_factory=list)
    flags: dict[str, RegisterFlags] = field(default_factory=dict)  # by learner key
    quarantined: list[tuple[str, str, str]] = field(default_factory=list)  # (record, field, reason)


def _date(s: str) -> date | None:
    s = s.strip()
    return date.fromisoformat(s) if s else None


def _bool(s: str) -> bool:
    return s.strip().lower() in {"true", "yes", "y", "1"}


def read_register(path: Path, school_urn: str) -> ConsentRegister:
    reg = ConsentRegister()
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = set(COLUMNS) - set(reader.fieldnames or ())
        if missing:
            reg.quarantined.append(("file", ",".join(sorted(missing)),
                                    f"consent register lacks column(s) {', '.join(sorted(missing))}"))
            return reg
        for n, row in enumerate(reader, start=2):
            where = f"row#{n}"
            try:
                key = learner_key(row["upn"])
                given_by = ConsentGiver(row["given_by"].strip())
                decision = ConsentDecision(row["decision"].strip())
                directions = tuple(Direction(d.strip()) for d in row["directions"].split(";") if d.strip())
                purposes = tuple(p.strip() for p in row["purposes"].split(";") if p.strip())
                valid_from = _date(row["valid_from"])
                if valid_from is None:
                    raise ValueError("valid_from is empty")
            except ValueError as exc:
                field_name = str(exc).split("'")[-2] if "'" in str(exc) else "row"
                reg.quarantined.append((where, field_name, f"consent record unreadable: {_safe(exc)}"))
                continue
            reg.consents.append(
                Consent(
                    consent_id=f"school:{school_urn}:{row['record_id'].strip()}",
                    subject_key=key,
                    given_by=given_by,
                    decision=decision,
                    directions=directions,
                    purposes=purposes,
                    valid_from=valid_from,
                    valid_to=_date(row["valid_to"]),
                    withdrawn_on=_date(row["withdrawn_on"]),
                )
            )
            fl = reg.flags.setdefault(key, RegisterFlags())
            fl.competent |= _bool(row["competent"])
            fl.child_protection |= _bool(row["child_protection"])
            fl.do_not_tell_parent |= _bool(row["do_not_tell_parent"])
    return reg


def _safe(exc: Exception) -> str:
    """An exception message without the offending value (it may be a UPN or a date of birth)."""
    text = str(exc)
    if "is not a valid" in text:
        return "a value is not one of the allowed codes"
    if "Invalid isoformat" in text:
        return "a date is not YYYY-MM-DD"
    return text[:120]
