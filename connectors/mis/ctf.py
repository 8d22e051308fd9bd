"""Read DfE Common Transfer Files (CTF XML) into canonical `Learner`s (docs/formats.md is the contract).

A file is read in one streaming pass with constant memory (apart from the set of UPNs already seen, for the
duplicate check): lxml's pull parser (the machinery `etree.iterparse` is built on; feeding it ourselves tells
an error at the end of the input, i.e. truncation, from one inside it) with `resolve_entities=False,
no_network=True, load_dtd=False, huge_tree=False`, reporting only the end of `Header` and `Pupil` elements;
each pupil becomes a Learner (or is quarantined) and is then freed with its processed siblings. Before that
pass a short sniff reads only up to the root's start tag, so a file that is not XML, has a DTD, or whose
root is not CTfile is refused at once, whatever its size. Unknown elements are ignored.

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
  name) and the rest of the file goes on: a missing, malformed or wrong-check-letter UPN, a UPN already used
  by an earlier pupil in the file (the later ones are quarantined and the reason names the first), missing
  names, a DOB that is missing, not a date or after the file's date, a Sex/Gender that is not M, F or U
  (O is read as U), an unreadable LeavingDate, or an unreadable LookedAfter/InCare or AdoptedFromCare
  (those flags decide who may see a record, so they are never guessed).
- A bad *optional item* is dropped with a `CtfWarning`, and the learner is kept: an NHS number that fails
  the modulus-11 check, a ULN that fails its check digit, a FormerUPN that fails the UPN check (former UPNs
  are only ever taken as the file states them, never inferred), unreadable attendance figures, an
  unrecognised SEN provision code (kept as stated, with a warning).

Because the pass streams, a refusal can come after some pupils were yielded by `iter_learners`: its callers
must discard everything they got from that file when `CtfRefused` is raised. `read` collects first and so
returns nothing from a refused file.

Accepted CTF versions (major numbers) come from, in order: the `accepted_versions` constructor argument, the
`SCHOOLSLINK_CTF_VERSIONS` environment variable (comma-separated, e.g. "25,26"), `ACCEPTED_CTF_VERSIONS`.
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

from connectors.mis.errors import CtfRefused
from schoolslink.identifiers import (
    is_valid_nhs_number,
    is_valid_uln,
    is_valid_upn,
    normalise_nhs_number,
)
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
_SEX_CODES: Final = {"M": "M", "F": "F", "U": "U", "O": "U"}
_SEN_CODES: Final = frozenset({"E", "K", "N", "S"})
_FIXED_EXCLUSION: Final = frozenset({"FIXD", "SUSP"})
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


@dataclass(frozen=True, slots=True)
class Quarantined:
    """A pupil record held back. `record` is its position ('pupil#17'), never an identifier or a name."""

    record: str
    field: str  # the first field at fault
    reason: str  # every problem found, for a data manager, ending '(pupil #17)'


@dataclass(frozen=True, slots=True)
class CtfWarning:
    """Something dropped or doubtful that did not stop a record: 'header' or 'pupil#N', field, message."""

    record: str
    field: str
    message: str


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


def configured_ctf_versions() -> tuple[str, ...]:
    """The accepted major versions: SCHOOLSLINK_CTF_VERSIONS if set, else ACCEPTED_CTF_VERSIONS."""
    env = os.environ.get(VERSIONS_ENV)
    if env is None or not env.strip():
        return ACCEPTED_CTF_VERSIONS
    return _parse_versions(env.split(","), VERSIONS_ENV)


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


def _int(s: str) -> int | None:
    if not s.isascii() or not s.isdigit():
        return None
    return int(s)


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


# Pupil children we read. Leaves keep their text; containers keep the element; FormerUPN repeats.
(
    _UPN,
    _ULN,
    _SURNAME,
    _FORENAME,
    _MIDDLE,
    _PREF_SURNAME,
    _PREF_FORENAME,
    _DOB,
    _SEX,
    _GENDER,
    _ADOPTED,
    _LEAVING,
) = range(12)
_FIRST_CONTAINER = 12
(_BASIC, _LAC, _SEN, _ADDRESS, _CONTACTS, _ATTENDANCE, _EXCLUSIONS) = range(_FIRST_CONTAINER, 19)
_NSLOTS = 19
_FORMER = 99
_PUPIL_SLOTS: Final = {
    "UPN": _UPN,
    "UniqueLearnerNumber": _ULN,
    "Surname": _SURNAME,
    "Forename": _FORENAME,
    "MiddleNames": _MIDDLE,
    "PreferredSurname": _PREF_SURNAME,
    "PreferredForename": _PREF_FORENAME,
    "DOB": _DOB,
    "Sex": _SEX,
    "Gender": _GENDER,
    "AdoptedFromCare": _ADOPTED,
    "LeavingDate": _LEAVING,
    "BasicDetails": _BASIC,
    "LookedAfter": _LAC,
    "SENhistory": _SEN,
    "Address": _ADDRESS,
    "Contacts": _CONTACTS,
    "Attendance": _ATTENDANCE,
    "Exclusions": _EXCLUSIONS,
    "FormerUPN": _FORMER,
}
_ADDRESS_LINE_INDEX: Final = {
    t: i for i, t in enumerate(("SAON", "PAON", "Street", "Locality", "Town", "AdministrativeArea", "PostTown"))
}
_ATTENDANCE_TAGS: Final = {
    "SessionsPossible": 0,
    "AttendanceSessions": 1,
    "SessionsAuthorised": 2,
    "SessionsUnauthorised": 3,
}


class CtfReader:
    """Reads CTF XML files; see the module docstring for what is refused, quarantined and warned about."""

    def __init__(self, accepted_versions: Iterable[str] | None = None) -> None:
        if accepted_versions is None:
            self._versions = configured_ctf_versions()
        else:
            self._versions = _parse_versions(accepted_versions, "accepted_versions")

    @property
    def accepted_versions(self) -> tuple[str, ...]:
        return self._versions

    def read(self, path: str | os.PathLike[str]) -> CtfResult:
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

    def iter_learners(self, path: str | os.PathLike[str]) -> Iterator[CtfItem]:
        """Stream a file: the CtfHeader first, then per pupil any CtfWarnings and its Learner or Quarantined.

        Raises CtfRefused for a bad file, possibly after some items were yielded (the file is only known to
        be whole at its end): a caller must then discard everything it received from this file.
        """
        with open(path, "rb") as f:
            _sniff(f)
            f.seek(0)
            yield from _FileReader(self._versions).run(f)


def iter_learners(path: str | os.PathLike[str], accepted_versions: Iterable[str] | None = None) -> Iterator[CtfItem]:
    """`CtfReader(accepted_versions).iter_learners(path)`: discard everything received if CtfRefused is raised."""
    return CtfReader(accepted_versions).iter_learners(path)


class _FileReader:
    """State of one pass over one file."""

    def __init__(self, versions: tuple[str, ...]) -> None:
        self.versions = versions
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
        return header

    # Pupil ----------------------------------------------------------------------------------------------

    def pupil(self, el: Any, pos: int) -> Learner | Quarantined:
        v: list[Any] = [None] * _NSLOTS
        formers: list[str | None] = []
        get = _PUPIL_SLOTS.get
        for child in el:
            i = get(child.tag)
            if i is None:
                continue
            if i < _FIRST_CONTAINER:
                v[i] = child.text
            elif i == _FORMER:
                formers.append(child.text)
            else:
                v[i] = child

        problems: list[tuple[str, str]] = []

        # UPN: required, valid, unique in the file.
        t = v[_UPN]
        upn = t.strip().upper() if t else ""
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

        t = v[_SURNAME]
        surname = t.strip() if t else ""
        if not surname:
            problems.append(("Surname", "Surname is missing"))
        t = v[_FORENAME]
        forename = t.strip() if t else ""
        if not forename:
            problems.append(("Forename", "Forename is missing"))

        t = v[_DOB]
        dob_s = t.strip() if t else ""
        dob = _iso_date(dob_s)
        if dob is None:
            problems.append(("DOB", "DOB is not a date (expected YYYY-MM-DD)" if dob_s else "DOB is missing"))
        elif self.file_date is not None and dob > self.file_date:
            problems.append(("DOB", "DOB is after the date the file was made"))

        t = v[_SEX]
        sex_field = "Sex"
        if t is None and v[_GENDER] is not None:
            t, sex_field = v[_GENDER], "Gender"
            if not self.gender_warned and self._major() >= 25:
                self.gender_warned = True
                self.pending.append(
                    CtfWarning("header", "Gender", "file uses Gender (CTF 24) instead of Sex; read as Sex")
                )
        sex_s = t.strip().upper() if t else ""
        sex = _SEX_CODES.get(sex_s)
        if not sex_s:
            problems.append(("Sex", "Sex is missing"))
        elif sex is None:
            problems.append((sex_field, f"{sex_field} is not one of M, F or U"))

        t = v[_LEAVING]
        leaving_s = t.strip() if t else ""
        leaving = _iso_date(leaving_s) if leaving_s else None
        if leaving_s and leaving is None:
            problems.append(("LeavingDate", "LeavingDate is not a date (expected YYYY-MM-DD)"))

        looked_after = False
        lac = v[_LAC]
        if lac is not None:
            for c in lac:
                if c.tag == "InCare":
                    t = c.text
                    flag = _BOOL.get(t.strip().lower()) if t else False
                    if flag is None:
                        problems.append(("LookedAfter", "LookedAfter/InCare is not true or false"))
                    else:
                        looked_after = flag
        adopted = False
        t = v[_ADOPTED]
        if t and t.strip():
            flag = _BOOL.get(t.strip().lower())
            if flag is None:
                problems.append(("AdoptedFromCare", "AdoptedFromCare is not true or false"))
            else:
                adopted = flag

        if problems:
            return Quarantined(
                f"pupil#{pos}",
                problems[0][0],
                f"{'; '.join(reason for _, reason in problems)} (pupil #{pos})",
            )
        assert dob is not None and sex is not None

        # Optional items: dropped with a warning when they fail their checks.
        t = v[_ULN]
        uln: str | None = (t.strip() or None) if t else None
        if uln is not None and not is_valid_uln(uln):
            self.warn(pos, "UniqueLearnerNumber", "ULN fails its check digit; dropped")
            uln = None

        former_upns: list[str] = []
        for t in formers:
            former = t.strip().upper() if t else ""
            if not former:
                continue
            if not is_valid_upn(former):
                self.warn(pos, "FormerUPN", "a FormerUPN fails the UPN check; dropped")
            elif former != upn and former not in former_upns:
                former_upns.append(former)

        year_group = ethnicity = ""
        enrol_status = "C"
        fsm: bool | None = None
        nhs_number: str | None = None
        basic = v[_BASIC]
        if basic is not None:
            for c in basic:
                tag = c.tag
                t = c.text
                t = t.strip() if t else ""
                if tag == "NCyearActual":
                    year_group = t
                elif tag == "Ethnicity":
                    ethnicity = t
                elif tag == "EnrolStatus":
                    enrol_status = t.upper() or "C"
                elif tag == "FSMeligible":
                    fsm = _BOOL.get(t.lower())
                    if fsm is None and t:
                        self.warn(pos, "FSMeligible", "FSMeligible is not true or false; ignored")
                elif tag == "NHSnumber" and t:
                    nhs = t if is_valid_nhs_number(t) else normalise_nhs_number(t)
                    if is_valid_nhs_number(nhs):
                        nhs_number = nhs
                    else:
                        self.warn(pos, "NHSnumber", "NHS number fails the modulus-11 check; dropped")

        sen_provision = "N" if v[_SEN] is None else self.sen(v[_SEN], pos)
        postcode, address_lines = ("", []) if v[_ADDRESS] is None else self.address(v[_ADDRESS])
        contacts = [] if v[_CONTACTS] is None else self.contacts(v[_CONTACTS])
        att = _NO_ATTENDANCE if v[_ATTENDANCE] is None else self.attendance(v[_ATTENDANCE], pos)

        fixed = 0
        permanent = False
        excl = v[_EXCLUSIONS]
        if excl is not None:
            for ex in excl:
                for c in ex:
                    if c.tag == "Category":
                        t = c.text
                        category = t.strip().upper() if t else ""
                        if category in _FIXED_EXCLUSION:
                            fixed += 1
                        elif category == "PERM":
                            permanent = True

        t = v[_MIDDLE]
        middle = t.strip() if t else ""
        t = v[_PREF_SURNAME]
        preferred_surname = t.strip() if t else ""
        t = v[_PREF_FORENAME]
        preferred_forename = t.strip() if t else ""
        return Learner(
            upn=upn,
            school_urn=self.urn,
            surname=surname,
            forename=forename,
            dob=dob,
            sex=sex,
            former_upns=former_upns,
            uln=uln,
            middle_names=middle,
            preferred_surname=preferred_surname,
            preferred_forename=preferred_forename,
            postcode=postcode,
            address_lines=address_lines,
            nhs_number=nhs_number,
            nhs_number_status=None,  # a CTF does not carry the PDS verification status
            year_group=year_group,
            enrol_status=enrol_status,
            sen_provision=sen_provision,
            ethnicity=ethnicity,
            fsm_eligible=fsm,
            attendance_sessions_possible=att[0],
            attendance_sessions_attended=att[1],
            attendance_sessions_authorised_absence=att[2],
            attendance_sessions_unauthorised_absence=att[3],
            exclusions_fixed_count=fixed,
            exclusions_permanent=permanent,
            leaving_date=leaving,
            contacts=contacts,
            flags=LearnerFlags(looked_after=looked_after, adopted=adopted),
        )

    def _major(self) -> int:
        return int(self.header.major_version) if self.header is not None else 0

    def warn(self, pos: int, field: str, message: str) -> None:
        self.pending.append(CtfWarning(f"pupil#{pos}", field, f"{message} (pupil #{pos})"))

    def sen(self, el: Any, pos: int) -> str:
        """Provision of the SEN entry with the latest StartDate (later in the file wins a tie); N if none."""
        best_key = ""
        best = ""
        for entry in el:
            provision = start = ""
            for c in entry:
                tag = c.tag
                if tag == "SENprovision":
                    t = c.text
                    provision = t.strip().upper() if t else ""
                elif tag == "StartDate":
                    t = c.text
                    start = t.strip() if t else ""
            if not provision:
                continue
            key = start if _iso_date(start) is not None else "0000-00-00"
            if not best or key >= best_key:
                best_key, best = key, provision
        if not best:
            return "N"
        if best not in _SEN_CODES:
            self.warn(pos, "SENprovision", "SEN provision is not E, K, N or S; kept as stated")
        return best

    @staticmethod
    def address(el: Any) -> tuple[str, list[str]]:
        """(postcode, address lines) from BS7666Address or AddressLines; PAON and Street share a line."""
        postcode = ""
        lines: list[str] = []
        for part in el:
            tag = part.tag
            if tag == "BS7666Address":
                parts = ["", "", "", "", "", "", ""]
                for c in part:
                    t = c.text
                    if not t:
                        continue
                    i = _ADDRESS_LINE_INDEX.get(c.tag)
                    if i is not None:
                        parts[i] = t.strip()
                    elif c.tag == "Postcode":
                        postcode = t
                if parts[1] and parts[2]:  # "12" + "Any Street" -> "12 Any Street"
                    parts[1], parts[2] = f"{parts[1]} {parts[2]}", ""
                lines += [x for x in parts if x]
            elif tag == "AddressLines":
                for line in part:
                    t = line.text
                    if not t or not t.strip():
                        continue
                    if line.tag == "Postcode":
                        postcode = t
                    elif line.tag.startswith("AddressLine"):
                        lines.append(t.strip())
            elif tag == "Postcode" and part.text:
                postcode = part.text
        return " ".join(postcode.upper().split()), lines

    @staticmethod
    def contacts(el: Any) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for contact in el:
            if contact.tag != "Contact":
                continue
            order: int | None = None
            title = surname = forename = relationship = email = ""
            responsibility: bool | None = None
            phones: list[dict[str, str]] = []
            for c in contact:
                tag = c.tag
                t = c.text
                t = t.strip() if t else ""
                if tag == "Surname":
                    surname = t
                elif tag == "Forename":
                    forename = t
                elif tag == "Relationship":
                    relationship = t.upper()
                elif tag == "Responsibility":
                    responsibility = _BOOL.get(t.lower())
                elif tag == "Order":
                    order = _int(t)
                elif tag == "Title":
                    title = t
                elif tag == "Phones":
                    for phone in c:
                        kind = number = ""
                        for p in phone:
                            pt = p.text
                            if p.tag == "PhoneNo":
                                number = pt.strip() if pt else ""
                            elif p.tag == "TelephoneType":
                                kind = pt.strip() if pt else ""
                        if number:
                            phones.append({"type": kind, "number": number})
                elif tag == "Email":
                    if not t:
                        for e in c:
                            if e.tag == "EmailAddress" and e.text:
                                t = e.text.strip()
                    email = t
            out.append(
                {
                    "order": order,
                    "title": title,
                    "surname": surname,
                    "forename": forename,
                    "relationship": relationship,
                    "responsibility": responsibility,
                    "phones": phones,
                    "email": email,
                }
            )
        if len(out) > 1:
            out.sort(key=lambda d: (d["order"] is None, d["order"] or 0))
        return out

    def attendance(self, el: Any, pos: int) -> tuple[int | None, int | None, int | None, int | None]:
        """(possible, attended, authorised, unauthorised): sums over every YearData of the latest Year."""
        latest = -1
        totals: list[int | None] = [None, None, None, None]
        bad = False
        for yd in el:
            if yd.tag != "YearData":
                continue
            year: int | None = None
            values: list[int | None] = [None, None, None, None]
            for c in yd:
                t = c.text
                if not t:
                    continue
                i = _ATTENDANCE_TAGS.get(c.tag)
                if i is not None:
                    t = t.strip()
                    if t.isdigit() and t.isascii():
                        values[i] = int(t)
                    elif t:
                        bad = True
                elif c.tag == "Year":
                    year = _int(t.strip())
            if year is None:
                bad = True
            elif year > latest:
                latest, totals = year, values
            elif year == latest:
                for i, n in enumerate(values):
                    if n is not None:
                        prev = totals[i]
                        totals[i] = n if prev is None else prev + n
        if bad:
            self.warn(pos, "Attendance", "attendance figures that are not whole numbers were ignored")
        return totals[0], totals[1], totals[2], totals[3]


_NO_ATTENDANCE: Final[tuple[None, None, None, None]] = (None, None, None, None)
