"""Pseudonymise pupil and patient identifiers in log records before anything writes them (docs/governance/logging.md).

The pipeline keeps pupil values out of log calls in the first place (it logs run ids, storage keys, counts and keyed
pseudonyms). This module is the safety net for the mistake that slips through: ours, Airflow's or a library's
(httpx logs request URLs). It replaces, in a record's message, its arguments and its traceback:

| what | how it is recognised | token |
|---|---|---|
| NHS number | 10 digits (or 3-3-4 with spaces or hyphens) passing the modulus-11 check | `<nhs:…>` |
| ULN | 10 digits, first not 0, passing the LRS check (and not a valid NHS number) | `<uln:…>` |
| UPN | a letter and 12 characters (11 digits, then a digit or a letter) with the right check letter | `<upn:…>` |
| date of birth | a date after a DOB-ish key (`dob`, `…birth…`, `<DOB>`), HL7 PID-7, or a standalone date | `<dob:…>` |
|               | (ISO or dd/mm/yyyy, not part of a timestamp) in a year 2 to 25 years before this one | |
| postcode | the UK postcode format (outward and inward code) | `<pc:…>` |
| email address | `local@domain.tld` (also `%40` URL-escaped) | `<email:…>` |
| UK phone number | `0` and 9 or 10 digits in the usual groupings; `+44`, `0044`, `(0)`, `(01632)` forms | `<tel:…>` |
| street address | a house number (`12`, `12a`, `Flat 3, 12`), 1-4 capitalised words, a street type | `<addr:…>` |
| HL7 name | `SURNAME^FORENAME` (XPN order) | `<name:…>` |
| name after a key | `surname=Smith`, `"given": ["Amy"]`, `<Forename>Amy<`, `patient_name: …`; after | `<name:…>` |
|                  | `name`, `names`, `contact` a capitalised value only; a dict's value under such a key | |
| HL7 PID, NK1 | by field: ids, names, DOB, address (XAD), phones and emails (XTN) | by kind; `<id:…>` |
| known names | words registered with `remember_names` (whole words, any case) | `<name:…>` |

Check-digit identifiers are replaced only when the check passes: `1234567890` fails modulus 11 and is no NHS number,
so it is left (about one random 10-digit run in eleven passes and is replaced anyway; harmless). A run of 10 or 11
digits starting with 0 (and not 00), spaced as UK numbers are, is a phone number. Timestamps
(`2026-11-26T02:00:00+00:00`, `2026-11-26 02:00`), run ids, URNs (6 digits), ODS codes, ports, versions and this
year's and last year's dates survive.

A token is `<kind:` + 8 hex digits of HMAC-SHA256 under the pseudonym key (`schoolslink.keys`) with the fixed label
`logfilter`: the same value gives the same token in every process sharing the key, and it cannot be reversed
without the key. Where no key is configured (no `SCHOOLSLINK_KEY` and no key file yet), a random per-process key is
used rather than creating a key file from a log call: tokens then only correlate within one process.

Nothing here raises: on any internal error a record is emitted with its message replaced by a fixed notice.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import re
import secrets
import sys
import threading
from collections.abc import Callable, Iterable, MutableMapping
from datetime import date
from functools import lru_cache
from pathlib import Path
from typing import Any

from schoolslink.identifiers import is_valid_nhs_number, is_valid_uln, is_valid_upn

__all__ = [
    "PseudonymisingFilter",
    "forget_names",
    "install",
    "pseudonymise",
    "pseudonymise_value",
    "remember_names",
    "structlog_processor",
]

LABEL = "logfilter"
FAILED_NOTICE = "[log record withheld: the pseudonymising filter failed on it]"

# Where a match may start: not inside a word or number, except straight after a %XX URL escape (%7C9434765919).
_START = r"(?:(?<![0-9A-Za-z])|(?<=%[0-9A-Fa-f]{2}))"
_END = r"(?![0-9A-Za-z])"
_DATE = r"\d{4}-\d{2}-\d{2}|\d{2}/\d{2}/\d{4}"
_SEP = r"[ -]?"


def _nsn(area_end: str) -> str:
    """A UK national significant number (what follows the trunk 0: 9 or 10 digits) as people group it; `area_end`
    separates the area code from the rest."""
    a, s = area_end, _SEP
    return (
        rf"(?:7\d{{3}}{a}\d{{3}}{s}\d{{3}}|7\d{{3}}{a}\d{{6}}|7\d{{2}}{a}\d{{3}}{s}\d{{4}}"  # 07700 900123
        rf"|2\d{a}\d{{4}}{s}\d{{4}}|2\d{{2}}{a}\d{{3}}{s}\d{{4}}"  # 020 7946 0123, 0207 946 0123
        rf"|1\d1{a}\d{{3}}{s}\d{{4}}|11\d{a}\d{{3}}{s}\d{{4}}"  # 0121 496 0123, 0113 496 0123
        rf"|1\d{{3}}{a}\d{{3}}{s}\d{{3}}|1\d{{3}}{a}\d{{5,6}}|1\d{{4}}{a}\d{{4,5}}"  # 01632 960123, 016977 4567
        rf"|[3589]\d{{2}}{a}\d{{3}}{s}\d{{3,4}}|[3589]\d{{3}}{a}\d{{6}})"  # 0300 123 4567, 0800 123 456
    )


_PAREN = r"\) ?"  # the end of an area code in brackets
_TEL = (rf"(?:\+|%2[Bb]|00)44 ?(?:\(0\) ?)?{_nsn(_SEP)}"  # +44 7700 900123, +44 (0)20 7946 0123, 0044 …
        rf"|\(0{_nsn(_PAREN)}"  # (01632) 960123
        rf"|0{_nsn(_SEP)}")  # 07700 900123, 01632-960-123
_STREET_TYPES = (
    "road|rd|street|st|avenue|ave|lane|ln|close|drive|dr|way|crescent|cres|grove|place|pl|court|ct|gardens|gdns"
    "|terrace|terr|tce|hill|park|row|walk|square|sq|mews|view|rise|green|parade|boulevard|broadway|quay|wharf|yard"
    "|croft|chase|vale|gate|mount|circus|meadows?|heights|esplanade|embankment|grange"
)
_ADDR = (r"(?:(?:Flat|FLAT|Apartment|APARTMENT|Apt|APT|Unit|UNIT|Suite|SUITE)\.? ?\d{1,4}[A-Za-z]?,? )?"  # Flat 3, …
         r"\d{1,4}[A-Za-z]?(?:[-/]\d{1,4}[A-Za-z]?)?,? "  # 12, 12a, 12-14
         r"(?:[A-Z][A-Za-z'\u2019.\-]* ){1,4}(?i:" + _STREET_TYPES + r")\.?")  # Mill Road, St Mary's Rd.
_PATTERN = re.compile(
    _START + r"(?:(?=[0-9(+%FAUS])(?:"  # (each branch only where it can start: the scan stays as fast as it was)
    # a timestamp keeps its date: run ids, watermarks, log timestamps
    r"(?P<ts>\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(?::\d{2}(?:[.,]\d+)?)?(?:Z|[+-]\d{2}:?\d{2})?)"
    r"|(?P<date>" + _DATE + r")"
    r"|(?P<nhs>\d{3}[ -]\d{3}[ -]\d{4})"
    r"|(?P<ten>\d{10})"
    r"|(?P<tel>" + _TEL + r")"
    r"|(?P<addr>" + _ADDR + r")"
    r")|(?=[A-Za-z])(?:"
    r"(?P<upn>[A-Za-z]\d{11}[0-9A-Za-z])"
    r"|(?P<pc>[A-PR-UWYZ](?:\d{1,2}|[A-HK-Y]\d{1,2}|\d[A-HJKPSTUW]|[A-HK-Y]\d[ABEHMNPRVWXY])"
    r"[ ]?\d[ABD-HJLNP-UW-Z]{2})"
    r"|(?<!\^)(?P<hl7n>[A-Z][A-Za-z'\-]+\^[A-Z][A-Za-z'\-]+)"
    r"))" + _END
)
_QUICK = re.compile(r"[0-9^@]")  # _PATTERN, _EMAIL and _DOBKEY cannot match a text without a digit, caret or @
_PHONE_TRUNK = re.compile(r"0[1-35789]")  # a 10-digit run failing the NHS check is a phone number when it starts so
_EMAIL = re.compile(r"(?<![\w.%+\-])[\w%+\-]+(?:['.][\w%+\-]+)*(?:@|%40)(?:[A-Za-z0-9\-]+\.)+[A-Za-z]{2,}(?![\w\-])")
# a date after a DOB-ish key (dob=…, "birthDate": "…", <DOB>…, BirthDate: …), in a pass of its own, only when
# the text has such a key
_DOB_HINT = re.compile(r"(?i)dob|birth")
_DOBKEY = re.compile(r"(?i)((?<![a-z])[a-z_]*(?:dob|birth)[a-z_]*['\"]?\s*[:=>]\s*['\"]?)(" + _DATE + r")(?![0-9])")
# a name after a name key (surname=Smith, "given": ["Amy"], <Forename>Amy<, patient_name: …), in a pass of its own,
# only when the text has `name`, `given`, `family` or `contact` in any case. Any value of a specific key; of `name`,
# `names` and `contact`, only a value with a capitalised word (`name=fhir-patient-match` is a mapping, `name=Jane` a
# person).
_NAME_KEY = (  # (factored by first letter: the scan tries far fewer alternatives at each word)
    r"(?i:(?P<any>(?:p(?:atient|upil|erson|arent|ractitioner|referred)|c(?:hild|arer|ontact)|l(?:earner|egal|ast)"
    r"|g(?:uardian|iven)|worker|staff|f(?:ormer|ull|irst|amily)|m(?:iddle|aiden))[_\- ]?names?"
    r"|(?:(?:preferred|former|legal)[_\- ]?)?(?:sur|fore)names?|given|family)|(?P<cap>names?|contact))"
)
_NAME_KEY_ONLY = re.compile(_NAME_KEY)  # a structlog or dict key, matched whole
_QUOTED = r"\"[^\"\r\n<>]{1,80}\"|'[^'\r\n<>]{1,80}'"
_NAMEKEY = re.compile(
    r"(?<![\w\-/])(?=[cfglmnpswCFGLMNPSW])" + _NAME_KEY + r"(?P<sep>['\"]?\s*[:=>]\s*(?P<list>\[\s*)?)"
    r"(?P<val>(?(list)(?:(?:" + _QUOTED + r")(?:\s*,\s*(?:" + _QUOTED + r"))*)|(?:" + _QUOTED
    + r"|[^\W\d_](?:[^\W\d_]|['\u2019\-])*(?: [A-Z](?:[^\W\d_]|['\u2019\-])*){0,3}(?![\w/@]|\.\w))))"
)
_NAMEISH = re.compile(r"[^\W\d_]+(?:[ '\u2019\-.,]+[^\W\d_]+)*\.?")
_QUOTED_ITEM = re.compile(_QUOTED)
# HL7 v2 segments that carry a person, logged raw (the segment runs to a CR, LF, or a repr's \r or \n)
_SEGMENT = re.compile(r"(?:(?<![0-9A-Za-z])|(?<=\\[rn]))(PID|NK1)\|((?:[^\r\n\\]|\\(?![rn]))*)")
_SEGMENT_FIELDS: dict[str, dict[int, str]] = {  # field number -> what it holds
    "PID": {2: "id", 3: "id", 4: "id", 5: "xpn", 6: "xpn", 7: "dob", 9: "xpn", 11: "xad", 13: "xtn", 14: "xtn",
            19: "id", 21: "id"},
    "NK1": {2: "xpn", 4: "xad", 5: "xtn", 6: "xtn"},
}
_TOKEN = re.compile(r"<[a-z]+:[0-9a-f]{8}>")
_WORD = re.compile(r"<[a-z]+:[0-9a-f]{8}>|[^\W\d_]+(?:['\-][^\W\d_]+)*")  # (a token is skipped whole)
_TITLES = frozenset({"dr", "mr", "mrs", "ms", "miss", "mx", "prof", "rev", "sir"})

_names: set[str] = set()
_names_lock = threading.Lock()
_PROCESS_KEY = secrets.token_bytes(32)


# Keys and tokens -------------------------------------------------------------------------------------------------


@lru_cache(maxsize=8)
def _key_for(env_key: str, home: str) -> bytes:
    if env_key:
        return env_key.encode()
    path = Path(home or ".schoolslink").resolve() / "secrets" / "pseudonym.key"
    try:
        if path.is_file():
            return path.read_text().strip().encode()
    except OSError:
        pass
    return _PROCESS_KEY


def _key() -> bytes:
    return _key_for(os.environ.get("SCHOOLSLINK_KEY", ""), os.environ.get("SCHOOLSLINK_HOME", ""))


@lru_cache(maxsize=65536)
def _token_with(k: bytes, kind: str, value: str) -> str:
    digest = hmac.new(k, f"{LABEL}\x1f{kind}\x1f{value}".encode(), hashlib.sha256).hexdigest()
    return f"<{kind}:{digest[:8]}>"


def token(kind: str, value: str) -> str:
    """The log token for `value` of `kind` (nhs, uln, upn, dob, pc, name); values are normalised first."""
    return _token_with(_key(), kind, value)


# Names known to the running task --------------------------------------------------------------------------------


def remember_names(names: Iterable[object]) -> None:
    """Register names (surnames, forenames) so that any later log record carrying one as a whole word has it
    replaced. Pipeline stages that hold a roll may call this with its names; values shorter than two letters are
    ignored, and a hyphenated or spaced name is registered whole and by part (titles such as Dr or Mrs are not
    registered as parts)."""
    new: set[str] = set()
    for n in names:
        text = str(n or "").strip().casefold()
        if len(text) < 2:
            continue
        new.add(text)
        for part in re.split(r"[\s\-'.]+", text):
            if len(part) >= 2 and part not in _TITLES:
                new.add(part)
    if new:
        with _names_lock:
            _names.update(new)


def forget_names() -> None:
    """Empty the name registry (a task that is done with a roll, and tests)."""
    with _names_lock:
        _names.clear()


# The replacement --------------------------------------------------------------------------------------------------


def _dob_window() -> tuple[int, int]:
    this_year = date.today().year
    return this_year - 25, this_year - 2


_WINDOW = _dob_window()


def _year_of(d: str) -> int:
    return int(d[:4]) if d[4] == "-" else int(d[6:])


def _tel(s: str) -> str:
    """The token of a phone number, normalised to its national digits (`+44 (0)7700 900123` = `07700900123`)."""
    digits = re.sub(r"\D", "", s.replace("%2B", "").replace("%2b", ""))
    if digits.startswith("0044"):
        digits = digits[4:]
    elif digits.startswith("44") and not s.startswith(("0", "(")):
        digits = digits[2:]
    return token("tel", "0" + digits.lstrip("0"))


def _replace(m: re.Match[str]) -> str:
    kind = m.lastgroup
    s = m.group(0)
    if kind == "ts":  # a timestamp survives, unless it is a date of birth at midnight from a DOB-aged year
        return token("dob", s[:10]) if _WINDOW[0] <= int(s[:4]) <= _WINDOW[1] else s
    if kind == "date":
        return token("dob", s) if _WINDOW[0] <= _year_of(s) <= _WINDOW[1] else s
    if kind == "nhs" or kind == "ten":
        digits = s.replace(" ", "").replace("-", "")
        if is_valid_nhs_number(digits):
            return token("nhs", digits)
        if kind == "ten" and is_valid_uln(s):
            return token("uln", s)
        return _tel(s) if _PHONE_TRUNK.match(s) else s
    if kind == "tel":
        return _tel(s)
    if kind == "addr":
        return token("addr", " ".join(s.replace(",", " ").split()).casefold())
    if kind == "upn":
        u = s.upper()
        return token("upn", u) if is_valid_upn(u) else s
    if kind == "pc":
        return token("pc", s.replace(" ", ""))
    if kind == "hl7n":
        return token("name", s.upper())
    return s


def _replace_email(m: re.Match[str]) -> str:
    return token("email", m.group(0).replace("%40", "@").casefold())


def _name_token(value: str, capitalised: bool) -> str | None:
    """The token of a value found after a name key, or None when it does not look like a name."""
    v = value.strip()
    if (not _NAMEISH.fullmatch(v) or (capitalised and not any(w[0].isupper() for w in v.split()))
            or v.casefold() in ("none", "null", "true", "false", "nan")):
        return None
    return token("name", " ".join(v.split()).casefold())


def _replace_keyed_name(m: re.Match[str]) -> str:
    capitalised = m.group("cap") is not None
    val = m.group("val")

    def one(q: re.Match[str]) -> str:
        tok = _name_token(q.group(0)[1:-1], capitalised)
        return q.group(0) if tok is None else q.group(0)[0] + tok + q.group(0)[-1]

    if val[0] in "'\"":
        out = _QUOTED_ITEM.sub(one, val)
    else:
        out = _name_token(val, capitalised) or val
    return m.group(0)[: m.start("val") - m.start()] + out


def _xtn(rep: str) -> str:
    """An HL7 XTN repetition with its number (1, 5-7, 12) and email (4) replaced."""
    c = rep.split("^")
    if c[0] and not _TOKEN.fullmatch(c[0]):
        c[0] = _tel(c[0])
    if len(c) > 3 and c[3] and not _TOKEN.fullmatch(c[3]):
        c[3] = token("email", c[3].casefold())
    if len(c) > 6 and any(c[4:7]) and not _TOKEN.fullmatch(c[6]):
        c[4:7] = ["", "", _tel(("+" if c[4] else "0") + "".join(c[4:7]))]
    if len(c) > 11 and c[11] and not _TOKEN.fullmatch(c[11]):
        c[11] = _tel(c[11])
    return "^".join(c)


def _first(n: int, kind: str) -> Callable[[str], str]:
    """An HL7 repetition with its first `n` components replaced by one token of `kind` (their text, joined)."""
    def repl(rep: str) -> str:
        c = rep.split("^")
        head = "^".join(c[:n]).rstrip("^")
        if not head or _TOKEN.fullmatch(head):
            return rep
        if kind == "nhs":  # an identifier: an NHS number as such, any other as an id
            return "^".join([token("nhs" if is_valid_nhs_number(head) else "id", head), *c[n:]])
        value = head.upper() if kind == "name" else " ".join(head.replace("^", " ").split()).casefold()
        return "^".join([token(kind, value), *[""] * (min(n, len(c)) - 1), *c[n:]]).rstrip("^")
    return repl


_HL7_FIELD: dict[str, Callable[[str], str]] = {
    "id": _first(1, "nhs"),  # an NHS number, else any other patient id
    "xpn": _first(3, "name"),  # family^given^middle
    "xad": _first(5, "addr"),  # street^other^city^county^postcode
    "xtn": _xtn,
    "dob": lambda v: v if not v[:8].isdigit() else token("dob", v[:8]),
}


def _scrub_segment(m: re.Match[str]) -> str:
    fields = m.group(2).split("|")  # fields[0] is field 1
    for n, kind in _SEGMENT_FIELDS[m.group(1)].items():
        if n <= len(fields) and fields[n - 1]:
            repl = _HL7_FIELD[kind]
            fields[n - 1] = "~".join(repl(r) for r in fields[n - 1].split("~"))
    return f"{m.group(1)}|{'|'.join(fields)}"


def _replace_name(m: re.Match[str]) -> str:
    w = m.group(0)
    folded = w.casefold()
    if folded in _names:
        return token("name", folded)
    if "-" in w or "'" in w:
        return "".join(token("name", p.casefold()) if p.casefold() in _names else p
                       for p in re.split(r"([\-'])", w))
    return w


def pseudonymise(text: str) -> str:
    """`text` with every recognised identifier replaced by its token (see the module docstring)."""
    if "PID|" in text or "NK1|" in text:
        text = _SEGMENT.sub(_scrub_segment, text)
    if _QUICK.search(text) is not None:
        if "@" in text or "%40" in text:
            text = _EMAIL.sub(_replace_email, text)
        if _DOB_HINT.search(text) is not None:
            text = _DOBKEY.sub(lambda m: m.group(1) + token("dob", m.group(2)), text)
        text = _PATTERN.sub(_replace, text)
    low = text.lower()  # (four `in` tests on it cost a tenth of a case-insensitive search)
    if "name" in low or "given" in low or "family" in low or "contact" in low:
        text = _NAMEKEY.sub(_replace_keyed_name, text)
    if _names:
        text = _WORD.sub(_replace_name, text)
    return text


def _keyed(key: object, value: Any, depth: int) -> Any:
    """A dict or event-dict value: under a name key, a name-like string (or list of them) becomes a token."""
    if isinstance(key, str) and (m := _NAME_KEY_ONLY.fullmatch(key)) is not None:
        capitalised = m.group("cap") is not None
        if isinstance(value, str):
            return _name_token(value, capitalised) or pseudonymise(value)
        if isinstance(value, (list, tuple)):
            out = [(_name_token(v, capitalised) or pseudonymise(v)) if isinstance(v, str)
                   else pseudonymise_value(v, depth + 1) for v in value]
            return tuple(out) if isinstance(value, tuple) else out
    return pseudonymise_value(value, depth + 1)


def pseudonymise_value(value: Any, _depth: int = 0) -> Any:
    """A structure (str, number, dict, list, tuple, set or other object) with its identifiers replaced.

    Strings are pseudonymised; 10-digit integers that are NHS numbers or ULNs become tokens; containers are
    walked (to a depth of 8), a dict's name-keyed values (`surname`, `given`, …) becoming name tokens; any other
    object is replaced by its pseudonymised `str()` when that text changes.
    """
    if isinstance(value, str):
        return pseudonymise(value)
    if value is None or isinstance(value, (bool, float)):
        return value
    if isinstance(value, int):
        if 10**9 <= value < 10**10:
            s = str(value)
            out = pseudonymise(s)
            return value if out == s else out
        return value
    if _depth >= 8:
        return pseudonymise(str(value))
    if isinstance(value, dict):
        return {k: _keyed(k, v, _depth) for k, v in value.items()}
    if isinstance(value, list):
        return [pseudonymise_value(v, _depth + 1) for v in value]
    if isinstance(value, tuple):
        return tuple(pseudonymise_value(v, _depth + 1) for v in value)
    if isinstance(value, (set, frozenset)):
        return [pseudonymise_value(v, _depth + 1) for v in value]
    if isinstance(value, bytes):
        return value
    try:
        s = str(value)
    except Exception:  # noqa: BLE001 - an object whose str() fails is shown as its type only
        return f"<{type(value).__name__}>"
    out = pseudonymise(s)
    return value if out == s else out


# stdlib logging ---------------------------------------------------------------------------------------------------


class PseudonymisingFilter(logging.Filter):
    """Replaces identifiers in a record's formatted message (message and args, merged) and traceback.

    Always returns True (it hides values, it never drops records). A record with nothing to replace is left as it
    is, args and all; a changed one carries the replaced message and no args.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            _scrub_record(record)
        except Exception:  # noqa: BLE001 - never raise from logging; withhold the record's text instead
            record.msg, record.args = FAILED_NOTICE, None
            record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


def _scrub_record(record: logging.LogRecord) -> None:
    if getattr(record, "_schoolslink_scrubbed", False):
        return
    try:
        message = record.getMessage()
        broken = False
    except Exception:  # noqa: BLE001 - a bad format string or argument: keep what there is, as scrubbed text
        message = f"{record.msg!r} {record.args!r}"
        broken = True
    out = pseudonymise(message)
    if out != message or broken:  # (logging's own error report would print the raw args)
        record.msg, record.args = out, None
    if record.exc_info and record.exc_info[0] is not None:
        text = record.exc_text or logging.Formatter().formatException(record.exc_info)
        scrubbed = pseudonymise(text)
        if scrubbed != text:  # the traceback names a value: keep only the scrubbed text, in the message
            record.msg, record.args = f"{record.getMessage()}\n{scrubbed}", None
            record.exc_info, record.exc_text = None, None
        else:
            record.exc_text = text
    if record.stack_info:
        record.stack_info = pseudonymise(record.stack_info)
    record._schoolslink_scrubbed = True


# structlog ----------------------------------------------------------------------------------------------------------


_STRUCTLOG_OWN = frozenset({"timestamp", "level", "logger", "logger_name", "loc"})


def structlog_processor(logger: Any, method_name: str, event_dict: MutableMapping[str, Any]) -> Any:
    """A structlog processor: the same replacement over an event dict (keys starting with `_` are structlog's own).

    An `exc_info` is rendered to an `exception` string first, so a value in an exception message is caught too.
    """
    try:
        if event_dict.get("exc_info"):
            import structlog

            event_dict = structlog.processors.format_exc_info(logger, method_name, event_dict)
        for k, v in list(event_dict.items()):
            if not k.startswith("_") and k not in _STRUCTLOG_OWN:
                event_dict[k] = _keyed(k, v, -1)
    except Exception:  # noqa: BLE001 - never raise from logging
        for k in [k for k in event_dict if not k.startswith("_")]:
            del event_dict[k]
        event_dict["event"] = FAILED_NOTICE
    return event_dict


structlog_processor._schoolslink_logfilter = True  # type: ignore[attr-defined]


# Installation ---------------------------------------------------------------------------------------------------

OUR_LOGGERS = ("schoolslink", "connectors", "dags", "httpx", "httpcore", "airflow", "airflow.task", "py.warnings")
_FILTER = PseudonymisingFilter()


def _has_ours(filterer: logging.Filterer) -> bool:
    return any(isinstance(f, PseudonymisingFilter) for f in filterer.filters)


def _install_record_factory() -> None:
    """Scrub every record as it is made, whichever logger and handler it then goes through."""
    previous = logging.getLogRecordFactory()
    if getattr(previous, "_schoolslink_logfilter", False):
        return

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        _FILTER.filter(record)
        return record

    factory._schoolslink_logfilter = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)


def _install_stdlib() -> None:
    last_resort = logging.lastResort  # what writes a warning when no handler is configured (a plain CLI run)
    if last_resort is not None and not _has_ours(last_resort):
        last_resort.addFilter(_FILTER)
    loggers: list[logging.Logger] = [logging.getLogger()]
    loggers += [logging.getLogger(n) for n in OUR_LOGGERS]
    loggers += [lg for lg in list(logging.Logger.manager.loggerDict.values()) if isinstance(lg, logging.Logger)]
    seen: set[int] = set()
    for lg in loggers:
        if id(lg) in seen:
            continue
        seen.add(id(lg))
        if lg.name in OUR_LOGGERS or lg is logging.getLogger():
            if not _has_ours(lg):
                lg.addFilter(_FILTER)
        for h in lg.handlers:  # a logger's filters miss records propagated from children; a handler's do not
            if not _has_ours(h):
                h.addFilter(_FILTER)


def _install_structlog() -> None:
    mod = sys.modules.get("structlog")
    if mod is None:
        return
    procs = mod.get_config()["processors"]
    if any(getattr(p, "_schoolslink_logfilter", False) for p in procs):
        return
    if isinstance(procs, list):  # in place: loggers already bound (and cached) share this list
        procs.insert(max(len(procs) - 1, 0), structlog_processor)
    else:
        seq = list(procs)
        seq.insert(max(len(seq) - 1, 0), structlog_processor)
        mod.configure(processors=seq)


def install() -> None:
    """Install the replacement: in the log record factory (every stdlib record, as it is made), as a filter on the
    root logger, our loggers, every handler now attached and the last-resort handler, and as a processor in
    structlog's configured chain (before its renderer). Idempotent and cheap: call it again after anything
    (Airflow) reconfigures logging. Never raises."""
    for step in (_install_record_factory, _install_stdlib, _install_structlog):
        with contextlib.suppress(Exception):  # installation must never stop the pipeline
            step()
