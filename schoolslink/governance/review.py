"""The identity review queue: what a person decides about links the matcher would not make, or made wrongly.

`schoolslink match review` calls these functions. Each decision is one transaction, and is recorded as a
run of `match_review` in the `runs` table (action, who, why, the rule met; pseudonymous keys and the
trust's Patient reference only), whose id the rows it changed carry (`links.linked_run`,
`review_queue.updated_run`, `outbox.run_id`).

Rules (DESIGN.md, "Governance rules"; for data engineers in docs/review-queue.md):

- confirm: a person links the trust's patient of an open item to a learner (the item's candidate, or the
  one named): method `confirmed_by_reviewer`, confidence 1.0, `confirmed_by` the reviewer's name; the item
  becomes `confirmed`. Refused (nothing changes) when the item is not open; when the patient is restricted
  (PDS `R`: never confirmed, never disclosed); when no learner is named or known; when the learner is not
  on the roll of the school the trust names; when the learner already has a live link to another patient
  of this trust, or a suspended one nobody has decided yet; when the patient is linked to another learner;
  and, for a sensitive case (looked after, adopted, child protection, do-not-tell-parent), unless for each
  of its flags one of that flag's rules (`CASE_RULES`) is stated met. A rule that names a consent is
  checked on the consent register for the day; the others are the reviewer's attestation, recorded.
- reject: the open item becomes `rejected`: the patient is never matched automatically again
  (`match_pending` skips every decided item).
- unlink: a link found wrong (made automatically or confirmed earlier) is withdrawn for good: its patient's
  item becomes `rejected` (so nothing re-links it), everything this trust was sent about the learner becomes
  due for retraction (outbox status `retract`), and every school that was sent status rows about the
  learner from this trust is owed one correction row in its next feed (`feed_rows.content_hash` holds
  `CORRECTION_DUE` + the decision id until the feed carries it). The retraction is sent by
  `schoolslink.pipeline.retraction`: first thing in the next mis_ingest delivery, or at once (`--now`).
- Reasons and names are staff text, stored in the runs table and the ledger: a reason that looks as if it
  holds an NHS number, a UPN or a date is refused, and nothing here prints or raises pupil data.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

from sqlalchemy import Connection, select, update

from schoolslink import outbox
from schoolslink.constants import PURPOSE_SUPPORT
from schoolslink.errors import DecisionRefused
from schoolslink.governance import register
from schoolslink.governance.matching import SENSITIVE_FLAGS
from schoolslink.model import Consent, ConsentDecision, ConsentGiver, MatchMethod, ReviewReason
from schoolslink.store.query import chunks
from schoolslink.store.schema import feed_rows, learners, links, patients, review_queue, runs
from schoolslink.store.upsert import upsert

DAG_ID = "match_review"  # the `runs.dag_id` of every review decision
OPEN, CONFIRMED, REJECTED = "open", "confirmed", "rejected"
# The reason an unlinked patient's item carries when it had none (the link was made automatically).
UNLINKED_REASON = "a reviewer found the link wrong and withdrew it (match review unlink): never re-linked"
# feed_rows.content_hash markers (a real hash is 64 hex digits, so neither can be mistaken for one):
CORRECTION_DUE = "retract:"  # + decision id: the school's next feed carries a correction row
CORRECTION_SENT = "retracted:"  # + decision id: the feed of feed_rows.feed_date carried it
MAX_REASON = 140  # with the decision id, it fits the ledger's 200-character "why"
MAX_NAME = 100  # links.confirmed_by
_LEARNER_FACTS = (learners.c.learner_key, learners.c.school_urn, learners.c.competent, learners.c.age_years,
                  *(learners.c[f] for f in SENSITIVE_FLAGS))

_LOOKS_IDENTIFYING = re.compile(
    r"\d{3}[ -]?\d{3}[ -]?\d{4}"  # an NHS number, as people write it
    r"|[A-Za-z]\d{11}[0-9A-Za-z]"  # a UPN
    r"|\d{1,4}[/.-]\d{1,2}[/.-]\d{1,4}"  # a date (of birth)
)


@dataclass(frozen=True, slots=True)
class CaseRule:
    """A rule of the agreement that must be met before a sensitive case's link is confirmed."""

    name: str
    meaning: str
    consent_of: ConsentGiver | None  # checked on the consent register; None: the reviewer attests it


RULES: dict[str, CaseRule] = {r.name: r for r in (
    CaseRule("local-authority-consent",
             "the local authority, which has parental responsibility for a looked-after child, has consented",
             ConsentGiver.LOCAL_AUTHORITY),
    CaseRule("young-person-consent",
             "the young person (16-17, or a younger child the school recorded as competent) has consented "
             "themselves", ConsentGiver.YOUNG_PERSON),
    CaseRule("post-adoption-identity-checked",
             "the trust's record is the child's record since adoption (new NHS number), not the birth record",
             None),
    CaseRule("safeguarding-lead-agreed",
             "the school's designated safeguarding lead and the child's social worker agree that sharing is safe",
             None),
)}
# For each sensitive flag, the rules of which one must be met (agreements/README.md, "Consent rules").
CASE_RULES: dict[str, tuple[str, ...]] = {
    "looked_after": ("local-authority-consent", "young-person-consent"),
    "adopted": ("post-adoption-identity-checked",),
    "child_protection": ("safeguarding-lead-agreed",),
    "do_not_tell_parent": ("young-person-consent",),
}


@dataclass(frozen=True, slots=True)
class ReviewItem:
    trust_ods: str
    patient_ref: str
    school_urn: str | None
    reason: str
    candidate_learner_key: str | None

    def to_json(self) -> dict[str, Any]:
        return {"trust_ods": self.trust_ods, "patient_ref": self.patient_ref, "school_urn": self.school_urn,
                "reason": self.reason, "candidate_learner_key": self.candidate_learner_key}


@dataclass(frozen=True, slots=True)
class Decision:
    """A recorded decision: its id (a `runs.run_id`) and what it changed. Keys and counts only."""

    decision_id: str
    action: str
    trust_ods: str
    patient_ref: str
    learner_key: str | None
    by: str
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"decision": self.decision_id, "action": self.action, "trust_ods": self.trust_ods,
                "patient_ref": self.patient_ref, "learner_key": self.learner_key, "by": self.by, **self.details}


def open_items(conn: Connection, school_urn: str | None = None, trust_ods: str | None = None) -> list[ReviewItem]:
    """The open items, oldest trust and reference first, of one school and/or trust (or all)."""
    q = select(review_queue).where(review_queue.c.status == OPEN)
    if school_urn is not None:
        q = q.where(review_queue.c.school_urn == school_urn)
    if trust_ods is not None:
        q = q.where(review_queue.c.trust_ods == trust_ods)
    q = q.order_by(review_queue.c.trust_ods, review_queue.c.school_urn, review_queue.c.patient_ref)
    return [ReviewItem(r["trust_ods"], r["patient_ref"], r["school_urn"], r["reason"], r["candidate_learner_key"])
            for r in conn.execute(q).mappings()]


def decision_record(conn: Connection, decision_id: str) -> dict[str, Any] | None:
    """The summary a decision recorded (action, by, reason, ...), or None if there is no such decision."""
    row = conn.execute(select(runs.c.summary).where(runs.c.run_id == decision_id, runs.c.dag_id == DAG_ID)).first()
    return dict(row[0]) if row is not None and isinstance(row[0], dict) else None


def retraction_reason(conn: Connection, decision_id: str) -> str:
    """What a retraction's ledger entry gives as its "why": the unlink decision's id and its reason."""
    rec = decision_record(conn, decision_id) or {}
    return f"{decision_id}: {rec.get('reason') or 'link withdrawn as wrong'}"[:200]


def check_staff_text(what: str, text: str, limit: int) -> str:
    """A reviewer's name or reason, stripped; refused if empty, too long, or shaped like a pupil identifier."""
    text = " ".join(text.split())
    if not text:
        raise DecisionRefused(f"{what} must not be empty")
    if len(text) > limit:
        raise DecisionRefused(f"{what} is longer than {limit} characters")
    if _LOOKS_IDENTIFYING.search(text):
        raise DecisionRefused(f"{what} looks as if it holds an NHS number, a UPN or a date: write it without "
                              "pupil identifiers (they would be kept in the run record and the ledger)")
    return text


def confirm(conn: Connection, trust_ods: str, patient_ref: str, *, by: str, at: datetime, on: date,
            learner_key: str | None = None, rules_met: Sequence[str] = ()) -> Decision:
    """Link the open item's patient to the learner (its candidate, or `learner_key`), as a person decided."""
    by = check_staff_text("the reviewer's name", by, MAX_NAME)
    item = _item(conn, trust_ods, patient_ref)
    if item is None or item["status"] != OPEN:
        state = "no review item" if item is None else f"the review item is already {item['status']}"
        raise DecisionRefused(f"{state} for {trust_ods} {patient_ref}: only an open item can be confirmed")
    pat = conn.execute(select(patients.c.patient_key, patients.c.restricted)
                       .where(patients.c.trust_ods == trust_ods, patients.c.patient_ref == patient_ref)
                       ).mappings().first()
    if pat is None:
        raise DecisionRefused(f"{trust_ods} {patient_ref} is not in the state store: run nhs_sync first")
    if pat["restricted"] or item["reason"] == ReviewReason.RESTRICTED.value:
        raise DecisionRefused(f"{trust_ods} {patient_ref} is a restricted record (PDS R): it is never confirmed "
                              "and nothing about it is ever disclosed")
    key = learner_key or item["candidate_learner_key"]
    if not key:
        raise DecisionRefused("this item has no candidate learner: name the learner with --learner KEY")
    lr = conn.execute(select(*_LEARNER_FACTS).where(learners.c.learner_key == key)).mappings().first()
    if lr is None:
        raise DecisionRefused(f"no learner {key} on any school's roll")
    if item["school_urn"] and lr["school_urn"] != item["school_urn"]:
        raise DecisionRefused(f"learner {key} is not on the roll of school {item['school_urn']}, the school the "
                              "trust's record names: the trust must correct the school first")
    existing = conn.execute(select(links).where(links.c.learner_key == key,
                                                links.c.trust_ods == trust_ods)).mappings().first()
    if existing is not None and existing["patient_ref"] != patient_ref:
        if not existing["withdrawn"]:
            raise DecisionRefused(f"learner {key} is already linked to another patient of {trust_ods}: if that "
                                  "link is wrong, unlink it first (match review unlink)")
        other = _item(conn, trust_ods, existing["patient_ref"])
        if other is None or other["status"] != REJECTED:
            raise DecisionRefused(f"learner {key} has a suspended link to another patient of {trust_ods} that "
                                  "waits for a decision: decide that item first")
    taken = conn.execute(select(links.c.learner_key).where(
        links.c.trust_ods == trust_ods, links.c.patient_ref == patient_ref, links.c.withdrawn.is_(False),
        links.c.learner_key != key)).first()
    if taken is not None:
        raise DecisionRefused(f"{trust_ods} {patient_ref} is already linked to another learner")
    flags = [f for f in SENSITIVE_FLAGS if lr[f]]
    met = _rules_met(conn, lr, pat["patient_key"], flags, rules_met, on)

    decision_id = _decision_id("confirm", at)
    upsert(conn, links, [{
        "learner_key": key, "trust_ods": trust_ods, "patient_key": pat["patient_key"], "patient_ref": patient_ref,
        "method": MatchMethod.CONFIRMED_BY_REVIEWER.value, "confidence": 1.0, "confirmed_by": by,
        "withdrawn": False, "linked_run": decision_id,
    }], ["learner_key", "trust_ods"])
    conn.execute(update(review_queue)
                 .where(review_queue.c.trust_ods == trust_ods, review_queue.c.patient_ref == patient_ref)
                 .values(status=CONFIRMED, candidate_learner_key=key, updated_run=decision_id))
    decision = Decision(decision_id, "confirm", trust_ods, patient_ref, key, by,
                        {"item_reason": item["reason"], "case_flags": flags, "rules_met": met})
    _record(conn, decision, at)
    return decision


def reject(conn: Connection, trust_ods: str, patient_ref: str, *, by: str, at: datetime,
           reason: str | None = None) -> Decision:
    """The open item is decided: no link. Its patient is never matched automatically again."""
    by = check_staff_text("the reviewer's name", by, MAX_NAME)
    why = check_staff_text("the reason", reason, MAX_REASON) if reason is not None else None
    item = _item(conn, trust_ods, patient_ref)
    if item is None or item["status"] != OPEN:
        state = "no review item" if item is None else f"the review item is already {item['status']}"
        raise DecisionRefused(f"{state} for {trust_ods} {patient_ref}: only an open item can be rejected")
    decision_id = _decision_id("reject", at)
    conn.execute(update(review_queue)
                 .where(review_queue.c.trust_ods == trust_ods, review_queue.c.patient_ref == patient_ref)
                 .values(status=REJECTED, updated_run=decision_id))
    decision = Decision(decision_id, "reject", trust_ods, patient_ref, item["candidate_learner_key"], by,
                        {"item_reason": item["reason"], "reason": why})
    _record(conn, decision, at)
    return decision


def unlink(conn: Connection, learner_key: str, trust_ods: str, *, by: str, reason: str, at: datetime) -> Decision:
    """Withdraw a link found wrong, and make everything sent under it due for retraction (see the module doc)."""
    by = check_staff_text("the reviewer's name", by, MAX_NAME)
    why = check_staff_text("the reason", reason, MAX_REASON)
    link = conn.execute(select(links).where(links.c.learner_key == learner_key,
                                            links.c.trust_ods == trust_ods)).mappings().first()
    if link is None:
        raise DecisionRefused(f"learner {learner_key} has no link to a patient of {trust_ods}")
    decision_id = _decision_id("unlink", at)
    patient_ref = link["patient_ref"]
    conn.execute(update(links).where(links.c.learner_key == learner_key, links.c.trust_ods == trust_ods)
                 .values(withdrawn=True))
    item = _item(conn, trust_ods, patient_ref)
    if item is None:
        school = conn.execute(select(learners.c.school_urn)
                              .where(learners.c.learner_key == learner_key)).scalar()
        upsert(conn, review_queue, [{
            "trust_ods": trust_ods, "patient_ref": patient_ref, "patient_key": link["patient_key"],
            "school_urn": school, "candidate_learner_key": learner_key, "reason": UNLINKED_REASON,
            "status": REJECTED, "updated_run": decision_id,
        }], ["trust_ods", "patient_ref"])
    else:
        conn.execute(update(review_queue)
                     .where(review_queue.c.trust_ods == trust_ods, review_queue.c.patient_ref == patient_ref)
                     .values(status=REJECTED, updated_run=decision_id))
    resources = outbox.mark_for_retraction(conn, f"fhir:{trust_ods}", learner_key, decision_id)
    corrections = 0
    for r in conn.execute(select(feed_rows).where(feed_rows.c.learner_key == learner_key,
                                                  feed_rows.c.trust_ods == trust_ods)).mappings():
        if is_marker(r["content_hash"]):
            continue  # a correction is already due, or the school already had one and no status since
        conn.execute(update(feed_rows)
                     .where(feed_rows.c.school_urn == r["school_urn"], feed_rows.c.learner_key == learner_key,
                            feed_rows.c.trust_ods == trust_ods)
                     .values(content_hash=CORRECTION_DUE + decision_id))
        corrections += 1
    decision = Decision(decision_id, "unlink", trust_ods, patient_ref, learner_key, by, {
        "reason": why, "link_method": link["method"], "was_withdrawn": bool(link["withdrawn"]),
        "retractions_due": resources, "feed_corrections_due": corrections,
    })
    _record(conn, decision, at)
    return decision


def unlink_decisions(conn: Connection, trust_ods: str, learner_keys: Sequence[str]) -> dict[str, str]:
    """For those of these learners whose link with the trust was unlinked as wrong: the decision's id.

    What a delivery that raced an unlink (sent after the decision was committed) uses to make what it just
    sent due for retraction too.
    """
    out: dict[str, str] = {}
    for part in chunks(sorted(set(learner_keys))):
        q = (select(links.c.learner_key, review_queue.c.updated_run)
             .join(review_queue, (review_queue.c.trust_ods == links.c.trust_ods)
                   & (review_queue.c.patient_ref == links.c.patient_ref))
             .where(links.c.trust_ods == trust_ods, links.c.learner_key.in_(part), links.c.withdrawn.is_(True),
                    review_queue.c.status == REJECTED,
                    review_queue.c.updated_run.startswith(f"{DAG_ID}__unlink__", autoescape=True)))
        out.update({r.learner_key: r.updated_run for r in conn.execute(q)})
    return out


def is_marker(content_hash: str | None) -> bool:
    return bool(content_hash) and str(content_hash).startswith((CORRECTION_DUE, CORRECTION_SENT))


def _item(conn: Connection, trust_ods: str, patient_ref: str) -> dict[str, Any] | None:
    row = conn.execute(select(review_queue).where(review_queue.c.trust_ods == trust_ods,
                                                  review_queue.c.patient_ref == patient_ref)).mappings().first()
    return dict(row) if row is not None else None


def _rules_met(conn: Connection, lr: dict[str, Any] | Any, patient_key: str, flags: list[str],
               stated: Sequence[str], on: date) -> list[str]:
    """The stated rules, checked: each flag needs one of its rules; consent rules must hold on the register."""
    unknown = sorted(set(stated) - set(RULES))
    if unknown:
        raise DecisionRefused(f"unknown rule(s) {', '.join(unknown)}; known: {', '.join(sorted(RULES))}")
    if not flags:
        return sorted(set(stated))
    records: list[Consent] | None = None
    for flag in flags:
        options = CASE_RULES[flag]
        chosen = [r for r in options if r in stated]
        if not chosen:
            raise DecisionRefused(f"a sensitive case ({flag.replace('_', '-')}): confirming it needs --rule-met "
                                  f"naming the agreement's rule that is met, one of: {', '.join(options)}")
        for name in chosen:
            giver = RULES[name].consent_of
            if giver is None:
                continue
            if records is None:
                everyone = register.load_for(conn, [lr["learner_key"], patient_key])
                records = register.for_school([c for recs in everyone.values() for c in recs], lr["school_urn"])
            if not _consent_holds(records, giver, lr, on):
                raise DecisionRefused(f"rule {name} is not met: the consent register has no active consent from "
                                      f"{giver.value.replace('_', ' ')} for {PURPOSE_SUPPORT} on {on.isoformat()}"
                                      + (" that counts (the young person is under 16 and not recorded as "
                                         "competent)" if giver is ConsentGiver.YOUNG_PERSON else ""))
    return sorted(set(stated))


def _consent_holds(records: list[Consent], giver: ConsentGiver, lr: Any, on: date) -> bool:
    """An active permit from `giver` for the purpose on `on`, and no refusal from them (refusal wins)."""
    if giver is ConsentGiver.YOUNG_PERSON and not (lr["competent"] or (lr["age_years"] or 0) >= 16):
        return False
    live = [c for c in records
            if c.given_by is giver and PURPOSE_SUPPORT in c.purposes and c.valid_from <= on
            and (c.valid_to is None or on <= c.valid_to) and (c.withdrawn_on is None or c.withdrawn_on > on)]
    return (any(c.decision is ConsentDecision.PERMIT for c in live)
            and not any(c.decision is ConsentDecision.DENY for c in live))


def _decision_id(action: str, at: datetime) -> str:
    return f"{DAG_ID}__{action}__{at.strftime('%Y%m%dT%H%M%S%f')}__{secrets.token_hex(3)}"


def _record(conn: Connection, d: Decision, at: datetime) -> None:
    summary = {"action": d.action, "trust_ods": d.trust_ods, "patient_ref": d.patient_ref,
               "learner_key": d.learner_key, "by": d.by, **d.details}
    upsert(conn, runs, [{"run_id": d.decision_id, "dag_id": DAG_ID, "started_at": at, "finished_at": at,
                         "summary": summary}], ["run_id"])


def confirmed_for_case(conn: Connection, pairs: list[tuple[Any, dict[str, Any]]]) -> set[tuple[str, str]]:
    """Of these (learner row, link row) pairs, the (learner key, trust) whose link a person confirmed knowing
    every sensitive flag the learner has now (`match review confirm`, with a rule met for each). A flag that
    arose after the confirmation is not covered: that link waits for a person again."""
    wanted = {lk["linked_run"] for lr, lk in pairs if lk.get("confirmed_by") and lk.get("linked_run")}
    if not wanted:
        return set()
    flags_at: dict[str, set[str]] = {}
    for run_id, summary in conn.execute(select(runs.c.run_id, runs.c.summary).where(
            runs.c.dag_id == DAG_ID, runs.c.run_id.in_(sorted(wanted)))):
        if isinstance(summary, dict) and summary.get("action") == "confirm":
            flags_at[run_id] = set(summary.get("case_flags") or ())
    out = set()
    for lr, lk in pairs:
        known = flags_at.get(lk.get("linked_run") or "")
        if known is not None and {f for f in SENSITIVE_FLAGS if lr[f]} <= known:
            out.add((lr["learner_key"], lk["trust_ods"]))
    return out
