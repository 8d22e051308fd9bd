"""`may_share`: may this data item about this learner go to (or come from) this trust, for this purpose, today?

The one question every disclosure must answer "yes" to, asked of the state store as it is now, with the
reason either way (for the run report, `match review`, and a DPO asking why something was or was not sent).
In order, the first "no" wins:

1. the learner is on a school's roll (the state store knows them) and has not left;
2. there is a live link between the learner and the trust's patient: not withdrawn, the patient not
   restricted (a restricted record is never disclosed);
3. a sensitive case (looked after, adopted, child protection, do-not-tell-parent) only once a person has
   confirmed the link knowing every flag the learner now has, with the rule for each met (`match review
   confirm --rule-met`), never on an automatic match;
4. an active agreement between the learner's school and the trust, for the purpose, lists the item for the
   direction (an agreement for another purpose never lends its items);
5. consent, under the rules in schoolslink/governance/consent.py (who decides; refusal wins; validity dates;
   withdrawal), covers the item for the direction and purpose on the day.

The pipeline's stages apply the same rules in bulk (schoolslink/pipeline/ingest.py at extraction,
schoolslink/pipeline/delivery.py just before delivery, schoolslink/feeds.py for the school feed); tests hold
them to agree with this function.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

from sqlalchemy import Connection, select

from schoolslink.governance import register
from schoolslink.governance.agreement import Agreement, agreement_for
from schoolslink.governance.consent import ConsentFacts, decide
from schoolslink.governance.matching import is_sensitive, live_links
from schoolslink.governance.review import confirmed_for_case
from schoolslink.model import Direction
from schoolslink.store.schema import learners


@dataclass(frozen=True, slots=True)
class ShareDecision:
    allowed: bool
    reason: str
    consent_id: str | None = None
    agreement_id: str | None = None
    agreement_version: str | None = None


def may_share(conn: Connection, agreements: list[Agreement], learner_key: str, trust_ods: str,
              direction: Direction, purpose: str, item: str, at: date) -> ShareDecision:
    """The decision, and its reason, for one item about one learner between their school and one trust."""
    row = conn.execute(select(learners).where(learners.c.learner_key == learner_key)).mappings().first()
    if row is None:
        return ShareDecision(False, "the learner is not on any school's roll")
    if row["left_school"]:
        return ShareDecision(False, "the learner has left the school")
    link = next((lk for lk in live_links(conn, [learner_key]).get(learner_key, []) if lk["trust_ods"] == trust_ods),
                None)
    if link is None:
        return ShareDecision(False, "no live link to a patient of this trust (none made, withdrawn, or restricted)")
    if is_sensitive(row) and (learner_key, trust_ods) not in confirmed_for_case(conn, [(row, link)]):
        return ShareDecision(False, "a sensitive case: nothing is shared until a person confirms the link knowing "
                                    "the case, with the agreement's rule for it met (match review confirm)")
    agreement = agreement_for(agreements, row["school_urn"], trust_ods, at, purpose)
    if agreement is None:
        return ShareDecision(False, f"no active agreement between school {row['school_urn']} and {trust_ods} "
                                    f"for {purpose} on {at.isoformat()}")
    if item not in agreement.allowed(direction):
        return ShareDecision(False, f"agreement {agreement.id} v{agreement.version} does not list {item} for "
                                    f"{direction.value}", None, agreement.id, agreement.version)
    records = register.for_school(
        [c for recs in register.load_for(conn, [learner_key, link["patient_key"]]).values() for c in recs],
        row["school_urn"])
    d = decide(records, ConsentFacts.of(row), direction, purpose, at, item)
    return ShareDecision(d.allowed and d.consent_id is not None, d.reason, d.consent_id, agreement.id,
                         agreement.version)
