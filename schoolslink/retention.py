"""Retention of the values behind the ledger's commitments.

The ledger (the proof of who received what, about whom, under which consent) is kept for the agreement's
`retention.ledger_years`. The values sent (`ledger_values`: item, salt, value) are personal data and are kept
much less long: the agreement's `retention.values_days`, or DEFAULT_VALUES_DAYS (90) where it does not say.
`purge` erases them once past it (salt and value set NULL, `erased_at` stamped): the entry keeps its
commitment, so the chain and the checkpoints still verify, but what was sent can no longer be shown.

HL7v2 messages (`hl7_messages`) are personal data too, sealed: once applied or quarantined and older than the
landing zone's retention (`SCHOOLSLINK_LANDING_RETENTION_DAYS`, 28 days), `purge` empties their body and keeps the
row (sender, MSH-10, type, status, reason, ACK code), so a resent message is still known and acknowledged as a
duplicate. A message not yet applied is never purged.

Call it from a DAG task or the CLI: `purge(now)` -> counts. docs/audit-ledger.md.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine, and_, func, select, update

from connectors.storage.landing import retention_days
from schoolslink.governance.agreement import Agreement, load_agreements
from schoolslink.store.schema import hl7_messages, ledger, ledger_values

DEFAULT_VALUES_DAYS = 90


def values_days_for(agreements: Sequence[Agreement], agreement_id: str, agreement_version: str) -> int:
    """How long values disclosed under this agreement version are kept: its `retention.values_days`; for a
    version no longer on file, the shortest any version of that id sets; else `SCHOOLSLINK_VALUES_RETENTION_DAYS`
    or DEFAULT_VALUES_DAYS."""
    exact = [a.values_days for a in agreements
             if a.id == agreement_id and a.version == agreement_version and a.values_days is not None]
    if exact:
        return min(exact)
    same_id = [a.values_days for a in agreements if a.id == agreement_id and a.values_days is not None]
    if same_id:
        return min(same_id)
    env = os.environ.get("SCHOOLSLINK_VALUES_RETENTION_DAYS", "").strip()
    return max(1, int(env)) if env else DEFAULT_VALUES_DAYS


def purge(now: datetime, *, engine: Engine | None = None,
          agreements: Sequence[Agreement] | None = None) -> dict[str, int]:
    """Erase the ledger's stored values older than their agreement's `values_days`; entries stay verifiable.

    Returns counts: `values_erased` (salt and value set NULL tonight), `values_kept` (still within their time),
    `agreements` (agreement versions looked at), `hl7_bodies_erased` (HL7v2 message bodies emptied tonight).
    """
    if engine is None:
        from schoolslink.store.db import engine as default_engine

        engine = default_engine()
    agreements = load_agreements() if agreements is None else agreements
    now = now.replace(tzinfo=UTC) if now.tzinfo is None else now.astimezone(UTC)
    erased = 0
    pending = select(ledger_values.c.seq).where(ledger_values.c.value.is_not(None))
    with engine.begin() as conn:
        versions = conn.execute(select(ledger.c.agreement_id, ledger.c.agreement_version).distinct()
                                .where(ledger.c.seq.in_(pending))).all()
        for agreement_id, version in versions:
            cutoff = now - timedelta(days=values_days_for(agreements, agreement_id, version))
            old = select(ledger.c.seq).where(and_(ledger.c.agreement_id == agreement_id,
                                                  ledger.c.agreement_version == version, ledger.c.at < cutoff))
            res = conn.execute(update(ledger_values)
                               .where(ledger_values.c.value.is_not(None), ledger_values.c.seq.in_(old))
                               .values(salt=None, value=None, erased_at=now))
            erased += res.rowcount or 0
        kept = int(conn.execute(select(func.count()).select_from(ledger_values)
                                .where(ledger_values.c.value.is_not(None))).scalar_one())
        hl7 = conn.execute(update(hl7_messages)
                           .where(hl7_messages.c.status != "received",
                                  hl7_messages.c.received_at < now - timedelta(days=retention_days()),
                                  func.length(hl7_messages.c.body) > 0)
                           .values(body=b""))
    return {"values_erased": erased, "values_kept": kept, "agreements": len(versions),
            "hl7_bodies_erased": hl7.rowcount or 0}
