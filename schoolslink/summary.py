"""The monthly partnership summary: for one month, one HTML page per partner school and one per trust, with
referrals received, what became of them and why, how long children waited, and how long a change at the trust
took to reach the school's nightly feed. Aggregate figures only, under statistical disclosure control.

Definitions (docs/partnership-summary.md gives them in full, with what each figure cannot show):

* A referral belongs to a school through the pupil it is linked to (a live link), else to the school the
  trust's record names; records the trust marks restricted (PDS `R`) and referrals entered in error are
  left out of every figure.
* Referrals: ServiceRequests whose `received` (authoredOn) date falls in the month, in Europe/London.
* Outcome, from the trust rows as last read: not accepted (a rejection reason, or `revoked`); accepted (an
  EpisodeOfCare, an attended Appointment, a closure reason or `completed`); closed before a decision (moved to
  adult services or out of the area with none of those); otherwise waiting for a decision. Acceptance rate =
  accepted / (accepted + not accepted).
* Wait: days from `received` to the earlier of the first attended Appointment and the EpisodeOfCare start,
  for waits that ended in the month (clock stops in the month, whenever the referral arrived). Median and
  90th percentile by linear interpolation between closest ranks (Hyndman-Fan type 7), to the nearest day.
* Time to reach the school: one change per (school, pupil, trust, trust sync run that stored it), for pupils the
  school's feed carries: from the trust's change time (its `meta.lastUpdated`, while the pull state still holds
  it; otherwise the start of the sync run that read it: an approximation that shortens the figure) to the first
  feed to the school about the pupil built at or after that run started (its ledger entry's time).
* Disclosure control: a count under 5 (0 included) shows as "fewer than 5", every other count is rounded to the
  nearest 5; a rate or percentile needs every count it is computed from to be 5 or more, else it is not shown.

No name, UPN, NHS number, date of birth, pseudonym or record reference ever reaches a page, a log or the
return value: pages are built from counts, and what `build_summaries` returns is counts.
"""

from __future__ import annotations

import bisect
import math
import os
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from markupsafe import Markup, escape
from sqlalchemy import Connection, select

from schoolslink import settings
from schoolslink.governance.agreement import Agreement, load_agreements
from schoolslink.ledger import subjects_of as ledger_subjects_of
from schoolslink.mapping.engine import load_mappings
from schoolslink.pipeline.common import store
from schoolslink.store.schema import (
    feed_rows,
    learners,
    ledger,
    links,
    patients,
    runs,
    trust_appointments,
    trust_episodes,
    trust_referrals,
    watermarks,
)

LONDON = ZoneInfo("Europe/London")
SUPPRESS_BELOW = 5  # a count under this shows as "fewer than 5"
ROUND_TO = 5  # every other count is rounded to the nearest multiple of this
SUPPRESSED_TEXT = "fewer than 5"
TREND_MONTHS = 6
REJECTION_TABLE = "mhsds-referral-rejection-reason"
NO_REASON_TEXT = "No reason recorded by the service"
TEMPLATES = Path(__file__).resolve().parent / "templates" / "summary"
_MONTH = re.compile(r"^(\d{4})-(0[1-9]|1[0-2])$")
ATTENDED = frozenset({"fulfilled", "arrived", "checked-in"})
EPISODE_NOT_COUNTED = frozenset({"entered-in-error", "cancelled"})


class Outcome(StrEnum):
    ACCEPTED = "accepted"
    NOT_ACCEPTED = "not_accepted"
    AWAITING = "awaiting"
    CLOSED_UNDECIDED = "closed_undecided"


OUTCOME_LABELS: dict[Outcome, str] = {
    Outcome.ACCEPTED: "Accepted",
    Outcome.NOT_ACCEPTED: "Not accepted",
    Outcome.AWAITING: "Waiting for a decision",
    Outcome.CLOSED_UNDECIDED: "Closed before a decision (moved area or to adult services)",
}


class SummaryError(ValueError):
    """The month asked for is not a month (YYYY-MM)."""


@dataclass(frozen=True, slots=True)
class SummaryCounts:
    """What was written: counts only (XCom-safe)."""

    school_pages: int
    trust_pages: int
    referrals: int  # referrals received in the month across all pages' trusts (unrounded: never on a page)
    changes_measured: int

    def as_dict(self) -> dict[str, int]:
        return {"summary_school_pages": self.school_pages, "summary_trust_pages": self.trust_pages,
                "summary_referrals": self.referrals, "summary_changes_measured": self.changes_measured}


# -- disclosure control and statistics: pure functions ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Shown:
    """A count as a page may show it: `value` is the rounded count (None when suppressed)."""

    value: int | None

    @property
    def suppressed(self) -> bool:
        return self.value is None

    @property
    def text(self) -> str:
        return SUPPRESSED_TEXT if self.value is None else f"{self.value:,}"


def rounded(n: int) -> int | None:
    """The count as shown: None under 5 (0 included), else rounded to the nearest 5 (halves cannot occur)."""
    if n < 0:
        raise ValueError("a count cannot be negative")
    if n < SUPPRESS_BELOW:
        return None
    return (n + ROUND_TO // 2) // ROUND_TO * ROUND_TO


def shown(n: int) -> Shown:
    return Shown(rounded(n))


def rate(part: int, other: int) -> int | None:
    """part / (part + other) as a whole percentage, or None if either count is suppressed (under 5)."""
    if part < SUPPRESS_BELOW or other < SUPPRESS_BELOW:
        return None
    return math.floor(100 * part / (part + other) + 0.5)


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile (0..100) by linear interpolation between closest ranks (Hyndman-Fan type 7; Excel
    PERCENTILE.INC, numpy's default)."""
    if not values:
        raise ValueError("no values")
    if not 0 <= p <= 100:
        raise ValueError("p must be between 0 and 100")
    xs = sorted(values)
    h = (len(xs) - 1) * p / 100
    lo = math.floor(h)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (h - lo) * (xs[hi] - xs[lo])


@dataclass(frozen=True, slots=True)
class Spread:
    """Median and 90th percentile of a set of values, shown only when the set has at least 5 members."""

    n: Shown
    median: float | None
    p90: float | None

    @property
    def available(self) -> bool:
        return self.median is not None


def spread(values: Sequence[float]) -> Spread:
    if len(values) < SUPPRESS_BELOW:
        return Spread(shown(len(values)), None, None)
    return Spread(shown(len(values)), percentile(values, 50), percentile(values, 90))


def month_before(day: date) -> str:
    """The month before the one `day` is in, as YYYY-MM (what the run on the 1st summarises)."""
    return _shift_month(date(day.year, day.month, 1), -1).strftime("%Y-%m")


def month_bounds(month: str) -> tuple[date, date]:
    """First and last day of a YYYY-MM month."""
    m = _MONTH.match(month)
    if not m:
        raise SummaryError(f"month must be YYYY-MM, not {month!r}")
    first = date(int(m.group(1)), int(m.group(2)), 1)
    nxt = date(first.year + (first.month == 12), first.month % 12 + 1, 1)
    return first, nxt - timedelta(days=1)


def _shift_month(first: date, months: int) -> date:
    k = first.year * 12 + first.month - 1 + months
    return date(k // 12, k % 12 + 1, 1)


# -- facts read from the store ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReferralFact:
    trust_ods: str
    school_urn: str | None
    received: date | None
    outcome: Outcome
    rejection_code: str | None
    wait_end: date | None  # the earlier of first attended contact and the episode's start (None: not yet)

    @property
    def wait_days(self) -> int | None:
        if self.received is None or self.wait_end is None or self.wait_end < self.received:
            return None  # no wait yet, or the trust's dates are out of order: left out
        return (self.wait_end - self.received).days


@dataclass(frozen=True, slots=True)
class ChangeFact:
    trust_ods: str
    school_urn: str
    changed_at: datetime  # aware, UTC
    exact: bool  # the trust's own change time (else: when schoolslink's sync run read it)
    reached_at: datetime | None  # when the first feed to the school carrying it was built (None: not yet)

    @property
    def hours(self) -> float | None:
        if self.reached_at is None:
            return None
        return max(0.0, (self.reached_at - self.changed_at).total_seconds() / 3600)


def outcome_of(referral: dict[str, Any], episodes: Iterable[dict[str, Any]],
               appointments: Iterable[dict[str, Any]]) -> Outcome:
    if referral["rejection_reason"] or referral["fhir_status"] == "revoked":
        return Outcome.NOT_ACCEPTED
    if (any(e["fhir_status"] not in EPISODE_NOT_COUNTED for e in episodes)
            or any(a["fhir_status"] in ATTENDED for a in appointments)
            or referral["closure_reason"] or referral["fhir_status"] == "completed"):
        return Outcome.ACCEPTED
    if referral["transition"] or referral["moved_area"]:
        return Outcome.CLOSED_UNDECIDED
    return Outcome.AWAITING


def wait_end_of(episodes: Iterable[dict[str, Any]], appointments: Iterable[dict[str, Any]]) -> date | None:
    ends = [e["start"] for e in episodes if e["start"] and e["fhir_status"] not in EPISODE_NOT_COUNTED]
    ends += [a["start"] for a in appointments if a["start"] and a["fhir_status"] in ATTENDED]
    return min(ends) if ends else None


def _utc(t: datetime | str | None) -> datetime | None:
    if t is None:
        return None
    if isinstance(t, str):
        t = datetime.fromisoformat(t.replace("Z", "+00:00"))
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


def _london_midnight(d: date) -> datetime:
    return datetime(d.year, d.month, d.day, tzinfo=LONDON).astimezone(UTC)


@dataclass
class StoreFacts:
    referrals: list[ReferralFact] = field(default_factory=list)
    changes: list[ChangeFact] = field(default_factory=list)
    trust_data_at: datetime | None = None  # when the last trust sync finished (the figures' "as held on")
    roll_schools: set[str] = field(default_factory=set)


def collect(conn: Connection, month: str) -> StoreFacts:
    """Everything the month's pages need, as facts with no identifier of any child."""
    first, last = month_bounds(month)
    facts = StoreFacts()
    pats = {(r.trust_ods, r.patient_ref): (r.school_urn, bool(r.restricted)) for r in conn.execute(
        select(patients.c.trust_ods, patients.c.patient_ref, patients.c.school_urn, patients.c.restricted))}
    school_of_learner = {r.learner_key: r.school_urn for r in conn.execute(
        select(learners.c.learner_key, learners.c.school_urn))}
    facts.roll_schools = set(school_of_learner.values())
    linked: dict[tuple[str, str], str] = {}  # (trust, patient_ref) -> learner_key, live links only
    learner_patient: dict[tuple[str, str], str] = {}  # (learner_key, trust) -> patient_ref
    for r in conn.execute(select(links.c.learner_key, links.c.trust_ods, links.c.patient_ref)
                          .where(links.c.withdrawn.is_(False))):
        linked[(r.trust_ods, r.patient_ref)] = r.learner_key
        learner_patient[(r.learner_key, r.trust_ods)] = r.patient_ref

    refs = [dict(r) for r in conn.execute(select(
        trust_referrals.c.trust_ods, trust_referrals.c.referral_ref, trust_referrals.c.patient_ref,
        trust_referrals.c.fhir_status, trust_referrals.c.received, trust_referrals.c.rejection_reason,
        trust_referrals.c.closure_reason, trust_referrals.c.transition, trust_referrals.c.moved_area,
        trust_referrals.c.version_id, trust_referrals.c.updated_run)
        .where(trust_referrals.c.fhir_status != "entered-in-error")).mappings()]
    eps: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for er in conn.execute(select(trust_episodes.c.trust_ods, trust_episodes.c.episode_ref,
                                 trust_episodes.c.referral_ref, trust_episodes.c.fhir_status, trust_episodes.c.start,
                                 trust_episodes.c.updated_run)).mappings():
        eps[(er["trust_ods"], er["referral_ref"])].append(dict(er))
    appts: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for ar in conn.execute(select(trust_appointments.c.trust_ods, trust_appointments.c.appointment_ref,
                                 trust_appointments.c.referral_ref, trust_appointments.c.fhir_status,
                                 trust_appointments.c.start, trust_appointments.c.updated_run)).mappings():
        appts[(ar["trust_ods"], ar["referral_ref"])].append(dict(ar))

    by_patient: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for ref in refs:
        key = (ref["trust_ods"], ref["patient_ref"])
        school, restricted = pats.get(key, (None, False))
        if restricted:
            continue
        learner = linked.get(key)
        if learner is not None and learner in school_of_learner:
            school = school_of_learner[learner]
        rk = (ref["trust_ods"], ref["referral_ref"])
        facts.referrals.append(ReferralFact(
            ref["trust_ods"], school, ref["received"], outcome_of(ref, eps[rk], appts[rk]), ref["rejection_reason"],
            wait_end_of(eps[rk], appts[rk])))
        by_patient[key].append(ref)

    run_times = {r.run_id: (_utc(r.started_at), _utc(r.finished_at), r.dag_id)
                 for r in conn.execute(select(runs.c.run_id, runs.c.started_at, runs.c.finished_at, runs.c.dag_id))}
    syncs = [fin for _, fin, dag in run_times.values() if dag == "nhs_sync" and fin is not None]
    facts.trust_data_at = max(syncs) if syncs else None
    facts.changes = _changes(conn, first, last, by_patient, eps, appts, learner_patient, run_times)
    return facts


def _seen_times(conn: Connection) -> dict[tuple[str, str], datetime]:
    """(trust, 'Type/id') -> the trust's lastUpdated of the latest version the pull state still holds."""
    out: dict[tuple[str, str], datetime] = {}
    for r in conn.execute(select(watermarks.c.source, watermarks.c.resource_type, watermarks.c.seen)
                          .where(watermarks.c.source.startswith("fhir:"))):
        trust = r.source.removeprefix("fhir:")
        for key, lu in (r.seen or {}).items():
            rid = f"{r.resource_type}/{str(key).split('|', 1)[0]}"
            t = _utc(str(lu))
            if t is not None and ((trust, rid) not in out or t > out[(trust, rid)]):
                out[(trust, rid)] = t
    return out


def _changes(conn: Connection, first: date, last: date, by_patient: dict[tuple[str, str], list[dict[str, Any]]],
             eps: dict[tuple[str, str], list[dict[str, Any]]], appts: dict[tuple[str, str], list[dict[str, Any]]],
             learner_patient: dict[tuple[str, str], str],
             run_times: dict[str, tuple[datetime | None, datetime | None, str]]) -> list[ChangeFact]:
    start, end = _london_midnight(first), _london_midnight(last + timedelta(days=1))
    seen = _seen_times(conn)
    carried: dict[tuple[str, str], list[datetime]] = defaultdict(list)  # (recipient, learner) -> feed times
    for r in conn.execute(select(ledger.c.recipient, ledger.c.subject_key, ledger.c.at, ledger.c.data_items)
                          .where(ledger.c.dag_id == "school_feeds", ledger.c.at >= start)):
        at = _utc(r.at)
        if at is not None and "referral_status" in str(r.data_items).split(","):
            carried[(r.recipient, r.subject_key)].append(at)
    for v in carried.values():
        v.sort()
    out: list[ChangeFact] = []
    triples = {(r.school_urn, r.learner_key, r.trust_ods)
               for r in conn.execute(select(feed_rows.c.school_urn, feed_rows.c.learner_key, feed_rows.c.trust_ods))}
    for urn, learner, trust in sorted(triples):
        patient_ref = learner_patient.get((learner, trust))
        if patient_ref is None:
            continue
        subject_feeds: list[datetime] | None = None  # the feeds that carried the pupil (ledger subjects: any key held)
        # every stored trust row about the pupil's referrals, grouped by the sync run that stored it: one change
        rows_by_run: dict[str, list[datetime | None]] = defaultdict(list)
        for ref in by_patient.get((trust, patient_ref), []):
            rk = (trust, ref["referral_ref"])
            rows_by_run[ref["updated_run"]].append(seen.get((trust, ref["referral_ref"])))
            for e in eps[rk]:
                rows_by_run[e["updated_run"]].append(seen.get((trust, e["episode_ref"])))
            for a in appts[rk]:
                rows_by_run[a["updated_run"]].append(seen.get((trust, a["appointment_ref"])))
        for run_id, times in rows_by_run.items():
            run_start = run_times.get(run_id, (None, None, ""))[0]
            exact = all(t is not None for t in times)
            changed_at = max(t for t in times if t is not None) if exact else run_start
            if changed_at is None or not start <= changed_at < end:
                continue
            from_ = run_start or changed_at
            feeds = subject_feeds if subject_feeds is not None else sorted(
                t for subject in ledger_subjects_of(learner) for t in carried.get((f"URN:{urn}", subject), []))
            subject_feeds = feeds
            i = bisect.bisect_left(feeds, from_)
            out.append(ChangeFact(trust, urn, changed_at, exact, feeds[i] if i < len(feeds) else None))
    return out


# -- aggregation -------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Bar:
    label: str
    count: Shown
    share: int | None = None  # per cent of the whole, when every count it needs is shown


@dataclass(frozen=True, slots=True)
class Figures:
    """One scope's figures (a school, a trust, or one row of a breakdown), every count already controlled."""

    label: str
    referrals: Shown
    outcomes: list[Bar]
    acceptance_rate: int | None
    decided: Shown
    reasons: list[Bar]
    waits: Spread
    lag: Spread  # hours
    lag_pending: Shown  # changes no feed has carried yet
    lag_exact: str  # "all" | "some" | "none" (only meaningful when lag.available)
    trend: list[Bar]


def figures(label: str, month: str, referrals: Sequence[ReferralFact], changes: Sequence[ChangeFact],
            reasons: ReasonLabels) -> Figures:
    first, last = month_bounds(month)
    in_month = [r for r in referrals if r.received is not None and first <= r.received <= last]
    by_outcome = {o: sum(1 for r in in_month if r.outcome is o) for o in Outcome}
    acc, rej = by_outcome[Outcome.ACCEPTED], by_outcome[Outcome.NOT_ACCEPTED]
    outcomes = [Bar(OUTCOME_LABELS[o], shown(by_outcome[o]), rate(by_outcome[o], len(in_month) - by_outcome[o]))
                for o in Outcome]
    by_reason: dict[str, int] = dict.fromkeys(reasons.every(), 0)
    for r in in_month:
        if r.outcome is Outcome.NOT_ACCEPTED:
            by_reason[reasons.label(r.rejection_code)] += 1
    waits = [float(w) for r in referrals
             if r.wait_end is not None and first <= r.wait_end <= last and (w := r.wait_days) is not None]
    lags = [h for c in changes if (h := c.hours) is not None]
    measured = [c for c in changes if c.reached_at is not None]
    n_exact = sum(1 for c in measured if c.exact)
    trend = []
    for k in range(TREND_MONTHS - 1, -1, -1):
        m0 = _shift_month(first, -k)
        m1 = _shift_month(m0, 1) - timedelta(days=1)
        n = sum(1 for r in referrals if r.received is not None and m0 <= r.received <= m1)
        trend.append(Bar(m0.strftime("%b %Y"), shown(n)))
    return Figures(
        label=label, referrals=shown(len(in_month)), outcomes=outcomes, acceptance_rate=rate(acc, rej),
        decided=shown(acc + rej),
        reasons=[Bar(text, shown(n)) for text, n in by_reason.items()], waits=spread(waits), lag=spread(lags),
        lag_pending=shown(len(changes) - len(measured)),
        lag_exact="all" if n_exact == len(measured) else ("none" if n_exact == 0 else "some"), trend=trend)


# -- pages -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Page:
    kind: str  # "school" | "trust"
    code: str  # URN or ODS code
    title: str
    month: str
    month_label: str
    totals: Figures
    breakdown_by: str  # "trust" | "school"
    breakdown: list[Figures]
    trust_data_at: str | None
    other_party: str  # e.g. "partner trusts" or "partner schools"
    contacts: list[dict[str, str]]


@dataclass(frozen=True, slots=True)
class ReasonLabels:
    """MHSDS referral rejection reason code -> plain English, from the feed's code table."""

    codes: dict[str, str]
    default: str

    @classmethod
    def load(cls) -> ReasonLabels:
        table = load_mappings().tables[REJECTION_TABLE]
        return cls({str(k): str(v) for k, v in table.codes.items()}, str(table.default))

    def label(self, code: str | None) -> str:
        if not code:
            return NO_REASON_TEXT
        return self.codes.get(str(code), self.default)

    def every(self) -> list[str]:
        """Every label a page lists, in a fixed order, so a reason's presence never tells that it occurred."""
        return [*self.codes.values(), self.default, NO_REASON_TEXT]


def partners(agreements: list[Agreement], first: date, last: date) -> list[Agreement]:
    """The agreements in force on some day of the month."""
    return [a for a in agreements
            if a.effective_from <= last and (a.effective_to is None or a.effective_to >= first)]


def build_pages(month: str, facts: StoreFacts, agreements: list[Agreement],
                reasons: ReasonLabels | None = None) -> list[Page]:
    first, last = month_bounds(month)
    reasons = reasons or ReasonLabels.load()
    active = partners(agreements, first, last)
    trusts = {t.ods: t for a in active for t in a.trusts}
    month_label = first.strftime("%B %Y")
    held = facts.trust_data_at.astimezone(LONDON) if facts.trust_data_at else None
    held_text = f"{held.day} {held.strftime('%B %Y at %H:%M')}" if held else None

    def covered(urn: str | None, ods: str) -> bool:
        return urn is not None and any(a.covers_school(urn) and a.covers_trust(ods) for a in active)

    schools = sorted({u for u in facts.roll_schools | {r.school_urn for r in facts.referrals if r.school_urn}
                      if any(covered(u, ods) for ods in trusts)})
    pages: list[Page] = []
    for urn in schools:
        mine = [ods for ods in sorted(trusts) if covered(urn, ods)]
        refs = [r for r in facts.referrals if r.school_urn == urn and r.trust_ods in mine]
        chg = [c for c in facts.changes if c.school_urn == urn and c.trust_ods in mine]
        breakdown = [figures(f"{trusts[o].name} ({o})", month, [r for r in refs if r.trust_ods == o],
                             [c for c in chg if c.trust_ods == o], reasons) for o in mine] if len(mine) > 1 else []
        contacts = [{"name": trusts[o].link_worker_name, "email": trusts[o].link_worker_email,
                     "organisation": f"{trusts[o].name} ({o})"} for o in mine if trusts[o].link_worker_name]
        pages.append(Page("school", urn, f"School URN {urn}", month, month_label,
                          figures(f"School URN {urn}", month, refs, chg, reasons), "trust", breakdown, held_text,
                          "partner trusts", contacts))
    for ods, trust in sorted(trusts.items()):
        partner_schools = [u for u in schools if covered(u, ods)]
        refs = [r for r in facts.referrals if r.trust_ods == ods and covered(r.school_urn, ods)]
        chg = [c for c in facts.changes if c.trust_ods == ods and covered(c.school_urn, ods)]
        breakdown = [figures(f"School URN {u}", month, [r for r in refs if r.school_urn == u],
                             [c for c in chg if c.school_urn == u], reasons) for u in partner_schools]
        school_contacts = sorted({(sc[0], sc[1]) for a in active if a.covers_trust(ods)
                                  for u in partner_schools if (sc := a.school_contact(u))})
        pages.append(Page("trust", ods, f"{trust.name} ({ods})", month, month_label,
                          figures(trust.name, month, refs, chg, reasons), "school", breakdown, held_text,
                          "partner schools", [{"name": n, "email": e, "organisation": "Partner schools"}
                                              for n, e in school_contacts]))
    return pages


# -- charts: inline SVG, no script, each with a title, a description and a data table beside it on the page ------

BAR_FILL = "#005eb8"  # NHS blue: 5.6:1 on white (WCAG 1.4.11 asks 3:1 for graphics)
TEXT_FILL = "#212b32"
AXIS = "#4c6272"


def _svg_open(width: int, height: int, chart_id: str, title: str, desc: str) -> list[str]:
    return [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" role="img" '
            f'aria-labelledby="{chart_id}-title {chart_id}-desc" class="chart" focusable="false">',
            f'<title id="{chart_id}-title">{escape(title)}</title>',
            f'<desc id="{chart_id}-desc">{escape(desc)}</desc>']


def describe(bars: Sequence[Bar], unit: str = "") -> str:
    return "; ".join(f"{b.label}: {b.count.text}{unit if not b.count.suppressed else ''}" for b in bars) + "."


def bar_chart(bars: Sequence[Bar], chart_id: str, title: str) -> Markup:
    """Horizontal bars, each label above its bar; a suppressed count draws no bar and says "fewer than 5"."""
    width, left, right, row = 440, 4, 96, 46
    top = max((b.count.value or 0) for b in bars) or ROUND_TO
    height = row * len(bars) + 8
    out = _svg_open(width, height, chart_id, title, describe(bars))
    for i, b in enumerate(bars):
        y = 8 + i * row
        out.append(f'<text x="{left}" y="{y + 12}" font-size="14" fill="{TEXT_FILL}">{escape(b.label)}</text>')
        w = 0 if b.count.value is None else max(2, round((width - left - right) * b.count.value / top))
        if w:
            out.append(f'<rect x="{left}" y="{y + 18}" width="{w}" height="20" fill="{BAR_FILL}"/>')
        style = ' font-style="italic"' if b.count.suppressed else ' font-weight="bold"'
        out.append(f'<text x="{left + w + 6}" y="{y + 33}" font-size="14" fill="{TEXT_FILL}"{style}>'
                   f'{escape(b.count.text)}</text>')
    out.append(f'<line x1="{left}" y1="4" x2="{left}" y2="{height - 2}" stroke="{AXIS}" stroke-width="1"/>')
    out.append("</svg>")
    return Markup("\n".join(out))  # noqa: S704 - every text in it went through escape()


def column_chart(bars: Sequence[Bar], chart_id: str, title: str) -> Markup:
    """Vertical columns over time (the trend); a suppressed month draws no column and says "fewer than 5"."""
    width, height, base, top_pad = 480, 250, 200, 40
    top = max((b.count.value or 0) for b in bars) or ROUND_TO
    slot = width / max(1, len(bars))
    out = _svg_open(width, height, chart_id, title, describe(bars))
    out.append(f'<line x1="0" y1="{base}" x2="{width}" y2="{base}" stroke="{AXIS}" stroke-width="1"/>')
    for i, b in enumerate(bars):
        cx = slot * i + slot / 2
        h = 0 if b.count.value is None else max(2, round((base - top_pad) * b.count.value / top))
        if h:
            out.append(f'<rect x="{cx - slot * 0.3:.1f}" y="{base - h}" width="{slot * 0.6:.1f}" height="{h}" '
                       f'fill="{BAR_FILL}"/>')
        if b.count.suppressed:  # two short lines, so narrow columns keep their words apart
            first_line, _, second_line = SUPPRESSED_TEXT.rpartition(" ")
            out.append(f'<text x="{cx:.1f}" y="{base - 26}" font-size="13" text-anchor="middle" fill="{TEXT_FILL}" '
                       f'font-style="italic">{escape(first_line)}<tspan x="{cx:.1f}" dy="16">{escape(second_line)}'
                       f'</tspan></text>')
        else:
            out.append(f'<text x="{cx:.1f}" y="{base - h - 8}" font-size="14" text-anchor="middle" '
                       f'fill="{TEXT_FILL}" font-weight="bold">{escape(b.count.text)}</text>')
        out.append(f'<text x="{cx:.1f}" y="{base + 22}" font-size="13" text-anchor="middle" fill="{TEXT_FILL}">'
                   f'{escape(b.label)}</text>')
    out.append("</svg>")
    return Markup("\n".join(out))  # noqa: S704 - every text in it went through escape()


def spread_bars(s: Spread, unit: str) -> list[Bar]:
    """Median and 90th percentile as bars (only drawn when shown), values rounded to whole units."""
    if s.median is None or s.p90 is None:
        return []
    return [Bar(f"Median ({unit})", Shown(_half_up(s.median))),
            Bar(f"90th percentile ({unit})", Shown(_half_up(s.p90)))]


def _half_up(x: float) -> int:
    return math.floor(x + 0.5)


def days_text(x: float | None) -> str:
    if x is None:
        return "not shown"
    n = _half_up(x)
    return "1 day" if n == 1 else f"{n:,} days"


def hours_text(h: float | None) -> str:
    if h is None:
        return "not shown"
    if h < 1:
        return "less than 1 hour"
    if h < 48:
        n = _half_up(h)
        return "1 hour" if n == 1 else f"{n} hours"
    return f"{h / 24:.1f} days"


def render(page: Page) -> str:
    from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html", "j2", "svg"]),
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.globals.update(bar_chart=bar_chart, column_chart=column_chart, spread_bars=spread_bars, days=days_text,
                       hours=hours_text, describe=describe, SUPPRESSED_TEXT=SUPPRESSED_TEXT,
                       ROUND_TO=ROUND_TO, SUPPRESS_BELOW=SUPPRESS_BELOW)
    return env.get_template("page.html.j2").render(page=page, t=page.totals)


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def summaries_dir(month: str) -> Path:
    """Where a month's pages go: SCHOOLSLINK_HOME/out/summaries/<YYYY-MM>/."""
    month_bounds(month)
    return settings.out_dir() / "summaries" / month


def build_month(month: str) -> SummaryCounts:
    """The DAG's step: `build_summaries` into `summaries_dir(month)`."""
    return build_summaries(month, summaries_dir(month))


def build_summaries(month: str, out_dir: Path) -> SummaryCounts:
    """Write `school-<URN>.html` and `trust-<ODS>.html` for `month` (YYYY-MM) into `out_dir`."""
    month_bounds(month)  # refuse a bad month before touching anything
    with store().connect() as conn:
        facts = collect(conn, month)
    pages = build_pages(month, facts, load_agreements())
    out_dir.mkdir(parents=True, exist_ok=True)
    for page in pages:
        _write(out_dir / f"{page.kind}-{page.code}.html", render(page))
    first, last = month_bounds(month)
    trusts = {p.code for p in pages if p.kind == "trust"}
    n_refs = sum(1 for r in facts.referrals
                 if r.trust_ods in trusts and r.received is not None and first <= r.received <= last)
    return SummaryCounts(sum(1 for p in pages if p.kind == "school"), len(trusts), n_refs,
                         sum(1 for c in facts.changes if c.reached_at is not None))
