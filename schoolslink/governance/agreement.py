"""Data sharing agreements (`agreements/*.yaml`): parties, purposes, and per direction the items allowed.

An agreement is the code's input: a data item that no active agreement lists for a direction and
purpose never leaves, whatever a mapping says. Loading refuses unknown keys and unknown item names
with `file: message`, so a typo can never widen or silently narrow what is shared.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import yaml

from schoolslink.errors import AgreementError
from schoolslink.model import DATA_ITEMS, Direction

# The canonical data items each direction may carry (schoolslink.model). An agreement may list only these.
KNOWN_ITEMS = DATA_ITEMS

_TOP_KEYS = {
    "id", "version", "title", "effective_from", "effective_to", "lawful_basis", "parties",
    "purposes", "directions", "consent", "retention", "link_contacts", "notices",
}
_NOTICES = {"withdrawal", "move"}
_REQUIRED = {"id", "version", "effective_from", "parties", "purposes", "directions", "lawful_basis"}


@dataclass(frozen=True, slots=True)
class Trust:
    ods: str
    name: str
    link_worker_name: str
    link_worker_email: str


@dataclass(frozen=True, slots=True)
class Agreement:
    id: str
    version: str
    title: str
    effective_from: date
    effective_to: date | None
    trusts: tuple[Trust, ...]
    school_urns: frozenset[str]
    school_urn_ranges: tuple[tuple[int, int], ...]
    purposes: tuple[str, ...]
    items: dict[Direction, frozenset[str]]
    school_link_contacts: dict[str, tuple[str, str]]  # urn -> (name, email); '*' for every school
    consent_required: bool
    source_path: str
    notify_withdrawal: bool = False  # notices: {withdrawal: true}: the trust is told when consent is withdrawn
    landing_days: int | None = None  # retention.landing_days: how long the school's raw exports are kept
    notify_move: bool = False  # notices: {move: true}: the trust is told when a pupil it knew moved school
    ledger_years: int | None = None  # retention.ledger_years: how long the ledger (the proof) and checkpoints are kept
    # retention.values_days: how long the values behind the ledger's commitments (ledger_values) are kept; None:
    # DEFAULT_VALUES_DAYS (schoolslink/retention.py)
    values_days: int | None = None

    def covers_school(self, urn: str) -> bool:
        if urn in self.school_urns:
            return True
        if urn.isdigit():
            n = int(urn)
            return any(lo <= n <= hi for lo, hi in self.school_urn_ranges)
        return False

    def covers_trust(self, ods: str) -> bool:
        return any(t.ods == ods for t in self.trusts)

    def active_on(self, day: date) -> bool:
        return self.effective_from <= day and (self.effective_to is None or day <= self.effective_to)

    def allowed(self, direction: Direction) -> frozenset[str]:
        return self.items.get(direction, frozenset())

    def trust(self, ods: str) -> Trust:
        for t in self.trusts:
            if t.ods == ods:
                return t
        raise KeyError(ods)

    def school_contact(self, urn: str) -> tuple[str, str] | None:
        return self.school_link_contacts.get(urn) or self.school_link_contacts.get("*")


def _need(cond: bool, path: Path, message: str) -> None:
    if not cond:
        raise AgreementError(f"{path}: {message}")


def _as_date(value: Any, path: Path, key: str) -> date:
    if isinstance(value, date):
        return value
    try:
        return date.fromisoformat(str(value))
    except ValueError:
        raise AgreementError(f"{path}: {key} must be a date (YYYY-MM-DD), got {value!r}") from None


def load_agreement(path: Path) -> Agreement:
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise AgreementError(f"{where}: not valid YAML") from None
    _need(isinstance(doc, dict), path, "an agreement is a mapping of keys")
    unknown = set(doc) - _TOP_KEYS
    _need(not unknown, path, f"unknown key(s): {', '.join(sorted(unknown))}")
    missing = _REQUIRED - set(doc)
    _need(not missing, path, f"missing key(s): {', '.join(sorted(missing))}")

    parties = doc["parties"]
    _need(isinstance(parties, dict) and set(parties) <= {"trusts", "schools"}, path,
          "parties must have only 'trusts' and 'schools'")
    trusts = []
    for t in parties.get("trusts") or []:
        _need(isinstance(t, dict) and {"ods", "name", "link_worker"} <= set(t), path,
              "each trust needs ods, name and link_worker")
        lw = t["link_worker"]
        _need(isinstance(lw, dict) and {"name", "email"} <= set(lw), path,
              f"trust {t['ods']}: link_worker needs name and email")
        trusts.append(Trust(str(t["ods"]), str(t["name"]), str(lw["name"]), str(lw["email"])))
    _need(bool(trusts), path, "parties.trusts must name at least one trust")

    schools = parties.get("schools") or {}
    _need(isinstance(schools, dict) and set(schools) <= {"urns", "urn_ranges"}, path,
          "parties.schools takes 'urns' and 'urn_ranges'")
    ranges = []
    for r in schools.get("urn_ranges") or []:
        lo, _, hi = str(r).partition("-")
        _need(lo.isdigit() and hi.isdigit() and int(lo) <= int(hi), path,
              f"urn range {r!r} must look like 900001-900500")
        ranges.append((int(lo), int(hi)))
    urns = frozenset(str(u) for u in schools.get("urns") or [])
    _need(bool(urns or ranges), path, "parties.schools must name at least one school")

    directions = doc["directions"]
    _need(isinstance(directions, dict), path, "directions must be a mapping")
    items: dict[Direction, frozenset[str]] = {}
    for name, spec in directions.items():
        try:
            direction = Direction(name)
        except ValueError:
            raise AgreementError(
                f"{path}: unknown direction {name!r}; use school_to_trust or trust_to_school"
            ) from None
        _need(isinstance(spec, dict) and set(spec) == {"items"}, path,
              f"directions.{name} takes exactly one key, 'items'")
        listed = [str(i) for i in spec["items"] or []]
        bad = sorted(set(listed) - KNOWN_ITEMS[direction])
        _need(not bad, path, f"directions.{name}: unknown data item(s) {', '.join(bad)}; known: "
              f"{', '.join(sorted(KNOWN_ITEMS[direction]))}")
        items[direction] = frozenset(listed)

    contacts: dict[str, tuple[str, str]] = {}
    for c in doc.get("link_contacts") or []:
        _need(isinstance(c, dict) and {"school", "name", "email"} <= set(c), path,
              "each link contact needs school (URN or '*'), name and email")
        contacts[str(c["school"])] = (str(c["name"]), str(c["email"]))

    consent = doc.get("consent") or {"required": True}
    _need(isinstance(consent, dict) and set(consent) <= {"required"}, path,
          "consent takes only 'required'")
    retention = doc.get("retention") or {}
    _need(isinstance(retention, dict) and set(retention) <= {"landing_days", "ledger_years", "values_days"}
          and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in retention.values()), path,
          "retention takes landing_days, ledger_years and values_days, whole numbers of 1 or more")
    _need(retention.get("values_days") is None or retention.get("ledger_years") is None
          or retention["values_days"] <= 366 * retention["ledger_years"], path,
          "retention.values_days must not outlast retention.ledger_years")
    notices = doc.get("notices") or {}
    _need(isinstance(notices, dict) and set(notices) <= _NOTICES
          and all(isinstance(v, bool) for v in notices.values()), path,
          f"notices takes {', '.join(sorted(_NOTICES))}: true or false")
    lawful = doc["lawful_basis"]
    _need(isinstance(lawful, dict) and {"article6", "article9"} <= set(lawful), path,
          "lawful_basis needs article6 and article9")
    purposes = tuple(str(p) for p in doc["purposes"])
    _need(bool(purposes), path, "purposes must list at least one purpose")

    return Agreement(
        id=str(doc["id"]),
        version=str(doc["version"]),
        title=str(doc.get("title", doc["id"])),
        effective_from=_as_date(doc["effective_from"], path, "effective_from"),
        effective_to=_as_date(doc["effective_to"], path, "effective_to") if doc.get("effective_to") else None,
        trusts=tuple(trusts),
        school_urns=urns,
        school_urn_ranges=tuple(ranges),
        purposes=purposes,
        items=items,
        school_link_contacts=contacts,
        consent_required=bool(consent.get("required", True)),
        source_path=str(path),
        notify_withdrawal=bool(notices.get("withdrawal", False)),
        landing_days=retention.get("landing_days"),
        notify_move=bool(notices.get("move", False)),
        ledger_years=retention.get("ledger_years"),
        values_days=retention.get("values_days"),
    )


def landing_days_for(agreements: list[Agreement], school_urn: str) -> int | None:
    """The shortest landing-zone retention any agreement covering the school sets (None: none sets one)."""
    days = [a.landing_days for a in agreements if a.landing_days is not None and a.covers_school(school_urn)]
    return min(days) if days else None


def agreements_dir() -> Path:
    import os

    return Path(os.environ.get("SCHOOLSLINK_AGREEMENTS", Path(__file__).resolve().parents[2] / "agreements"))


def load_agreements(folder: Path | None = None) -> list[Agreement]:
    folder = folder or agreements_dir()
    return [load_agreement(p) for p in sorted(folder.glob("*.yaml"))]


def agreement_for(
    agreements: list[Agreement], school_urn: str, trust_ods: str, day: date, purpose: str
) -> Agreement | None:
    """The active agreement between this school and this trust on `day` for `purpose` (newest version wins).

    An agreement made for another purpose never lends its items to this one.
    """
    found = [
        a for a in agreements
        if a.active_on(day) and purpose in a.purposes and a.covers_school(school_urn) and a.covers_trust(trust_ods)
    ]
    if not found:
        return None
    return max(found, key=lambda a: a.effective_from)
