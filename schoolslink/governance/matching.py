"""The first identity match: no guessed identity.

A trust's Patient links to a learner only when the Patient's NHS number is verified (status 01), the
trust names the school, and name + date of birth agree (as a keyed match hash) with exactly one
learner on that school's roll, and neither side is a sensitive case. Anything else waits unlinked in
the review queue with its reason, and nothing about it is disclosed. The governance issue adds scored
demographic matching, PDS-style traces and `schoolslink match review`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, delete, or_, select, update

from schoolslink.model import MatchMethod, ReviewReason
from schoolslink.store.query import chunks
from schoolslink.store.schema import learners, links, patients, review_queue
from schoolslink.store.upsert import upsert


@dataclass(frozen=True, slots=True)
class MatchCounts:
    linked: int
    review: int


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
    """
    q = (
        select(links.c.learner_key, links.c.trust_ods, links.c.patient_ref, links.c.patient_key,
               learners.c.school_urn)
        .join(learners, learners.c.learner_key == links.c.learner_key)
        .join(patients, (patients.c.trust_ods == links.c.trust_ods) & (patients.c.patient_ref == links.c.patient_ref))
        .where(links.c.withdrawn.is_(False))
        .where(or_(patients.c.restricted.is_(True), *(learners.c[f].is_(True) for f in SENSITIVE_FLAGS)))
    )
    hits = list(conn.execute(q).mappings())
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


def match_pending(conn: Connection, run_id: str, school_urns: Iterable[str] | None = None) -> MatchCounts:
    """Match the trust patients (of these schools, or all) that have no link and no review decision."""
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
    need_schools = sorted({p["school_urn"] for p in pats if p["school_urn"]})

    roll: dict[tuple[str, str], list[dict[str, object]]] = defaultdict(list)
    for part in chunks(need_schools, 500):
        rows = conn.execute(
            select(
                learners.c.learner_key, learners.c.school_urn, learners.c.match_hash,
                learners.c.looked_after, learners.c.adopted, learners.c.child_protection,
                learners.c.do_not_tell_parent,
            ).where(learners.c.school_urn.in_(part))
        ).mappings()
        for r in rows:
            roll[(r["school_urn"], r["match_hash"])].append(dict(r))

    new_links, reviews = [], []
    for p in pats:
        reason: ReviewReason | None = None
        candidate = None
        if p["restricted"]:
            reason = ReviewReason.RESTRICTED
        elif not p["school_urn"]:
            reason = ReviewReason.NO_SCHOOL_NAMED
        elif not p["verified"]:
            reason = ReviewReason.UNVERIFIED_NHS_NUMBER
        else:
            cands = roll.get((p["school_urn"], p["match_hash"]), [])
            if not cands:
                reason = ReviewReason.NO_CANDIDATE
            elif len(cands) > 1:
                reason = ReviewReason.SEVERAL_CANDIDATES
            else:
                candidate = cands[0]
                if is_sensitive(candidate):
                    reason = ReviewReason.SENSITIVE_CASE
                elif (candidate["learner_key"], p["trust_ods"]) in taken:
                    reason = ReviewReason.ALREADY_LINKED
        if reason is None and candidate is not None:
            taken.add((candidate["learner_key"], p["trust_ods"]))
            new_links.append({
                "learner_key": candidate["learner_key"], "trust_ods": p["trust_ods"],
                "patient_key": p["patient_key"], "patient_ref": p["patient_ref"],
                "method": MatchMethod.VERIFIED_NHS_NUMBER_NAME_DOB.value, "confidence": 1.0,
                "confirmed_by": None, "withdrawn": False, "linked_run": run_id,
            })
        else:
            reviews.append({
                "trust_ods": p["trust_ods"], "patient_ref": p["patient_ref"], "patient_key": p["patient_key"],
                "school_urn": p["school_urn"],
                "candidate_learner_key": candidate["learner_key"] if candidate else None,
                "reason": (reason or ReviewReason.NO_CANDIDATE).value, "status": "open", "updated_run": run_id,
            })
    # A link is never overwritten here: a learner already linked (or once linked and withdrawn) to a
    # patient of this trust is not re-pointed by a later match; that case waits for a person.
    upsert(conn, links, new_links, ["learner_key", "trust_ods"], update=False)
    # A patient that waited for its pupil's roll and now links leaves the review queue.
    for lk in new_links:
        conn.execute(delete(review_queue).where(review_queue.c.trust_ods == lk["trust_ods"],
                                                review_queue.c.patient_ref == lk["patient_ref"]))
    upsert(conn, review_queue, reviews, ["trust_ods", "patient_ref"])
    return MatchCounts(len(new_links), len(reviews))
