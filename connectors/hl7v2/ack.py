"""The HL7v2 acknowledgment the listener returns for each message (original acknowledgment mode).

    MSH|^~\\&|<MSH-5>|<MSH-6>|<MSH-3>|<MSH-4>|<now>||ACK^<trigger>^ACK|<new control id>|<MSH-11>|<MSH-12>
    MSA|<AA, AE or AR>|<the message's MSH-10>[|<text>]
    ERR||<segment^sequence^field[^repetition]>|<ERR-3 code>^<text>^HL70357|E          (AE and AR only)

Written in the message's own field separator and encoding characters (the defaults `|^~\\&` when its MSH could
not be read), sending and receiving application and facility swapped, MSH-11 (processing id) and MSH-12 (version)
copied as received. ERR-3 is a CWE from HL7 table 0357 and ERR-4 the severity (E); ERR-2 says where the fault is.
MSA-3 repeats the text for receivers on HL7 2.3/2.4, which read MSA-3 rather than ERR. The text names a field and
never quotes a value (fastcheck.py), and is escaped with the message's escape character.
"""

from __future__ import annotations

import itertools
import secrets
import time
from typing import Final

from connectors.hl7v2.fastcheck import WS, Checked

__all__ = ["DEFAULT_ENCODING", "build_ack"]

DEFAULT_ENCODING: Final = b"|^~\\&"
_PREFIX: Final = secrets.token_hex(3).upper().encode()  # our control ids: this process's prefix and a counter
_counter = itertools.count(1)
_clock: list[object] = [-1, b""]  # (second, MSH-7 text): one strftime a second
_EMPTY_MSH: Final = [b""] * 12
_START: Final = b"\x0b"
_END: Final = b"\r\x1c\r"  # the segment's CR, then MLLP's end bytes
_cache: dict[tuple[bytes, ...], tuple[bytes, bytes, bytes]] = {}


def _now() -> bytes:
    sec = int(time.time())
    if _clock[0] != sec:
        _clock[0] = sec
        _clock[1] = time.strftime("%Y%m%d%H%M%S+0000", time.gmtime(sec)).encode()
    stamp = _clock[1]
    assert isinstance(stamp, bytes)
    return stamp


def _escape(text: str, enc: bytes) -> bytes:
    """`text` (ASCII) with the message's separators written as HL7 escape sequences."""
    raw = text.encode("ascii", "replace")
    fs, comp, rep, esc, sub = (enc[i:i + 1] for i in range(5))
    if not any(c in raw for c in (fs, comp, rep, esc, sub)):
        return raw
    out = bytearray()
    for b in raw:
        c = bytes((b,))
        out += (esc + {fs: b"F", comp: b"S", rep: b"R", esc: b"E", sub: b"T"}[c] + esc
                if c in (fs, comp, rep, esc, sub) else c)
    return bytes(out)


def _parts(enc: bytes, msh: list[bytes]) -> tuple[bytes, bytes, bytes]:
    """The fixed parts of an ACK to this sender: (MSH up to MSH-7, MSH-8 to our control id's prefix,
    MSH-11 to MSA-1), kept per sender and message type."""
    key = (enc, msh[2], msh[3], msh[4], msh[5], msh[8], msh[10], msh[11])
    got = _cache.get(key)
    if got is None:
        fs, comp, rep = enc[:1], enc[1:2], enc[2:3]
        t = msh[8].split(rep, 1)[0].split(comp, 2)
        trigger = t[1].strip(WS) if len(t) > 1 else b""
        got = (b"".join((b"MSH", enc, fs, msh[4], fs, msh[5], fs, msh[2], fs, msh[3], fs)),
               b"".join((fs, fs, b"ACK", comp, trigger, comp, b"ACK", fs, _PREFIX)),
               b"".join((fs, msh[10], fs, msh[11], b"\rMSA", fs)))
        if len(_cache) >= 1024:
            _cache.clear()
        _cache[key] = got
    return got


def build_ack(checked: Checked, ack: str, error: str | None = None, text: str | None = None,
              location: tuple[str, ...] | None = None, *, framed: bool = False) -> bytes:
    """The acknowledgment of the message `checked` describes, with code `ack` (and, for AE/AR, ERR-3 `error`);
    with `framed`, inside MLLP's start and end bytes."""
    enc = checked.enc or DEFAULT_ENCODING
    msh = checked.msh or _EMPTY_MSH
    head, mid, tail = _parts(enc, msh)
    fs = enc[:1]
    cid = msh[9]
    if enc[2:3] in cid or enc[1:2] in cid:
        cid = cid.split(enc[2:3], 1)[0].split(enc[1:2], 1)[0]
    out = [_START if framed else b"", head, _now(), mid, str(next(_counter)).encode(), tail, ack.encode(), fs,
           cid.strip(WS)]
    if error is not None:
        comp = enc[1:2]
        etext = _escape(text or "", enc)
        out += [fs, etext, b"\rERR", fs, fs]
        if location:
            out.append(comp.join(p.encode() for p in location))
        out += [fs, error.encode(), comp, etext, comp, b"HL70357", fs, b"E"]
    out.append(_END if framed else b"\r")
    return b"".join(out)
