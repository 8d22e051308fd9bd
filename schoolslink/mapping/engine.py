"""The mapping engine: load, check and compile declarative YAML mappings (`mappings/`), then run them.

A mapping's template is a tree whose leaves are literals or expressions. Expressions are dicts whose
keys start with `$` (so they never clash with FHIR element names):

    {$path: "a.b[0].c"}            a value from the input record; `x[k=v]` picks the first item whose k is v
    {$var: name}                   a value computed under `let:` or given by the caller (run context)
    {$const: value}                a literal, even a dict or list
    {$fn: name, $args: [...]}      a registered function (schoolslink/mapping/functions.py)
    {$table: name, $of: expr}      a code table lookup (its `unmapped` policy applies)
    {$fragment: name}              a named fragment's template, on the same record
    {$each: path, $as: v, $do: n}  repeat n for each item of a list (the item is {$var: v})

Any node may also carry `$when` (a condition: omit the node when false), `$default` (a literal when
the value is missing) and `$item` (the canonical data item the node carries: it is dropped, at
compile time, unless the agreement and consent allow that item). Conditions: `$exists`, `$eq`,
`$ne`, `$in`, `$not`, `$all`, `$any`. A missing value, empty text, empty list or empty object is
omitted, as FHIR requires.

A `kind: columns` mapping (a CSV column map) is turned into an equivalent template; with a `layout:` block it
also describes a whole CSV export layout (how to recognise its header row, which identifier keys a learner,
whether it is the whole roll), which `connectors/mis/csv.py` reads with no Python per layout.

Loading refuses unknown keys, unknown functions, tables and fragments, and malformed paths with
`file:line: message`, never later and never silently. A mapping compiles once per run (and per
allowed-item set) to a Python function; running it over a batch costs a few microseconds a record.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any

from schoolslink.errors import ConfigurationError, PermanentDataError
from schoolslink.mapping import functions
from schoolslink.mapping.yamlnodes import LDict, LList, MappingFileError, line_of
from schoolslink.mapping.yamlnodes import load as load_yaml
from schoolslink.model import ALL_DATA_ITEMS, Learner, LearnerFlags

MAPPINGS_DIR = Path(__file__).resolve().parents[2] / "mappings"

EXPR_KEYS = {"$path", "$var", "$const", "$fn", "$table", "$fragment", "$each"}
MODIFIERS = {"$when", "$default", "$item"}
ALLOWED_WITH = {
    "$path": set(),
    "$var": set(),
    "$const": set(),
    "$fn": {"$args"},
    "$table": {"$of"},
    "$fragment": set(),
    "$each": {"$as", "$do"},
}
CONDITIONS = {"$exists", "$eq", "$ne", "$in", "$not", "$all", "$any"}
MAPPING_KEYS = {"mapping", "description", "kind", "input", "output", "vars", "let", "template", "columns", "check",
                "layout"}
COLUMN_KEYS = {"target", "fn", "table", "default", "required", "fallback"}
LAYOUT_KEYS = {"name", "detect", "key", "qualifier", "delimiter", "encoding", "source_id"}
LAYOUT_KEYS_REQUIRED = {"name", "detect", "key", "qualifier"}
LAYOUT_IDENTIFIERS = ("upn", "uln")  # `key:` values: the canonical field that keys a learner
LAYOUT_QUALIFIERS = ("full", "partial")
LAYOUT_DELIMITERS = (",", ";", "\t", "|")
# `encoding:` as written -> the Python codec that reads it (utf-8 reads a byte-order mark too)
LAYOUT_ENCODINGS = {"utf-8": "utf-8-sig", "utf-8-sig": "utf-8-sig", "cp1252": "cp1252"}
# What a layout's columns may fill: Learner's single-valued fields, and its flags as flags.<name>
LEARNER_TARGETS = frozenset(
    {f.name for f in dataclass_fields(Learner)} - {"flags", "former_upns", "address_lines", "contacts"}
    | {f"flags.{f.name}" for f in dataclass_fields(LearnerFlags)})
LEARNER_REQUIRED_TARGETS = ("surname", "forename", "dob", "sex")  # and the layout's key
FRAGMENT_KEYS = {"fragment", "description", "template"}
TABLE_KEYS = {"table", "description", "source", "target", "unmapped", "default", "codes"}
KINDS = {"template", "columns"}
CHECKS = {"fhir-r4", "none"}
_NAME = re.compile(r"^[a-z][a-z0-9-]*$")
_NAME_VAR = re.compile(r"^[a-z_][a-z0-9_]*$")


class MappingError(PermanentDataError):
    """A record the mapping could not map: carries the record's pseudonymous key, never its values."""

    def __init__(self, mapping: str, record_key: str, reason: str) -> None:
        super().__init__(f"mapping {mapping}: record {record_key}: {reason}")
        self.mapping = mapping
        self.record_key = record_key
        self.reason = reason


class UnmappedCode(MappingError):
    """A code table whose policy is `quarantine` met a code it does not list."""


@dataclass
class CodeTable:
    name: str
    unmapped: str  # error | default | quarantine
    default: Any
    codes: dict[str, Any]
    path: Path
    digest: str

    def lookup(self, code: Any) -> Any:
        if code is None or code == "":
            return None
        key = str(code)
        if key in self.codes:
            return self.codes[key]
        if self.unmapped == "default":
            return self.default
        raise _Unmapped(self.name, key, self.unmapped)


class _Unmapped(Exception):
    def __init__(self, table: str, code: str, policy: str) -> None:
        super().__init__(f"code table {table} has no entry for the code given")
        self.table, self.code, self.policy = table, code, policy


# What CodeTable.lookup raises for a code it does not list (before the mapping wraps it as a MappingError): for
# readers that look a column's code up themselves to say which column was at fault.
UnmappedLookup = _Unmapped


class ColumnKey(str):
    """A CSV column name as a column map reads it: one key of the record, taken literally (it may hold spaces,
    dots or brackets, as MIS headings do: `Legal Surname`, `Middle name(s)`). Only `_columns_to_template` makes
    these, so a template written in YAML never reads a path this way."""

    __slots__ = ()


def heading_key(text: str) -> str:
    """How CSV headings are compared: white space runs made one space, none at either end, case ignored."""
    return " ".join(text.split()).casefold()


@dataclass(frozen=True)
class Column:
    """One entry of a column map: the CSV column, and how its value becomes its canonical target."""

    name: str
    target: str
    fn: str | None
    table: str | None
    required: bool
    has_default: bool
    default: Any
    fallback: tuple[str, ...]  # other headings read, in order, when this one is missing or empty
    line: int

    @property
    def headings(self) -> tuple[str, ...]:
        return (self.name, *self.fallback)


@dataclass(frozen=True)
class Layout:
    """A column map's `layout:` block: a CSV export layout a reader can recognise and read."""

    name: str
    detect: tuple[str, ...]  # headings that must all be in the header row
    key: str  # upn | uln
    qualifier: str  # full | partial
    delimiter: str
    encoding: str  # the Python codec
    source_id: str | None  # the column holding the MIS's own record id (admission number, student ref)
    line: int

    @property
    def format(self) -> str:
        return f"csv:{self.name}"


@dataclass
class Fragment:
    name: str
    template: Any
    path: Path
    digest: str


@dataclass
class Mapping:
    name: str
    kind: str
    description: str
    input: str
    output: str
    check: str
    lets: list[tuple[str, Any]]
    template: Any
    path: Path
    digest: str
    run_vars: tuple[str, ...] = ()
    version: str = ""
    items: frozenset[str] = frozenset()
    _compiled: dict[frozenset[str] | None, Callable[[Any, dict[str, Any]], tuple[dict[str, Any], list[str]]]] = (
        field(default_factory=dict))
    columns: tuple[Column, ...] = ()  # kind columns: the column map, in file order
    layout: Layout | None = None  # kind columns with a layout: block


@dataclass
class MappingSet:
    """Every mapping, fragment and code table under a folder, checked and ready to compile."""

    root: Path
    mappings: dict[str, Mapping]
    fragments: dict[str, Fragment]
    tables: dict[str, CodeTable]

    def layouts(self) -> list[Mapping]:
        """The column maps that describe a CSV export layout, by layout name."""
        return sorted((m for m in self.mappings.values() if m.layout is not None),
                      key=lambda m: m.layout.name if m.layout is not None else "")

    def get(self, name: str) -> Mapping:
        try:
            return self.mappings[name]
        except KeyError:
            raise ConfigurationError(f"no mapping named {name!r} under {self.root}") from None

    def compile(self, name: str, allowed: Iterable[str] | None = None) -> CompiledMapping:
        m = self.get(name)
        key = frozenset(allowed) if allowed is not None else None
        fn = m._compiled.get(key)
        if fn is None:
            fn = _Compiler(self, m, key).compile()
            m._compiled[key] = fn
        return CompiledMapping(m, fn)


@dataclass(frozen=True)
class CompiledMapping:
    mapping: Mapping
    fn: Callable[[Any, dict[str, Any]], tuple[dict[str, Any], list[str]]]

    @property
    def version(self) -> str:
        return self.mapping.version

    def problems(self, resource: dict[str, Any]) -> list[str]:
        """The output check the mapping declares (`check: fhir-r4`): R4 structure and UK Core rules."""
        if self.mapping.check != "fhir-r4":
            return []
        from schoolslink.mapping.ukcore import check

        return check(resource)

    def run(self, record: Any, context: dict[str, Any] | None = None, *, record_key: str = "?") -> dict[str, Any]:
        return self.run_with_items(record, context, record_key=record_key)[0]

    def run_with_items(self, record: Any, context: dict[str, Any] | None = None, *,
                       record_key: str = "?") -> tuple[dict[str, Any], list[str]]:
        ctx = {"mapping_version": self.mapping.version, **(context or {})}
        try:
            return self.fn(record, ctx)
        except _Unmapped as exc:
            cls = UnmappedCode if exc.policy == "quarantine" else MappingError
            raise cls(self.mapping.name, record_key, str(exc)) from None
        except (ValueError, TypeError, ArithmeticError) as exc:
            reason = _safe_reason(exc)
            raise MappingError(self.mapping.name, record_key, reason) from None


@dataclass(frozen=True, slots=True)
class ColumnFailure:
    """Why one column of a column map could not map a row: `unmapped` (its code table does not list the code),
    `invalid` (its function refused the value; `why` names the kind of failure, never the value) or `missing`
    (a required column is empty)."""

    column: Column
    kind: str
    why: str = ""


def column_failures(columns: Iterable[Column], tables: dict[str, CodeTable], row: dict[str, Any],
                    value_of: Callable[[dict[str, Any], Column], Any] | None = None) -> list[ColumnFailure]:
    """Which columns could not map this row, and why: each column's value through its function, code table and
    required check, as the column map compiles them (to say which column a MappingError came from)."""
    out: list[ColumnFailure] = []
    for c in columns:
        value: Any = value_of(row, c) if value_of is not None else row.get(c.name)
        try:
            if c.fn is not None:
                value = functions.REGISTRY[c.fn].fn(value)
            if c.table is not None:
                value = tables[c.table].lookup(value)
        except _Unmapped:
            out.append(ColumnFailure(c, "unmapped"))
            continue
        except (ValueError, TypeError, ArithmeticError) as exc:
            out.append(ColumnFailure(c, "invalid", safe_reason(exc).removeprefix(f"{type(exc).__name__}: ")))
            continue
        if c.required and (value is None or value == "" or value == []):
            out.append(ColumnFailure(c, "missing"))
    return out


def safe_reason(exc: Exception) -> str:
    """The kind of failure a mapping function or lookup raised, never the offending value."""
    return _safe_reason(exc)


def _safe_reason(exc: Exception) -> str:
    """The kind of failure, never the offending value (it may be an identifier or a date of birth)."""
    text = str(exc)
    if "isoformat" in text or "day is out of range" in text or "month must be" in text:
        return "a date is not a real date in the expected form"
    if "invalid literal" in text or "could not convert" in text:
        return "a number is not a number"
    if "not enough values" in text or "too many values" in text:
        return "a value is not in the expected form"
    return type(exc).__name__ + (f": {text}" if len(text) < 80 and not any(c.isdigit() for c in text) else "")


# Loading and checking ---------------------------------------------------------------------------------------


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fail(path: Path, node: Any, message: str, key: str | None = None) -> MappingFileError:
    return MappingFileError(path, line_of(node, key), message)


def _check_keys(path: Path, node: Any, allowed: set[str], required: set[str], what: str) -> None:
    if not isinstance(node, LDict):
        raise _fail(path, node, f"{what} must be a mapping of keys")
    for k in node:
        if k not in allowed:
            raise _fail(path, node, f"unknown key {k!r} in {what}; allowed: {', '.join(sorted(allowed))}", k)
    for k in sorted(required - set(node)):
        raise _fail(path, node, f"{what} needs {k!r}")


def check_path(path: Path, node: Any, text: Any, key: str, variables: set[str] | None = None) -> None:
    """A path walks the input record (`a.b[0].c`, `ext[url=...].v`) or, with `@`, a variable (`@item.code`)."""
    if isinstance(text, ColumnKey) and text:
        return  # a CSV column name: one key, read literally
    if not isinstance(text, str) or not text:
        raise _fail(path, node, f"{key} must be a path like a.b[0].c", key)
    parts = _split_path(text)
    if parts is None:
        raise _fail(path, node, f"malformed path {text!r}", key)
    if text.startswith("@") and variables is not None and parts[0][0] not in variables:
        raise _fail(path, node, f"path {text!r} starts at an unknown variable {parts[0][0]!r}", key)


def _split_path(text: str) -> list[tuple[str, list[tuple[str, Any]]]] | None:
    """'a.b[0].ext[url=http://x.y].v' -> [(a, []), (b, [(idx, 0)]), (ext, [(eq, (url, http://x.y))]), (v, [])]."""
    if isinstance(text, ColumnKey):
        return [(str(text), [])]
    out: list[tuple[str, list[tuple[str, Any]]]] = []
    if text.startswith("@"):
        text = text[1:]
    i, n = 0, len(text)
    while i < n:
        m = re.match(r"[A-Za-z_][A-Za-z0-9_]*", text[i:])
        if not m:
            return None
        name = m.group(0)
        i += len(name)
        steps: list[tuple[str, Any]] = []
        while i < n and text[i] == "[":
            j = text.find("]", i)
            if j < 0:
                return None
            inner = text[i + 1 : j]
            if inner.isdigit():
                steps.append(("idx", int(inner)))
            elif "=" in inner:
                k, v = inner.split("=", 1)
                if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", k) or not v:
                    return None
                steps.append(("eq", (k, v)))
            else:
                return None
            i = j + 1
        out.append((name, steps))
        if i < n:
            if text[i] != ".":
                return None
            i += 1
            if i == n:
                return None
    return out or None


def _load_table(path: Path) -> CodeTable:
    doc = load_yaml(path)
    _check_keys(path, doc, TABLE_KEYS, {"table", "unmapped", "codes"}, "a code table")
    if doc["unmapped"] not in {"error", "default", "quarantine"}:
        raise _fail(path, doc, "unmapped must be error, default or quarantine", "unmapped")
    if doc["unmapped"] == "default" and "default" not in doc:
        raise _fail(path, doc, "unmapped: default needs a 'default' value", "unmapped")
    if not isinstance(doc["codes"], LDict) or not doc["codes"]:
        raise _fail(path, doc, "codes must map each code to its value", "codes")
    return CodeTable(str(doc["table"]), str(doc["unmapped"]), doc.get("default"),
                     {str(k): v for k, v in doc["codes"].items()}, path, _digest(path))


_LOADED: dict[Path, tuple[tuple[tuple[str, int, int], ...], MappingSet]] = {}


def load_mappings(root: Path | None = None) -> MappingSet:
    """Every mapping, fragment and code table under `root` (default: mappings/), loaded and checked once.

    Kept while no file under `root` changes, so compiled mappings are reused across a run's batches.
    """
    root = (root or MAPPINGS_DIR).resolve()
    files = sorted(root.rglob("*.yaml"))
    signature = tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in files)
    hit = _LOADED.get(root)
    if hit is not None and hit[0] == signature:
        return hit[1]
    ms = _load_mappings(root)
    _LOADED[root] = (signature, ms)
    return ms


def _load_mappings(root: Path) -> MappingSet:
    tables: dict[str, CodeTable] = {}
    fragments: dict[str, Fragment] = {}
    mappings: dict[str, Mapping] = {}
    files = sorted(p for p in root.rglob("*.yaml") if not p.name.endswith(".tests.yaml"))
    for p in files:
        doc = load_yaml(p)
        if not isinstance(doc, LDict):
            raise MappingFileError(p, 1, "a mapping file is a mapping of keys")
        if "table" in doc:
            t = _load_table(p)
            if t.name in tables:
                raise _fail(p, doc, f"code table {t.name!r} is also defined in {tables[t.name].path}", "table")
            tables[t.name] = t
        elif "fragment" in doc:
            _check_keys(p, doc, FRAGMENT_KEYS, {"fragment", "template"}, "a fragment")
            name = str(doc["fragment"])
            if name in fragments:
                raise _fail(p, doc, f"fragment {name!r} is also defined in {fragments[name].path}", "fragment")
            fragments[name] = Fragment(name, doc["template"], p, _digest(p))
        elif "mapping" in doc:
            m = _load_mapping(p, doc)
            if m.name in mappings:
                raise _fail(p, doc, f"mapping {m.name!r} is also defined in {mappings[m.name].path}", "mapping")
            mappings[m.name] = m
        else:
            raise MappingFileError(p, 1, "a file here must start with mapping:, fragment: or table:")
    ms = MappingSet(root, mappings, fragments, tables)
    _check_layouts(ms)
    for m in mappings.values():
        used_fragments: set[str] = set()
        used_tables: set[str] = set()
        items: set[str] = set()
        gated = _uses_items(m.template, ms)
        known = {"mapping_version", *m.run_vars}
        for name, expr in m.lets:  # a let sees only the lets before it
            _Checker(ms, m.path, used_fragments, used_tables, items, set(known), gated=gated).node(expr)
            known.add(name)
        _Checker(ms, m.path, used_fragments, used_tables, items, known, gated=gated).node(m.template)
        h = hashlib.sha256(m.digest.encode())
        for f in sorted(used_fragments):
            h.update(fragments[f].digest.encode())
        for tname in sorted(used_tables):
            h.update(tables[tname].digest.encode())
        m.version = h.hexdigest()[:16]
        m.items = frozenset(items)
    return ms


def _check_layouts(ms: MappingSet) -> None:
    """Layout names are unique, and no two layouts detect on the same headings (a file would fit both)."""
    names: dict[str, Mapping] = {}
    detects: dict[frozenset[str], Mapping] = {}
    for m in sorted(ms.mappings.values(), key=lambda m: str(m.path)):
        lay = m.layout
        if lay is None:
            continue
        doc_line = lay.line
        other = names.get(lay.name)
        if other is not None:
            raise MappingFileError(m.path, doc_line, f"layout {lay.name!r} is also defined in {other.path}")
        names[lay.name] = m
        key = frozenset(heading_key(d) for d in lay.detect)
        same = detects.get(key)
        if same is not None and same.layout is not None:
            raise MappingFileError(m.path, doc_line, f"layout {lay.name!r} detects on the same headings as layout "
                                   f"{same.layout.name!r} ({same.path}): a file could not be told apart; "
                                   "add a heading only one of them has")
        detects[key] = m


def _uses_items(n: Any, ms: MappingSet, seen: frozenset[str] = frozenset()) -> bool:
    if isinstance(n, dict):
        if "$item" in n:
            return True
        frag = n.get("$fragment")
        if isinstance(frag, str) and frag in ms.fragments and frag not in seen:
            return _uses_items(ms.fragments[frag].template, ms, seen | {frag})
        return any(_uses_items(v, ms, seen) for v in n.values())
    if isinstance(n, list):
        return any(_uses_items(v, ms, seen) for v in n)
    return False


def _load_mapping(p: Path, doc: LDict) -> Mapping:
    _check_keys(p, doc, MAPPING_KEYS, {"mapping", "kind", "input", "output"}, "a mapping")
    name = str(doc["mapping"])
    if not _NAME.match(name):
        raise _fail(p, doc, "a mapping's name is lower-case words joined by hyphens", "mapping")
    kind = str(doc["kind"])
    if kind not in KINDS:
        raise _fail(p, doc, f"kind must be one of {', '.join(sorted(KINDS))}", "kind")
    check = str(doc.get("check", "none"))
    if check not in CHECKS:
        raise _fail(p, doc, f"check must be one of {', '.join(sorted(CHECKS))}", "check")
    lets: list[tuple[str, Any]] = []
    if "let" in doc:
        if not isinstance(doc["let"], LDict):
            raise _fail(p, doc, "let must map names to expressions", "let")
        lets = list(doc["let"].items())
    columns: tuple[Column, ...] = ()
    layout: Layout | None = None
    if kind == "template":
        if "template" not in doc or "columns" in doc:
            raise _fail(p, doc, "a template mapping has a template and no columns", "kind")
        if "layout" in doc:
            raise _fail(p, doc, "layout: describes a CSV export, so it goes only in a kind: columns mapping", "layout")
        template = doc["template"]
    else:
        if "columns" not in doc or "template" in doc:
            raise _fail(p, doc, "a columns mapping has columns and no template", "kind")
        template, columns = _columns_to_template(p, doc["columns"])
        if "layout" in doc:
            layout = _load_layout(p, doc["layout"], columns)
    run_vars = doc.get("vars") or LList()
    if not isinstance(run_vars, list) or not all(isinstance(v, str) and _NAME_VAR.match(v) for v in run_vars):
        raise _fail(p, doc, "vars lists the names of run variables the caller gives", "vars")
    return Mapping(name, kind, str(doc.get("description", "")), str(doc["input"]), str(doc["output"]), check,
                   lets, template, p, _digest(p), tuple(run_vars), columns=columns, layout=layout)


def _load_layout(p: Path, node: Any, columns: tuple[Column, ...]) -> Layout:
    """A column map's `layout:` block, checked: its keys and values, and that its columns fill a learner."""
    _check_keys(p, node, LAYOUT_KEYS, LAYOUT_KEYS_REQUIRED, "layout")
    name = node["name"]
    if not isinstance(name, str) or not _NAME.match(name):
        raise _fail(p, node, "layout name is lower-case words joined by hyphens (shown as format csv:<name>)", "name")
    detect = node["detect"]
    if not isinstance(detect, list) or not detect or not all(isinstance(d, str) and d.strip() for d in detect):
        raise _fail(p, node, "detect lists the header columns that identify this layout (all must be present)",
                    "detect")
    seen: dict[str, str] = {}
    for d in detect:
        if heading_key(d) in seen:
            raise _fail(p, node, f"detect names the column {d!r} twice (headings are compared ignoring case)",
                        "detect")
        seen[heading_key(d)] = d
    key = node["key"]
    if key not in LAYOUT_IDENTIFIERS:
        raise _fail(p, node, f"key must be one of {', '.join(LAYOUT_IDENTIFIERS)}: the identifier that keys a "
                    "learner", "key")
    qualifier = node["qualifier"]
    if qualifier not in LAYOUT_QUALIFIERS:
        raise _fail(p, node, "qualifier must be full (the export is the whole roll: a learner it no longer lists "
                    "has left) or partial (a list of changes)", "qualifier")
    delimiter = node.get("delimiter", ",")
    if delimiter not in LAYOUT_DELIMITERS:
        raise _fail(p, node, "delimiter must be one of: comma, semicolon, tab or |, written as a quoted "
                    "character", "delimiter")
    encoding = node.get("encoding", "utf-8")
    if encoding not in LAYOUT_ENCODINGS:
        raise _fail(p, node, f"encoding must be one of {', '.join(LAYOUT_ENCODINGS)}", "encoding")
    source_id = node.get("source_id")
    if source_id is not None and (not isinstance(source_id, str) or not source_id.strip()):
        raise _fail(p, node, "source_id names the column holding the MIS's own record id", "source_id")
    # The column map must make a learner: Learner's fields only, the required ones and the key present.
    targets = {c.target: c for c in columns}
    for c in columns:
        if c.target not in LEARNER_TARGETS:
            raise MappingFileError(p, c.line, f"target {c.target!r} is not a learner field; a layout's columns fill "
                                   f"these: {', '.join(sorted(LEARNER_TARGETS))}")
    missing = [t for t in (*LEARNER_REQUIRED_TARGETS, key) if t not in targets]
    if missing:
        raise _fail(p, node, f"this layout's columns must fill {', '.join(missing)} (every learner has "
                    f"{', '.join(LEARNER_REQUIRED_TARGETS)} and the layout's key)")
    return Layout(name, tuple(detect), key, qualifier, delimiter, LAYOUT_ENCODINGS[encoding],
                  source_id.strip() if isinstance(source_id, str) else None, line_of(node))


def _columns_to_template(p: Path, columns: Any) -> tuple[LDict, tuple[Column, ...]]:
    """`columns: {CSV column: target | {target, fn, table, required, default, fallback}}` -> an equivalent
    template, and the column map as `Column`s (for readers that check a header row against it)."""
    if not isinstance(columns, LDict) or not columns:
        raise _fail(p, columns, "columns must map each CSV column to its target")
    out = LDict()
    out.line = columns.line
    out.lines = {}
    specs: list[Column] = []
    headings: dict[str, str] = {}
    for col, spec in columns.items():
        if isinstance(spec, str):
            spec = LDict(target=spec)
            spec.line = columns.lines[col]
            spec.lines = {"target": spec.line}
        _check_keys(p, spec, COLUMN_KEYS, {"target"}, f"column {col!r}")
        if not col.strip():
            raise _fail(p, columns, "a column name cannot be empty", col)
        fallback = spec.get("fallback", LList())
        if isinstance(fallback, str):
            fallback = [fallback]
        if not isinstance(fallback, list) or not all(isinstance(f, str) and f.strip() for f in fallback):
            raise _fail(p, spec, f"column {col!r}: fallback lists other headings for the same column", "fallback")
        for h in (col, *fallback):
            other = headings.get(heading_key(h))
            if other is not None:
                raise _fail(p, spec, f"column {col!r}: the heading {h!r} is already read for column {other!r} "
                            "(headings are compared ignoring case)", "fallback" if h != col else None)
            headings[heading_key(h)] = col
        if "required" in spec and not isinstance(spec["required"], bool):
            raise _fail(p, spec, f"column {col!r}: required is true or false", "required")
        reads = [LDict({"$path": ColumnKey(h)}) for h in (col, *fallback)]
        for r in reads:
            r.line, r.lines = spec.line, {"$path": spec.line}
        expr: Any = reads[0]
        if fallback:  # the first heading with a value
            fb = LDict({"$fn": "first", "$args": LList(reads)})
            fb.line, fb.lines = spec.line, {"$fn": spec.lines.get("fallback", spec.line), "$args": spec.line}
            expr = fb
        if "fn" in spec:
            fn = LDict({"$fn": spec["fn"], "$args": LList([expr])})
            fn.line, fn.lines = spec.line, {"$fn": spec.lines["fn"], "$args": spec.line}
            expr = fn
        if "table" in spec:
            tb = LDict({"$table": spec["table"], "$of": expr})
            tb.line, tb.lines = spec.line, {"$table": spec.lines["table"], "$of": spec.line}
            expr = tb
        if spec.get("required") and "default" in spec:
            raise _fail(p, spec, f"column {col!r}: a required column cannot also have a default", "default")
        if spec.get("required"):
            rq = LDict({"$fn": "required", "$args": LList([expr, col])})
            rq.line, rq.lines = spec.line, {"$fn": spec.line, "$args": spec.line}
            expr = rq
        if "default" in spec:
            expr["$default"] = spec["default"]
            expr.lines["$default"] = spec.lines["default"]
        target = str(spec["target"])
        if not re.fullmatch(r"[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)*", target):
            raise _fail(p, spec, f"target {target!r} must be a dotted canonical name", "target")
        node = out
        parts = target.split(".")
        for part in parts[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = LDict()
                nxt.line, nxt.lines = spec.line, {}
                node[part] = nxt
                node.lines[part] = spec.line
            node = nxt
        if parts[-1] in node:
            raise _fail(p, spec, f"target {target!r} is filled by two columns", "target")
        node[parts[-1]] = expr
        node.lines[parts[-1]] = spec.line
        specs.append(Column(str(col), target, str(spec["fn"]) if "fn" in spec else None,
                            str(spec["table"]) if "table" in spec else None, bool(spec.get("required")),
                            "default" in spec, spec.get("default"), tuple(fallback), spec.line))
    return out, tuple(specs)


@functions.register("required", 2)
def _required(value: Any, column: Any) -> Any:
    """The value, or an error naming the column when it is missing."""
    if value is None or value == "":
        raise ValueError(f"required column {column} is empty")
    return value


def _expressions_in(v: Any) -> list[LDict]:
    """Every expression node within a condition's operand (not descending into nested conditions' ops)."""
    out: list[LDict] = []
    if isinstance(v, LDict):
        if any(k in v for k in EXPR_KEYS):
            out.append(v)
            for a in v.get("$args", ()) if isinstance(v.get("$args"), list) else ():
                out += _expressions_in(a)
            if "$of" in v:
                out += _expressions_in(v["$of"])
        else:
            for x in v.values():
                out += _expressions_in(x)
    elif isinstance(v, list):
        for x in v:
            out += _expressions_in(x)
    return out


class _Checker:
    def __init__(self, ms: MappingSet, path: Path, fragments: set[str], tables: set[str], items: set[str],
                 vars_: set[str], seen: tuple[str, ...] = (), gated: bool = False) -> None:
        self.ms, self.path, self.fragments, self.tables, self.items = ms, path, fragments, tables, items
        self.vars = vars_
        self.seen = seen
        self.gated = gated

    def node(self, n: Any) -> None:
        if isinstance(n, LList):
            for x in n:
                self.node(x)
            return
        if not isinstance(n, LDict):
            return
        dollar = [k for k in n if k.startswith("$")]
        exprs = [k for k in dollar if k in EXPR_KEYS]
        for k in dollar:
            if k not in EXPR_KEYS | MODIFIERS | {"$args", "$of", "$as", "$do"}:
                raise _fail(self.path, n, f"unknown expression key {k!r}", k)
        if len(exprs) > 1:
            raise _fail(self.path, n, f"one expression a node: {', '.join(exprs)} together", exprs[1])
        if "$when" in n:
            self.cond(n["$when"], n)
        if "$item" in n:
            if not isinstance(n["$item"], str) or n["$item"] not in ALL_DATA_ITEMS:
                raise _fail(self.path, n, f"$item must name a canonical data item; known: "
                            f"{', '.join(sorted(ALL_DATA_ITEMS))}", "$item")
            self.items.add(n["$item"])
        if not exprs:
            owners = {"$args": "$fn", "$of": "$table", "$as": "$each", "$do": "$each"}
            for k, owner in owners.items():
                if k in n:
                    raise _fail(self.path, n, f"{k} belongs with {owner}", k)
            for k, v in n.items():
                if not k.startswith("$"):
                    self.node(v)
            return
        e = exprs[0]
        extra = {k for k in dollar if k not in MODIFIERS and k != e}
        bad = extra - ALLOWED_WITH[e]
        if bad:
            raise _fail(self.path, n, f"{', '.join(sorted(bad))} cannot go with {e}", sorted(bad)[0])
        plain = [k for k in n if not k.startswith("$")]
        if plain:
            raise _fail(self.path, n, f"an expression node cannot also hold elements ({plain[0]})", plain[0])
        v = n[e]
        if e == "$path":
            check_path(self.path, n, v, e, self.vars)
        elif e == "$var":
            if v not in self.vars:
                raise _fail(self.path, n, f"unknown variable {v!r}; known: {', '.join(sorted(self.vars))}", e)
        elif e == "$fn":
            f = functions.REGISTRY.get(str(v))
            if f is None:
                raise _fail(self.path, n, f"unknown function {v!r}; see `schoolslink mappings functions`", e)
            args = n.get("$args", LList())
            if not isinstance(args, list):
                raise _fail(self.path, n, "$args must be a list", "$args")
            if not f.min_args <= len(args) <= f.max_args:
                raise _fail(self.path, n, f"{v} takes {f.min_args}-{f.max_args} arguments, given {len(args)}", e)
            for a in args:
                self.node(a)
        elif e == "$table":
            if v not in self.ms.tables:
                raise _fail(self.path, n, f"unknown code table {v!r}", e)
            if "$of" not in n:
                raise _fail(self.path, n, "$table needs $of: the code to look up", e)
            self.tables.add(str(v))
            self.node(n["$of"])
        elif e == "$fragment":
            frag = self.ms.fragments.get(str(v))
            if frag is None:
                raise _fail(self.path, n, f"unknown fragment {v!r}", e)
            if str(v) in self.seen:
                raise _fail(self.path, n, f"fragment {v!r} includes itself", e)
            self.fragments.add(str(v))
            _Checker(self.ms, frag.path, self.fragments, self.tables, self.items, self.vars,
                     (*self.seen, str(v)), self.gated).node(frag.template)
        elif e == "$each":
            check_path(self.path, n, v, e, self.vars)
            if "$as" not in n or "$do" not in n:
                raise _fail(self.path, n, "$each needs $as (a name) and $do (the node to repeat)", e)
            if not isinstance(n["$as"], str) or n["$as"] in self.vars:
                raise _fail(self.path, n, f"$as must be a new name, not one already in use ({n['$as']!r})", "$as")
            _Checker(self.ms, self.path, self.fragments, self.tables, self.items, self.vars | {str(n["$as"])},
                     self.seen, self.gated).node(n["$do"])

    def _gated_condition(self, c: Any) -> None:
        """In a mapping that tags data items, a condition may read only tagged values.

        Otherwise a condition could reveal an item the agreement withholds (e.g. show the days waiting
        only while a status is 'waiting', telling the school the status). A tagged value the agreement
        withholds reads as missing, so the node it guards is left out.
        """
        if not self.gated:
            return
        for k, v in c.items():
            if k == "$exists" and isinstance(v, str):
                raise _fail(self.path, c, "this mapping tags data items: write $exists as an expression "
                            "with its $item, e.g. {$path: ..., $item: ...}", k)
            for node in _expressions_in(v):
                if "$path" in node and "$item" not in node:
                    raise _fail(self.path, node, "this mapping tags data items: a value a condition reads "
                                "must carry its $item", "$path")

    def cond(self, c: Any, parent: Any) -> None:
        if not isinstance(c, LDict) or len(c) != 1 or next(iter(c)) not in CONDITIONS:
            raise _fail(self.path, parent, f"$when takes one of {', '.join(sorted(CONDITIONS))}", "$when")
        op, arg = next(iter(c.items()))
        self._gated_condition(c)
        if op == "$exists":
            if isinstance(arg, str):
                check_path(self.path, c, arg, op, self.vars)
            elif isinstance(arg, LDict) and any(k in arg for k in EXPR_KEYS):
                self.node(arg)
            else:
                raise _fail(self.path, c, "$exists takes a path or an expression", op)
        elif op in {"$eq", "$ne"}:
            if not isinstance(arg, list) or len(arg) != 2:
                raise _fail(self.path, c, f"{op} takes two values", op)
            for a in arg:
                self.node(a)
        elif op == "$in":
            if not isinstance(arg, list) or len(arg) != 2 or not isinstance(arg[1], list):
                raise _fail(self.path, c, "$in takes a value and a list", op)
            self.node(arg[0])
        elif op == "$not":
            self.cond(arg, c)
        else:
            if not isinstance(arg, list) or not arg:
                raise _fail(self.path, c, f"{op} takes a list of conditions", op)
            for a in arg:
                self.cond(a, c)


# Compiling ---------------------------------------------------------------------------------------------------

_EMPTY: tuple[Any, ...] = (None, "", [], {})


def _ident(name: str) -> str:
    """A registered function's name as a Python identifier in generated code."""
    return re.sub(r"[^0-9A-Za-z_]", "_", name)


def _constant(n: Any) -> bool:
    if isinstance(n, dict):
        return all(not k.startswith("$") and _constant(v) for k, v in n.items())
    if isinstance(n, list):
        return all(_constant(x) for x in n)
    return True


class ConstDict(dict[str, Any]):
    """A constant part of a mapping's output, shared by every record: read-only by convention.

    Checkers may remember their verdict on one (by identity), since it never changes.
    """

    __slots__ = ()


class ConstList(list[Any]):
    __slots__ = ()


def _plain(n: Any) -> Any:
    if isinstance(n, dict):
        return ConstDict({k: _plain(v) for k, v in n.items() if v not in _EMPTY})
    if isinstance(n, list):
        return ConstList(_plain(x) for x in n if x not in _EMPTY)
    return n


def _fold_var(n: Any, name: str, value: Any) -> Any:
    """A copy of the tree with {$var: name} replaced by its compile-time value."""
    if isinstance(n, LDict):
        if n.get("$var") == name and not any(k in n for k in MODIFIERS):
            return value
        if "$const" in n or n.get("$as") == name:
            return n
        out = LDict({k: _fold_var(v, name, value) for k, v in n.items()})
        out.line, out.lines = n.line, n.lines
        return out
    if isinstance(n, LList):
        out_l = LList(_fold_var(x, name, value) for x in n)
        out_l.line = n.line
        return out_l
    return n


class _Compiler:
    """Turns a checked template into Python source, once; the function runs with no interpretation."""

    def __init__(self, ms: MappingSet, m: Mapping, allowed: frozenset[str] | None) -> None:
        self.ms, self.m, self.allowed = ms, m, allowed
        self.lines: list[str] = []
        self.consts: dict[str, Any] = {}
        self.n = 0
        self.in_cond = 0  # values a condition reads decide, but are not sent: they are not recorded as items

    def tmp(self) -> str:
        self.n += 1
        return f"t{self.n}"

    def const(self, value: Any) -> str:
        if isinstance(value, (str, int, bool)) or value is None or (isinstance(value, float) and math.isfinite(value)):
            return repr(value)
        name = f"C{len(self.consts)}"
        self.consts[name] = value
        return name

    def emit(self, indent: int, line: str) -> None:
        self.lines.append("    " * indent + line)

    def compile(self) -> Callable[[Any, dict[str, Any]], tuple[dict[str, Any], list[str]]]:
        # The mapping's own version is known now: fold it in, so parts that use it become constants.
        template = _fold_var(self.m.template, "mapping_version", self.m.version)
        self.emit(1, "items = []")
        self.emit(1, "V = dict(ctx)")
        for name, expr in self.m.lets:
            v = self.value(expr, 1, "src")
            self.emit(1, f"V[{name!r}] = {v}")
        out = self.value(template, 1, "src")
        self.emit(1, f"return ({out} if {out} is not None else {{}}), items")
        src = "def mapped(src, ctx):\n" + "\n".join(self.lines) + "\n"
        ns: dict[str, Any] = {f"F_{_ident(k)}": f.fn for k, f in functions.REGISTRY.items()}
        if len(ns) != len(functions.REGISTRY):
            raise ConfigurationError("two registered function names differ only by punctuation")
        ns.update({"TB": {k: t.lookup for k, t in self.ms.tables.items()}, "EMPTY": _EMPTY, **self.consts})
        code = compile(src, f"<mapping {self.m.name}>", "exec")
        exec(code, ns)  # noqa: S102 - source generated from a checked template, never from input data
        fn: Callable[[Any, dict[str, Any]], tuple[dict[str, Any], list[str]]] = ns["mapped"]
        return fn

    # Each method emits statements and returns the name of a local holding the value (None = omitted).

    def value(self, n: Any, ind: int, src: str) -> str:
        if isinstance(n, LDict) and "$item" in n and self.allowed is not None and n["$item"] not in self.allowed:
            return "None"  # dropped before the mapping runs: the agreement or consent does not allow it
        if isinstance(n, (LDict, LList)) and _constant(n):
            # A subtree with no expressions is built once and shared by every output (outputs are read-only).
            return self.const(_plain(n))
        modifiers = isinstance(n, LDict) and any(k in n for k in MODIFIERS)
        if not modifiers:
            return self.bare(n, ind, src)
        t = self.tmp()
        if "$when" in n:
            c = self.cond(n["$when"], ind, src)
            self.emit(ind, f"{t} = None")
            self.emit(ind, f"if {c}:")
            inner = self.bare(n, ind + 1, src)
            self.emit(ind + 1, f"{t} = {inner}")
        else:
            inner = self.bare(n, ind, src)
            self.emit(ind, f"{t} = {inner}")
        if "$default" in n:
            self.emit(ind, f"if {t} is None or {t} == '': {t} = {self.const(n['$default'])}")
        if "$item" in n and not self.in_cond:
            self.emit(ind, f"if {t} is not None: items.append({n['$item']!r})")
        return t

    @staticmethod
    def _sure(n: Any) -> bool:
        """A literal that is never empty: it can be placed without a check."""
        if isinstance(n, (LDict, LList)):
            return _constant(n) and bool(_plain(n))
        return n is not None and n != ""

    def bare(self, n: Any, ind: int, src: str) -> str:
        if isinstance(n, LList):
            t = self.tmp()
            self.emit(ind, f"{t} = []")
            for x in n:
                v = self.value(x, ind, src)
                if isinstance(x, LDict) and "$each" in x:
                    self.emit(ind, f"if {v}: {t}.extend({v})")
                elif self._sure(x):
                    self.emit(ind, f"{t}.append({v})")
                else:
                    self.emit(ind, f"if {v} not in EMPTY: {t}.append({v})")
            return f"({t} or None)"
        if not isinstance(n, LDict):
            return self.const(n)
        if "$path" in n:
            return self.path(n["$path"], ind, src)
        if "$var" in n:
            return f"V.get({n['$var']!r})"
        if "$const" in n:
            return self.const(n["$const"])
        if "$fn" in n:
            args = [self.value(a, ind, src) for a in n.get("$args", [])]
            t = self.tmp()
            self.emit(ind, f"{t} = F_{_ident(n['$fn'])}({', '.join(args)})")
            return t
        if "$table" in n:
            v = self.value(n["$of"], ind, src)
            return f"TB[{n['$table']!r}]({v})"
        if "$fragment" in n:
            frag = _fold_var(self.ms.fragments[n["$fragment"]].template, "mapping_version", self.m.version)
            return self.value(frag, ind, src)
        if "$each" in n:
            seq = self.path(n["$each"], ind, src)
            t, it = self.tmp(), self.tmp()
            self.emit(ind, f"{t} = []")
            self.emit(ind, f"for {it} in ({seq} or ()):")
            self.emit(ind + 1, f"V[{n['$as']!r}] = {it}")
            v = self.value(n["$do"], ind + 1, src)
            self.emit(ind + 1, f"if {v} not in EMPTY: {t}.append({v})")
            return f"({t} or None)"
        t = self.tmp()
        sure = [k for k, v in n.items() if not k.startswith("$") and self._sure(v)]
        self.emit(ind, f"{t} = {{" + ", ".join(f"{k!r}: {self.value(n[k], ind, src)}" for k in sure) + "}")
        for k, v in n.items():
            if k.startswith("$") or k in sure:
                continue
            val = self.value(v, ind, src)
            self.emit(ind, f"if {val} not in EMPTY: {t}[{k!r}] = {val}")
        return f"({t} or None)"

    def path(self, text: str, ind: int, src: str) -> str:
        parts = _split_path(text)
        assert parts is not None  # checked at load
        t = self.tmp()
        head, rest = parts[0], parts[1:]
        if text.startswith("@") and not isinstance(text, ColumnKey):  # a variable bound by let:, $each or the caller
            self.emit(ind, f"{t} = V.get({head[0]!r})")
        else:
            self.emit(ind, f"{t} = {src}.get({head[0]!r}) if isinstance({src}, dict) else None")
        for kind, arg in head[1]:
            self._step(t, kind, arg, ind)
        for name, steps in rest:
            self.emit(ind, f"{t} = {t}.get({name!r}) if isinstance({t}, dict) else None")
            for kind, arg in steps:
                self._step(t, kind, arg, ind)
        return t

    def _step(self, t: str, kind: str, arg: Any, ind: int) -> None:
        if kind == "idx":
            self.emit(ind, f"{t} = {t}[{arg}] if isinstance({t}, list) and len({t}) > {arg} else None")
        else:
            k, v = arg
            keys = k.split(".")
            x = self.tmp()
            getter = x
            for kk in keys:
                getter = f"({getter}.get({kk!r}) if isinstance({getter}, dict) else None)"
            # a plain loop: cheaper than next() over a generator, and this runs for every record
            self.emit(ind, f"if isinstance({t}, list):")
            self.emit(ind + 1, f"for {x} in {t}:")
            self.emit(ind + 2, f"if {getter} == {v!r}:")
            self.emit(ind + 3, f"{t} = {x}")
            self.emit(ind + 3, "break")
            self.emit(ind + 1, "else:")
            self.emit(ind + 2, f"{t} = None")
            self.emit(ind, "else:")
            self.emit(ind + 1, f"{t} = None")

    def cond(self, c: Any, ind: int, src: str) -> str:
        self.in_cond += 1
        try:
            return self._cond(c, ind, src)
        finally:
            self.in_cond -= 1

    def _cond(self, c: Any, ind: int, src: str) -> str:
        op, arg = next(iter(c.items()))
        t = self.tmp()
        if op == "$exists":
            v = self.path(arg, ind, src) if isinstance(arg, str) else self.value(arg, ind, src)
            self.emit(ind, f"{t} = {v} not in EMPTY")
        elif op in {"$eq", "$ne"}:
            a, b = (self.value(x, ind, src) for x in arg)
            self.emit(ind, f"{t} = {a} {'==' if op == '$eq' else '!='} {b}")
        elif op == "$in":
            a = self.value(arg[0], ind, src)
            self.emit(ind, f"{t} = {a} in {self.const(tuple(arg[1]))}")
        elif op == "$not":
            inner = self.cond(arg, ind, src)
            self.emit(ind, f"{t} = not {inner}")
        else:
            parts = [self.cond(x, ind, src) for x in arg]
            joiner = " and " if op == "$all" else " or "
            self.emit(ind, f"{t} = " + joiner.join(parts))
        return t
