"""Read CSV exports from school and college MIS into canonical `Learner`s (docs/formats.md, "CSV exports").

A CSV layout is data, not code: a column map under mappings/mis-in/ (`kind: columns`) with a `layout:` block
(mappings/README.md) says how to recognise the layout's header row (`detect`), which identifier keys a learner
(`key: upn` or `key: uln`), whether an export is the whole roll (`qualifier`), and optionally its `delimiter`,
`encoding` and the column holding the MIS's own record id (`source_id`). Onboarding a new export layout is one
YAML file (and its golden tests); this module has nothing per layout.

Which layout: the header row (the first line) is compared with every layout's `detect` headings, ignoring case
and runs of white space. A layout matches when all of its detect headings are present; of those that match, the
one with the most detect headings wins. None matching, or two equally specific, refuses the file (naming the
layouts and the headings they lack, never a cell). A caller that knows the layout names it (`layout=`): then only
that layout is tried.

One pass, row by row (the csv module, strict quoting), in constant memory apart from the identifiers already
seen (for the duplicate check) and what `read` returns.

A bad *file* raises `CsvRefused` (a `FileRefused`) with a reason that never quotes the file's content: empty; a
spreadsheet, PDF or other binary (NUL bytes anywhere); UTF-16 text; bytes that are not text in the layout's
encoding (UTF-8, with or without a byte-order mark, unless the layout says `encoding: cp1252`); a first line over
64 KiB; a header matching no layout or two equally; a header that lacks a column the layout requires (its
`required: true` columns and its key; a column's `fallback` headings count) or names a column the layout reads
twice; a quote out of place (not well-formed CSV); a file that ends inside a quoted value (truncated); more than
half of the rows holding more cells than the header (the delimiter or quoting is wrong: the columns cannot be
trusted); a header and no rows in a whole-roll (`full`) export, which would otherwise mark every learner as left;
and a school URN column that disagrees with the school the file landed for (`school_urn=`), or with itself.

A bad *record* is quarantined (`Quarantined`: record `row#N`, N the file line the row starts on; the first field at
fault; every problem found, ending with the position; never a value) and the rest of the file goes on:
- key `upn`: the UPN missing, malformed or with a wrong check letter (upper-cased and trimmed first), or the same
  UPN as an earlier row (the later rows are quarantined, naming the first);
- key `uln`: the ULN missing, not ten digits, or failing its check digit, or a duplicate. A UPN is optional in a
  ULN-keyed layout: one that fails the UPN check is dropped with a `MisWarning` (the learner keeps its ULN), as is
  a UPN an earlier row already gave;
- any column the mapping cannot map (`MappingError`: a required column empty, a date not in the layout's form, a
  code its code table does not list, e.g. a sex code outside ctf-sex, a looked-after flag that is not yes/no);
- a row with more non-empty cells than the header has columns (a value probably holds an unquoted delimiter);
- a school URN column that is not six digits.
Rows with no content (blank lines, a row of empty cells) are skipped; a row with fewer cells than the header reads
the missing ones as empty.

An optional value the mapping drops (e.g. an NHS number failing modulus 11 through `valid_nhs_number`) keeps the
learner and adds a `MisWarning`, as does a SEN provision outside the ctf-sen-provision codes (kept as stated).

School URN: a layout whose columns fill `school_urn` is checked against the `school_urn` argument (the landing
folder's school): a row that states another school refuses the whole file, since it may be another school's
export and nothing from it may land on this school's roll. Without the argument the first URN stated is the file's,
and a second, different one refuses the file. A layout with no URN column takes `school_urn`, or "" when the
caller gives none (`schoolslink mis check` does not know the school).

Refusals can come after rows were read (a CSV is only known to be whole at its end): `read` returns nothing from a
refused file.
"""

from __future__ import annotations

import csv
import gc
import io
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Final

from connectors.mis.base import (
    MisExport,
    MisWarning,
    Quarantined,
    learner_from_mapped,
    learner_template_problems,
    sen_codes,
)
from connectors.mis.errors import CsvRefused
from schoolslink.errors import ConfigurationError
from schoolslink.identifiers import is_valid_uln, is_valid_upn, normalise_upn
from schoolslink.mapping.engine import (
    LEARNER_REQUIRED_TARGETS,
    Column,
    Layout,
    Mapping,
    MappingError,
    MappingSet,
    column_failures,
    heading_key,
    load_mappings,
)

_HEAD: Final = 1 << 16  # the header row must fit in this
_URN_RE: Final = re.compile(r"\d{6}")
_UPN_SHAPE_RE: Final = re.compile(r"[A-Z]\d{11}[0-9ABCDEFGHJKLMNPQRTUVWXYZ]")
_UTF8_BOM: Final = b"\xef\xbb\xbf"
_UTF16_BOMS: Final = (b"\xff\xfe", b"\xfe\xff")
_BINARY_SIGNATURES: Final = (
    (b"PK\x03\x04", "a ZIP archive (an XLSX spreadsheet is one), not CSV text: save it as CSV"),
    (b"\xd0\xcf\x11\xe0", "an Excel 97-2003 (XLS) or other Office file, not CSV text: save it as CSV"),
    (b"%PDF", "a PDF, not CSV text: export the report as CSV"),
)
_ENCODING_NAMES: Final = {"utf-8-sig": "UTF-8", "cp1252": "Windows-1252 (cp1252)"}


class _NulInFile(Exception):
    def __init__(self, line: int) -> None:
        super().__init__("NUL byte")
        self.line = line


class _Prefixed(io.RawIOBase):
    """The bytes already read (`head`) and then the rest of `rest`, as one raw stream. Closing it leaves `rest`
    open (the caller's stream stays the caller's)."""

    def __init__(self, head: bytes, rest: IO[bytes]) -> None:
        self._head = head
        self._pos = 0
        self._rest = rest

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        want = len(b)
        if self._pos < len(self._head):
            k = min(want, len(self._head) - self._pos)
            b[:k] = self._head[self._pos:self._pos + k]
            self._pos += k
            return k
        data = self._rest.read(want)
        k = len(data)
        b[:k] = data
        return k


# The chosen layout, ready to read --------------------------------------------------------------------------------


class _Plan:
    """A layout's mapping compiled and checked against Learner (a ConfigurationError if it cannot make one)."""

    def __init__(self, ms: MappingSet, m: Mapping) -> None:
        assert m.layout is not None
        self.mapping = m
        self.layout: Layout = m.layout
        self.compiled = ms.compile(m.name)
        key = self.layout.key
        problems = learner_template_problems(m.template, (*LEARNER_REQUIRED_TARGETS, key))
        if problems:
            raise ConfigurationError(f"{m.path}: the {m.name} columns must fill Learner's fields: "
                                     + "; ".join(problems))
        by_target = {c.target: c for c in m.columns}
        self.key_column: Column = by_target[key]
        self.upn_column = by_target.get("upn")
        self.urn_column = by_target.get("school_urn")
        self.required = tuple(c for c in m.columns if c.required or c is self.key_column)
        # Columns whose stated value, when the mapping drops it, is worth a warning (the identifiers and the URN
        # have their own checks).
        self.warn_columns = tuple(c for c in m.columns if c.target not in {key, "upn", "school_urn"})
        self.tables = ms.tables
        self.sen_codes = sen_codes(ms)
        # The names a row is keyed by: the mapping's own spelling of each heading it reads.
        names = [h for c in m.columns for h in c.headings]
        if self.layout.source_id is not None:
            names.append(self.layout.source_id)
        self.names = {heading_key(n): n for n in names}


# Header and layout detection -----------------------------------------------------------------------------------


def _header_cells(line: str, delimiter: str) -> list[str]:
    try:
        cells = next(csv.reader([line], delimiter=delimiter, strict=True), [])
    except csv.Error:
        return []
    return cells


def _first_line(head: bytes, complete: bool) -> bytes:
    end = head.find(b"\n")
    if end < 0:
        if not complete:
            raise CsvRefused("the first line is longer than 64 KiB: this is not a CSV export with a header row")
        return head
    return head[: end + 1]


def _check_head(head: bytes) -> None:
    """Refuse early what is not CSV text at all: empty, binary, UTF-16."""
    if not head.removeprefix(_UTF8_BOM).strip():
        raise CsvRefused("file is empty")
    for signature, what in _BINARY_SIGNATURES:
        if head.startswith(signature):
            raise CsvRefused(f"file is {what}")
    if head.startswith(_UTF16_BOMS):
        raise CsvRefused("file is UTF-16 text; CSV exports are read as UTF-8 (or Windows-1252 where the layout "
                         "says so): save it as CSV UTF-8")
    if b"\x00" in head:
        raise CsvRefused("file has NUL bytes: it is a binary file, not CSV text")


def _decode_header(line: bytes) -> str:
    raw = line.removeprefix(_UTF8_BOM)
    for enc in ("utf-8", "cp1252"):
        try:
            return raw.decode(enc)
        except UnicodeDecodeError:
            continue
    raise CsvRefused("the header row is not text (neither UTF-8 nor Windows-1252): this is not a CSV export")


def _missing_from(layout: Layout, headings: set[str]) -> list[str]:
    return [d for d in layout.detect if heading_key(d) not in headings]


def _choose(ms: MappingSet, header: str, layout: str | None) -> Mapping:
    """The layout the header row fits (see the module docstring), or CsvRefused."""
    candidates = ms.layouts()
    if layout is not None:
        named = [m for m in candidates if m.layout is not None and m.layout.name == layout]
        if not named:
            known = ", ".join(m.layout.name for m in candidates if m.layout is not None) or "none"
            raise ConfigurationError(f"no CSV layout named {layout!r} under {ms.root} (known: {known})")
        candidates = named
    if not candidates:
        raise ConfigurationError(f"no column map under {ms.root} has a layout: block, so no CSV can be read")
    cells_by_delimiter: dict[str, set[str]] = {}
    fits: list[Mapping] = []
    lacking: list[tuple[int, str, list[str]]] = []
    for m in candidates:
        lay = m.layout
        assert lay is not None
        headings = cells_by_delimiter.get(lay.delimiter)
        if headings is None:
            headings = {heading_key(c) for c in _header_cells(header, lay.delimiter)}
            cells_by_delimiter[lay.delimiter] = headings
        missing = _missing_from(lay, headings)
        if missing:
            lacking.append((len(missing), lay.name, missing))
        else:
            fits.append(m)
    if not fits:
        if layout is not None:
            _, name, missing = lacking[0]
            raise CsvRefused(f"the header row lacks columns the {name} layout needs: {', '.join(missing)}",
                             f"csv:{name}")
        lacking.sort()
        shown = "; ".join(f"{name} lacks {_some(missing)}" for _, name, missing in lacking)
        raise CsvRefused(f"the header row matches no CSV layout ({len(lacking)} tried: {shown}); a new export "
                         "layout is one YAML file under mappings/mis-in/")
    fits.sort(key=lambda m: -len(m.layout.detect) if m.layout is not None else 0)
    best = fits[0]
    assert best.layout is not None
    ties = [m.layout.name for m in fits if m.layout is not None and len(m.layout.detect) == len(best.layout.detect)]
    if len(ties) > 1:
        raise CsvRefused(f"the header row fits more than one CSV layout equally well ({', '.join(ties)}): "
                         "name the layout, or give one of them a detect heading only its exports have")
    return best


def _some(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


# The reader --------------------------------------------------------------------------------------------------


class CsvReader:
    """Reads CSV exports in any layout the mappings describe; see the module docstring."""

    def __init__(self, mappings: MappingSet | None = None) -> None:
        """`mappings`: where the layouts come from (default: `load_mappings()`, read again for each file when a
        mapping file has changed)."""
        self._mappings = mappings

    def layouts(self) -> list[Layout]:
        """The layouts this reader knows, by name."""
        ms = self._mappings if self._mappings is not None else load_mappings()
        return [m.layout for m in ms.layouts() if m.layout is not None]

    def read(self, source: Path | str | os.PathLike[str] | IO[bytes], *, layout: str | None = None,
             school_urn: str | None = None) -> MisExport:
        """Read a whole export: format 'csv:<layout>', version None, the layout's qualifier.

        `source` is a path or an open binary stream (read from its start when it can seek). `layout` names the
        layout instead of detecting it. `school_urn` is the school the file landed for: it fills each learner's
        school URN when the layout has no URN column, and is checked against one when it has.

        Raises CsvRefused for a bad file (nothing from it is returned), ConfigurationError for a broken or unknown
        layout, ValueError for a `school_urn` that is not six digits.
        """
        if school_urn is not None and not _URN_RE.fullmatch(school_urn):
            raise ValueError("school_urn must be a 6-digit URN")
        ms = self._mappings if self._mappings is not None else load_mappings()
        if isinstance(source, (str, os.PathLike)):
            with open(source, "rb") as f:
                return self._read(ms, f, layout, school_urn)
        if source.seekable():
            source.seek(0)
        return self._read(ms, source, layout, school_urn)

    def _read(self, ms: MappingSet, f: IO[bytes], layout: str | None, school_urn: str | None) -> MisExport:
        head = f.read(_HEAD)
        _check_head(head)
        first = _first_line(head, complete=len(head) < _HEAD)
        plan = _Plan(ms, _choose(ms, _decode_header(first), layout))
        text = io.TextIOWrapper(io.BufferedReader(_Prefixed(head, f)), encoding=plan.layout.encoding,
                                errors="strict", newline="")
        # The cyclic garbage collector is paused while the rows are read (and restored after, also on error): the
        # reader makes no reference cycles, and collecting while thousands of new Learners pile up is wasted work.
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            return _FileReader(plan, school_urn).run(text)
        finally:
            if was_enabled:
                gc.enable()


def _lines(text: IO[str]) -> Iterator[str]:
    """The file's physical lines, refusing a NUL byte anywhere (the csv module would read it as a character)."""
    n = 0
    for line in text:
        n += 1
        if "\x00" in line:
            raise _NulInFile(n)
        yield line


class _FileReader:
    """State of one pass over one file."""

    def __init__(self, plan: _Plan, school_urn: str | None) -> None:
        self.plan = plan
        self.layout = plan.layout
        self.fmt = plan.layout.format
        self.given_urn = school_urn
        self.urn = school_urn  # the file's school: given, or the first a row states
        self.urn_row = 0
        self.mapped = plan.compiled.fn
        self.run_context = {"mapping_version": plan.compiled.version}
        self.seen: dict[str, int] = {}  # the key identifier -> the row that first gave it
        self.seen_upns: dict[str, int] = {}  # in a ULN-keyed layout, the UPNs already given
        self.export = MisExport(self.fmt, None, school_urn, self.layout.qualifier)
        self.last_end = 0  # the file line the last record read ended on

    def refuse(self, reason: str) -> CsvRefused:
        return CsvRefused(reason, self.fmt)

    def run(self, text: IO[str]) -> MisExport:
        enc = _ENCODING_NAMES.get(self.layout.encoding, self.layout.encoding)
        reader = csv.reader(_lines(text), delimiter=self.layout.delimiter, strict=True)
        try:
            self.rows(reader)
        except UnicodeDecodeError:
            hint = ("; if the MIS writes Windows-1252, the layout says encoding: cp1252"
                    if self.layout.encoding == "utf-8-sig" else "")
            raise self.refuse(f"file has bytes that are not {enc} text (after line {reader.line_num}){hint}") from None
        except _NulInFile as exc:
            raise self.refuse(f"file has NUL bytes (line {exc.line}): it is a binary file, not CSV text") from None
        except csv.Error as exc:
            message = str(exc)
            if "unexpected end of data" in message:
                raise self.refuse(f"file is truncated: it ends inside a quoted value (the row starting on line "
                                  f"{self.last_end + 1})") from None
            if "field limit" in message:
                raise self.refuse(f"file has a value longer than the CSV reader's limit (line {reader.line_num}): "
                                  "this is not a MIS export") from None
            raise self.refuse(f"file is not well-formed CSV: a quote is out of place (line {reader.line_num})") \
                from None
        return self.finish()

    def rows(self, reader: Any) -> None:
        header = next(reader, None)
        if header is None:
            raise self.refuse("file is empty")
        self.last_end = reader.line_num
        index = self.header_index(header)
        width = len(header)
        export = self.export
        ragged = 0
        for cells in reader:
            start = self.last_end + 1
            self.last_end = reader.line_num
            if not any(c.strip() for c in cells):
                continue  # a blank line, or a row of empty cells (spreadsheets write those)
            export.records += 1
            if len(cells) > width and any(c.strip() for c in cells[width:]):
                ragged += 1
                export.quarantined.append(Quarantined(
                    f"row#{start}", "row", f"the row has more cells than the header row has columns (a value may "
                    f"hold an unquoted delimiter) (row#{start})"))
                continue
            n = len(cells)
            row = {name: (cells[i] if i < n else "") for i, name in index}
            self.row(row, start)
        if ragged and ragged * 2 > export.records:
            raise self.refuse(f"{ragged} of {export.records} rows have more cells than the header row: the file is "
                              "not in the layout its header states (check the delimiter and the quoting)")

    def header_index(self, header: list[str]) -> list[tuple[int, str]]:
        """(position, the mapping's name for it) for each header cell the layout reads; refuses a header that
        lacks a required column or names one twice."""
        names = self.plan.names
        index: list[tuple[int, str]] = []
        present: set[str] = set()
        for i, cell in enumerate(header):
            k = heading_key(cell.removeprefix("\ufeff"))
            name = names.get(k)
            if name is None:
                continue
            if k in present:
                raise self.refuse(f"the header row names the column {name} twice")
            present.add(k)
            index.append((i, name))
        missing = [c.name for c in self.plan.required if not any(heading_key(h) in present for h in c.headings)]
        if missing:
            raise self.refuse(f"the header row has no {', '.join(missing)} column"
                              f"{'s' if len(missing) > 1 else ''}, which the {self.layout.name} layout requires")
        return index

    # One row ----------------------------------------------------------------------------------------------------

    def row(self, row: dict[str, str], line: int) -> None:
        plan = self.plan
        problems: list[tuple[str, str]] = []
        key_value = self.key_problems(row, line, problems)
        urn = self.row_urn(row, line, problems)
        out: dict[str, Any] | None
        try:
            out = self.mapped(row, self.run_context)[0]
        except Exception:  # noqa: BLE001 - diagnosed per column below; the mapping's reasons carry no values
            out = None
            problems += self.diagnose(row)
        if problems:
            self.quarantine(line, problems)
            return
        assert out is not None
        # Optional values the mapping dropped (looked at before the output becomes a Learner).
        dropped = [c.name for c in plan.warn_columns if _stated(row, c) and _dropped(out, c.target)]
        if self.layout.key == "uln":
            out["uln"] = key_value
            out["upn"] = self.optional_upn(row, line)
        else:
            out["upn"] = key_value
        out["school_urn"] = urn
        try:
            learner = learner_from_mapped(out)
        except (KeyError, TypeError, ValueError):
            gave = [f for f in LEARNER_REQUIRED_TARGETS if f not in out]
            what = f"no {', '.join(gave)}" if gave else "a date that is not a date or flags that are not flags"
            self.quarantine(line, [("mapping", f"the {plan.mapping.name} mapping gave {what}")])
            return
        export = self.export
        export.learners.append(learner)
        sid = row.get(self.layout.source_id) if self.layout.source_id is not None else None
        export.source_ids.append((sid.strip() or None) if sid is not None else None)
        for name in dropped:
            self.warn(line, name, f"{name} is stated but is not a value the {self.layout.name} layout reads; dropped")
        if learner.sen_provision not in plan.sen_codes:
            self.warn(line, "sen_provision", "SEN provision is not E, K, N or S; kept as stated")

    def key_problems(self, row: dict[str, str], line: int, problems: list[tuple[str, str]]) -> str:
        """The row's key identifier (normalised), adding to `problems` when it is missing, invalid or repeated."""
        col = self.plan.key_column
        raw = _value(row, col)
        if self.layout.key == "upn":
            value = normalise_upn(raw)
            if not value:
                problems.append((col.name, "UPN is missing"))
            elif not is_valid_upn(value):
                problems.append((col.name, "UPN check letter is wrong" if _UPN_SHAPE_RE.fullmatch(value) else
                                 "UPN is not a UPN (13 characters: a check letter, 11 digits, a digit or letter)"))
            else:
                self.check_duplicate(value, "UPN", col.name, line, problems)
            return value
        value = "".join(raw.split())
        if not value:
            problems.append((col.name, "ULN is missing"))
        elif not is_valid_uln(value):
            shape = len(value) == 10 and value.isascii() and value.isdigit() and value[0] != "0"
            problems.append((col.name, "ULN check digit is wrong" if shape else
                             "ULN is not a ULN (10 digits, the first not 0)"))
        else:
            self.check_duplicate(value, "ULN", col.name, line, problems)
        return value

    def check_duplicate(self, value: str, what: str, field: str, line: int, problems: list[tuple[str, str]]) -> None:
        first = self.seen.get(value)
        if first is None:
            self.seen[value] = line
        else:
            problems.append((field, f"duplicate {what}: the same {what} as row#{first}"))

    def optional_upn(self, row: dict[str, str], line: int) -> str:
        """A ULN-keyed layout's UPN: kept when valid and new to the file, else dropped with a warning."""
        col = self.plan.upn_column
        if col is None:
            return ""
        value = normalise_upn(_value(row, col))
        if not value:
            return ""
        if not is_valid_upn(value):
            self.warn(line, col.name, "UPN fails the UPN check; dropped (the learner is keyed by ULN)")
            return ""
        first = self.seen_upns.get(value)
        if first is not None:
            self.warn(line, col.name, f"UPN is the same as row#{first}'s; dropped (the learner is keyed by ULN)")
            return ""
        self.seen_upns[value] = line
        return value

    def row_urn(self, row: dict[str, str], line: int, problems: list[tuple[str, str]]) -> str:
        col = self.plan.urn_column
        stated = _value(row, col).strip() if col is not None else ""
        if not stated:
            return self.urn or ""
        assert col is not None
        if not _URN_RE.fullmatch(stated):
            problems.append((col.name, f"{col.name} is not a 6-digit URN"))
            return self.urn or ""
        if self.urn is None:
            self.urn, self.urn_row = stated, line
        elif stated != self.urn:
            if self.given_urn is not None:
                raise self.refuse(f"row#{line} states a school URN other than the school this file landed for: it "
                                  "may be another school's export, so nothing from it is applied")
            raise self.refuse(f"rows state more than one school URN (row#{self.urn_row} and row#{line}): an export "
                              "is one school's, so nothing from it is applied")
        return stated

    def diagnose(self, row: dict[str, str]) -> list[tuple[str, str]]:
        """Which columns the mapping could not map, and why (value-free): each column's value through its
        function, code table and required check, as the column map compiles them."""
        plan = self.plan
        problems: list[tuple[str, str]] = []
        for f in column_failures(plan.mapping.columns, plan.tables, row,
                                 lambda r, c: _value(r, c) if c.fallback else r.get(c.name)):
            c = f.column
            if f.kind == "unmapped":
                problems.append((c.name, f"{c.name} is not a sex code this layout reads" if c.target == "sex" else
                                 f"{c.name} is not a code the {c.table} code table lists"))
            elif f.kind == "invalid":
                problems.append((c.name, f"{c.name}: {f.why}"))
            else:
                problems.append((c.name, f"{c.name} is missing"))
        if not problems:  # not a column's own failure: the mapping's value-free reason
            try:
                plan.compiled.run(row, record_key="row")
            except MappingError as exc:
                problems.append(("mapping", f"the {plan.mapping.name} mapping could not map it: {exc.reason}"))
            else:
                problems.append(("mapping", f"the {plan.mapping.name} mapping could not map it"))
        return problems

    def quarantine(self, line: int, problems: list[tuple[str, str]]) -> None:
        reasons = "; ".join(dict.fromkeys(r for _, r in problems))
        self.export.quarantined.append(Quarantined(f"row#{line}", problems[0][0], f"{reasons} (row#{line})"))

    def warn(self, line: int, field: str, message: str) -> None:
        self.export.warnings.append(MisWarning(f"row#{line}", field, f"{message} (row#{line})"))

    def finish(self) -> MisExport:
        export = self.export
        if export.records == 0 and self.layout.qualifier == "full":
            raise self.refuse("file has a header row but no learner rows: an empty whole-roll export would mark "
                              "every learner as left")
        if self.urn is not None and self.given_urn is None:
            export.school_urn = self.urn
            for learner in export.learners:  # rows before the first that stated the URN
                if not learner.school_urn:
                    learner.school_urn = self.urn
        return export


def _value(row: dict[str, str], col: Column) -> str:
    """The first of a column's headings with a value in the row ("" when none has one)."""
    for h in col.headings:
        v = row.get(h)
        if v:
            return v
    return ""


def _stated(row: dict[str, str], col: Column) -> bool:
    return bool(_value(row, col).strip())


def _dropped(out: dict[str, Any], target: str) -> bool:
    if target.startswith("flags."):
        flags = out.get("flags")
        return not isinstance(flags, dict) or flags.get(target[6:]) is None
    return out.get(target) in (None, "")


__all__ = ["CsvReader"]
