"""The outbox: per destination, the content hash of every record we have sent.

A record whose hash the destination already has is not sent again, so a re-run sends nothing and
adds no version to the trust's `_history`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

from sqlalchemy import Connection, select, tuple_

from schoolslink.store.query import chunks
from schoolslink.store.schema import outbox
from schoolslink.store.upsert import upsert


def content_hash(resource: dict[str, Any]) -> str:
    body = json.dumps(resource, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(body.encode()).hexdigest()


def unchanged(conn: Connection, destination: str, hashes: dict[str, str]) -> set[str]:
    """The resource refs (Type/id) whose current hash this destination already has."""
    have: set[str] = set()
    for part in chunks(list(hashes)):
        q = select(outbox.c.resource_ref, outbox.c.content_hash).where(
            outbox.c.destination == destination,
            outbox.c.status == "sent",
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
