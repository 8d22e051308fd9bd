"""The hot-path checks of fastcheck.py made again through hl7apy: the slow, trusted path.

Not used by the listener. It exists for two things: the differential test (tests/unit/test_hl7_fastcheck.py), which
holds `fastcheck.check` to the same verdict as `reference_check` for every message, good or broken; and the
benchmark's baseline (benchmarks/mllp.py).

Every value is read from hl7apy's parse: the separators and the version from `hl7apy.parser.get_message_info`, the
MSH and each PID segment from `hl7apy.parser.parse_segment` (validation level TOLERANT), fields by repetition,
components and subcomponents by hl7apy's element names. Only the MSH and PID segments are handed to hl7apy: the
hot path looks at nothing else (hl7apy would refuse a segment id it does not know, which is the full parse's
business). The rules, their order and the texts are fastcheck.py's.
"""

from __future__ import annotations

from typing import Any

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import is_base_datatype
from hl7apy.exceptions import HL7apyException
from hl7apy.parser import get_message_info, parse_segment

from connectors.hl7v2 import fastcheck as fc
from schoolslink.identifiers import is_valid_nhs_number

__all__ = ["reference_check"]

_WS = fc.WS.decode("ascii")
_SEPARATORS = frozenset(chr(b) for b in fc.SEPARATOR_BYTES)
_VERSIONS = frozenset(v.decode() for v in fc.VERSIONS)
_EVENTS = {t.decode(): frozenset(e.decode() for e in es) for t, es in fc.EVENTS.items()}
_PARSE_VERSION = "2.5"  # the MSH is read under one known version first, to learn the message's own


def _refuse(ack: str, error: str, text: str, *location: str) -> fc.Checked:
    return fc.Checked(ack, error, text, location, None, None, None, None, None)


def _part(element: Any, i: int) -> Any | None:
    """Child number `i` (1-based) of a field or component. Of a composite data type (CX, HD, MSG, VID), by hl7apy's
    name for it (`CX_4`, `HD_1`): hl7apy leaves out empty components and does not name those past the type's last
    one, so position means nothing there. Of a primitive or unknown type (children named after their type, `ST`),
    by position: there hl7apy keeps the empty ones."""
    kids = list(element.children)
    datatype = element.datatype
    if datatype is not None and not is_base_datatype(datatype, element.version):
        suffix = f"_{i}"
        return next((k for k in kids if k.name and k.name.endswith(suffix) and k.name[:-len(suffix)] == datatype),
                    None)
    return kids[i - 1] if len(kids) >= i else None


def _value(element: Any | None) -> str:
    return "" if element is None else str(element.to_er7()).strip(_WS)


def _first(segment: Any, name: str) -> Any | None:
    reps = segment.children.get(name)
    return reps[0] if reps else None


def reference_check(message: bytes) -> fc.Checked:
    """`fastcheck.check`'s verdict, reached through hl7apy."""
    text = message.decode("ascii", "surrogateescape").replace("\r\n", "\r").replace("\n", "\r").lstrip()
    try:
        enc, _structure, _version = get_message_info(text)
    except (HL7apyException, IndexError):
        if not text.startswith("MSH"):
            return _refuse(fc.REFUSE_REJECT, "100", fc.T_NO_MSH, "MSH", "1")
        return _refuse(fc.REFUSE_REJECT, "102", fc.T_SEPARATORS, "MSH", "1", "2")
    seps = [enc["FIELD"], enc["COMPONENT"], enc["REPETITION"], enc["ESCAPE"], enc["SUBCOMPONENT"]]
    if "TRUNCATION" in enc or len(set(seps)) != 5 or not all(s in _SEPARATORS for s in seps):
        return _refuse(fc.REFUSE_REJECT, "102", fc.T_SEPARATORS, "MSH", "1", "2")
    segments = text.split("\r")
    level = VALIDATION_LEVEL.TOLERANT
    msh = parse_segment(segments[0], version=_PARSE_VERSION, encoding_chars=enc, validation_level=level)
    version = _value(_part(_first(msh, "MSH_12"), 1)) if _first(msh, "MSH_12") is not None else ""
    control_id = _value(_part(_first(msh, "MSH_10"), 1)) if _first(msh, "MSH_10") is not None else ""
    if not version:
        return _refuse(fc.REFUSE_REJECT, "101", fc.T_VERSION_MISSING, "MSH", "1", "12")
    if version not in _VERSIONS:
        return _refuse(fc.REFUSE_REJECT, "203", fc.T_VERSION, "MSH", "1", "12")
    msh = parse_segment(segments[0], version=version, encoding_chars=enc, validation_level=level)
    msh_9 = _first(msh, "MSH_9")
    mtype = _value(_part(msh_9, 1)) if msh_9 is not None else ""
    event = _value(_part(msh_9, 2)) if msh_9 is not None else ""
    if not mtype:
        return _refuse(fc.REFUSE_REJECT, "101", fc.T_TYPE_MISSING, "MSH", "1", "9")
    if mtype not in _EVENTS:
        return _refuse(fc.REFUSE_REJECT, "200", fc.T_TYPE, "MSH", "1", "9")
    if not event:
        return _refuse(fc.REFUSE_REJECT, "101", fc.T_EVENT_MISSING, "MSH", "1", "9")
    if event not in _EVENTS[mtype]:
        return _refuse(fc.REFUSE_REJECT, "201", fc.T_EVENT, "MSH", "1", "9")
    if not control_id:
        return _refuse(fc.REFUSE_REJECT, "101", fc.T_CONTROL_ID, "MSH", "1", "10")
    msh_fields = segments[0].split(enc["FIELD"])
    keys = [control_id, mtype, event] + [msh_fields[i].strip(_WS) if len(msh_fields) > i else "" for i in (2, 3)]
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for k in keys for ch in k):
        return _refuse(fc.REFUSE_REJECT, "102", fc.T_CONTROL_CHARACTER, "MSH", "1", "10")
    pid_prefix = "PID" + enc["FIELD"]
    pids = [s for s in segments[1:] if s.startswith(pid_prefix)]
    for seq, raw in enumerate(pids, 1):
        pid = parse_segment(raw, version=version, encoding_chars=enc, validation_level=level)
        for n, cx in enumerate(pid.children.get("PID_3") or [], 1):
            authority = _part(cx, 4)
            if authority is None or _value(_part(authority, 1)) != "NHS":
                continue
            if _value(_part(cx, 5)) not in ("NH", "HN", ""):
                continue
            number = _value(_part(cx, 1))
            if not number:
                continue
            if len(number) != 10 or not number.isascii() or not number.isdigit():
                return _refuse(fc.REFUSE_ERROR, "102", fc.T_NHS_FORMAT, "PID", str(seq), "3", str(n))
            if not is_valid_nhs_number(number):
                return _refuse(fc.REFUSE_ERROR, "102", fc.T_NHS_CHECK, "PID", str(seq), "3", str(n))
    return fc.Checked(fc.ACCEPT, None, None, None, None, None, None, None, None)
