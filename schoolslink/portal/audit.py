"""What the portal records: what it showed about whom in the ledger, and everything else in `portal_events`.

The ledger (schoolslink/ledger.py, docs/audit-ledger.md) gets one entry per pupil row a page or download showed:
recipient `portal:<user id>`, subject the pupil's learner key (the ledger turns it into its subject pseudonym),
direction trust_to_school, DAG `portal`, task `feed_page`, `pupil_page` or `download:<file>`, run
`portal-<YYYY-MM-DD>` (UK date), the data items the row filled, and the agreement, consent and mapping version of
the feed entry that first disclosed the row to the school; content hash = SHA-256 of the row as shown (the
feed's own hash of it). `schoolslink audit query --recipient portal:<id>` lists them; `--upn` finds them too.

`portal_events` (never pupil data, a pupil id, a password or a code) keeps sign-ins and their failures,
sign-outs, ended sessions, account changes, summary views, and every refused request: a page, pupil or file
of a school (or trust) the user may not see, answered 404 like a page that does not exist. A refusal discloses
nothing, so it is not a ledger entry.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import Connection, insert, select

from schoolslink import keys, ledger
from schoolslink.feeds import COLUMN_ITEMS, CORRECTION_CODE, CORRECTION_VERSION
from schoolslink.feeds import _hash as row_hash  # the feed's own hash of a row as the school received it
from schoolslink.model import Direction, Disclosure
from schoolslink.store.schema import ledger as ledger_table
from schoolslink.store.schema import portal_events

LONDON = ZoneInfo("Europe/London")
DAG_ID = "portal"


def event(conn: Connection, at: datetime, kind: str, *, user_id: str | None = None, organisation: str | None = None,
          detail: str | None = None) -> None:
    conn.execute(insert(portal_events).values(at=at, user_id=user_id, event=kind[:30],
                                              organisation=(organisation or None) and organisation[:10],
                                              detail=(detail or None) and detail[:300]))


def items_shown(row: dict[str, Any]) -> tuple[str, ...]:
    """The data items a feed row's filled columns carry (a correction row: `retraction`)."""
    if row.get("status_code") == CORRECTION_CODE:
        return (ledger.RETRACTION,)
    items = {item for col, (item, _) in COLUMN_ITEMS.items() if row.get(col) not in (None, "")}
    if row.get("status_code"):
        items.add("referral_status")
    if row.get("days_waiting") not in (None, ""):
        items.add("days_waiting")
    return tuple(sorted(items))


def _feed_entries(conn: Connection, urn: str, learner_keys: Sequence[str]) -> dict[str, tuple[str, str, str]]:
    """learner key -> (agreement id, version, consent id) of the latest feed entry to the school about them."""
    subject_of = {s: lk for lk in set(learner_keys) for s in ledger.subjects_of(lk)}
    out: dict[str, tuple[str, str, str]] = {}
    subjects = sorted(subject_of)
    for i in range(0, len(subjects), 500):
        q = (select(ledger_table.c.subject_key, ledger_table.c.agreement_id, ledger_table.c.agreement_version,
                    ledger_table.c.consent_id)
             .where(ledger_table.c.subject_key.in_(subjects[i:i + 500]), ledger_table.c.recipient == f"URN:{urn}",
                    ledger_table.c.dag_id == "school_feeds", ledger_table.c.data_items != ledger.RETRACTION)
             .order_by(ledger_table.c.seq))
        for subject, agreement, version, consent in conn.execute(q):
            out[subject_of[subject]] = (str(agreement), str(version), str(consent))
    return out


def record_shown(conn: Connection, *, user_id: str, urn: str, rows: Sequence[dict[str, Any]], mapping_version: str,
                 task: str, at: datetime) -> int:
    """One ledger entry per row shown to the user (in the caller's transaction); a row without a UPN names nobody."""
    rows = [r for r in rows if r.get("upn")]
    if not rows:
        return 0
    lks = [keys.learner_key_of({"upn": r["upn"]}) for r in rows]
    why = _feed_entries(conn, urn, lks)
    run_id = f"portal-{at.astimezone(LONDON).date().isoformat()}"
    disclosures = []
    for lk, row in zip(lks, rows, strict=True):
        correction = row.get("status_code") == CORRECTION_CODE
        agreement, version, consent = why.get(lk) or (*ledger.last_agreement(conn, lk, f"URN:{urn}"), "none")
        disclosures.append(Disclosure(
            run_id=run_id, dag_id=DAG_ID, direction=Direction.TRUST_TO_SCHOOL, recipient=f"portal:{user_id}",
            subject_key=lk, data_items=items_shown(row), agreement_id=agreement, agreement_version=version,
            consent_id=consent, mapping_version=CORRECTION_VERSION if correction else mapping_version,
            content_hash=row_hash(row), task_id=task))
    return ledger.append(conn, disclosures, at)
