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
| HL7 name | `SURNAME^FORENAME` (XPN order) | `<name:…>` |
| known names | words registered with `remember_names` (whole words, any case) | `<name:…>` |

Check-digit identifiers are replaced only when the check passes: `1234567890` fails modulus 11 and is no NHS number,
so it is left (about one random 10-digit run in eleven passes and is replaced anyway; harmless). Timestamps
(`2026-11-26T02:00:00+00:00`, `2026-11-26 02:00`), run ids, URNs (6 digits), ODS codes and this year's and last
year's dates survive.

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
from collections.abc import Iterable, MutableMapping
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
_PATTERN = re.compile(
    _START + r"(?:"
    # a timestamp keeps its date: run ids, watermarks, log timestamps
    r"(?P<ts>\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(?::\d{2}(?:[.,]\d+)?)?(?:Z|[+-]\d{2}:?\d{2})?)"
    r"|(?P<date>" + _DATE + r")"
    r"|(?P<nhs>\d{3}[ -]\d{3}[ -]\d{4})"
    r"|(?P<ten>\d{10})"
    r"|(?P<upn>[A-Za-z]\d{11}[0-9A-Za-z])"
    r"|(?P<pc>[A-PR-UWYZ](?:\d{1,2}|[A-HK-Y]\d{1,2}|\d[A-HJKPSTUW]|[A-HK-Y]\d[ABEHMNPRVWXY])"
    r"[ ]?\d[ABD-HJLNP-UW-Z]{2})"
    r"|(?<!\^)(?P<hl7n>[A-Z][A-Za-z'\-]+\^[A-Z][A-Za-z'\-]+)"
    r")" + _END
)
# a date after a DOB-ish key (dob=…, "birthDate": "…", <DOB>…, BirthDate: …), in a pass of its own, only when
# the text has such a key
_DOB_HINT = re.compile(r"(?i)dob|birth")
_DOBKEY = re.compile(r"(?i)((?<![a-z])[a-z_]*(?:dob|birth)[a-z_]*['\"]?\s*[:=>]\s*['\"]?)(" + _DATE + r")(?![0-9])")
# HL7 PID-7 (date/time of birth), replaced in a pass of its own so the rest of the segment is still scanned
_PID7 = re.compile(r"(PID\|(?:[^|\r\n]*\|){6})(\d{8}(?:\d{2,6})?)(?=[|^\r\n]|$)")
_QUICK = re.compile(r"[0-9^]")  # nothing above can match a text without a digit or a caret
_WORD = re.compile(r"[^\W\d_]+(?:['\-][^\W\d_]+)*")

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
    ignored, and a hyphenated or spaced name is registered whole and by part."""
    new: set[str] = set()
    for n in names:
        text = str(n or "").strip().casefold()
        if len(text) < 2:
            continue
        new.add(text)
        for part in re.split(r"[\s\-']+", text):
            if len(part) >= 2:
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


def _replace(m: re.Match[str]) -> str:
    kind = m.lastgroup
    s = m.group(0)
    if kind == "ts":  # a timestamp survives, unless it is a date of birth at midnight from a DOB-aged year
        return token("dob", s[:10]) if _WINDOW[0] <= int(s[:4]) <= _WINDOW[1] else s
    if kind == "date":
        return token("dob", s) if _WINDOW[0] <= _year_of(s) <= _WINDOW[1] else s
    if kind == "nhs":
        digits = s.replace(" ", "").replace("-", "")
        return token("nhs", digits) if is_valid_nhs_number(digits) else s
    if kind == "ten":
        if is_valid_nhs_number(s):
            return token("nhs", s)
        return token("uln", s) if is_valid_uln(s) else s
    if kind == "upn":
        u = s.upper()
        return token("upn", u) if is_valid_upn(u) else s
    if kind == "pc":
        return token("pc", s.replace(" ", ""))
    if kind == "hl7n":
        return token("name", s.upper())
    return s


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
    if _QUICK.search(text) is not None:
        if _DOB_HINT.search(text) is not None:
            text = _DOBKEY.sub(lambda m: m.group(1) + token("dob", m.group(2)), text)
        if "PID|" in text:
            text = _PID7.sub(lambda m: m.group(1) + token("dob", m.group(2)[:8]), text)
        text = _PATTERN.sub(_replace, text)
    if _names:
        text = _WORD.sub(_replace_name, text)
    return text


def pseudonymise_value(value: Any, _depth: int = 0) -> Any:
    """A structure (str, number, dict, list, tuple, set or other object) with its identifiers replaced.

    Strings are pseudonymised; 10-digit integers that are NHS numbers or ULNs become tokens; containers are
    walked (to a depth of 8); any other object is replaced by its pseudonymised `str()` when that text changes.
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
        return {k: pseudonymise_value(v, _depth + 1) for k, v in value.items()}
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
                event_dict[k] = pseudonymise_value(v)
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
