"""A trust's referral, episode and appointments -> the canonical status of the referral tonight.

What the school reads for each status and reason comes from the feed-row mapping and its code tables
(`mappings/feed-out/`, `mappings/code-tables/`); where else to go after a not-accepted or discharged status
comes from the trust's signposting table (schoolslink.governance.signposting), keyed by `reason_code`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from typing import Any

from schoolslink.model import ReferralStatus


@dataclass(frozen=True, slots=True)
class SchoolStatus:
    status: ReferralStatus
    reason_code: str | None
    first_contact: date | None
    next_appointment: date | None


TRANSITION_MONTHS = 6  # a young person this close to 18 is flagged for transition to adult services


def approaching_adulthood(dob: date | str | None, on: date) -> bool:
    """True from six months before the 18th birthday on: the school and the trust plan the move to adult
    services (the trust's own transition flag counts too; see the feed)."""
    if dob is None:
        return False
    born = date.fromisoformat(dob) if isinstance(dob, str) else dob
    months = (born.year + 18) * 12 + born.month - 1 - TRANSITION_MONTHS
    year, month = divmod(months, 12)
    last_day = [31, 29 if year % 4 == 0 and (year % 100 != 0 or year % 400 == 0) else 28, 31, 30, 31, 30, 31, 31,
                30, 31, 30, 31][month]
    return on >= date(year, month + 1, min(born.day, last_day))


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
    return SchoolStatus(st, code, first, nxt if st not in {ReferralStatus.NOT_ACCEPTED,
                                                          ReferralStatus.DISCHARGED} else None)
