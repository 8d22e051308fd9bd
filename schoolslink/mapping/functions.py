"""The registry of named functions a mapping may call. A mapping naming any other function is refused
when it loads. Each function takes plain values and returns a value or None (None omits the element).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from schoolslink import keys
from schoolslink.identifiers import is_valid_nhs_number, normalise_nhs_number


@dataclass(frozen=True, slots=True)
class Function:
    name: str
    fn: Callable[..., Any]
    min_args: int
    max_args: int
    doc: str


REGISTRY: dict[str, Function] = {}


Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def register(name: str, min_args: int, max_args: int | None = None) -> Decorator:
    """Register a mapping function; a name registered twice is refused (one registry, no shadowing)."""
    if name in REGISTRY:
        raise RuntimeError(f"mapping function {name!r} is registered twice")

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        REGISTRY[name] = Function(name, fn, min_args, max_args if max_args is not None else min_args,
                                  (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else "")
        return fn

    return deco


@register("date", 1)
def to_date(value: Any) -> str | None:
    """An ISO date (YYYY-MM-DD) from an ISO date or date-time; refuses anything else."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return value.date().isoformat()
    if isinstance(value, date):
        return value.isoformat()
    return date.fromisoformat(str(value)[:10]).isoformat()


_DMY = re.compile(r"(\d{1,2})/(\d{1,2})/(\d{4})")


@register("date_dmy", 1)
def date_dmy(value: Any) -> str | None:
    """An ISO date from DD/MM/YYYY (as census-style CSV exports write dates)."""
    if value is None or str(value).strip() == "":
        return None
    m = _DMY.fullmatch(str(value).strip())
    if m is None:  # e.g. 1/13/05: a US-style or two-digit-year date is refused, never guessed
        raise ValueError("isoformat: not DD/MM/YYYY")
    return date(int(m[3]), int(m[2]), int(m[1])).isoformat()


@register("upper", 1)
def upper(value: Any) -> str | None:
    """Upper case."""
    return None if value is None else str(value).upper()


@register("lower", 1)
def lower(value: Any) -> str | None:
    """Lower case."""
    return None if value is None else str(value).lower()


@register("trim", 1)
def trim(value: Any) -> str | None:
    """Text with outer white space removed; empty text omits the element."""
    if value is None:
        return None
    s = str(value).strip()
    return s or None


@register("concat", 1, 10)
def concat(*parts: Any) -> str | None:
    """The parts joined, skipping missing ones; nothing when all are missing."""
    present = [str(p) for p in parts if p is not None and p != ""]
    return "".join(present) if present else None


@register("join", 2, 11)
def join(sep: Any, *parts: Any) -> str | None:
    """The parts joined with a separator, skipping missing ones."""
    present = [str(p) for p in parts if p is not None and p != ""]
    return str(sep).join(present) if present else None


@register("int", 1)
def to_int(value: Any) -> int | None:
    """A whole number."""
    if value is None or value == "":
        return None
    return int(str(value).strip())


@register("number", 1)
def to_number(value: Any) -> float | None:
    """A decimal number."""
    if value is None or value == "":
        return None
    return float(str(value).strip())


@register("bool", 1)
def to_bool(value: Any) -> bool | None:
    """true/false from true, yes, y, 1 / false, no, n, 0."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        return value
    s = str(value).strip().lower()
    if s in {"true", "yes", "y", "1"}:
        return True
    if s in {"false", "no", "n", "0"}:
        return False
    raise ValueError("not a yes/no value")


@register("percent", 2)
def percent(part: Any, whole: Any) -> float | None:
    """part / whole as a percentage rounded to one place; nothing when whole is missing or zero."""
    if part is None or whole in (None, 0, "0", ""):
        return None
    return round(100.0 * float(part) / float(whole), 1)


@register("resource_id", 1, 8)
def resource_id(*parts: Any) -> str:
    """A deterministic FHIR id: keyed HMAC of our own source keys (reveals nothing without the key)."""
    return keys.resource_id(*(str(p) for p in parts))


@register("pseudonym", 2)
def pseudonym(kind: Any, value: Any) -> str | None:
    """A keyed pseudonym of a value (e.g. an NHS number) safe to log and send."""
    return None if value is None else keys.pseudonym(str(kind), str(value))


@register("nhs_number", 1)
def nhs_number(value: Any) -> str | None:
    """A valid 10-digit NHS number (spaces removed); refuses one that fails the modulus 11 check."""
    if value is None or value == "":
        return None
    n = normalise_nhs_number(str(value))
    if not is_valid_nhs_number(n):
        raise ValueError("NHS number fails the modulus 11 check")
    return n


@register("ref_id", 1)
def ref_id(value: Any) -> str | None:
    """The id part of a FHIR reference 'Type/id'."""
    if not value:
        return None
    return str(value).rsplit("/", 1)[-1]


@register("ref_type", 1)
def ref_type(value: Any) -> str | None:
    """The type part of a FHIR reference 'Type/id'."""
    if not value or "/" not in str(value):
        return None
    return str(value).split("/", 1)[0]


@register("days_between", 2)
def days_between(start: Any, end: Any) -> int | None:
    """Whole days from one ISO date to another."""
    if not start or not end:
        return None
    return (date.fromisoformat(str(end)[:10]) - date.fromisoformat(str(start)[:10])).days


@register("first", 1, 10)
def first(*values: Any) -> Any:
    """The first value that is present."""
    return next((v for v in values if v is not None and v != ""), None)


_WS = re.compile(r"\s+")


@register("postcode", 1)
def postcode(value: Any) -> str | None:
    """A UK postcode in upper case with one space before the inward code."""
    if value is None or str(value).strip() == "":
        return None
    s = _WS.sub("", str(value)).upper()
    return f"{s[:-3]} {s[-3:]}" if len(s) > 3 else s


# Functions kept beside the systems they read; importing them registers them here.
from schoolslink.mapping import functions_fhir, functions_mis, functions_wonde  # noqa: E402, F401
