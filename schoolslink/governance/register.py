"""Reading and writing the consent register in the state store (both sides' records)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from sqlalchemy import Connection, delete, select

from schoolslink.model import Consent, ConsentDecision, ConsentGiver, Direction
from schoolslink.store.query import chunks
from schoolslink.store.schema import consents
from schoolslink.store.upsert import upsert


def save(conn: Connection, records: Iterable[Consent], source: str, run_id: str,
         competent: dict[str, bool] | None = None) -> int:
    competent = competent or {}
    rows = [
        {
            "consent_id": c.consent_id,
            "source": source,
            "subject_key": c.subject_key,
            "given_by": c.given_by.value,
            "decision": c.decision.value,
            "directions": ";".join(d.value for d in c.directions),
            "purposes": ";".join(c.purposes),
            "data_items": ";".join(c.data_items) if c.data_items is not None else None,
            "school_urn": c.school_urn,
            "valid_from": c.valid_from,
            "valid_to": c.valid_to,
            "withdrawn_on": c.withdrawn_on,
            "competent": competent.get(c.subject_key, False),
            "updated_run": run_id,
        }
        for c in records
    ]
    return upsert(conn, consents, rows, ["consent_id"])


def replace_school_register(conn: Connection, school_urn: str, records: list[Consent], run_id: str,
                            competent: dict[str, bool]) -> int:
    """A school's register export is its whole register: records it no longer lists stop counting."""
    save(conn, records, "school", run_id, competent=competent)
    keep = {c.consent_id for c in records}
    stored = conn.execute(
        select(consents.c.consent_id).where(consents.c.source == "school",
                                            consents.c.consent_id.like(f"school:{school_urn}:%"))
    ).scalars()
    return forget(conn, [cid for cid in stored if cid not in keep])


def for_school(records: list[Consent], school_urn: str) -> list[Consent]:
    """The records that speak about sharing with this school (a consent naming another school does not)."""
    return [c for c in records if c.school_urn is None or c.school_urn == school_urn]


def forget(conn: Connection, consent_ids: Iterable[str]) -> int:
    """Remove records the source has retracted (e.g. a trust Consent later marked entered-in-error)."""
    ids = sorted(set(consent_ids))
    n = 0
    for part in chunks(ids):
        n += conn.execute(delete(consents).where(consents.c.consent_id.in_(part))).rowcount or 0
    return n


def load_for(conn: Connection, subject_keys: Iterable[str]) -> dict[str, list[Consent]]:
    """Every consent record (school and trust side) for these subject keys, by subject key."""
    keys = sorted(set(subject_keys))
    out: dict[str, list[Consent]] = defaultdict(list)
    for part in chunks(keys):
        for r in conn.execute(select(consents).where(consents.c.subject_key.in_(part))).mappings():
            out[r["subject_key"]].append(
                Consent(
                    consent_id=r["consent_id"],
                    subject_key=r["subject_key"],
                    given_by=ConsentGiver(r["given_by"]),
                    decision=ConsentDecision(r["decision"]),
                    directions=tuple(Direction(d) for d in r["directions"].split(";") if d),
                    purposes=tuple(p for p in r["purposes"].split(";") if p),
                    valid_from=r["valid_from"],
                    valid_to=r["valid_to"],
                    withdrawn_on=r["withdrawn_on"],
                    data_items=tuple(r["data_items"].split(";")) if r["data_items"] is not None else None,
                    school_urn=r["school_urn"],
                )
            )
    return out
