"""The disclosure ledger: append-only, one row per record disclosed, each row chained to the previous.

entry_hash = SHA-256(prev_hash || canonical JSON of the entry's fields). The head of the chain is kept
in `watermarks` ('ledger', 'head') and locked for the append, so concurrent runs append in turn on
SQLite (a write takes the database's write lock first) and PostgreSQL (row lock).
The audit issue adds external Merkle checkpoints, queries and the auditor's report.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, insert, select, update

from schoolslink.model import Disclosure
from schoolslink.store.schema import ledger, watermarks

GENESIS = "0" * 64
RETRACTION = "retraction"  # data_items of an entry that retracts what was sent earlier (a link found wrong)
_FIELDS = (
    "at", "run_id", "dag_id", "direction", "recipient", "subject_key", "data_items",
    "agreement_id", "agreement_version", "consent_id", "mapping_version", "content_hash",
)


def _at_text(at: datetime) -> str:
    """The instant as UTC ISO text (SQLite hands back naive UTC datetimes, PostgreSQL aware ones)."""
    aware = at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)
    return aware.isoformat(timespec="microseconds")


def _entry_hash(prev_hash: str, fields: dict[str, Any]) -> str:
    body = json.dumps({k: fields[k] for k in _FIELDS}, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256((prev_hash + body).encode()).hexdigest()


def _lock_head(conn: Connection) -> str:
    """Take the ledger's write lock and return the head hash."""
    res = conn.execute(
        update(watermarks)
        .where(watermarks.c.source == "ledger", watermarks.c.resource_type == "head")
        .values(value=watermarks.c.value)
    )
    if res.rowcount == 0:
        conn.execute(insert(watermarks).values(source="ledger", resource_type="head", value=GENESIS))
    head = conn.execute(
        select(watermarks.c.value)
        .where(watermarks.c.source == "ledger", watermarks.c.resource_type == "head")
        .with_for_update()
    ).scalar_one()
    return str(head)


def append(conn: Connection, disclosures: Iterable[Disclosure], at: datetime) -> int:
    """Append one ledger row per disclosure, in one transaction with the caller's other writes."""
    prev = _lock_head(conn)
    rows = []
    for d in disclosures:
        fields: dict[str, Any] = {
            "at": _at_text(at),
            "run_id": d.run_id,
            "dag_id": d.dag_id,
            "direction": d.direction.value,
            "recipient": d.recipient,
            "subject_key": d.subject_key,
            "data_items": ",".join(sorted(d.data_items)),
            "agreement_id": d.agreement_id,
            "agreement_version": d.agreement_version,
            "consent_id": d.consent_id,
            "mapping_version": d.mapping_version,
            "content_hash": d.content_hash,
        }
        h = _entry_hash(prev, fields)
        rows.append({**fields, "at": at.astimezone(UTC), "prev_hash": prev, "entry_hash": h})
        prev = h
    if rows:
        conn.execute(insert(ledger), rows)  # one executemany: SQLAlchemy batches the rows itself
        conn.execute(
            update(watermarks)
            .where(watermarks.c.source == "ledger", watermarks.c.resource_type == "head")
            .values(value=prev)
        )
    return len(rows)


def last_agreement(conn: Connection, subject_key: str, recipient: str,
                   content_hash: str | None = None) -> tuple[str, str]:
    """The agreement (id, version) of the latest disclosure to `recipient` about `subject_key` (with that
    content hash, if one is given and found): what a retraction of it records. ("none", "-") if none."""
    q = (select(ledger.c.agreement_id, ledger.c.agreement_version)
         .where(ledger.c.subject_key == subject_key, ledger.c.recipient == recipient, ledger.c.data_items != RETRACTION)
         .order_by(ledger.c.seq.desc()).limit(1))
    hit = conn.execute(q.where(ledger.c.content_hash == content_hash)).first() if content_hash else None
    hit = hit or conn.execute(q).first()
    return (str(hit[0]), str(hit[1])) if hit is not None else ("none", "-")


@dataclass(frozen=True, slots=True)
class VerifyResult:
    ok: bool
    entries: int
    first_bad_seq: int | None
    message: str


def verify(conn: Connection) -> VerifyResult:
    """Recompute the chain; name the first entry whose hash or link does not hold."""
    prev = GENESIS
    n = 0
    for row in conn.execute(select(ledger).order_by(ledger.c.seq)).mappings():
        n += 1
        fields = dict(row)
        at = fields["at"]
        fields["at"] = _at_text(at) if isinstance(at, datetime) else str(at)
        if row["prev_hash"] != prev:
            return VerifyResult(False, n, row["seq"], f"entry {row['seq']}: link to the previous entry broken")
        if _entry_hash(prev, fields) != row["entry_hash"]:
            return VerifyResult(False, n, row["seq"], f"entry {row['seq']}: contents changed")
        prev = row["entry_hash"]
    head = conn.execute(
        select(watermarks.c.value).where(watermarks.c.source == "ledger", watermarks.c.resource_type == "head")
    ).scalar()
    if head is not None and head != prev:
        return VerifyResult(False, n, None, "the chain's tail was removed or replaced")
    return VerifyResult(True, n, None, f"{n} entries verified")
