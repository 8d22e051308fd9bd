"""The full parse of a stored HL7v2 message (the slow, trusted path, after the ACK) into a plain view.

`parse(body)` runs hl7apy (`parse_message`, tolerant validation, `find_groups=False`) over the message and returns a
`ParsedMessage`: the header facts (type, version, control id) and `segments`, the view the declarative mappings in
`mappings/hl7v2-in/` read:

    {"PID": [ {"f3": [{"c1": "9990000018", "c4": "NHS", "c5": "NH"}, {"c1": "RX4000123", "c4": "RX4", ...}],
               "f5": [{"c1": "SURNAME", "c2": "FORENAME", "c7": "L"}], "f7": [{"c1": "20130401"}], ...} ],
     "NK1": [ {...}, {...} ], ...}

Segment id -> its occurrences, in order; field `fN` (HL7 "PID-N") -> its repetitions, in order; each repetition
-> its components `cN`. A component with subcomponents gives its first subcomponent as `cN` and each one as `cN_M`
(so `c4` of `NHS&2.16.840.1.113883.2.1.4.1&ISO` is `NHS`). Escape sequences are decoded; empty values and HL7's
null (`""`) are left out (an empty repetition stays, as `{}`, so `[0]` is always the first). MSH-1 and MSH-2 are the
separators, as sent. In a mapping path: `PID[0].f3[c4=NHS].c1`, `PID[0].f7[0].c1`.

hl7apy decides what a segment is: segment ids the message's HL7 version does not define are refused, as are
versions outside 2.3 to 2.6 (those the listener takes, `fastcheck.VERSIONS`). Values are not read from its tree:
past what its version defines, hl7apy keeps a field's value but not its position (a v2.3 message's PID-32 comes
back as PID-31), so each segment hl7apy accepted is split here, as sent, one for one. Z segments (local
extensions: ZU1, ZU3, ZU8, ...) are taken out before hl7apy sees the message and kept aside, as sent, in
`z_segments`: hl7apy cannot type them, and nothing reads them.

As each message is parsed, the name parts of the people it names (PID-5, PID-6, PID-9, MRG-7, NK1-2, NK1-30, PD1-4)
are registered with the log filter (`schoolslink.logfilter.remember_names`), so a log line can never show them.

A message that cannot be read raises `Hl7Refused` with the field (or segment position) and a reason written for a
trust data engineer, never a value from the message.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from connectors.hl7v2.fastcheck import VERSIONS as _LISTENER_VERSIONS
from schoolslink.errors import PermanentDataError
from schoolslink.logfilter import remember_names

__all__ = ["VERSIONS", "Hl7Refused", "ParsedMessage", "Segment", "parse"]

VERSIONS = frozenset(v.decode("ascii") for v in _LISTENER_VERSIONS)

Repetition = dict[str, str]
Segment = dict[str, list[Repetition]]

# The people a message names, as (segment, field, components of the name that are name parts): XPN (family,
# given, further given) and XCN (id, family, given, further given).
_NAME_FIELDS = (("PID", "f5", ("c1", "c2", "c3")), ("PID", "f6", ("c1", "c2", "c3")),
                ("PID", "f9", ("c1", "c2", "c3")), ("MRG", "f7", ("c1", "c2", "c3")),
                ("NK1", "f2", ("c1", "c2", "c3")), ("NK1", "f30", ("c1", "c2", "c3")),
                ("PD1", "f4", ("c2", "c3", "c4")))
_SEGMENT_ID = re.compile(r"[A-Z][A-Z0-9]{2}")


class Hl7Refused(PermanentDataError):
    """A message (or a part of it) that cannot be used: `field` names the field or segment (e.g. `PID-7`,
    `segment 4`), `reason` says what is wrong and what to do, never a value from the message."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(reason)
        self.field = field
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ParsedMessage:
    message_type: str  # MSH-9.1^MSH-9.2, e.g. ADT^A08
    version: str  # MSH-12
    control_id: str  # MSH-10
    segments: dict[str, list[Segment]]  # the view the mappings read (module docstring)
    z_segments: tuple[str, ...]  # local Z segments, as sent: kept, never read

    def person_names(self) -> Iterator[str]:
        """Every name part of every person the message names (for the log filter)."""
        for seg_id, field, parts in _NAME_FIELDS:
            for seg in self.segments.get(seg_id, ()):
                for rep in seg.get(field, ()):
                    for key, value in rep.items():
                        if key.split("_", 1)[0] in parts:
                            yield value


@dataclass(frozen=True, slots=True)
class _Separators:
    field: str
    repetition: str
    component: str
    subcomponent: str
    escape: str


def parse(body: bytes) -> ParsedMessage:
    """The full parse of one message as stored (the content of its MLLP frame). Raises `Hl7Refused`."""
    from hl7apy.consts import VALIDATION_LEVEL
    from hl7apy.exceptions import HL7apyException, InvalidName, UnsupportedVersion
    from hl7apy.parser import parse_message

    lines = [s.lstrip() for s in _text(body).replace("\r\n", "\r").replace("\n", "\r").split("\r") if s.strip()]
    if not lines or not lines[0].startswith("MSH"):
        raise Hl7Refused("MSH", "MSH: the message does not begin with an MSH segment")
    seps = _separators(lines[0])
    standard = [s for s in lines if s[0] not in "Zz"]
    z_segments = tuple(s for s in lines if s[0] in "Zz")
    try:
        message = parse_message("\r".join(standard), validation_level=VALIDATION_LEVEL.TOLERANT, find_groups=False)
    except UnsupportedVersion:
        raise Hl7Refused("MSH-12", _version_reason()) from None
    except InvalidName:
        raise _unknown_segment(standard, _first(_segment(standard[0], seps), "f12", "c1")) from None
    except HL7apyException as exc:
        raise Hl7Refused("MSH", f"the message could not be parsed as HL7v2 ({type(exc).__name__}): check its "
                                f"MSH segment and separators") from None
    except Exception as exc:  # noqa: BLE001 - hl7apy fails on odd input in other ways too; never quote it
        raise Hl7Refused("MSH", f"the message could not be parsed as HL7v2 ({type(exc).__name__})") from None

    if len(message.children) != len(standard):  # one for one, or hl7apy read the message another way
        raise Hl7Refused("MSH", "the message could not be parsed as HL7v2: its segments could not be told apart")
    segments: dict[str, list[Segment]] = {}
    for seg, text in zip(message.children, standard, strict=True):
        segments.setdefault(str(seg.name).upper(), []).append(_segment(text, seps))
    msh = segments["MSH"][0]
    version = _first(msh, "f12", "c1")
    if version not in VERSIONS:
        raise Hl7Refused("MSH-12", _version_reason())
    parsed = ParsedMessage(
        message_type="^".join((_first(msh, "f9", "c1"), _first(msh, "f9", "c2"))), version=version,
        control_id=_first(msh, "f10", "c1"), segments=segments, z_segments=z_segments)
    remember_names(parsed.person_names())  # before anything else reads the message: hidden if ever logged
    return parsed


def _text(body: bytes) -> str:
    """The message as text: UTF-8, else ISO 8859-1 (what NHS systems send when they do not send UTF-8)."""
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        return body.decode("latin-1")


def _separators(msh: str) -> _Separators:
    """MSH-1 and MSH-2: the field separator, then component, repetition, escape and subcomponent."""
    chars = msh[3:8]
    if len(chars) < 5 or len(set(chars)) < 5 or msh[8:9] not in ("", chars[0]) or any(c.isalnum() for c in chars):
        raise Hl7Refused("MSH-2", "MSH-1/MSH-2: the field separator and encoding characters must be five different "
                                  "punctuation characters, such as |^~\\&")
    return _Separators(field=chars[0], component=chars[1], repetition=chars[2], escape=chars[3],
                       subcomponent=chars[4])


def _version_reason() -> str:
    return f"MSH-12: version id not supported ({', '.join(sorted(VERSIONS))} are)"


def _unknown_segment(segments: list[str], version: str) -> Hl7Refused:
    """The first segment the message's version does not define, by position (its id may be stray text)."""
    from hl7apy import load_reference
    from hl7apy.exceptions import HL7apyException

    for n, seg in enumerate(segments, 1):
        try:
            if _SEGMENT_ID.fullmatch(seg[:3].upper()):
                load_reference(seg[:3].upper(), "Segment", version)
                continue
        except HL7apyException:
            pass
        return Hl7Refused(f"segment {n}", f"segment {n}: not a segment HL7 v{version} defines (a local segment's "
                                          f"id starts with Z; a line break inside a value splits a segment)")
    return Hl7Refused("MSH", "the message could not be parsed as HL7v2: a segment name is not valid")


def _segment(er7: str, seps: _Separators) -> Segment:
    parts = er7.split(seps.field)
    seg: Segment = {}
    if parts[0].upper() == "MSH":  # MSH-1 is the field separator itself; MSH-2 the other separators, as sent
        seg["f1"] = [{"c1": seps.field}]
        seg["f2"] = [{"c1": parts[1]}] if len(parts) > 1 else []
        numbered = enumerate(parts[2:], 3)
    else:
        numbered = enumerate(parts[1:], 1)
    for n, text in numbered:
        if text and text != '""':
            seg[f"f{n}"] = [_repetition(r, seps) for r in text.split(seps.repetition)]
    return seg


def _repetition(text: str, seps: _Separators) -> Repetition:
    rep: Repetition = {}
    for i, comp in enumerate(text.split(seps.component), 1):
        subs = comp.split(seps.subcomponent)
        if len(subs) == 1:
            value = _unescape(comp, seps)
            if value and value != '""':
                rep[f"c{i}"] = value
            continue
        for j, sub in enumerate(subs, 1):
            value = _unescape(sub, seps)
            if value and value != '""':
                rep[f"c{i}_{j}"] = value
                if j == 1:
                    rep[f"c{i}"] = value
    return rep


def _unescape(text: str, seps: _Separators) -> str:
    """HL7 escape sequences decoded: separators (F S T R E), hex (Xhh...), line breaks (.br) as spaces; highlighting
    and character-set switches (H N C M Z and other formatting) dropped. Never logs or raises on odd sequences."""
    esc = seps.escape
    if esc not in text:
        return text
    out: list[str] = []
    i, n = 0, len(text)
    named = {"F": seps.field, "S": seps.component, "T": seps.subcomponent, "R": seps.repetition, "E": esc,
             ".br": " "}
    while i < n:
        c = text[i]
        j = text.find(esc, i + 1) if c == esc else -1
        if j < 0:
            out.append(c)
            i += 1
            continue
        seq = text[i + 1:j]
        if seq in named:
            out.append(named[seq])
        elif seq[:1] == "X" and len(seq) % 2 == 1 and all(ch in "0123456789abcdefABCDEF" for ch in seq[1:]):
            out.append(bytes.fromhex(seq[1:]).decode("latin-1"))
        i = j + 1
    return "".join(out)


def _first(seg: Segment, field: str, comp: str) -> str:
    reps: list[Repetition] = seg.get(field) or [{}]
    return reps[0].get(comp, "").strip()

