"""The thin layer between Airflow tasks and the core: the only core module that imports Airflow.

Each DAG task calls one function here with nothing but what Airflow gives it; the function returns
storage keys and counts (never pupil data) for XCom.

Logging (docs/governance/logging.md): `run_facts()`, which every task calls first, installs the pseudonymising
filter (`schoolslink.logfilter`) on whatever logging Airflow has set up in the task's process. For the task log
files Airflow's supervisor writes, point `[logging] logging_config_class` at `schoolslink.airflow_glue.LOGGING_CONFIG`
(`airflow_runner.airflow_env` does): Airflow's default logging dict, plus a `REMOTE_TASK_LOG` whose structlog
`processors` put the pseudonymising processor in the task log write path. It passes uploads and reads on to the
remote log handler `[logging] remote_logging` configures, if any.
"""

from __future__ import annotations

import copy
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

    Also installs the pseudonymising log filter and points the core's endpoint lookups at Airflow's Connections
    (every task calls this first)."""
    from schoolslink import logfilter

    logfilter.install()
    from airflow.sdk import get_current_context

    from schoolslink.connections import use_lookup

    use_lookup(airflow_connection)
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


# Airflow's logging configuration (`[logging] logging_config_class = schoolslink.airflow_glue.LOGGING_CONFIG`) ------


class PseudonymisingTaskLogIO:
    """Airflow's `RemoteLogIO` hook, used for its documented `processors`: structlog processors installed in the task
    log write path (the task process and the supervisor that writes the task's log file). Uploads, reads and
    anything else go to the remote log handler Airflow would otherwise use; without one, reads say "not
    implemented" so Airflow reads the local file as usual."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    @property
    def processors(self) -> tuple[Any, ...]:
        from schoolslink.logfilter import structlog_processor

        return (structlog_processor, *tuple(getattr(self._inner, "processors", None) or ()))

    def upload(self, path: Any, ti: Any = None) -> None:
        if self._inner is not None:
            self._inner.upload(path, ti)

    def read(self, relative_path: str, ti: Any) -> Any:
        if self._inner is None:
            raise NotImplementedError
        return self._inner.read(relative_path, ti)

    def __getattr__(self, name: str) -> Any:  # e.g. `stream`, when the remote handler has it
        if name.startswith("__") or self.__dict__.get("_inner") is None:
            raise AttributeError(name)
        return getattr(self.__dict__["_inner"], name)


def _remote_task_log() -> Any:
    """The remote log handler Airflow would use with its default logging dict (None without remote logging)."""
    try:
        from airflow._shared.logging.factory import _build_remote_task_log_from_provider
        from airflow._shared.module_loading import import_string
        from airflow.configuration import conf
        from airflow.providers_manager import ProvidersManager

        if conf.getboolean("logging", "remote_logging", fallback=False):
            inner = _build_remote_task_log_from_provider(
                remote_base_log_folder=conf.get("logging", "remote_base_log_folder", fallback=None),
                providers_manager=ProvidersManager(), import_string=import_string)  # type: ignore[no-untyped-call]
            if inner is not None:
                return inner
        from airflow.config_templates import airflow_local_settings

        return getattr(airflow_local_settings, "REMOTE_TASK_LOG", None)
    except Exception:  # noqa: BLE001 - no remote handler: local task logs, as Airflow does by default
        return None


_TASK_LOG_IO: list[PseudonymisingTaskLogIO] = []


def __getattr__(name: str) -> Any:
    """`LOGGING_CONFIG` (Airflow's default logging dict) and `REMOTE_TASK_LOG`, built when Airflow asks for them."""
    if name == "LOGGING_CONFIG":
        from airflow.config_templates.airflow_local_settings import DEFAULT_LOGGING_CONFIG

        return copy.deepcopy(DEFAULT_LOGGING_CONFIG)
    if name == "REMOTE_TASK_LOG":
        if not _TASK_LOG_IO:
            _TASK_LOG_IO.append(PseudonymisingTaskLogIO(_remote_task_log()))
        return _TASK_LOG_IO[0]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
