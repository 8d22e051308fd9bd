"""What every MIS reader returns, whatever the source (CTF XML, a CSV layout, a Wonde pull).

`MisExport` is one source file (or one API pull, landed as a file) read: the learners it states, the
records held back (`Quarantined`, by position, never by value), warnings about items dropped, and what it
says about leavers. Readers raise `connectors.mis.errors.FileRefused` (or a subclass) for a whole file that
must not be used; a bad record is never an exception.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from dataclasses import fields as dataclass_fields
from typing import Any, Final

from schoolslink.errors import ConfigurationError
from schoolslink.mapping.engine import CompiledMapping, MappingError, MappingSet, UnmappedCode, load_mappings
from schoolslink.model import Learner, LearnerFlags


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


# Learners from a learner mapping's output ----------------------------------------------------------------------
# Every reader maps a source record with a declarative mapping (mappings/mis-in/) whose output is Learner's fields
# (flags nested, dates as YYYY-MM-DD). These two helpers are the one way to check such a mapping and to turn its
# output into a Learner.

LEARNER_REQUIRED_FIELDS: Final = ("upn", "school_urn", "surname", "forename", "dob", "sex")
LEARNER_FIELDS: Final = frozenset(f.name for f in dataclass_fields(Learner))
LEARNER_FLAG_FIELDS: Final = frozenset(f.name for f in dataclass_fields(LearnerFlags))


def learner_template_problems(template: Any, required: Iterable[str] = LEARNER_REQUIRED_FIELDS) -> list[str]:
    """What keeps a learner mapping's template from making a Learner: names that are not Learner fields (or
    flags), and `required` fields it does not fill. Empty when it can make one."""
    if not isinstance(template, dict):
        return ["the template must be an object of learner fields"]
    unknown = sorted(k for k in template if not k.startswith("$") and k not in LEARNER_FIELDS)
    flags = template.get("flags")
    if isinstance(flags, dict):
        unknown += sorted(f"flags.{k}" for k in flags if not k.startswith("$") and k not in LEARNER_FLAG_FIELDS)
    missing = [k for k in required if k not in template]
    return ([f"not Learner fields: {', '.join(unknown)}"] if unknown else []) + (
        [f"missing: {', '.join(missing)}"] if missing else [])


def learner_from_mapped(out: dict[str, Any]) -> Learner:
    """A Learner from a learner mapping's output (changed in place): `dob` and `leaving_date` from YYYY-MM-DD
    text to dates, `flags` (an object or nothing) to LearnerFlags.

    Raises KeyError, TypeError or ValueError when the output cannot make a Learner (a required field missing, a
    date that is not a date, a flag that is not a flag): the reader quarantines the record. The messages carry
    no values, but readers give their own reasons anyway.
    """
    dob = out["dob"]
    if not isinstance(dob, dt.date):
        out["dob"] = dt.date.fromisoformat(dob)
    leaving = out.get("leaving_date")
    if leaving is not None and not isinstance(leaving, dt.date):
        out["leaving_date"] = dt.date.fromisoformat(leaving)
    flags = out.get("flags")
    out["flags"] = LearnerFlags(**flags) if flags else LearnerFlags()
    return Learner(**out)


_UNMAPPED_TABLE_RE: Final = re.compile(r"code table (\S+) has no entry")


def mapping_error_problems(exc: MappingError, problems: list[tuple[str, str]], sex_tables: frozenset[str],
                           sex_at: int, sex_field: str) -> list[tuple[str, str]]:
    """A record's problems once its learner mapping failed (changed in place): an unknown code in one of the
    sex tables joins them as "<field> is not one of M, F or U" (where the sex check stands); another unknown
    code, or any other mapping error when nothing else was wrong, as the mapping's value-free reason."""
    if isinstance(exc, UnmappedCode):
        m = _UNMAPPED_TABLE_RE.search(exc.reason)
        if m is not None and m.group(1) in sex_tables:
            problems.insert(sex_at, (sex_field, f"{sex_field} is not one of M, F or U"))
        else:
            problems.append(("mapping", f"the {exc.mapping} mapping held it back: {exc.reason}"))
    elif not problems:
        problems.append(("mapping", f"the {exc.mapping} mapping could not map it: {exc.reason}"))
    return problems


SEN_TABLE: Final = "ctf-sen-provision"  # its codes are the SEN provisions every reader accepts without a warning
SEN_CODES: Final = frozenset({"E", "K", "N", "S"})  # when the mappings have no such table


def sen_codes(ms: MappingSet) -> frozenset[str]:
    table = ms.tables.get(SEN_TABLE)
    return frozenset(table.codes) if table is not None else SEN_CODES


def checked_learner_mapping(ms: MappingSet | None, name: str) -> CompiledMapping:
    """The compiled learner mapping `name`, its template checked against Learner: a ConfigurationError (the
    installation's, not the file's) if it cannot make one. `load_mappings()` keeps what it loaded while no
    mapping file changes, so this is cheap per file."""
    cm = (ms if ms is not None else load_mappings()).compile(name)
    m = cm.mapping
    problems = learner_template_problems(m.template)
    if problems:
        raise ConfigurationError(f"{m.path}: the {m.name} template must fill Learner's fields: " + "; ".join(problems))
    return cm
