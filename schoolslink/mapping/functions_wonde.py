"""Mapping functions for reading Wonde API pulls (registered into the one registry in functions.py).

The Wonde reader (`connectors/mis/wonde.py`) hands each student object of a landed pull, exactly as the Wonde
API returned it (JSON: text, numbers, true/false, null, nested objects such as `extended_details.data`), to
`mappings/mis-in/wonde-learner.yaml`, which maps it to the canonical learner with these and the general
functions. Like the MIS functions they take plain values and never fail on a wrong shape: what they cannot
read is left out. Only the strict ones (`wonde_date`, `wonde_bool`) refuse a value, with a ValueError whose
message names no value (the reader checks those fields first, so a data manager gets its own reason).

`stated_upns` is also what the reader uses to warn about former UPNs that were dropped, so the mapping and
the warning always agree on what was stated.

functions.py imports this module at its end, after `register` is defined: so the registry is reached through
the module (`_f.register`), never imported by name at the top.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any, Final

from schoolslink.identifiers import is_valid_upn
from schoolslink.mapping import functions as _f

_register = _f.register  # refuses a name another module already registered


# Text a Wonde boolean may arrive as, besides JSON true/false (MIS values pass through Wonde as stated).
_BOOL_TEXT: Final = {"true": True, "1": True, "yes": True, "y": True,
                     "false": False, "0": False, "no": False, "n": False}
_UPN_SEPARATORS: Final = re.compile(r"[\s,;]+")  # never inside a UPN, so splitting on them guesses nothing


def _bool(value: Any) -> bool | None:
    """JSON true/false, 1/0, or one of _BOOL_TEXT in any case; None for anything else (incl. null, "")."""
    if type(value) is bool:
        return value
    if type(value) is int and value in (0, 1):
        return bool(value)
    if type(value) is str:
        return _BOOL_TEXT.get(value.strip().lower())
    return None


def _stated(value: Any) -> bool:
    return value is not None and value != ""


@_register("wonde_text", 1)
def wonde_text(value: Any) -> str | None:
    """A JSON text with outer white space removed (a whole number as its digits); nothing for anything else."""
    if type(value) is str:
        return value.strip() or None
    if type(value) is int:
        return str(value)
    return None


@_register("wonde_date", 1)
def wonde_date(value: Any) -> str | None:
    """The ISO date (YYYY-MM-DD) of a Wonde date object ({date: "YYYY-MM-DD HH:MM:SS.ffffff", timezone_type,
    timezone}) or of such a text: its date part as stated (no time zone arithmetic); refuses anything else."""
    if type(value) is dict:
        value = value.get("date")
    if value is None or value == "":
        return None
    if type(value) is not str:
        raise ValueError("isoformat: not a Wonde date")
    text = value.strip()
    head = text[:10]
    if len(head) != 10 or head[4] != "-" or head[7] != "-" or (len(text) > 10 and text[10] not in " T"):
        raise ValueError("isoformat: not a Wonde date")
    return dt.date.fromisoformat(head).isoformat()  # ValueError (isoformat ...) for an impossible date


@_register("wonde_bool", 1)
def wonde_bool(value: Any) -> bool | None:
    """true/false from JSON true/false, 1/0, or text true/false/1/0/yes/no/y/n (any case); nothing when not
    stated; refuses anything else (for flags that decide who may see a record: never guessed)."""
    if not _stated(value):
        return None
    flag = _bool(value)
    if flag is None:
        raise ValueError("not true or false")  # no digits: the engine then shows the reason
    return flag


@_register("wonde_bool_or_none", 1)
def wonde_bool_or_none(value: Any) -> bool | None:
    """true/false as wonde_bool reads it; nothing for anything else."""
    return _bool(value)


def stated_upns(value: Any) -> list[str]:
    """Every UPN a Wonde value states, as stated (upper-cased, outer white space removed), valid or not: a text
    may hold several, separated by commas, semicolons or white space; a list holds texts."""
    items = value if type(value) is list else [value]
    out: list[str] = []
    for item in items:
        if type(item) is str:
            out.extend(p.upper() for p in _UPN_SEPARATORS.split(item) if p)
    return out


@_register("wonde_upns", 1, 2)
def wonde_upns(value: Any, exclude: Any = None) -> list[str] | None:
    """The UPNs a Wonde value states (see stated_upns) that pass the check letter, once each, in order,
    without `exclude` (the learner's own UPN)."""
    skip = exclude.strip().upper() if type(exclude) is str else None
    out: list[str] = []
    for u in stated_upns(value):
        if u != skip and u not in out and is_valid_upn(u):
            out.append(u)
    return out or None


# Wonde contact_details.data.telephones keys, in the order they are listed, with the CTF TelephoneType code
# each is given (H home, M mobile, W work; "" where Wonde does not say which kind the number is). The kinds
# come first, so a number Wonde also gives as the primary one keeps its kind.
_PHONE_KEYS: Final = (("home", "H"), ("mobile", "M"), ("work", "W"), ("primary", ""), ("phone", ""))
_EMAIL_KEYS: Final = ("primary", "email", "home", "work")


def _data(value: Any) -> dict[str, Any]:
    """An included object's fields: Wonde wraps includes as {"data": {...}}; a bare object is read as is."""
    if type(value) is dict:
        inner = value.get("data")
        return inner if type(inner) is dict else value
    return {}


def _order(value: Any) -> int | None:
    if type(value) is int:
        return value if value >= 0 else None
    if type(value) is str:
        v = value.strip()
        return int(v) if v.isascii() and v.isdigit() else None
    return None


@_register("wonde_contacts", 1)
def wonde_contacts(items: Any) -> list[dict[str, Any]] | None:
    """Wonde contacts (a student's contacts.data, each with its relationship and, when included, its
    contact_details) -> canonical contacts in the shape ctf_contacts gives, in priority order (none last):
    order (relationship.priority, a whole number or nothing), title, surname, forename, relationship
    (relationship.relationship, upper case), responsibility (relationship.parental_responsibility: true,
    false or nothing), phones ([{type, number}], each number once) and email (the first of emails' primary,
    email, home, work); empty text when not stated."""
    if type(items) is not list:
        return None
    out: list[dict[str, Any]] = []
    for c in items:
        if type(c) is not dict:
            continue
        rel = _data(c.get("relationship"))
        details = _data(c.get("contact_details"))
        phones: list[dict[str, str]] = []
        seen: set[str] = set()
        telephones = details.get("telephones")
        if type(telephones) is dict:
            for key, kind in _PHONE_KEYS:
                number = wonde_text(telephones.get(key))
                if number is not None and number not in seen:
                    seen.add(number)
                    phones.append({"type": kind, "number": number})
        email = ""
        emails = details.get("emails")
        if type(emails) is dict:
            for key in _EMAIL_KEYS:
                e = wonde_text(emails.get(key))
                if e is not None:
                    email = e
                    break
        relationship = wonde_text(rel.get("relationship"))
        out.append({
            "order": _order(rel.get("priority")),
            "title": wonde_text(c.get("title")) or "",
            "surname": wonde_text(c.get("surname")) or wonde_text(c.get("legal_surname")) or "",
            "forename": wonde_text(c.get("forename")) or wonde_text(c.get("legal_forename")) or "",
            "relationship": relationship.upper() if relationship is not None else "",
            "responsibility": _bool(rel.get("parental_responsibility")),
            "phones": phones,
            "email": email,
        })
    if len(out) > 1:
        out.sort(key=_contact_order)  # stable: contacts of the same priority keep Wonde's order
    return out or None


def _contact_order(contact: dict[str, Any]) -> tuple[bool, int]:
    order = contact["order"]
    return (order is None, order or 0)
