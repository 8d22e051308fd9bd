"""What every stage shares: the run's store connection, dates, and recording of quarantine and runs."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import date

from sqlalchemy import Connection, Engine, insert

from connectors.storage.landing import LandingZone
from schoolslink.governance.agreement import landing_days_for, load_agreements
from schoolslink.store.db import engine
from schoolslink.store.schema import quarantine


def store() -> Engine:
    return engine()


def landing_zone() -> LandingZone:
    """The landing zone, keeping each school's files as long as the agreements covering it say."""
    agreements = load_agreements()
    return LandingZone(retention=lambda urn: landing_days_for(agreements, urn))


def age_on(dob: date, day: date) -> int:
    return day.year - dob.year - ((day.month, day.day) < (dob.month, dob.day))


def quarantine_rows(conn: Connection, run_id: str, source: str,
                    items: Iterable[tuple[str | None, str | None, str]]) -> int:
    rows = [
        {"run_id": run_id, "source": source, "record": rec, "field": fld, "reason": reason[:500]}
        for rec, fld, reason in items
    ]
    if rows:
        conn.execute(insert(quarantine), rows)
    return len(rows)


def chunked(items: list[str], n: int) -> list[list[str]]:
    """Split into at most n round-robin chunks, none empty."""
    n = max(1, min(n, len(items)))
    return [items[i::n] for i in range(n)] if items else []
