"""The checks an HL7v2 message passes before it is acknowledged: the listener's hot path, and nothing more.

`check(message)` reads the message as bytes (no decoding, no regular expression, one split of the MSH segment and
one of each PID-3) and returns a `Checked`: the acknowledgment code, and for a refusal the ERR-3 code (HL7 table
0357) and a short text that names the field and never quotes its value. Everything else (the full hl7apy parse,
mapping, identity) happens after the message is stored, in the full-parse stage.

In this order; the first failure decides:

| # | check | refusal |
|---|---|---|
| 1 | the message begins with an MSH segment (after leading white space) | AR 100 |
| 2 | MSH-1 and MSH-2: a field separator and four encoding characters, five distinct punctuation characters | AR 102 |
| 3 | MSH-12 version id present / one of 2.3, 2.3.1, 2.4, 2.5, 2.5.1, 2.6 | AR 101 / AR 203 |
| 4 | MSH-9 message type present / ADT or REF | AR 101 / AR 200 |
| 5 | MSH-9 trigger event present / ADT A01 A03 A04 A08 A28 A31 A40, REF I12 I13 I14 | AR 101 / AR 201 |
| 6 | MSH-10 message control id present | AR 101 |
| 7 | each PID segment's PID-3: the NHS number (the repetition whose CX-4 is `NHS` and CX-5 `NH`, `HN` or |  |
|   | empty), when there is one, is 10 digits and its Modulus 11 check digit is right | AE 102 |

AR (reject) where the message cannot be processed as sent (its header is unusable or names something we do not
take): the sender must change how it sends, not what it says. AE (error) where the header is good but the content
is wrong (an NHS number that fails its check digit): the record must be corrected at source and sent again. An NHS
number may be absent (many referrals arrive before a trace); PID-3's other repetitions (the trust's MRN, whose
assigning authority is its ODS code) are not checked here.

Segments end with CR; LF and CR LF are accepted too. Values are compared with surrounding white space removed, a
field that repeats is read by its first repetition, and escape sequences are not decoded (a value that needs one
is not a valid code or NHS number anyway). `reference_check.py` makes the same checks through hl7apy; the
differential test holds the two to the same verdict for every message.
"""

from __future__ import annotations

import re
from typing import Final

from schoolslink.identifiers import is_valid_nhs_number

__all__ = [
    "ACCEPT",
    "ERR_MEANING",
    "EVENTS",
    "REFUSE_ERROR",
    "REFUSE_REJECT",
    "VERSIONS",
    "Checked",
    "check",
]

ACCEPT: Final = "AA"
REFUSE_ERROR: Final = "AE"
REFUSE_REJECT: Final = "AR"

# HL7 table 0357 (message error condition codes) as ERR-3 carries them
ERR_MEANING: Final = {
    "100": "Segment sequence error",
    "101": "Required field missing",
    "102": "Data type error",
    "103": "Table value not found",
    "200": "Unsupported message type",
    "201": "Unsupported event code",
    "203": "Unsupported version id",
    "207": "Application internal error",
}

VERSIONS: Final = frozenset({b"2.3", b"2.3.1", b"2.4", b"2.5", b"2.5.1", b"2.6"})
EVENTS: Final = {
    b"ADT": frozenset({b"A01", b"A03", b"A04", b"A08", b"A28", b"A31", b"A40"}),
    b"REF": frozenset({b"I12", b"I13", b"I14"}),
}
NHS_AUTHORITY: Final = b"NHS"
NHS_ID_TYPES: Final = frozenset({b"NH", b"HN", b""})

# What str.strip() removes from ASCII text, so the bytes here and hl7apy's str agree on what white space is.
WS: Final = b" \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f"
_CONTROL: Final = bytes(range(0x20)) + b"\x7f"
_CONTROL_RE: Final = re.compile("[\x00-\x1f\x7f]")


def _escaped(text: str) -> str:
    """A key with its control characters written out (`\\x00`): stored and echoed as text, never raw (PostgreSQL
    refuses NUL in text; a log or an ACK would carry the rest)."""
    return _CONTROL_RE.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
SEPARATOR_BYTES: Final = frozenset(b for b in range(0x21, 0x7F) if not chr(b).isalnum())

# The texts (ERR-3.2): the field, what is wrong, never the value.
T_NO_MSH: Final = "MSH: the message does not begin with an MSH segment"
T_SEPARATORS: Final = ("MSH-1/MSH-2: the field separator and encoding characters must be five different "
                       "punctuation characters, such as |^~\\&")
T_VERSION_MISSING: Final = "MSH-12: the version id is missing"
T_VERSION: Final = "MSH-12: version id not supported (2.3 to 2.6 are)"
T_TYPE_MISSING: Final = "MSH-9: the message type is missing"
T_TYPE: Final = "MSH-9: message type not supported (ADT and REF are)"
T_EVENT_MISSING: Final = "MSH-9: the trigger event is missing"
T_EVENT: Final = "MSH-9: trigger event not supported for this message type"
T_CONTROL_ID: Final = "MSH-10: the message control id is missing"
T_CONTROL_CHARACTER: Final = "MSH-3, MSH-4 or MSH-10 holds a control character, which no HL7 text may"
T_NHS_FORMAT: Final = "PID-3: NHS number is not 10 digits"
T_NHS_CHECK: Final = "PID-3: NHS number fails its check digit"

_MSH_FIELDS: Final = 12  # we read up to MSH-12
# MSH-1 + MSH-2 combinations already found usable (a handful per trust), with their separators
_encodings: dict[bytes, tuple[bytes, bytes, bytes, bytes, bytes]] = {}


class Checked:
    """The verdict on one message, and the MSH facts the acknowledgment and the store need.

    `ack` is AA, AE or AR; `error` the ERR-3 code and `text` its text for a refusal (else None); `location` the
    ERR-2 location (segment, sequence, field[, repetition]). `enc` is MSH-1 + MSH-2 (five bytes) and `msh` the MSH
    fields (index i holds MSH-(i+1), at least 12 of them) when the header could be read, else None. `sender` is
    MSH-3^MSH-4, `control_id` MSH-10 and `message_type` e.g. `ADT^A08`, each None when it could not be read.
    """

    __slots__ = ("ack", "control_id", "enc", "error", "location", "message_type", "msh", "sender", "text")

    def __init__(self, ack: str, error: str | None, text: str | None, location: tuple[str, ...] | None,
                 enc: bytes | None, msh: list[bytes] | None, sender: str | None, control_id: str | None,
                 message_type: str | None) -> None:
        self.ack = ack
        self.error = error
        self.text = text
        self.location = location
        self.enc = enc
        self.msh = msh
        self.sender = sender
        self.control_id = control_id
        self.message_type = message_type

    @property
    def accepted(self) -> bool:
        return self.ack == ACCEPT

    @property
    def verdict(self) -> tuple[str, str | None, str | None]:
        """(ack, error, text): what the differential test compares."""
        return self.ack, self.error, self.text

    def __repr__(self) -> str:  # ids and codes only: never message content
        return f"Checked({self.ack}, {self.error}, {self.text!r}, control_id={self.control_id!r})"


def _separators(enc: bytes) -> tuple[bytes, bytes, bytes, bytes, bytes] | None:
    """(field, component, repetition, subcomponent separators, the PID marker) for MSH-1 + MSH-2, if usable."""
    seps = _encodings.get(enc)
    if seps is None:
        if len(enc) != 5 or len(set(enc)) != 5 or not all(b in SEPARATOR_BYTES for b in enc):
            return None
        seps = (enc[:1], enc[1:2], enc[2:3], enc[4:5], b"\rPID" + enc[:1])
        if len(_encodings) < 256:
            _encodings[enc] = seps
    return seps


def check(message: bytes) -> Checked:
    """The hot-path verdict on one message (the content of one MLLP frame)."""
    data = message.lstrip(WS)
    if not data.startswith(b"MSH"):
        return Checked(REFUSE_REJECT, "100", T_NO_MSH, ("MSH", "1"), None, None, None, None, None)
    end = data.find(b"\r")
    lf = data.find(b"\n", 0, end) if end >= 0 else data.find(b"\n")
    if lf >= 0:
        end = lf
    msh_seg = data if end < 0 else data[:end]
    enc = msh_seg[3:8]
    seps = _separators(enc)
    if seps is None or msh_seg[8:9] not in (b"", enc[:1]):
        return Checked(REFUSE_REJECT, "102", T_SEPARATORS, ("MSH", "1", "2"), None, None, None, None, None)
    fs, comp, rep, sub, marker = seps
    f = msh_seg.split(fs)
    if len(f) < _MSH_FIELDS:
        f.extend([b""] * (_MSH_FIELDS - len(f)))
    # MSH-10, MSH-9, MSH-12: the first repetition, the first component(s), without white space
    v = f[9]
    if rep in v:
        v = v[:v.index(rep)]
    cid = v.split(comp, 1)[0].strip(WS) if comp in v else v.strip(WS)
    control_id = cid.decode("ascii", "backslashreplace") if cid else None
    sender = (f[2].strip(WS) + b"^" + f[3].strip(WS)).decode("ascii", "backslashreplace")
    v = f[8]
    if rep in v:
        v = v[:v.index(rep)]
    t = v.split(comp, 2)
    mtype = t[0].strip(WS)
    event = t[1].strip(WS) if len(t) > 1 else b""
    message_type = (mtype + b"^" + event).decode("ascii", "backslashreplace") if mtype else None
    keys = f[2] + f[3] + cid + mtype + event
    control = len(keys.translate(None, _CONTROL)) != len(keys)  # in C: the usual answer, no, costs nothing
    if control:
        sender = _escaped(sender)
        control_id = _escaped(control_id) if control_id is not None else None
        message_type = _escaped(message_type) if message_type is not None else None
    v = f[11]
    if rep in v:
        v = v[:v.index(rep)]
    version = v.split(comp, 1)[0].strip(WS) if comp in v else v.strip(WS)
    if version not in VERSIONS:
        if not version:
            return Checked(REFUSE_REJECT, "101", T_VERSION_MISSING, ("MSH", "1", "12"), enc, f, sender, control_id,
                           message_type)
        return Checked(REFUSE_REJECT, "203", T_VERSION, ("MSH", "1", "12"), enc, f, sender, control_id,
                       message_type)
    events = EVENTS.get(mtype)
    if events is None or event not in events:
        if not mtype:
            return Checked(REFUSE_REJECT, "101", T_TYPE_MISSING, ("MSH", "1", "9"), enc, f, sender, control_id, None)
        if events is None:
            return Checked(REFUSE_REJECT, "200", T_TYPE, ("MSH", "1", "9"), enc, f, sender, control_id,
                           message_type)
        if not event:
            return Checked(REFUSE_REJECT, "101", T_EVENT_MISSING, ("MSH", "1", "9"), enc, f, sender, control_id,
                           message_type)
        return Checked(REFUSE_REJECT, "201", T_EVENT, ("MSH", "1", "9"), enc, f, sender, control_id, message_type)
    if control_id is None:
        return Checked(REFUSE_REJECT, "101", T_CONTROL_ID, ("MSH", "1", "10"), enc, f, sender, None, message_type)
    if control:
        return Checked(REFUSE_REJECT, "102", T_CONTROL_CHARACTER, ("MSH", "1", "10"), enc, f, sender, control_id,
                       message_type)
    if marker in data or b"\n" in data:
        if b"\n" in data:
            data = data.replace(b"\r\n", b"\r").replace(b"\n", b"\r")
        bad = _nhs_numbers(data, fs, comp, rep, sub, marker)
        if bad is not None:
            text, seq, repetition = bad
            return Checked(REFUSE_ERROR, "102", text, ("PID", str(seq), "3", str(repetition)), enc, f, sender,
                           control_id, message_type)
    return Checked(ACCEPT, None, None, None, enc, f, sender, control_id, message_type)


def _nhs_numbers(data: bytes, fs: bytes, comp: bytes, rep: bytes, sub: bytes,
                 marker: bytes) -> tuple[str, int, int] | None:
    """The first PID-3 NHS number that fails, as (text, PID segment sequence, repetition), or None."""
    seq = 0
    i = data.find(marker)
    while i >= 0:
        seq += 1
        start = i + 1
        e = data.find(b"\r", start)
        parts = (data[start:e] if e >= 0 else data[start:]).split(fs, 4)
        if len(parts) > 3 and NHS_AUTHORITY in parts[3]:
            for n, r in enumerate(parts[3].split(rep), 1):
                c = r.split(comp, 5)
                if len(c) < 4 or c[3].split(sub, 1)[0].strip(WS) != NHS_AUTHORITY:
                    continue
                if (c[4].strip(WS) if len(c) > 4 else b"") not in NHS_ID_TYPES:
                    continue
                number = c[0].strip(WS)
                if not number:
                    continue  # an NHS repetition without a number: no number, which is allowed
                if len(number) != 10 or not number.isdigit():
                    return T_NHS_FORMAT, seq, n
                if not is_valid_nhs_number(number.decode("ascii")):
                    return T_NHS_CHECK, seq, n
        i = data.find(marker, start) if e >= 0 else -1
    return None
