"""Who received what about whom: ledger entries by subject, recipient, agreement, run and time range.

The auditor names the child by NHS number or UPN. Neither is in the ledger: entries carry the keyed pseudonym
the pipeline made (schoolslink/keys.py), so the identifier is checked (check digit, check letter), keyed the same
way (under every id key and pseudonym key version keys.py holds), and then forgotten: it is never stored, logged,
printed or echoed in an error message. Which ledger subjects belong to the child:

* a UPN: its learner key; a learner renumbered to or from it (learner_events 'renumbered'); and the trust
  patients a link ties the learner to (their patient keys).
* an NHS number: its patient key; every learner linked to that patient (withdrawn links too: what went under a
  link later found wrong is still about this child's record); and every learner whose school record holds that
  NHS number (the school's `nhs` match key), with their renumberings.

The ledger table is reflected, not taken from schoolslink/store/schema.py, so the columns a later migration adds
(task_id, key_version) appear in the output as soon as they exist.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import ColumnElement, Connection, MetaData, Table, select

from schoolslink import keys
from schoolslink.identifiers import is_valid_nhs_number, is_valid_upn, normalise_nhs_number, normalise_upn
from schoolslink.model import Direction
from schoolslink.store.schema import learner_events, learners, links

LONDON = ZoneInfo("Europe/London")

# The output columns, in order; those in OPTIONAL only when the ledger has them. `agreement` is the ledger's
# agreement_id; `data_items` is a list in JSON and comma-separated text in CSV (as the ledger keeps it).
COLUMNS = (
    "seq", "at", "run_id", "dag_id", "task_id", "direction", "recipient", "subject_key", "key_version",
    "data_items", "agreement", "agreement_version", "consent_id", "mapping_version", "content_hash", "entry_hash",
)
OPTIONAL = frozenset({"task_id", "key_version"})
_SOURCE = {"agreement": "agreement_id"}  # output column -> ledger column, where they differ
_IN_CHUNK = 500


class AuditUsageError(ValueError):
    """What the auditor asked cannot be asked as given (an identifier that fails its check, a malformed recipient
    or time): a usage error (exit 2). The message never repeats the identifier."""


# -- reading tables defensively ---------------------------------------------------------------------------------


def reflect(conn: Connection, name: str) -> Table:
    """The table as the database has it now (columns a later migration added included)."""
    return Table(name, MetaData(), autoload_with=conn)


def has_table(conn: Connection, name: str) -> bool:
    from sqlalchemy import inspect

    return bool(inspect(conn).has_table(name))


def utc(at: datetime | str) -> datetime:
    """An instant from the store as an aware UTC datetime (SQLite hands back naive UTC, PostgreSQL aware)."""
    if isinstance(at, str):
        at = datetime.fromisoformat(at)
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


def iso(at: datetime | str | None) -> str | None:
    return None if at is None else utc(at).isoformat(timespec="microseconds")


def output_columns(table: Table) -> tuple[str, ...]:
    have = set(table.c.keys())
    return tuple(c for c in COLUMNS if c not in OPTIONAL or c in have)


def entry_of(row: Mapping[str, Any], columns: Sequence[str]) -> dict[str, Any]:
    """One ledger row as the auditor sees it: UTC ISO time, data items as a list."""
    out: dict[str, Any] = {}
    for c in columns:
        v = row.get(_SOURCE.get(c, c))
        if c == "at":
            v = iso(v)
        elif c == "data_items":
            v = [i for i in str(v or "").split(",") if i]
        elif c == "seq" and v is not None:
            v = int(v)
        out[c] = v
    return out


# -- the subject: an identifier, keyed as the pipeline keys it ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Subject:
    """The ledger subjects (keyed pseudonyms) that belong to one child, and how each kind was found."""

    kind: str  # "upn" | "nhs_number" | "subject_key"
    keys: frozenset[str]
    via: tuple[str, ...] = ()

    def describe(self) -> dict[str, Any]:
        """What a JSON answer says about the subject: the kind of identifier given, never the identifier."""
        return {"kind": self.kind, "subject_keys": sorted(self.keys), "via": list(self.via)}


def check_upn(text: str) -> str:
    """The UPN normalised, or AuditUsageError saying what is wrong with it (without repeating it)."""
    upn = normalise_upn(text)
    if len(upn) != 13:
        raise AuditUsageError(f"a UPN has 13 characters; the one given has {len(upn)}")
    if not is_valid_upn(upn):
        raise AuditUsageError("the UPN given is not valid: its check letter (the first character) does not match "
                              "the other twelve, or those are not 11 digits and a digit or letter; check for a typing "
                              "mistake")
    return upn


def check_nhs_number(text: str) -> str:
    """The NHS number normalised (spaces and hyphens dropped), or AuditUsageError (without repeating it)."""
    nhs = normalise_nhs_number(text)
    if len(nhs) != 10 or not nhs.isascii() or not nhs.isdigit():
        raise AuditUsageError("an NHS number has 10 digits (spaces and hyphens are ignored); the one given has not")
    if not is_valid_nhs_number(nhs):
        raise AuditUsageError("the NHS number given is not valid: its check digit (the tenth) does not match the "
                              "first nine (modulus 11); check for a typing mistake")
    return nhs


def upn_keys(upn: str) -> set[str]:
    """The learner key (state store) of a checked UPN under every id key held (keys.py)."""
    return set(keys.learner_keys_for_identity(upn))


def nhs_keys(nhs: str) -> set[str]:
    """The patient key (state store) of a checked NHS number under every id key held."""
    return set(keys.patient_keys_for_nhs_number(nhs))


def ledger_subjects(state_keys: Iterable[str]) -> frozenset[str]:
    """What the ledger records for these state keys: their subject pseudonyms under every pseudonym key held."""
    return frozenset(s for k in state_keys for _v, s in keys.ledger_subjects(k))


def _chunks(values: Iterable[str]) -> Iterable[list[str]]:
    vs = sorted(values)
    for i in range(0, len(vs), _IN_CHUNK):
        yield vs[i : i + _IN_CHUNK]


def _renumbered(conn: Connection, learner_keys: set[str]) -> set[str]:
    """Learner keys tied to these by a renumbering (a UPN that became another, either way)."""
    out: set[str] = set()
    ev = learner_events
    for part in _chunks(learner_keys):
        for a, b in conn.execute(select(ev.c.learner_key, ev.c.other_key).where(
                ev.c.kind == "renumbered", ev.c.learner_key.in_(part) | ev.c.other_key.in_(part))):
            out.update(k for k in (a, b) if k)
    return out - learner_keys


def subject_for_upn(conn: Connection, text: str) -> Subject:
    upn = check_upn(text)
    lks = upn_keys(upn)
    via = [f"the UPN keyed as the pipeline keys it ({len(lks)} id key(s), {len(keys.held_keys())} pseudonym key "
           "version(s))"]
    more = _renumbered(conn, lks)
    if more:
        via.append(f"{len(more)} learner record(s) renumbered to or from it")
        lks |= more
    pks: set[str] = set()
    for part in _chunks(lks):
        pks.update(r for (r,) in conn.execute(select(links.c.patient_key).where(links.c.learner_key.in_(part))))
    if pks:
        via.append(f"{len(pks)} trust patient(s) linked to the learner")
    return Subject("upn", ledger_subjects(lks | pks), tuple(via))


def subject_for_nhs_number(conn: Connection, text: str) -> Subject:
    nhs = check_nhs_number(text)
    pks = nhs_keys(nhs)
    via = [f"the NHS number keyed as the pipeline keys it ({len(pks)} id key(s), {len(keys.held_keys())} pseudonym "
           "key version(s))"]
    linked: set[str] = set()
    withdrawn = 0
    for part in _chunks(pks):
        for lk, gone in conn.execute(select(links.c.learner_key, links.c.withdrawn)
                                     .where(links.c.patient_key.in_(part))):
            linked.add(lk)
            withdrawn += bool(gone)
    if linked:
        via.append(f"{len(linked)} learner(s) linked to the trust patient"
                   + (f" ({withdrawn} link(s) since withdrawn)" if withdrawn else ""))
    held: set[str] = set()
    q = select(learners.c.learner_key, learners.c.match_keys).where(learners.c.match_keys.is_not(None))
    for lk, mk in conn.execute(q):
        if isinstance(mk, dict) and mk.get("nhs") in pks:
            held.add(lk)
    if held - linked:
        via.append(f"{len(held - linked)} learner(s) whose school record holds the NHS number")
    lks = linked | held
    more = _renumbered(conn, lks) if lks else set()
    if more:
        via.append(f"{len(more)} learner record(s) renumbered to or from those")
    return Subject("nhs_number", ledger_subjects(pks | lks | more), tuple(via))


def subject_for_key(text: str) -> Subject:
    k = text.strip()
    if not re.fullmatch(r"[a-z]{3}-[0-9a-f]{8,64}", k):
        raise AuditUsageError("a subject key looks like 'lrn-' or 'pat-' and hex digits (as the ledger shows it)")
    return Subject("subject_key", frozenset({k}), ("the subject key as given",))


# -- the other filters ---------------------------------------------------------------------------------------------


def parse_recipient(text: str) -> str:
    """'URN:<urn>' (a school), 'ODS:<code>' (a trust), or a portal user's name as the ledger records it."""
    t = text.strip()
    m = re.fullmatch(r"(?i)(urn|ods):\s*(\S+)", t)
    if m:
        kind, code = m.group(1).upper(), m.group(2).upper()
        if kind == "URN" and not re.fullmatch(r"\d{6,7}", code):
            raise AuditUsageError("a school's URN has 6 or 7 digits, e.g. URN:900001")
        if kind == "ODS" and not re.fullmatch(r"[A-Z0-9]{3,10}", code):
            raise AuditUsageError("an ODS code has 3 to 10 letters and digits, e.g. ODS:R9X")
        return f"{kind}:{code}"
    if not t or len(t) > 100:
        raise AuditUsageError("a recipient is URN:<urn>, ODS:<code> or a portal user (at most 100 characters)")
    return t


def parse_instant(text: str, *, end: bool = False) -> datetime:
    """A date or date-time as a UTC bound. Without an offset it is UK time (Europe/London). A bare date as the
    end of a range means the whole of that day: the bound is the next midnight (exclusive); otherwise an end is
    inclusive (the bound is one microsecond later)."""
    t = text.strip()
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", t):
            d = date.fromisoformat(t)
            start = datetime.combine(d + timedelta(days=1) if end else d, time(0), tzinfo=LONDON)
            return start.astimezone(UTC)
        at = datetime.fromisoformat(t.replace("Z", "+00:00"))
    except ValueError:
        raise AuditUsageError("a time is YYYY-MM-DD or YYYY-MM-DDTHH:MM[:SS][+HH:MM] (UK time without an offset)"
                              ) from None
    at = at.replace(tzinfo=LONDON) if at.tzinfo is None else at
    return at.astimezone(UTC) + (timedelta(microseconds=1) if end else timedelta(0))


def parse_direction(text: str) -> str:
    try:
        return Direction(text.strip().lower()).value
    except ValueError:
        raise AuditUsageError(f"a direction is one of {', '.join(d.value for d in Direction)}") from None


@dataclass(frozen=True, slots=True)
class LedgerQuery:
    """Every filter given must hold (AND); none given: the whole ledger."""

    subject: Subject | None = None
    recipient: str | None = None
    agreement: str | None = None
    run_id: str | None = None
    since: datetime | None = None  # inclusive, UTC
    until: datetime | None = None  # exclusive, UTC
    direction: str | None = None

    def __post_init__(self) -> None:
        if self.since is not None and self.until is not None and self.until <= self.since:
            raise AuditUsageError("the end of the time range is not after its start")

    def filters(self) -> dict[str, Any]:
        """What was asked, as a JSON answer repeats it: the subject's kind and keys, never the identifier."""
        out: dict[str, Any] = {}
        if self.subject is not None:
            out["subject"] = self.subject.describe()
        for name in ("recipient", "agreement", "run_id", "direction"):
            v = getattr(self, name)
            if v is not None:
                out[name] = v
        if self.since is not None:
            out["from"] = iso(self.since)
        if self.until is not None:
            out["to_before"] = iso(self.until)
        return out


@dataclass(slots=True)
class QueryResult:
    query: LedgerQuery
    columns: tuple[str, ...]
    entries: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"ok": True, "count": len(self.entries), "filters": self.query.filters(),
                "columns": list(self.columns), "entries": self.entries}

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(self.columns)
        for e in self.entries:
            w.writerow(["" if e[c] is None else (",".join(e[c]) if c == "data_items" else e[c])
                        for c in self.columns])
        return buf.getvalue()


def _bound(conn: Connection, at: datetime) -> datetime:
    """A UTC instant as the store compares it (SQLite keeps naive UTC text)."""
    return at.replace(tzinfo=None) if conn.dialect.name == "sqlite" else at


def run_query(conn: Connection, q: LedgerQuery) -> QueryResult:
    t = reflect(conn, "ledger")
    columns = output_columns(t)
    result = QueryResult(q, columns)
    if q.subject is not None and not q.subject.keys:
        return result
    conds: list[ColumnElement[bool]] = []
    if q.recipient is not None:
        conds.append(t.c.recipient == q.recipient)
    if q.agreement is not None:
        conds.append(t.c.agreement_id == q.agreement)
    if q.run_id is not None:
        conds.append(t.c.run_id == q.run_id)
    if q.direction is not None:
        conds.append(t.c.direction == q.direction)
    if q.since is not None:
        conds.append(t.c["at"] >= _bound(conn, q.since))
    if q.until is not None:
        conds.append(t.c["at"] < _bound(conn, q.until))
    parts: list[list[str] | None] = list(_chunks(q.subject.keys)) if q.subject is not None else [None]
    rows: dict[int, dict[str, Any]] = {}
    for part in parts:
        stmt = select(t).where(*conds)
        if part is not None:
            stmt = stmt.where(t.c.subject_key.in_(part))
        for row in conn.execute(stmt.order_by(t.c.seq)).mappings():
            rows[int(row["seq"])] = entry_of(dict(row), columns)
    result.entries = [rows[s] for s in sorted(rows)]
    return result
