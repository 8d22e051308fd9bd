"""Read DfE Common Transfer Files (CTF XML) into canonical `Learner`s (docs/formats.md is the contract).

Two layers. This module is the hardened streaming parser: a file is read in one pass with constant memory
(apart from the set of UPNs already seen, for the duplicate check): lxml's pull parser (the machinery
`etree.iterparse` is built on; feeding it ourselves tells an error at the end of the input, i.e. truncation,
from one inside it) with `resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False`,
reporting only the end of `Header` and `Pupil` elements; each pupil is turned into a plain nested dict of its
element values (`element_values`: element names as keys, text with outer white space removed, repeated
elements such as FormerUPN, SEN, Contact, Phone, YearData and Exclusion as lists), checked, and then freed
with its processed siblings. Before that pass a short sniff reads only up to the root's start tag, so a file
that is not XML, has a DTD, or whose root is not CTfile is refused at once, whatever its size.

How those values become canonical learner fields is the declarative mapping `mappings/mis-in/ctf-learner.yaml`
(with the `ctf-sex-codes` and `ctf-sex` code tables and the functions in schoolslink/mapping/functions_mis.py),
given the Header's `school_urn`, `ctf_version`, `ctf_major` and `file_date` as run variables: a data engineer
changes it, and its golden tests, without Python. Its output must be Learner's fields (flags nested): a
mapping that names anything else, or misses a required field, is a ConfigurationError when a file is read.
Elements the mapping does not use are ignored.

What happens to bad input (DESIGN.md, "Bad input"):

- A bad *file* raises `CtfRefused` (connectors.mis.errors) with a reason a data manager can act on: empty,
  not XML, not well-formed, truncated, root not `CTfile`, no Header or a Header without a usable CTFversion,
  DocumentQualifier or SourceSchool URN, a CTF version that is not configured, or any DOCTYPE / entity
  declaration. A DTD is refused outright: by a byte scan of the first 64 KiB before any parsing, and else
  (a DOCTYPE pushed further down) by the parser's own document info at the root's start tag, before any
  content. With entities never resolved and nothing loaded or fetched, billion-laughs and external-entity
  (XXE) files are refused in well under a second. Reasons never quote file content or parser messages:
  after a parser error the reason comes from the error's type and, where libxml2's push-parser report is
  unreliable (undefined entities), a scan of the file; "truncated" means the parser hit the end of the
  input and the file does not end with the CTfile end tag.
- A bad *record* is quarantined (`Quarantined`: position `pupil#N`, the field, a reason; never the UPN or a
  name) and the rest of the file goes on. The reader checks, before the mapping runs: a missing, malformed
  or wrong-check-letter UPN, a UPN already used by an earlier pupil in the file (the later ones are
  quarantined and the reason names the first), missing names, a DOB that is missing, not a date or after
  the file's date, no Sex or Gender, an unreadable LeavingDate, or an unreadable LookedAfter/InCare or
  AdoptedFromCare (those flags decide who may see a record, so they are never guessed). Every problem found
  goes in one reason. A Sex/Gender code the mapping's code tables do not list (their `quarantine` policy:
  anything but M, F, U or O, in either case; O is read as U) is reported among them as "Sex is not one of M,
  F or U"; any other mapping error (`MappingError`, `UnmappedCode`) quarantines the record too, with the
  mapping's value-free reason.
- A bad *optional item* is dropped by the mapping, and the reader adds a `CtfWarning` and keeps the learner:
  an NHS number that fails the modulus-11 check, a ULN that fails its check digit, a FormerUPN that fails
  the UPN check (former UPNs are only ever taken as the file states them, never inferred), an FSMeligible
  that is not true or false, unreadable attendance figures, and a SEN provision that is not a code of the
  `ctf-sen-provision` table (kept as stated, with a warning).

Text is read with outer white space removed, so an element holding only white space is read as empty: a
`<Sex> </Sex>` beside a `<Gender>` reads the Gender, and a `<LookedAfter><InCare> </InCare>` is not stated
(false), as an empty one is.

Because the pass streams, a refusal can come after some pupils were yielded by `iter_learners`: its callers
must discard everything they got from that file when `CtfRefused` is raised. `read` collects first and so
returns nothing from a refused file.

Accepted CTF versions (major numbers) come from, in order: the `accepted_versions` constructor argument, the
`SCHOOLSLINK_CTF_VERSIONS` environment variable (comma-separated, e.g. "25,26"), the `ctf-versions` code table
(mappings/code-tables/ctf-versions.yaml: a new academic year's version is one line there), and last
`ACCEPTED_CTF_VERSIONS`.
"""

from __future__ import annotations

import codecs
import datetime as dt
import gc
import os
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO, Any, Final, TypeAlias

from lxml import etree

from connectors.mis.base import (
    LEARNER_REQUIRED_FIELDS,
    MisExport,
    Quarantined,
    checked_learner_mapping,
    mapping_error_problems,
    sen_codes,
)
from connectors.mis.base import MisWarning as CtfWarning
from connectors.mis.errors import CtfRefused
from schoolslink.identifiers import is_valid_upn
from schoolslink.mapping.engine import CompiledMapping, MappingError, MappingSet, load_mappings
from schoolslink.model import Learner, LearnerFlags

ACCEPTED_CTF_VERSIONS: Final[tuple[str, ...]] = ("24", "25")
VERSIONS_ENV: Final = "SCHOOLSLINK_CTF_VERSIONS"

_PARSER_OPTIONS: Final[dict[str, Any]] = {
    "resolve_entities": False,
    "no_network": True,
    "load_dtd": False,
    "huge_tree": False,
    "remove_comments": True,
    "remove_pis": True,
    "remove_blank_text": True,
}
_CHUNK = 1 << 16
_UTF16_BOMS: Final = (b"\xff\xfe", b"\xfe\xff")
_PRESCAN = 1 << 16

_VERSION_RE = re.compile(r"(\d{1,3})(?:\.\d{1,3})?")
_URN_RE = re.compile(r"\d{6}")
_UPN_SHAPE_RE = re.compile(r"[A-Z]\d{11}[0-9ABCDEFGHJKLMNPQRTUVWXYZ]")
_BOOL: Final = {"true": True, "1": True, "false": False, "0": False}

_DTD_REASON: Final = "file declares a DTD or entities; CTF files never do — refused as a possible XML entity attack"
_ENTITY_USE_REASON: Final = (
    "file uses XML entities that CTF files never contain — refused as a possible XML entity attack"
)


# Results ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CtfHeader:
    version: str  # as stated, e.g. "25.0"
    qualifier: str  # "full" (the whole roll) or "partial"
    source_lea: str
    source_estab: str
    source_urn: str
    school_name: str
    dest_lea: str | None
    dest_estab: str | None
    datetime: dt.datetime | None
    supplier_id: str = ""

    @property
    def major_version(self) -> str:
        head = self.version.split(".", 1)[0]
        return str(int(head)) if head.isdigit() else head


@dataclass(slots=True)
class CtfResult:
    header: CtfHeader
    learners: list[Learner] = field(default_factory=list)
    quarantined: list[Quarantined] = field(default_factory=list)
    warnings: list[CtfWarning] = field(default_factory=list)


CtfItem: TypeAlias = CtfHeader | Learner | Quarantined | CtfWarning


# Configuration ----------------------------------------------------------------------------------------------


def _parse_versions(values: Iterable[str], source: str) -> tuple[str, ...]:
    out: list[str] = []
    for raw in values:
        v = raw.strip()
        if not v:
            continue
        m = _VERSION_RE.fullmatch(v)
        if m is None:
            raise ValueError(f"{source}: {raw!r} is not a CTF version (expected e.g. 25 or 25.0)")
        out.append(str(int(m.group(1))))
    if not out:
        raise ValueError(f"{source}: no CTF version given")
    return tuple(dict.fromkeys(out))


VERSIONS_TABLE: Final = "ctf-versions"


def configured_ctf_versions(mappings: MappingSet | None = None) -> tuple[str, ...]:
    """The accepted major versions: SCHOOLSLINK_CTF_VERSIONS if set, else the `ctf-versions` code table of
    the mappings (mappings/code-tables/ctf-versions.yaml), else ACCEPTED_CTF_VERSIONS."""
    env = os.environ.get(VERSIONS_ENV)
    if env is not None and env.strip():
        return _parse_versions(env.split(","), VERSIONS_ENV)
    table = (mappings or load_mappings()).tables.get(VERSIONS_TABLE)
    if table is None:
        return ACCEPTED_CTF_VERSIONS
    return _parse_versions([str(c) for c in table.codes], f"code table {VERSIONS_TABLE}")


# Small helpers ----------------------------------------------------------------------------------------------


def _text(el: Any) -> str:
    if el is None:
        return ""
    t = el.text
    return t.strip() if t else ""


def _iso_date(s: str) -> dt.date | None:
    if len(s) != 10 or s[4] != "-" or s[7] != "-":
        return None
    try:
        return dt.date.fromisoformat(s)
    except ValueError:
        return None


def _children(el: Any) -> dict[str, Any]:
    """Direct children by tag (the last wins); comments and PIs are removed by the parser."""
    return {c.tag: c for c in el}


# File-level checks ------------------------------------------------------------------------------------------


def _prescan(head: bytes) -> None:
    """Refuse a DTD before any parsing when it sits in the first bytes (where a prolog is)."""
    if head.startswith(_UTF16_BOMS):
        text = head.decode("utf-16", errors="ignore").encode("utf-8", errors="ignore")
    else:
        text = head
    root_at = text.find(b"<CTfile")
    prolog = text if root_at < 0 else text[:root_at]
    if b"<!DOCTYPE" in prolog or b"<!ENTITY" in prolog:
        raise CtfRefused(_DTD_REASON)


def _has_dtd(el: Any) -> bool:
    info = el.getroottree().docinfo
    return bool(info.internalDTD is not None or info.externalDTD is not None or info.doctype)


_ENTITY_SCAN_RE = re.compile(r"<!(?:DOCTYPE|ENTITY)|&([A-Za-z_][-\w.]*);")
_PREDEFINED_ENTITIES: Final = frozenset({"lt", "gt", "amp", "apos", "quot"})
_ROOT_CLOSE_RE = re.compile(r"</CTfile\s*>\s*\Z")
_ERROR_NAMES: Final = {
    getattr(etree.ErrorTypes, n): n for n in dir(etree.ErrorTypes) if n[:1].isupper() and n.isupper()
}
_ENTITY_ATTACK_ERRORS: Final = frozenset(
    {
        "ERR_ENTITY_LOOP",
        "ERR_ENTITY_IS_EXTERNAL",
        "ERR_ENTITY_IS_PARAMETER",
        "ERR_ENTITY_PE_INTERNAL",
        "ERR_EXT_ENTITY_STANDALONE",
        "ERR_ENTITY_PROCESSING",
        "ERR_ENTITYREF_IN_DTD",
    }
)


def _decoder(f: IO[bytes]) -> codecs.IncrementalDecoder:
    """For scanning a file for ASCII markup: UTF-16 if it has a BOM, else Latin-1 (keeps ASCII as is)."""
    f.seek(0)
    enc = "utf-16" if f.read(2) in _UTF16_BOMS else "latin-1"
    f.seek(0)
    return codecs.getincrementaldecoder(enc)(errors="replace")


def _ends_with_root_close(f: IO[bytes]) -> bool:
    """Whether the file's last markup is the CTfile end tag (so a parse error at the end is not truncation)."""
    f.seek(0)
    bom = f.read(2)
    size = f.seek(0, os.SEEK_END)
    start = max(0, size - 256)
    start -= start % 2  # keep UTF-16 code units aligned (the BOM is at 0)
    f.seek(start)
    tail = f.read()
    enc = {b"\xff\xfe": "utf-16-le", b"\xfe\xff": "utf-16-be"}.get(bom, "latin-1")
    return _ROOT_CLOSE_RE.search(tail.decode(enc, errors="replace")) is not None


def _entity_finding(f: IO[bytes]) -> tuple[str, int] | None:
    """Scan the file (for a refusal's reason only): ("dtd", line) at the first DOCTYPE or ENTITY declaration,
    ("undefined", line) at the first reference to an entity other than the five XML predefines, else None."""
    decode = _decoder(f).decode
    line, carry = 1, ""
    while True:
        chunk = f.read(_CHUNK)
        text = carry + decode(chunk, final=not chunk)
        for m in _ENTITY_SCAN_RE.finditer(text):
            name = m.group(1)
            if name is None or name not in _PREDEFINED_ENTITIES:
                return ("undefined" if name else "dtd"), line + text.count("\n", 0, m.start())
        if not chunk:
            return None
        cut = max(0, len(text) - 64)  # a reference may straddle chunks
        line += text.count("\n", 0, cut)
        carry = text[cut:]


def _refusal(err: etree.XMLSyntaxError, f: IO[bytes], *, at_close: bool) -> CtfRefused:
    """A content-free refusal for a parser error: libxml2's messages can quote bytes and entity names, and after
    a recoverable error in a push parse its codes and lines can be misleading, so the file is looked at again."""
    name = _ERROR_NAMES.get(err.code, "")
    msg = (err.msg or "").lower()
    line = f" (line {err.lineno})" if err.lineno else ""
    if at_close and not _ends_with_root_close(f):
        return CtfRefused(f"file is truncated: it ends before the CTfile element is closed{line}")
    finding = _entity_finding(f)
    if finding is not None and finding[0] == "dtd":
        return CtfRefused(_DTD_REASON)
    if finding is not None:
        return CtfRefused(
            f"file refers to an XML entity it does not define (line {finding[1]}); "
            "CTF files use only &amp; &lt; &gt; &quot; &apos; and character references"
        )
    if name in _ENTITY_ATTACK_ERRORS or (name == "ERR_RESOURCE_LIMIT" and "amplification" in msg):
        return CtfRefused(_ENTITY_USE_REASON)
    if name == "ERR_RESOURCE_LIMIT":
        return CtfRefused(f"file exceeds the XML parser's safety limits (a huge text or name){line}")
    if name == "ERR_DOCUMENT_END":
        return CtfRefused(f"file has content after the end of the CTfile element{line}")
    if "ENCODING" in name or name == "ERR_INVALID_CHAR":
        return CtfRefused(f"file has bytes that are not valid characters in its encoding{line}")
    if name.startswith("NS_ERR"):
        return CtfRefused(f"file uses an XML namespace prefix it does not declare{line}")
    return CtfRefused(f"file is not well-formed XML{line}")


def _sniff(f: IO[bytes]) -> None:
    """Refuse early: empty, not XML, a DTD, or a root that is not CTfile (before the main pass)."""
    head = f.read(_PRESCAN)
    if not head.strip():
        raise CtfRefused("file is empty")
    _prescan(head)
    body = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if not body.startswith(b"<") and not head.startswith(_UTF16_BOMS):
        raise CtfRefused("file is not XML (it does not start with '<'); a CTF file is an XML export")
    parser = etree.XMLPullParser(events=("start",), **_PARSER_OPTIONS)
    chunk = head
    try:
        while True:
            if chunk:
                parser.feed(chunk)
            else:
                parser.close()  # raises: the input ended before any element
                raise CtfRefused("file is not XML: it has no elements")
            for _event, el in parser.read_events():
                _check_root(el)
                return
            chunk = f.read(_CHUNK)
    except etree.XMLSyntaxError as err:
        if not chunk:
            raise CtfRefused("file is not XML: it ends before its first element") from None
        raise _refusal(err, f, at_close=False) from None


def _check_root(root: Any) -> None:
    if _has_dtd(root):
        raise CtfRefused(_DTD_REASON)
    tag = root.tag
    if tag != "CTfile":
        shown = tag if isinstance(tag, str) and re.fullmatch(r"[A-Za-z_][\w.:-]{0,40}", tag) else "?"
        raise CtfRefused(f"root element is <{shown}>, not <CTfile>: this is not a Common Transfer File")


# The reader -------------------------------------------------------------------------------------------------


@contextmanager
def _gc_paused() -> Iterator[None]:
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


# Layer 1: a pupil's element values -----------------------------------------------------------------------

# Elements that may repeat: always a list in a pupil's values, so a mapping sees one shape.
REPEATED_ELEMENTS: Final = frozenset({"FormerUPN", "SEN", "Contact", "Phone", "YearData", "Exclusion"})


def element_values(el: Any, _repeated: frozenset[str] = REPEATED_ELEMENTS) -> dict[str, Any]:
    """An element's children as a plain nested dict: element names as keys; an element's text with outer white
    space removed ("" when it has none); an element holding elements (and no text of its own) as a dict;
    `REPEATED_ELEMENTS` as lists. Attributes are ignored; of two same-named children not in REPEATED_ELEMENTS
    the last wins. Comments and PIs are removed by the parser, so every child is an element."""
    d: dict[str, Any] = {}
    for c in el.getchildren():  # a list made in C: cheaper than iterating the element
        t = c.text
        if t is None:
            v: Any = element_values(c) or ""
        else:
            v = t.strip()
            if not v and len(c):  # white space before a child, where the parser kept it
                v = element_values(c)
        tag = c.tag
        if tag in _repeated:
            same = d.get(tag)
            if same is None:
                d[tag] = [v]
            else:
                same.append(v)
        else:
            d[tag] = v
    return d


# Layer 2: the ctf-learner mapping -----------------------------------------------------------------------------

LEARNER_MAPPING: Final = "ctf-learner"
_SEX_TABLES: Final = frozenset({"ctf-sex", "ctf-sex-codes"})  # an unknown code here: "Sex is not one of ..."
_REQUIRED_FIELDS: Final = LEARNER_REQUIRED_FIELDS


@dataclass(frozen=True, slots=True)
class _LearnerMapping:
    compiled: CompiledMapping
    sen_codes: frozenset[str]
    variables: frozenset[str]  # the run variables it declares (vars:): the only ones it can read


def _learner_mapping(ms: MappingSet | None) -> _LearnerMapping:
    """The compiled ctf-learner mapping, checked against Learner, and the SEN codes read without a warning."""
    ms = ms if ms is not None else load_mappings()
    cm = checked_learner_mapping(ms, LEARNER_MAPPING)
    return _LearnerMapping(cm, sen_codes(ms), frozenset(cm.mapping.run_vars))


class CtfReader:
    """Reads CTF XML files; see the module docstring for what is refused, quarantined and warned about."""

    def __init__(self, accepted_versions: Iterable[str] | None = None, *, mappings: MappingSet | None = None) -> None:
        """`mappings`: where the ctf-learner mapping comes from (default: `load_mappings()`, read again for each
        file when a mapping file has changed)."""
        if accepted_versions is None:
            self._versions = configured_ctf_versions(mappings)
        else:
            self._versions = _parse_versions(accepted_versions, "accepted_versions")
        self._mappings = mappings

    @property
    def accepted_versions(self) -> tuple[str, ...]:
        return self._versions

    def read(self, path: str | os.PathLike[str] | IO[bytes]) -> CtfResult:
        """Read a whole file. Raises CtfRefused for a bad file, and then nothing from it is returned.

        The cyclic garbage collector is paused while the file is read (and restored after, also on error):
        the reader makes no reference cycles, and collecting while tens of thousands of new Learners pile up
        costs about a third of the read time.
        """
        header: CtfHeader | None = None
        learners: list[Learner] = []
        quarantined: list[Quarantined] = []
        warnings: list[CtfWarning] = []
        with _gc_paused():
            for item in self.iter_learners(path):
                if type(item) is Learner:
                    learners.append(item)
                elif type(item) is Quarantined:
                    quarantined.append(item)
                elif type(item) is CtfWarning:
                    warnings.append(item)
                elif type(item) is CtfHeader:
                    header = item
        assert header is not None  # iter_learners refuses a file without one
        return CtfResult(header, learners, quarantined, warnings)

    def iter_learners(self, path: str | os.PathLike[str] | IO[bytes]) -> Iterator[CtfItem]:
        """Stream a file: the CtfHeader first, then per pupil any CtfWarnings and its Learner or Quarantined.

        Raises CtfRefused for a bad file, possibly after some items were yielded (the file is only known to
        be whole at its end): a caller must then discard everything it received from this file.
        """
        mapping = _learner_mapping(self._mappings)  # a broken mapping is a ConfigurationError, not the file's
        if hasattr(path, "read"):  # an open, seekable binary stream (a sealed file from the landing zone)
            f: Any = path
            f.seek(0)
            _sniff(f)
            f.seek(0)
            yield from _FileReader(self._versions, mapping).run(f)
            return
        with open(path, "rb") as f:
            _sniff(f)
            f.seek(0)
            yield from _FileReader(self._versions, mapping).run(f)

    def read_export(self, source: str | os.PathLike[str] | IO[bytes]) -> MisExport:
        """`read`, as the MisExport every MIS reader returns (format 'ctf')."""
        r = self.read(source)
        h = r.header
        return MisExport("ctf", h.version, h.source_urn, h.qualifier, h.datetime, r.learners, r.quarantined,
                         r.warnings, records=len(r.learners) + len(r.quarantined))


def iter_learners(path: str | os.PathLike[str], accepted_versions: Iterable[str] | None = None) -> Iterator[CtfItem]:
    """`CtfReader(accepted_versions).iter_learners(path)`: discard everything received if CtfRefused is raised."""
    return CtfReader(accepted_versions).iter_learners(path)


class _FileReader:
    """State of one pass over one file."""

    def __init__(self, versions: tuple[str, ...], mapping: _LearnerMapping) -> None:
        self.versions = versions
        self.compiled = mapping.compiled
        self.mapped = mapping.compiled.fn
        self.variables = mapping.variables
        self.sen_codes = mapping.sen_codes
        self.context: dict[str, Any] = {}  # the mapping's run variables, from the Header
        self.run_context: dict[str, Any] = {}  # the same with mapping_version, as run() gives it
        self.header: CtfHeader | None = None
        self.urn = ""
        self.file_date: dt.date | None = None
        self.position = 0
        self.seen: dict[str, int] = {}
        self.checked_root = False
        self.gender_warned = False
        self.pending: list[CtfWarning] = []
        self.pupil_data: Any = None

    def run(self, f: IO[bytes]) -> Iterator[CtfItem]:
        parser = etree.XMLPullParser(events=("end",), tag=("Header", "Pupil"), **_PARSER_OPTIONS)
        pending = self.pending
        element = self.element
        while True:
            chunk = f.read(_CHUNK)
            if not chunk:
                break
            try:
                parser.feed(chunk)
            except etree.XMLSyntaxError as err:
                raise _refusal(err, f, at_close=False) from None
            for _event, el in parser.read_events():
                item = element(el)
                if pending:
                    yield from pending
                    pending.clear()
                if item is not None:
                    yield item
        try:
            root = parser.close()
        except etree.XMLSyntaxError as err:
            raise _refusal(err, f, at_close=True) from None
        for _event, el in parser.read_events():  # normally none are left after the last feed
            item = element(el)
            yield from pending
            pending.clear()
            if item is not None:
                yield item
        if not self.checked_root:
            _check_root(root)
        if self.header is None:
            raise CtfRefused("file has no Header: cannot tell its CTF version or which school sent it")

    def element(self, el: Any) -> CtfItem | None:
        if not self.checked_root:
            _check_root(el.getroottree().getroot())
            self.checked_root = True
        if el.tag == "Pupil":
            parent = el.getparent()
            if parent is not self.pupil_data:  # the same proxy while we hold it: an identity check
                if parent is None or parent.tag != "CTFpupilData":
                    return None  # not a pupil record of this file's shape: ignored like any unknown element
                self.pupil_data = parent
            if self.header is None:
                raise CtfRefused("pupil records come before the Header: the file is not in CTF order")
            self.position += 1
            item = self.pupil(el, self.position)
            # Free the pupils before this one (their subtrees go with them); this one goes next time.
            while el.getprevious() is not None:
                del parent[0]
            return item
        parent = el.getparent()
        if parent is None or parent.getparent() is not None:
            return None  # a Header inside something else: not the file's Header
        if self.header is not None:
            raise CtfRefused("file has more than one Header")
        return self.read_header(el)

    # Header ---------------------------------------------------------------------------------------------

    def read_header(self, el: Any) -> CtfHeader:
        c = _children(el)
        version = _text(c.get("CTFversion"))
        if not version:
            raise CtfRefused("the Header has no CTFversion: cannot tell which CTF version this file is")
        m = _VERSION_RE.fullmatch(version)
        if m is None:
            raise CtfRefused("the Header's CTFversion is not a version number (expected e.g. 25.0)")
        if str(int(m.group(1))) not in self.versions:
            raise CtfRefused(
                f"CTF version {version} is not accepted here (accepted: {', '.join(self.versions)}); "
                f"a new version is added in {VERSIONS_ENV}"
            )
        qualifier = _text(c.get("DocumentQualifier")).lower()
        if qualifier not in ("full", "partial"):
            raise CtfRefused("the Header's DocumentQualifier must be 'full' or 'partial'")
        src = _children(c["SourceSchool"]) if "SourceSchool" in c else {}
        urn = _text(src.get("URN"))
        if not _URN_RE.fullmatch(urn):
            raise CtfRefused("the Header's SourceSchool has no 6-digit URN: cannot tell which school sent the file")
        dest = _children(c["DestSchool"]) if "DestSchool" in c else {}
        stamp: dt.datetime | None = None
        raw_stamp = _text(c.get("DateTime"))
        if raw_stamp:
            try:
                stamp = dt.datetime.fromisoformat(raw_stamp)
            except ValueError:
                self.pending.append(
                    CtfWarning("header", "DateTime", "the Header's DateTime is not a date-time; ignored")
                )
        header = CtfHeader(
            version=version,
            qualifier=qualifier,
            source_lea=_text(src.get("LEA")),
            source_estab=_text(src.get("Estab")),
            source_urn=urn,
            school_name=_text(src.get("SchoolName")),
            dest_lea=_text(dest.get("LEA")) or None,
            dest_estab=_text(dest.get("Estab")) or None,
            datetime=stamp,
            supplier_id=_text(c.get("SupplierID")),
        )
        self.header = header
        self.urn = urn
        self.file_date = stamp.date() if stamp is not None else None
        self.context = {
            "school_urn": urn,
            "ctf_version": version,
            "ctf_major": header.major_version,
            "file_date": self.file_date.isoformat() if self.file_date is not None else None,
        }
        # What run() would give the compiled mapping, less the variables it does not declare (a smaller dict
        # to copy for each record).
        self.run_context = {"mapping_version": self.compiled.version}
        self.run_context.update((k, v) for k, v in self.context.items() if k in self.variables)
        return header

    # Pupil ----------------------------------------------------------------------------------------------

    def pupil(self, el: Any, pos: int) -> Learner | Quarantined:
        """Check a pupil's values (quarantining a bad record), map them with ctf-learner, warn of what was
        dropped. Reasons and warnings give the position, never a value."""
        d = element_values(el)
        problems: list[tuple[str, str]] = []

        # UPN: required, valid, unique in the file.
        t = d.get("UPN")
        upn = t.upper() if type(t) is str else ""
        if not upn:
            problems.append(("UPN", "UPN is missing"))
        elif not is_valid_upn(upn):
            if _UPN_SHAPE_RE.fullmatch(upn):
                problems.append(("UPN", "UPN check letter is wrong"))
            else:
                problems.append(
                    ("UPN", "UPN is not a UPN (13 characters: a check letter, 11 digits, a digit or letter)")
                )
        else:
            first = self.seen.get(upn)
            if first is None:
                self.seen[upn] = pos
            else:
                problems.append(("UPN", f"duplicate UPN in file: the same UPN as pupil #{first}, which is kept"))

        t = d.get("Surname")
        if type(t) is not str or not t:
            problems.append(("Surname", "Surname is missing"))
        t = d.get("Forename")
        if type(t) is not str or not t:
            problems.append(("Forename", "Forename is missing"))

        t = d.get("DOB")
        dob_s = t if type(t) is str else ""
        dob = _iso_date(dob_s)
        if dob is None:
            problems.append(("DOB", "DOB is not a date (expected YYYY-MM-DD)" if dob_s else "DOB is missing"))
        elif self.file_date is not None and dob > self.file_date:
            problems.append(("DOB", "DOB is after the date the file was made"))

        # Sex (CTF 25) wins over Gender (CTF 24). Whether the code is one we read is the mapping's code tables'
        # say (their `quarantine` policy); its problem goes here, among the others, when it has one.
        t = d.get("Sex")
        sex_field = "Sex"
        if type(t) is not str or not t:
            t = d.get("Gender")
            if type(t) is str and t:
                sex_field = "Gender"
                if not self.gender_warned and self._major() >= 25:
                    self.gender_warned = True
                    self.pending.append(
                        CtfWarning("header", "Gender", "file uses Gender (CTF 24) instead of Sex; read as Sex")
                    )
            else:
                t = ""
        sex_stated = bool(t)
        if not sex_stated:
            problems.append(("Sex", "Sex is missing"))
        sex_at = len(problems)

        t = d.get("LeavingDate")
        if type(t) is str and t and _iso_date(t) is None:
            problems.append(("LeavingDate", "LeavingDate is not a date (expected YYYY-MM-DD)"))
        # Who may see a record depends on these flags: never guessed.
        t = d.get("LookedAfter")
        if type(t) is dict:
            t = t.get("InCare")
            if type(t) is str and t and t.lower() not in _BOOL:
                problems.append(("LookedAfter", "LookedAfter/InCare is not true or false"))
        t = d.get("AdoptedFromCare")
        if type(t) is str and t and t.lower() not in _BOOL:
            problems.append(("AdoptedFromCare", "AdoptedFromCare is not true or false"))

        if problems and not sex_stated:
            return _quarantined(pos, problems)
        # The mapping runs on a record with problems too when it states a Sex: its code tables say if the code
        # is another problem (the mapping looks Sex up first, so nothing else can fail before).
        try:
            try:
                out = self.mapped(d, self.run_context)[0]  # the compiled mapping itself: no per-record setup
            except Exception:  # noqa: BLE001 - run() again through the public API, which says what it was
                out = self.compiled.run(d, self.context, record_key=f"pupil#{pos}")
        except MappingError as exc:
            return _quarantined(pos, mapping_error_problems(exc, problems, _SEX_TABLES, sex_at, sex_field))
        if problems:
            return _quarantined(pos, problems)

        # The canonical learner: the mapping's output, with its dates as dates and its flags as LearnerFlags.
        try:
            t = out["dob"]
            out["dob"] = dob if t == dob_s else _from_iso(t)  # the date already read, unless mapped otherwise
            t = out.get("leaving_date")
            if t is not None:
                out["leaving_date"] = _from_iso(t)
            t = out.get("flags")
            out["flags"] = LearnerFlags(**t) if t else LearnerFlags()
            learner = Learner(**out)
        except (KeyError, TypeError, ValueError):
            gave = [f for f in _REQUIRED_FIELDS if f not in out]
            what = f"no {', '.join(gave)}" if gave else "a date that is not a date or flags that are not flags"
            return _quarantined(pos, [("mapping", f"the {LEARNER_MAPPING} mapping gave {what}")])

        # Optional items the mapping dropped: warned about, as stated in the file.
        t = d.get("UniqueLearnerNumber")
        if type(t) is str and t and learner.uln is None:
            self.warn(pos, "UniqueLearnerNumber", "ULN fails its check digit; dropped")
        t = d.get("FormerUPN")
        if t:
            for former in t:
                if type(former) is str and former and not is_valid_upn(former.upper()):
                    self.warn(pos, "FormerUPN", "a FormerUPN fails the UPN check; dropped")
        basic = d.get("BasicDetails")
        if type(basic) is dict:
            if _stated(basic.get("FSMeligible")) and learner.fsm_eligible is None:
                self.warn(pos, "FSMeligible", "FSMeligible is not true or false; ignored")
            if _stated(basic.get("NHSnumber")) and learner.nhs_number is None:
                self.warn(pos, "NHSnumber", "NHS number fails the modulus-11 check; dropped")
        if learner.sen_provision not in self.sen_codes:
            self.warn(pos, "SENprovision", "SEN provision is not E, K, N or S; kept as stated")
        t = d.get("Attendance")
        if type(t) is dict and _unreadable_attendance(t.get("YearData")):
            self.warn(pos, "Attendance", "attendance figures that are not whole numbers were ignored")
        return learner

    def _major(self) -> int:
        return int(self.header.major_version) if self.header is not None else 0

    def warn(self, pos: int, field: str, message: str) -> None:
        self.pending.append(CtfWarning(f"pupil#{pos}", field, f"{message} (pupil #{pos})"))


def _quarantined(pos: int, problems: list[tuple[str, str]]) -> Quarantined:
    return Quarantined(f"pupil#{pos}", problems[0][0], f"{'; '.join(reason for _, reason in problems)} (pupil #{pos})")


_from_iso: Final = dt.date.fromisoformat  # TypeError / ValueError when the mapping gave no date


_ATTENDANCE_FIGURES: Final = ("SessionsPossible", "AttendanceSessions", "SessionsAuthorised", "SessionsUnauthorised")


def _unreadable_attendance(years: Any) -> bool:
    """Whether a YearData has no whole-number Year, or a figure that is not a whole number (it is ignored)."""
    if type(years) is not list:
        return False
    for yd in years:
        if type(yd) is not dict:
            return True
        year = yd.get("Year")
        if type(year) is not str or not year:
            return True
        try:
            every = "".join(yd.values())  # usually a YearData holds only whole numbers: one check for all
        except TypeError:  # an element in it holds elements
            every = ""
        if every.isascii() and every.isdigit():
            continue
        digits = year
        for name in _ATTENDANCE_FIGURES:
            t = yd.get(name)
            if type(t) is str:
                digits += t
        if not digits.isascii() or not digits.isdigit():
            return True
    return False


def _stated(value: Any) -> bool:
    return type(value) is str and value != ""
