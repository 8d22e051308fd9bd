"""The school's consent register export (CSV; columns in docs/formats.md).

A row that cannot be read is quarantined by position (`row#N`) with the COLUMN NAME and a reason; neither
ever holds a value from the file (a UPN, a date). One bad row costs that row only. A file that cannot be
read as the register at all (not UTF-8, not CSV, columns missing) is refused whole: `refused` says why and
no record is returned. `read_register` never raises for bad content. Every record it returns is scoped to
the school whose register it is (`school_urn`).

What each column means, and how it is read, is the declarative column map `mappings/mis-in/consent-register`
(with the `consent-giver` and `consent-decision` code tables): a data engineer changes it, and its golden
tests, without Python. A flag column (competent, child_protection, do_not_tell_parent) that is not yes/no
holds its row back: those flags decide who may see a record, so they are never guessed.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

from schoolslink.keys import learner_key
from schoolslink.mapping.engine import CompiledMapping, MappingError, column_failures, load_mappings
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


MAPPING = "consent-register"


class _RowError(ValueError):
    """One row's problem: the column it is in and a reason that holds no value from the file."""

    def __init__(self, column: str, reason: str) -> None:
        super().__init__(reason)
        self.column = column


_GIVERS = ", ".join(v.value for v in ConsentGiver)
_DECISIONS = ", ".join(v.value for v in ConsentDecision)


def _diagnose(cm: CompiledMapping, tables: dict[str, Any], row: dict[str, Any]) -> _RowError:
    """The first column the mapping could not map, and why (value-free)."""
    for f in column_failures(cm.mapping.columns, tables, row):
        c = f.column
        if f.kind == "unmapped":
            allowed = {"consent-giver": _GIVERS, "consent-decision": _DECISIONS}.get(c.table or "", "")
            return _RowError(c.name, f"{c.name} is not one of {allowed}" if allowed
                             else f"{c.name} is not a known code")
        if f.kind == "invalid":
            why = "not a date (YYYY-MM-DD)" if c.fn == "date" else f.why
            return _RowError(c.name, f"{c.name} is {why}" if why.startswith("not ") else f"{c.name}: {why}")
        return _RowError(c.name, f"{c.name} is empty")
    return _RowError("row", "the row could not be read")


def _parse_row(cm: CompiledMapping, tables: dict[str, Any], row: dict[str | None, str | None],
               school_urn: str) -> tuple[Consent, RegisterFlags]:
    if row.get(None):  # DictReader puts values beyond the header under the key None
        raise _RowError("row", "the row has more values than the header has columns")
    for column in COLUMNS:
        if row.get(column) is None:  # a short row: DictReader fills the columns it did not reach with None
            raise _RowError(column, f"the row ends before column {column}")
    clean = {k: v for k, v in row.items() if k is not None}
    try:
        out = cm.run(clean, record_key="row")
    except MappingError:
        raise _diagnose(cm, tables, clean) from None
    consent = Consent(
        consent_id=f"school:{school_urn}:{out['record_id']}",
        subject_key=learner_key(out["upn"]),
        given_by=ConsentGiver(out["given_by"]),
        decision=ConsentDecision(out["decision"]),
        directions=tuple(Direction(d) for d in out["directions"]),
        purposes=tuple(out["purposes"]),
        valid_from=date.fromisoformat(out["valid_from"]),
        valid_to=date.fromisoformat(out["valid_to"]) if out.get("valid_to") else None,
        withdrawn_on=date.fromisoformat(out["withdrawn_on"]) if out.get("withdrawn_on") else None,
        school_urn=school_urn,
    )
    flags = RegisterFlags(bool(out.get("competent")), bool(out.get("child_protection")),
                          bool(out.get("do_not_tell_parent")))
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
        ms = load_mappings()
        cm = ms.compile(MAPPING)
        for n, row in enumerate(reader, start=2):
            where = f"row#{n}"
            try:
                consent, flags = _parse_row(cm, ms.tables, row, school_urn)
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
