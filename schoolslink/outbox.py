"""The outbox: per destination, the content hash of every record we have sent.

A record whose hash the destination already has is not sent again, so a re-run sends nothing and
adds no version to the trust's `_history`.

Status of a row: `sent` (the destination has this hash), `failed` (the destination refused it),
`retract` (a link was found wrong: the resource is to be re-sent marked entered-in-error; `run_id` then
names the `match review unlink` decision) and `retracted` (done: `content_hash` is the entered-in-error
version's). Only `sent` counts as "the destination has it", so a retracted record is sent again in full
if a person later confirms a right link for it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

from sqlalchemy import Connection, select, tuple_, update

from schoolslink.store.query import chunks
from schoolslink.store.schema import outbox
from schoolslink.store.upsert import upsert

SENT = "sent"
FAILED = "failed"
RETRACT = "retract"
RETRACTED = "retracted"


def content_hash(resource: dict[str, Any]) -> str:
    body = json.dumps(resource, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(body.encode()).hexdigest()


def unchanged(conn: Connection, destination: str, hashes: dict[str, str]) -> set[str]:
    """The resource refs (Type/id) whose current hash this destination already has."""
    have: set[str] = set()
    for part in chunks(list(hashes)):
        q = select(outbox.c.resource_ref, outbox.c.content_hash).where(
            outbox.c.destination == destination,
            outbox.c.status == SENT,
            tuple_(outbox.c.resource_ref).in_([(r,) for r in part]),
        )
        for ref, h in conn.execute(q):
            if hashes.get(ref) == h:
                have.add(ref)
    return have


def record(
    conn: Connection, destination: str, rows: Iterable[tuple[str, str, str, str, str | None]], run_id: str
) -> None:
    """rows: (resource_ref, subject_key, content_hash, status, error)."""
    upsert(
        conn,
        outbox,
        [
            {
                "destination": destination,
                "resource_ref": ref,
                "subject_key": subject,
                "content_hash": h,
                "status": status,
                "attempts": 1,
                "last_error": (err or "")[:500] or None,
                "run_id": run_id,
            }
            for ref, subject, h, status, err in rows
        ],
        ["destination", "resource_ref"],
    )


def mark_for_retraction(conn: Connection, destination: str, subject_key: str, decision_id: str) -> int:
    """Everything this destination was sent (or refused) about this subject becomes due for retraction."""
    res = conn.execute(
        update(outbox)
        .where(outbox.c.destination == destination, outbox.c.subject_key == subject_key,
               outbox.c.status.in_((SENT, FAILED)))
        .values(status=RETRACT, run_id=decision_id, attempts=0, last_error=None)
    )
    return int(res.rowcount or 0)


def due_for_retraction(conn: Connection, destinations: Iterable[str] | None = None) -> dict[str, list[dict[str, Any]]]:
    """The rows waiting to be retracted, by destination (all destinations, or these)."""
    q = select(outbox).where(outbox.c.status == RETRACT).order_by(outbox.c.destination, outbox.c.resource_ref)
    if destinations is not None:
        q = q.where(outbox.c.destination.in_(sorted(set(destinations))))
    out: dict[str, list[dict[str, Any]]] = {}
    for r in conn.execute(q).mappings():
        out.setdefault(r["destination"], []).append(dict(r))
    return out


def note_failure(conn: Connection, destination: str, resource_ref: str, error: str) -> None:
    """Count a failed attempt and keep its reason; the row's status (and the decision it names) stay."""
    conn.execute(
        update(outbox)
        .where(outbox.c.destination == destination, outbox.c.resource_ref == resource_ref)
        .values(attempts=outbox.c.attempts + 1, last_error=error[:500])
    )
