"""Identity matching: no guessed identity.

A trust's Patient is matched only within the roll of the school it names, on keyed hashes (the match hash of name
and date of birth; the per-attribute `match_keys`), never on plain names. It links to a pupil when (the full rules,
weights and thresholds are in `schoolslink/governance/scoring.py`, for trust engineers in docs/identity-matching.md):

* the trust's NHS number is verified (01) and name + date of birth agree exactly with one pupil (the first rule); or
* the Fellegi-Sunter score is at least AUTO (28) and no other pupil scores REVIEW (15) or more; or
* the trust's verified NHS number is the one the school's MIS holds for the one candidate (date of birth agreeing);
* or, when a PDS trace is configured (off by default), PDS finds the trust's verified NHS number for the one
  candidate's details, as the school holds them (only pupils whose plain record the store keeps, i.e. with an
  active consent, can be traced);

and never when the pupil has a twin on the roll, is a sensitive case (looked after, adopted, child protection,
do-not-tell-parent) or the record is restricted. Anything else waits unlinked in the review queue with its reason
and best candidate (`match_candidates` keeps every candidate a reviewer should weigh, with its score and which
attributes agreed), and nothing about it is disclosed.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, delete, or_, select, update

from schoolslink.governance.scoring import (
    PDS_MIN_SCORE,
    Decision,
    LearnerFacts,
    PatientFacts,
    Roll,
    TraceFinding,
    after_trace,
    decide,
)
from schoolslink.keys import patient_key
from schoolslink.logfilter import remember_names
from schoolslink.model import MatchMethod, ReviewReason
from schoolslink.store.query import chunks
from schoolslink.store.schema import learners, links, match_candidates, patients, review_queue
from schoolslink.store.upsert import upsert

if TYPE_CHECKING:
    from connectors.pds.trace import PdsTrace

log = logging.getLogger(__name__)

KEEP_CANDIDATES = 10  # the most candidates kept in match_candidates for one Patient (best first)


@dataclass(frozen=True, slots=True)
class MatchCounts:
    linked: int
    review: int
    traced: int = 0  # PDS traces asked (0 unless a trace is configured)
    linked_by_trace: int = 0
    trace_failed: int = 0  # PDS did not answer usefully (error): those patients stay in review, tried next run


SENSITIVE_FLAGS = ("looked_after", "adopted", "child_protection", "do_not_tell_parent")


def is_sensitive(learner: Mapping[Any, Any]) -> bool:
    """A learners row flagged looked after, adopted, child protection or do-not-tell-parent."""
    return any(learner[f] for f in SENSITIVE_FLAGS)


def live_links(conn: Connection, learner_keys: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
    """The links that may carry disclosures: not withdrawn, and the trust's patient not restricted."""
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for part in chunks(sorted(set(learner_keys))):
        q = (select(links)
             .join(patients, (patients.c.trust_ods == links.c.trust_ods)
                   & (patients.c.patient_ref == links.c.patient_ref))
             .where(links.c.learner_key.in_(part), links.c.withdrawn.is_(False), patients.c.restricted.is_(False)))
        for r in conn.execute(q).mappings():
            out[r["learner_key"]].append(dict(r))
    return out


def suspend_sensitive(conn: Connection, run_id: str) -> int:
    """Suspend every live link whose pupil has become a sensitive case or whose patient became restricted.

    A link is checked when it is made and again every run: a child who becomes looked after, or a
    record the trust marks restricted, stops being disclosed from the next run, and waits for a person.
    A link a person confirmed knowing the case stands, until a new flag arises.
    """
    from schoolslink.governance.review import confirmed_for_case  # review builds on this module

    q = (
        select(links.c.learner_key, links.c.trust_ods, links.c.patient_ref, links.c.patient_key,
               links.c.confirmed_by, links.c.linked_run, patients.c.restricted, learners.c.school_urn,
               *(learners.c[f] for f in SENSITIVE_FLAGS))
        .join(learners, learners.c.learner_key == links.c.learner_key)
        .join(patients, (patients.c.trust_ods == links.c.trust_ods) & (patients.c.patient_ref == links.c.patient_ref))
        .where(links.c.withdrawn.is_(False))
        .where(or_(patients.c.restricted.is_(True), *(learners.c[f].is_(True) for f in SENSITIVE_FLAGS)))
    )
    hits = [dict(h) for h in conn.execute(q).mappings()]
    # A person who confirmed a link knowing every flag the pupil has now (match review confirm) decided it:
    # that link stands. A restricted patient never does; a flag that arose since sends it back for review.
    kept = confirmed_for_case(conn, [(h, h) for h in hits if not h["restricted"]])
    hits = [h for h in hits if (h["learner_key"], h["trust_ods"]) not in kept]
    for h in hits:
        conn.execute(update(links).where(links.c.learner_key == h["learner_key"], links.c.trust_ods == h["trust_ods"])
                     .values(withdrawn=True))
    upsert(conn, review_queue, [
        {"trust_ods": h["trust_ods"], "patient_ref": h["patient_ref"], "patient_key": h["patient_key"],
         "school_urn": h["school_urn"], "candidate_learner_key": h["learner_key"],
         "reason": ReviewReason.BECAME_SENSITIVE.value, "status": "open", "updated_run": run_id}
        for h in hits
    ], ["trust_ods", "patient_ref"])
    return len(hits)


def match_pending(conn: Connection, run_id: str, school_urns: Iterable[str] | None = None, *,
                  trace: PdsTrace | None = None) -> MatchCounts:
    """Match the trust patients (of these schools, or all) that have no link and no review decision.

    `trace`: a PDS trace to confirm a verified Patient's NHS number for a LOW_SCORE candidate's details (None, the
    default: no trace; nhs_sync passes the configured one, see `connectors.pds.client.PdsFhirClient.from_env`).
    """
    suspend_sensitive(conn, run_id)
    q = select(patients)
    urns = sorted(set(school_urns)) if school_urns is not None else None
    if urns is not None:
        q = q.where(patients.c.school_urn.in_(urns))
    pats = list(conn.execute(q).mappings())
    if not pats:
        return MatchCounts(0, 0)

    linked_refs = {
        (r.trust_ods, r.patient_ref) for r in conn.execute(select(links.c.trust_ods, links.c.patient_ref))
    }
    taken = {(r.learner_key, r.trust_ods) for r in conn.execute(select(links.c.learner_key, links.c.trust_ods))}
    decided = {
        (r.trust_ods, r.patient_ref)
        for r in conn.execute(
            select(review_queue.c.trust_ods, review_queue.c.patient_ref).where(review_queue.c.status != "open")
        )
    }
    settled = linked_refs | decided
    pats = [p for p in pats if (p["trust_ods"], p["patient_ref"]) not in settled]
    rolls = _rolls(conn, sorted({p["school_urn"] for p in pats if p["school_urn"]}))
    empty = Roll(())

    new_links: list[dict[str, Any]] = []
    reviews: list[dict[str, Any]] = []
    weighed: list[dict[str, Any]] = []
    tally: dict[str, int] = defaultdict(int)
    for p in pats:
        facts = PatientFacts(p["patient_key"], p["school_urn"], p["match_hash"], p["match_keys"], bool(p["verified"]),
                             bool(p["restricted"]))
        d = decide(facts, rolls.get(p["school_urn"] or "", empty))
        if d.traceable and trace is not None:
            d = _traced(conn, trace, d, facts, tally)
        c = d.candidate
        if d.links and c is not None and (c.learner.learner_key, p["trust_ods"]) in taken:
            d = Decision(ReviewReason.ALREADY_LINKED, c, (c,))
        if d.links and c is not None and d.method is not None:
            taken.add((c.learner.learner_key, p["trust_ods"]))
            tally["linked_by_trace"] += d.method is MatchMethod.PDS_TRACE
            new_links.append({
                "learner_key": c.learner.learner_key, "trust_ods": p["trust_ods"],
                "patient_key": p["patient_key"], "patient_ref": p["patient_ref"],
                "method": d.method.value, "confidence": d.confidence,
                "confirmed_by": None, "withdrawn": False, "linked_run": run_id,
            })
            continue
        reviews.append({
            "trust_ods": p["trust_ods"], "patient_ref": p["patient_ref"], "patient_key": p["patient_key"],
            "school_urn": p["school_urn"], "candidate_learner_key": c.learner.learner_key if c else None,
            "reason": (d.reason or ReviewReason.NO_CANDIDATE).value, "status": "open", "updated_run": run_id,
        })
        weighed.extend({
            "trust_ods": p["trust_ods"], "patient_ref": p["patient_ref"], "learner_key": cand.learner.learner_key,
            "rank": rank, "exact": cand.exact, "score": cand.score,
            "agreement": cand.comparison.pattern if cand.comparison is not None else None, "updated_run": run_id,
        } for rank, cand in enumerate(d.candidates[:KEEP_CANDIDATES], 1))
    # A link is never overwritten here: a learner already linked (or once linked and withdrawn) to a
    # patient of this trust is not re-pointed by a later match; that case waits for a person.
    upsert(conn, links, new_links, ["learner_key", "trust_ods"], update=False)
    # A patient that waited for its pupil's roll and now links leaves the review queue.
    for lk in new_links:
        conn.execute(delete(review_queue).where(review_queue.c.trust_ods == lk["trust_ods"],
                                                review_queue.c.patient_ref == lk["patient_ref"]))
    upsert(conn, review_queue, reviews, ["trust_ods", "patient_ref"])
    _replace_candidates(conn, [(p["trust_ods"], p["patient_ref"]) for p in pats], weighed)
    return MatchCounts(len(new_links), len(reviews), tally["traced"], tally["linked_by_trace"], tally["trace_failed"])


def _rolls(conn: Connection, schools: Sequence[str]) -> dict[str, Roll]:
    """The roll of each school, as keys and flags."""
    by_school: dict[str, list[LearnerFacts]] = defaultdict(list)
    for part in chunks(schools, 500):
        rows = conn.execute(
            select(
                learners.c.learner_key, learners.c.school_urn, learners.c.match_hash, learners.c.match_keys,
                learners.c.looked_after, learners.c.adopted, learners.c.child_protection,
                learners.c.do_not_tell_parent,
            ).where(learners.c.school_urn.in_(part))
        ).mappings()
        for r in rows:
            by_school[r["school_urn"]].append(
                LearnerFacts(r["learner_key"], r["match_hash"], r["match_keys"], is_sensitive(r)))
    return {urn: Roll(ls) for urn, ls in by_school.items()}


def _replace_candidates(conn: Connection, matched: Sequence[tuple[str, str]], rows: list[dict[str, Any]]) -> None:
    """What a reviewer weighs for each patient matched now replaces what was kept for it (nothing, once linked)."""
    by_trust: dict[str, list[str]] = defaultdict(list)
    for trust, ref in matched:
        by_trust[trust].append(ref)
    for trust, refs in by_trust.items():
        for part in chunks(sorted(refs)):
            conn.execute(delete(match_candidates).where(match_candidates.c.trust_ods == trust,
                                                        match_candidates.c.patient_ref.in_(part)))
    if rows:
        conn.execute(match_candidates.insert(), rows)


def _traced(conn: Connection, trace: PdsTrace, d: Decision, p: PatientFacts, tally: dict[str, int]) -> Decision:
    """Ask PDS whose NHS number the candidate's details are; only a pupil whose plain record we keep (an active
    consent) can be traced. A failed trace leaves the decision as it was (tried again next run)."""
    from connectors.pds.errors import PdsError

    if d.candidate is None:
        return d
    key = d.candidate.learner.learner_key
    plain = conn.execute(select(learners.c.plain).where(learners.c.learner_key == key)).scalar()
    if not isinstance(plain, Mapping) or not plain.get("surname") or not plain.get("forename") or not plain.get("dob"):
        return d
    tally["traced"] += 1
    remember_names((plain.get("surname"), plain.get("forename")))  # hidden if a PDS error ever quotes them
    try:
        found = trace.search(family=str(plain["surname"]), given=str(plain["forename"]), birthdate=str(plain["dob"]),
                             gender=plain.get("sex"), postcode=plain.get("postcode") or None)
    except PdsError as exc:
        tally["trace_failed"] += 1
        log.warning("PDS trace for patient %s (candidate %s) failed: %s", p.patient_key, key, exc)
        return d
    confident = [c for c in found if c.score is not None and c.score >= PDS_MIN_SCORE]
    return after_trace(d, p, TraceFinding(tuple(patient_key(c.nhs_number) for c in confident),
                                          any(c.restricted for c in found)))
