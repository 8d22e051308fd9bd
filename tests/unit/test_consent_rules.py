"""The consent rules, case by case (agreements/README.md states them for data engineers)."""

from __future__ import annotations

from datetime import date

from schoolslink.governance.consent import ConsentFacts, decide
from schoolslink.model import Consent, ConsentDecision, ConsentGiver, Direction

P = "cypmhs-school-support"
S2T, T2S = Direction.SCHOOL_TO_TRUST, Direction.TRUST_TO_SCHOOL
DAY = date(2026, 11, 26)
CHILD = ConsentFacts(age_years=12, competent=False, looked_after=False)


def c(cid: str, who: ConsentGiver, decision: ConsentDecision = ConsentDecision.PERMIT, *,
      directions: tuple[Direction, ...] = (S2T, T2S), frm: date = date(2026, 9, 1), to: date | None = None,
      withdrawn: date | None = None, items: tuple[str, ...] | None = None) -> Consent:
    return Consent(cid, "lrn-x", who, decision, directions, (P,), frm, to, withdrawn_on=withdrawn, data_items=items)


def test_no_record_means_no_sharing() -> None:
    d = decide([], CHILD, S2T, P, DAY)
    assert not d.allowed and "no consent" in d.reason


def test_parent_permit_covers_only_its_directions_and_purpose() -> None:
    recs = [c("a", ConsentGiver.PARENT, directions=(S2T,))]
    assert decide(recs, CHILD, S2T, P, DAY).allowed
    assert not decide(recs, CHILD, T2S, P, DAY).allowed
    assert not decide(recs, CHILD, S2T, "research", DAY).allowed


def test_two_parents_disagree_refusal_wins() -> None:
    recs = [c("a", ConsentGiver.PARENT), c("b", ConsentGiver.PARENT, ConsentDecision.DENY)]
    d = decide(recs, CHILD, S2T, P, DAY)
    assert not d.allowed and d.reason.startswith("refused") and d.consent_id == "b"


def test_withdrawal_stops_from_its_date() -> None:
    recs = [c("a", ConsentGiver.PARENT, withdrawn=date(2026, 11, 20))]
    assert decide(recs, CHILD, S2T, P, date(2026, 11, 19)).allowed
    d = decide(recs, CHILD, S2T, P, DAY)
    assert not d.allowed and d.reason == "consent withdrawn"


def test_expired_and_future_records_do_not_count() -> None:
    assert not decide([c("a", ConsentGiver.PARENT, to=date(2026, 10, 31))], CHILD, S2T, P, DAY).allowed
    assert not decide([c("a", ConsentGiver.PARENT, frm=date(2026, 12, 1))], CHILD, S2T, P, DAY).allowed


def test_sixteen_year_old_decides_for_themselves() -> None:
    older = ConsentFacts(age_years=16, competent=False, looked_after=False)
    assert not decide([c("a", ConsentGiver.PARENT)], older, S2T, P, DAY).allowed
    assert decide([c("y", ConsentGiver.YOUNG_PERSON)], older, S2T, P, DAY).allowed
    # Their refusal wins over a parent's permit.
    recs = [c("a", ConsentGiver.PARENT), c("y", ConsentGiver.YOUNG_PERSON, ConsentDecision.DENY)]
    assert not decide(recs, older, S2T, P, DAY).allowed


def test_competent_younger_child_decides() -> None:
    gillick = ConsentFacts(age_years=14, competent=True, looked_after=False)
    assert decide([c("y", ConsentGiver.YOUNG_PERSON)], gillick, S2T, P, DAY).allowed
    assert not decide([c("a", ConsentGiver.PARENT)], gillick, S2T, P, DAY).allowed


def test_looked_after_child_needs_the_local_authority() -> None:
    lac = ConsentFacts(age_years=10, competent=False, looked_after=True)
    assert not decide([c("a", ConsentGiver.PARENT)], lac, S2T, P, DAY).allowed
    assert decide([c("la", ConsentGiver.LOCAL_AUTHORITY)], lac, S2T, P, DAY).allowed


def test_item_scoped_consent() -> None:
    recs = [c("a", ConsentGiver.PARENT, items=("attendance_percent",))]
    assert decide(recs, CHILD, S2T, P, DAY, "attendance_percent").allowed
    assert not decide(recs, CHILD, S2T, P, DAY, "sen_provision").allowed
