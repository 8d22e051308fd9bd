"""A trust's referral, episode and appointments -> the status a school reads, in plain English.

The labels are code tables in `mappings/code-tables/`; the feeds issue adds per-trust signposting
("where else to go").
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from typing import Any

from schoolslink.errors import ConfigurationError
from schoolslink.mapping.engine import MAPPINGS_DIR, CodeTable, _load_table
from schoolslink.model import ReferralStatus


def _tables() -> dict[str, CodeTable]:
    root = MAPPINGS_DIR / "code-tables"
    return {t.name: t for t in (_load_table(p) for p in sorted(root.glob("*.yaml")))}


_T = _tables()
_missing = {s.value for s in ReferralStatus} - set(_T["referral-status"].codes)
if _missing:
    raise ConfigurationError(f"{_T['referral-status'].path}: no label for {', '.join(sorted(_missing))}")
PLAIN = {s: str(_T["referral-status"].codes[s.value]) for s in ReferralStatus}
REJECTION = _T["mhsds-referral-rejection-reason"]
CLOSURE = _T["mhsds-referral-closure-reason"]

WAITING = {ReferralStatus.RECEIVED, ReferralStatus.BEING_ASSESSED, ReferralStatus.ACCEPTED_WAITING}


@dataclass(frozen=True, slots=True)
class SchoolStatus:
    status: ReferralStatus
    reason_code: str | None
    reason_text: str | None
    first_contact: date | None
    next_appointment: date | None


def derive(referral: dict[str, Any], episodes: list[dict[str, Any]], appointments: list[dict[str, Any]],
           on: date) -> SchoolStatus:
    """Status on `on`, from the stored rows of one ServiceRequest and its EpisodeOfCare / Appointments."""
    past = sorted(a["start"] for a in appointments
                  if a["start"] and a["start"] <= on and a["fhir_status"] in {"fulfilled", "arrived", "checked-in"})
    future = sorted(a["start"] for a in appointments
                    if a["start"] and a["start"] > on and a["fhir_status"] in {"booked", "pending", "proposed"})
    first = past[0] if past else None
    nxt = future[0] if future else None
    active_eps = [e for e in episodes if e["fhir_status"] in {"active", "waitlist", "onhold"}]
    finished_eps = [e for e in episodes if e["fhir_status"] == "finished"]

    if referral["transition"]:
        st, code = ReferralStatus.MOVED_TO_ADULT_SERVICES, referral["closure_reason"]
    elif referral["moved_area"]:
        st, code = ReferralStatus.MOVED_AREA, referral["closure_reason"]
    elif referral["rejection_reason"] or referral["fhir_status"] in {"revoked", "entered-in-error"}:
        st, code = ReferralStatus.NOT_ACCEPTED, referral["rejection_reason"]
    elif referral["closure_reason"] or referral["fhir_status"] == "completed" or (finished_eps and not active_eps):
        st, code = ReferralStatus.DISCHARGED, referral["closure_reason"]
    elif active_eps:
        waiting = all(e["fhir_status"] == "waitlist" for e in active_eps)
        st = ReferralStatus.ACCEPTED_WAITING if waiting and first is None else ReferralStatus.IN_TREATMENT
        code = None
    elif referral["fhir_status"] == "active":
        st, code = ReferralStatus.BEING_ASSESSED, None
    else:
        st, code = ReferralStatus.RECEIVED, None
    text = None
    if st is ReferralStatus.NOT_ACCEPTED and code:
        text = REJECTION.lookup(code)
    elif code:
        text = CLOSURE.lookup(code)
    return SchoolStatus(st, code, text, first, nxt if st not in {ReferralStatus.NOT_ACCEPTED,
                                                                ReferralStatus.DISCHARGED} else None)
