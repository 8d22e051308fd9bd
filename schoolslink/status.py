"""A trust's referral, episode and appointments -> the status a school reads, in plain English.

The labels are code tables in `mappings/code-tables/`; the feeds issue adds per-trust signposting
("where else to go").
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import yaml

from schoolslink.errors import ConfigurationError
from schoolslink.model import ReferralStatus

CODE_TABLES = Path(__file__).resolve().parents[1] / "mappings" / "code-tables"


def _table(name: str, *, required: set[str] | None = None) -> dict[str, str]:
    path = CODE_TABLES / f"{name}.yaml"
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(doc, dict) or set(doc) != {"table", "source", "unmapped", "codes"}:
        raise ConfigurationError(f"{path}: a code table has exactly table, source, unmapped and codes")
    if doc["unmapped"] not in {"error", "default"}:
        raise ConfigurationError(f"{path}: unmapped must be 'error' or 'default'")
    codes = {str(k): str(v) for k, v in doc["codes"].items()}
    missing = (required or set()) - set(codes)
    if missing:
        raise ConfigurationError(f"{path}: no label for {', '.join(sorted(missing))}")
    return codes


_STATUS = _table("referral-status", required={s.value for s in ReferralStatus})
PLAIN = {s: _STATUS[s.value] for s in ReferralStatus}
REJECTION = _table("mhsds-referral-rejection-reason")
CLOSURE = _table("mhsds-referral-closure-reason")

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
        text = REJECTION.get(code, f"Reason code {code}")
    elif code:
        text = CLOSURE.get(code, f"Reason code {code}")
    return SchoolStatus(st, code, text, first, nxt if st not in {ReferralStatus.NOT_ACCEPTED,
                                                                ReferralStatus.DISCHARGED} else None)
