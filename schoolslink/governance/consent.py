"""The consent rules: who decides, and whether a data item may go in a direction for a purpose today.

Rules (DESIGN.md, "Governance rules"; written out for data engineers in agreements/README.md):
- A young person aged 16-17 with capacity, or a younger child the school recorded as competent
  (Gillick), decides for themselves: their own records govern and parents' records are not consulted.
- Otherwise a person with parental responsibility decides; for a looked-after child that is the
  local authority. If two with parental responsibility disagree, refusal wins.
- A record counts only on the days it is valid (valid_from..valid_to), before any withdrawal, and
  only for the directions, purposes and (where it lists them) data items it names.
- No record that counts means no consent: nothing is shared.

`decide` is pure: it takes the records and the facts, and returns the decision and its reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date
from typing import TYPE_CHECKING, Any

from schoolslink.model import Consent, ConsentDecision, ConsentGiver, Direction

if TYPE_CHECKING:
    from schoolslink.governance.agreement import Agreement


@dataclass(frozen=True, slots=True)
class ConsentFacts:
    age_years: int | None
    competent: bool  # the school recorded the child as competent to decide (Gillick)
    looked_after: bool

    @classmethod
    def of(cls, learner: Mapping[Any, Any]) -> ConsentFacts:
        """The facts as the state store's learners row holds them."""
        return cls(learner["age_years"], bool(learner["competent"]), bool(learner["looked_after"]))


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    reason: str
    consent_id: str | None = None


def _applies(c: Consent, direction: Direction, purpose: str, item: str | None, at: date) -> bool:
    if direction not in c.directions or purpose not in c.purposes:
        return False
    if item is not None and c.data_items is not None and item not in c.data_items:
        return False
    if c.valid_from > at:
        return False
    return not (c.valid_to is not None and at > c.valid_to)


def decide(
    records: list[Consent],
    facts: ConsentFacts,
    direction: Direction,
    purpose: str,
    at: date,
    item: str | None = None,
) -> Decision:
    """May `item` (or, with None, the record as a whole) go in `direction` for `purpose` on `at`?"""
    in_scope = [c for c in records if _applies(c, direction, purpose, item, at)]
    withdrawn = [c for c in in_scope if c.withdrawn_on is not None and c.withdrawn_on <= at]
    live = [c for c in in_scope if c.withdrawn_on is None or c.withdrawn_on > at]

    decides_for_self = facts.competent or (facts.age_years is not None and facts.age_years >= 16)
    if decides_for_self:
        deciders = [c for c in live if c.given_by is ConsentGiver.YOUNG_PERSON]
        who = "the young person"
    elif facts.looked_after:
        deciders = [c for c in live if c.given_by is ConsentGiver.LOCAL_AUTHORITY]
        who = "the local authority (looked-after child)"
    else:
        deciders = [c for c in live if c.given_by is ConsentGiver.PARENT]
        who = "a person with parental responsibility"

    refusals = [c for c in deciders if c.decision is ConsentDecision.DENY]
    if refusals:
        first = min(refusals, key=lambda c: c.consent_id)
        return Decision(False, f"refused by {who}", first.consent_id)
    permits = [c for c in deciders if c.decision is ConsentDecision.PERMIT]
    if permits:
        newest = max(permits, key=lambda c: (c.valid_from, c.consent_id))
        return Decision(True, f"consent given by {who}", newest.consent_id)
    if withdrawn:
        last = max(withdrawn, key=lambda c: (c.withdrawn_on or at, c.consent_id))
        return Decision(False, "consent withdrawn", last.consent_id)
    if any(c.given_by is not ConsentGiver.YOUNG_PERSON for c in live) and decides_for_self:
        return Decision(False, "the young person decides for themselves and has not consented")
    return Decision(False, f"no consent from {who} covers {direction.value} for {purpose}")


def allowed_items(
    agreement: Agreement, records: list[Consent], facts: ConsentFacts, direction: Direction, purpose: str, at: date
) -> tuple[frozenset[str], str | None]:
    """Agreement ∩ consent: the items that may go, and the consent id that allows them (None: nothing may)."""
    items, consent_id = set(), None
    for item in sorted(agreement.allowed(direction)):
        d = decide(records, facts, direction, purpose, at, item)
        if d.allowed:
            items.add(item)
            consent_id = consent_id or d.consent_id
    return frozenset(items), consent_id
