"""Mapping functions for reading MIS exports (registered into the one registry in functions.py).

The CTF reader (`connectors/mis/ctf.py`) turns each `<Pupil>` into a plain nested dict of element values
(stripped text; repeated elements as lists) and `mappings/mis-in/ctf-learner.yaml` maps that dict to the
canonical learner with these. They take plain values and never fail on a wrong shape (a text where a list
was expected, a list item that is not an element): what they cannot read is left out. Only the strict ones
(`date_ymd`, `xs_boolean`) refuse a value, with a ValueError whose message names no value.

functions.py imports this module at its end, after `register` is defined: so the registry is reached through
the module (`_f.register`), never imported by name at the top.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

from schoolslink.identifiers import is_valid_nhs_number, is_valid_uln, is_valid_upn, normalise_nhs_number
from schoolslink.mapping import functions as _f

_register = _f.register  # refuses a name another module already registered


_XS_BOOLEAN = {"true": True, "1": True, "false": False, "0": False}


def _iso(value: Any) -> dt.date | None:
    """A date from exactly YYYY-MM-DD, else None."""
    if type(value) is not str or len(value) != 10 or value[4] != "-" or value[7] != "-":
        return None
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        return None


@_register("date_ymd", 1)
def date_ymd(value: Any) -> str | None:
    """An ISO date from exactly YYYY-MM-DD (as CTF writes dates); refuses text in any other form."""
    if type(value) is not str or not value:
        return None  # nothing stated (or an element holding elements, which has no text of its own)
    if _iso(value) is None:
        raise ValueError("isoformat: not a YYYY-MM-DD date")
    return value


@_register("xs_boolean", 1)
def xs_boolean(value: Any) -> bool | None:
    """true/false from an XML boolean (true, false, 1, 0, any case); refuses any other text."""
    if type(value) is not str or not value:
        return None
    flag = _XS_BOOLEAN.get(value.lower())
    if flag is None:
        raise ValueError("not an XML boolean: true or false")  # no digits: the engine then shows the reason
    return flag


@_register("xs_boolean_or_none", 1)
def xs_boolean_or_none(value: Any) -> bool | None:
    """true/false from an XML boolean (true, false, 1, 0); nothing for anything else."""
    return _XS_BOOLEAN.get(value.lower()) if type(value) is str else None


@_register("text", 1)
def text(value: Any) -> str | None:
    """An element's own text; nothing for an element that holds elements, or a list of them."""
    return value if type(value) is str and value else None


@_register("first_text", 1, 5)
def first_text(*values: Any) -> str | None:
    """The first value that is text and not empty (an element's own text, not a group of elements)."""
    for v in values:
        if type(v) is str and v:
            return v
    return None


@_register("single_spaces", 1)
def single_spaces(value: Any) -> str | None:
    """Text with each run of white space made one space and none at either end."""
    if type(value) is not str:
        return None
    return " ".join(value.split()) or None


@_register("valid_uln", 1)
def valid_uln(value: Any) -> str | None:
    """A ULN that passes its check digit; nothing otherwise (the reader warns that it was dropped)."""
    if type(value) is str and is_valid_uln(value):
        return value
    return None


@_register("valid_nhs_number", 1)
def valid_nhs_number(value: Any) -> str | None:
    """A 10-digit NHS number (spaces and hyphens removed) that passes modulus 11; nothing otherwise."""
    if type(value) is not str or not value:
        return None
    if is_valid_nhs_number(value):
        return value
    n = normalise_nhs_number(value)
    return n if is_valid_nhs_number(n) else None


@_register("valid_upns", 1, 2)
def valid_upns(values: Any, exclude: Any = None) -> list[str] | None:
    """The UPNs of a list that pass the check letter, upper-cased, once each, in order, without `exclude`."""
    if not values:
        return None
    if not isinstance(values, list):
        values = [values]
    skip = exclude.upper() if type(exclude) is str else None
    out: list[str] = []
    for v in values:
        if type(v) is not str or not v:
            continue
        u = v.upper()
        if u != skip and u not in out and is_valid_upn(u):
            out.append(u)
    return out or None


@_register("latest_by", 3)
def latest_by(items: Any, key: Any, field: Any) -> str | None:
    """`field` of the item with the latest `key` date (YYYY-MM-DD; missing or unreadable counts as earliest;
    a later item wins a tie), among the items that have `field`."""
    if not isinstance(items, list):
        return None
    best: str | None = None
    best_key = ""
    for item in items:
        if type(item) is not dict:
            continue
        value = item.get(field)
        if type(value) is not str or not value:
            continue
        stated = item.get(key)
        k = stated if type(stated) is str and _iso(stated) is not None else "0000-00-00"
        if best is None or k >= best_key:
            best, best_key = value, k
    return best


@_register("count_codes", 3)
def count_codes(items: Any, field: Any, codes: Any) -> int:
    """How many items have `field` equal to one of `codes` (compared in upper case); 0 when none."""
    if not isinstance(items, list) or not items:
        return 0
    wanted = {str(c).upper() for c in codes} if isinstance(codes, list) else {str(codes).upper()}
    n = 0
    for item in items:
        if type(item) is dict:
            v = item.get(field)
            if type(v) is str and v.upper() in wanted:
                n += 1
    return n


@_register("has_code", 3)
def has_code(items: Any, field: Any, codes: Any) -> bool:
    """true when an item has `field` equal to one of `codes` (compared in upper case), else false."""
    return bool(count_codes(items, field, codes))


@_register("texts_of", 2, 10)
def texts_of(*groups: Any) -> list[str] | None:
    """Lines of text from (element, [names]) pairs, in order: each name's text where it has some; a nested
    list of names shares one line, joined by spaces (e.g. [SAON, [PAON, Street], Town])."""
    out: list[str] = []
    for i in range(0, len(groups) - 1, 2):
        el = groups[i]
        if type(el) is not dict:
            continue
        for name in groups[i + 1]:
            if type(name) is str:
                v = el.get(name)
                if type(v) is str and v:
                    out.append(v)
            elif isinstance(name, list):
                parts = [v for v in map(el.get, name) if type(v) is str and v]
                if parts:
                    out.append(" ".join(parts))
    return out or None


@_register("sums_of_latest", 3)
def sums_of_latest(items: Any, key: Any, fields: Any) -> dict[str, int] | None:
    """{field: sum} over the items whose `key` is the greatest whole number (e.g. every YearData of the
    latest Year), counting only whole numbers; a field with none is left out."""
    if type(items) is not list or not isinstance(fields, list):
        return None
    latest = -1
    chosen: list[dict[str, Any]] = []
    for item in items:
        if type(item) is dict:
            k = item.get(key)
            if type(k) is str and k.isascii() and k.isdigit():
                n = int(k)
                if n > latest:
                    latest, chosen = n, [item]
                elif n == latest:
                    chosen.append(item)
    out: dict[str, int] = {}
    for item in chosen:
        for f in fields:
            v = item.get(f)
            if type(v) is str and v.isascii() and v.isdigit():
                out[f] = out[f] + int(v) if f in out else int(v)
    return out or None


@_register("ctf_contacts", 1)
def ctf_contacts(items: Any) -> list[dict[str, Any]] | None:
    """CTF Contact elements -> canonical contacts in their Order (none last): each with order (a whole number
    or nothing), title, surname, forename, relationship (upper case), responsibility (true, false or nothing),
    phones ([{type, number}] with a number) and email (Email's text or its EmailAddress); empty text when
    not stated."""
    if type(items) is not list:
        return None
    out: list[dict[str, Any]] = []
    for c in items:
        if type(c) is not dict:
            continue
        get = c.get
        order = get("Order")
        title = get("Title", "")
        surname = get("Surname", "")
        forename = get("Forename", "")
        relationship = get("Relationship")
        responsibility = get("Responsibility")
        email = get("Email", "")
        if type(email) is dict:
            email = email.get("EmailAddress", "")
        phones: list[dict[str, str]] = []
        holder = get("Phones")
        if type(holder) is dict:
            for p in holder.get("Phone") or ():
                if type(p) is dict:
                    number = p.get("PhoneNo")
                    if number and type(number) is str:
                        kind = p.get("TelephoneType", "")
                        phones.append({"type": kind if type(kind) is str else "", "number": number})
        out.append({
            "order": int(order) if type(order) is str and order.isascii() and order.isdigit() else None,
            "title": title if type(title) is str else "",
            "surname": surname if type(surname) is str else "",
            "forename": forename if type(forename) is str else "",
            "relationship": relationship.upper() if type(relationship) is str else "",
            "responsibility": _XS_BOOLEAN.get(responsibility.lower()) if type(responsibility) is str else None,
            "phones": phones,
            "email": email if type(email) is str else "",
        })
    if len(out) > 1:
        out.sort(key=_contact_order)
    return out or None


def _contact_order(contact: dict[str, Any]) -> tuple[bool, int]:
    order = contact["order"]
    return (order is None, order or 0)


# CSV exports (connectors/mis/csv.py, the column maps with a `layout:` block) ---------------------------------


def _dmy(text: str) -> dt.date | None:
    """A date from exactly DD/MM/YYYY (one- or two-digit day and month), else None; raises for a
    non-existent day."""
    parts = text.split("/")
    if len(parts) != 3:
        return None
    d, m, y = parts
    if not (1 <= len(d) <= 2 and 1 <= len(m) <= 2 and len(y) == 4) or not (d + m + y).isascii() \
            or not (d + m + y).isdigit():
        return None
    return dt.date(int(y), int(m), int(d))


@_register("date_dmy_or_iso", 1)
def date_dmy_or_iso(value: Any) -> str | None:
    """An ISO date from DD/MM/YYYY or YYYY-MM-DD (both unambiguous; MIS reports write either); refuses
    anything else (a US-style, two-digit-year or worded date is never guessed)."""
    if type(value) is not str:
        return None
    s = value.strip()
    if not s:
        return None
    iso = _iso(s)
    if iso is not None:
        return s
    try:
        day = _dmy(s)
    except ValueError:
        day = None
    if day is None:
        raise ValueError("isoformat: not DD/MM/YYYY or YYYY-MM-DD")
    return day.isoformat()


@_register("leading_code", 1)
def leading_code(value: Any) -> str | None:
    """The code at the start of a coded description, upper-cased: 'K - SEN Support' and 'k' give K. The code is
    the text before the first ' - ' (or the whole text when there is none), with outer white space removed."""
    if type(value) is not str:
        return None
    code = value.split(" - ", 1)[0].strip().upper()
    return code or None


_YEAR_RE = re.compile(r"(?:year|yr|y)\s*(\d{1,2})")


@_register("nc_year", 1)
def nc_year(value: Any) -> str | None:
    """A year group as its National Curriculum year: 'Year 9', 'Yr 9', 'Y9' and '9' give 9, 'Reception' gives R;
    any other text is kept as stated (white space tidied)."""
    if type(value) is not str:
        return None
    s = " ".join(value.split())
    low = s.lower()
    if low in ("reception", "rec"):
        return "R"
    m = _YEAR_RE.fullmatch(low)
    if m is not None:
        return str(int(m.group(1)))
    return s or None


@_register("semicolon_list", 1)
def semicolon_list(value: Any) -> list[str] | None:
    """'a; b' -> ['a', 'b'] (trimmed, empties dropped); nothing when there is nothing."""
    if value is None:
        return None
    items = [p.strip() for p in str(value).split(";") if p.strip()]
    return items or None


@_register("consent_directions", 1)
def consent_directions(value: Any) -> list[str] | None:
    """'school_to_trust;trust_to_school' -> the directions, each checked; refuses any other word."""
    items: list[str] | None = semicolon_list(value)
    if items is None:
        return None
    allowed = ("school_to_trust", "trust_to_school")
    if any(i not in allowed for i in items):
        raise ValueError(f"not one of {', '.join(allowed)}")
    return items
