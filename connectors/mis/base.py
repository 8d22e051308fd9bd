"""What every MIS reader returns, whatever the source (CTF XML, a CSV layout, a Wonde pull).

`MisExport` is one source file (or one API pull, landed as a file) read: the learners it states, the
records held back (`Quarantined`, by position, never by value), warnings about items dropped, and what it
says about leavers. Readers raise `connectors.mis.errors.FileRefused` (or a subclass) for a whole file that
must not be used; a bad record is never an exception.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from schoolslink.model import Learner


@dataclass(frozen=True, slots=True)
class Quarantined:
    """A record held back. `record` is its position ('pupil#17', 'row#5', 'student#3'), never an identifier."""

    record: str
    field: str  # the first field at fault
    reason: str  # every problem found, for a data manager, ending with the position


@dataclass(frozen=True, slots=True)
class MisWarning:
    """Something dropped or doubtful that did not stop a record: 'header' or a position, field, message."""

    record: str
    field: str
    message: str


@dataclass(slots=True)
class MisExport:
    """One MIS export read.

    `format`: 'ctf', 'csv:<layout>' or 'wonde'. `qualifier`: 'full' when the export is the whole roll (a
    learner it no longer lists has left), 'partial' otherwise. `school_urn`: the school the export says it
    comes from, or None when the format does not say (the landing folder then decides). `left`: identifiers
    (UPN, or 'ULN:' + ULN) of learners the source itself reports as having left. `deleted_source_ids`: the
    source system's own record ids it reports as deleted (Wonde deletions), for the pipeline to resolve.
    `source_ids` runs parallel to `learners`: each learner's id in the source system, where it has one.
    """

    format: str
    version: str | None
    school_urn: str | None
    qualifier: str
    exported_at: dt.datetime | None = None
    learners: list[Learner] = field(default_factory=list)
    quarantined: list[Quarantined] = field(default_factory=list)
    warnings: list[MisWarning] = field(default_factory=list)
    left: list[str] = field(default_factory=list)
    deleted_source_ids: list[str] = field(default_factory=list)
    source_ids: list[str | None] = field(default_factory=list)
    records: int = 0  # records read, accepted or not
