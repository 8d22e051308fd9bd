"""The thin layer between Airflow tasks and the core: the only core module that imports Airflow.

Each DAG task calls one function here with nothing but what Airflow gives it; the function returns
storage keys and counts (never pupil data) for XCom.
"""

from __future__ import annotations

import os
from datetime import UTC, date, datetime
from typing import Any
from zoneinfo import ZoneInfo

LONDON = ZoneInfo("Europe/London")


def max_chunks() -> int:
    """About as many chunks as workers (AIRFLOW__CORE__PARALLELISM, capped by the machine)."""
    env = os.environ.get("SCHOOLSLINK_CHUNKS")
    if env:
        return max(1, int(env))
    return max(1, min(os.cpu_count() or 1, 8))


def airflow_connection(conn_id: str) -> dict[str, Any] | None:
    """An Airflow Connection as a plain dict (host, login, password, schema, port, extra), or None."""
    from airflow.sdk import Connection
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        conn = Connection.get(conn_id)
    except AirflowNotFoundException:
        return None
    return {"host": conn.host, "login": conn.login, "password": conn.password, "schema": conn.schema,
            "port": conn.port, "extra": conn.extra_dejson}


def run_facts() -> tuple[str, date, datetime]:
    """(run id, the run's date in Europe/London, the time now) for the running task.

    Also points the core's endpoint lookups at Airflow's Connections (every task calls this first)."""
    from airflow.sdk import get_current_context

    from schoolslink.endpoints import use_connection_lookup

    use_connection_lookup(airflow_connection)
    ctx: Any = get_current_context()
    run_id = str(ctx["run_id"])
    when = ctx.get("logical_date") or ctx["dag_run"].run_after
    return run_id, when.astimezone(LONDON).date(), datetime.now(UTC)


def started_at() -> datetime:
    from airflow.sdk import get_current_context

    ctx: Any = get_current_context()
    dr = ctx["dag_run"]
    # dag.test() stamps start_date with the logical date; run_after is when the run became due.
    known = [t for t in (dr.start_date, dr.run_after) if t is not None]
    return max(known) if known else datetime.now(UTC)
