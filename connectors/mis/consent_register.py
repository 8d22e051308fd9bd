"""The school's consent register export (CSV; columns in docs/formats.md).

A row that cannot be read is quarantined by position (`row#N`) with the COLUMN NAME and a reason; neither
ever holds a value from the file (a UPN, a date). One bad row costs that row only. A file that cannot be
read as the register at all (not UTF-8, not CSV, columns missing) is refused whole: `refused` says why and
no record is returned. `read_register` never raises for bad content. Every record it returns is scoped to
the school whose register it is (`school_urn`). The mappings issue moves the column map into a declarative
mapping.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import TypeVar

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
    refused: str | None = None  # why the whole file was refused (then there are no consents and no flags)


_E = TypeVar("_E", ConsentGiver, ConsentDecision, Direction)


class _RowError(ValueError):
    """One row's problem: the column it is in and a reason that holds no value from the file."""

    def __init__(self, column: str, reason: str) -> None:
        super().__init__(reason)
        self.column = column


def _allowed(values: type[ConsentGiver] | type[ConsentDecision] | type[Direction]) -> str:
    return ", ".join(v.value for v in values)


def _text(row: dict[str | None, str | None], column: str, required: bool = False) -> str:
    value = row.get(column)
    if value is None:  # a short row: DictReader fills the columns it did not reach with None
        raise _RowError(column, f"the row ends before column {column}")
    value = value.strip()
    if required and not value:
        raise _RowError(column, f"{column} is empty")
    return value


def _date(row: dict[str | None, str | None], column: str) -> date | None:
    value = _text(row, column)
    if not value:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise _RowError(column, f"{column} is not a date (YYYY-MM-DD)") from None


def _bool(row: dict[str | None, str | None], column: str) -> bool:
    return _text(row, column).lower() in {"true", "yes", "y", "1"}


def _code(value: str, enum: type[_E], column: str) -> _E:
    try:
        return enum(value)
    except ValueError:
        raise _RowError(column, f"{column} is not one of {_allowed(enum)}") from None


def _parse_row(row: dict[str | None, str | None], school_urn: str) -> tuple[Consent, RegisterFlags]:
    if row.get(None):  # DictReader puts values beyond the header under the key None
        raise _RowError("row", "the row has more values than the header has columns")
    record_id = _text(row, "record_id", required=True)
    key = learner_key(_text(row, "upn", required=True))
    given_by = _code(_text(row, "given_by"), ConsentGiver, "given_by")
    decision = _code(_text(row, "decision"), ConsentDecision, "decision")
    directions = tuple(
        _code(d.strip(), Direction, "directions") for d in _text(row, "directions").split(";") if d.strip()
    )
    purposes = tuple(p.strip() for p in _text(row, "purposes").split(";") if p.strip())
    valid_from = _date(row, "valid_from")
    if valid_from is None:
        raise _RowError("valid_from", "valid_from is empty")
    valid_to = _date(row, "valid_to")
    withdrawn_on = _date(row, "withdrawn_on")
    flags = RegisterFlags(_bool(row, "competent"), _bool(row, "child_protection"), _bool(row, "do_not_tell_parent"))
    consent = Consent(
        consent_id=f"school:{school_urn}:{record_id}",
        subject_key=key,
        given_by=given_by,
        decision=decision,
        directions=directions,
        purposes=purposes,
        valid_from=valid_from,
        valid_to=valid_to,
        withdrawn_on=withdrawn_on,
        school_urn=school_urn,
    )
    return consent, flags


def _refuse(reason: str) -> ConsentRegister:
    return ConsentRegister(refused=reason)


def read_register(source: Path | bytes, school_urn: str) -> ConsentRegister:
    """Read a register from a file or from its bytes (a sealed file's plaintext)."""
    reg = ConsentRegister()
    try:
        text = (source if isinstance(source, bytes) else source.read_bytes()).decode("utf-8-sig")
    except UnicodeDecodeError:
        return _refuse("consent register is not UTF-8 text: export it again as CSV (UTF-8)")
    parsed: list[tuple[str, str, Consent, RegisterFlags]] = []  # (where, record_id, consent, flags)
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        header = [(c or "").strip() for c in reader.fieldnames or ()]
        missing = [c for c in COLUMNS if c not in header]
        if missing:
            return _refuse(f"consent register lacks column(s) {', '.join(missing)}: nothing in it was applied")
        reader.fieldnames = header
        for n, row in enumerate(reader, start=2):
            where = f"row#{n}"
            try:
                consent, flags = _parse_row(row, school_urn)
            except _RowError as exc:
                reg.quarantined.append((where, exc.column, f"consent record unreadable: {exc}"))
                continue
            parsed.append((where, consent.consent_id, consent, flags))
    except csv.Error:
        return _refuse("consent register is not a well-formed CSV file: nothing in it was applied")

    # A record id must be unique in the file: a repeated one is ambiguous, so none of its rows counts.
    seen: dict[str, int] = {}
    for _, cid, _, _ in parsed:
        seen[cid] = seen.get(cid, 0) + 1
    for where, cid, consent, flags in parsed:
        if seen[cid] > 1:
            reg.quarantined.append((where, "record_id", "consent record unreadable: record_id is not unique "
                                                        "in the file"))
            continue
        reg.consents.append(consent)
        fl = reg.flags.setdefault(consent.subject_key, RegisterFlags())
        fl.competent |= flags.competent
        fl.child_protection |= flags.child_protection
        fl.do_not_tell_parent |= flags.do_not_tell_parent
    return reg
