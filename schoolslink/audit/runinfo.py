"""One DAG run as the state store records it: its `runs` row (times, summary counts) and whether it is known."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, func, select

from schoolslink.audit.query import reflect


class UnknownRunError(LookupError):
    """No run with this id in the state store (no `runs` row, no ledger entry, no quarantine row): exit 1."""

    def __init__(self, run_id: str) -> None:
        super().__init__(f"no run {run_id!r} in the state store (no run summary, ledger entry or quarantine row has "
                         "that run id)")
        self.run_id = run_id


def run_row(conn: Connection, run_id: str) -> dict[str, Any] | None:
    """The run's `runs` row (every column the table has now), or None."""
    t = reflect(conn, "runs")
    row = conn.execute(select(t).where(t.c.run_id == run_id)).mappings().first()
    return dict(row) if row is not None else None


def run_is_known(conn: Connection, run_id: str) -> bool:
    """A `runs` row, or anything the run wrote to the ledger or quarantine (a run that failed before it finished)."""
    if run_row(conn, run_id) is not None:
        return True
    for name in ("ledger", "quarantine"):
        t = reflect(conn, name)
        if conn.execute(select(func.count()).select_from(t).where(t.c.run_id == run_id)).scalar():
            return True
    return False
