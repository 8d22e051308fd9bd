"""school_feeds: each school's status feed for tonight (CSV + JSON + manifest), nightly in Europe/London.

The cron is in Europe/London, so it stays at 02:00 local time across the clock changes. Wiring only.
"""

from __future__ import annotations

from typing import Any

import pendulum
from airflow.sdk import dag, task


@dag(
    dag_id="school_feeds",
    schedule="0 2 * * *",
    start_date=pendulum.datetime(2026, 9, 1, tz="Europe/London"),
    catchup=False,
    max_active_runs=1,
    tags=["schoolslink", "trust-to-school"],
    doc_md=__doc__,
)
def school_feeds() -> None:
    @task
    def plan() -> list[dict[str, Any]]:
        from schoolslink import airflow_glue
        from schoolslink.pipeline import feeds_stage

        return feeds_stage.plan(airflow_glue.max_chunks())

    @task
    def build(chunk: dict[str, Any]) -> dict[str, Any]:
        from schoolslink import airflow_glue
        from schoolslink.pipeline import feeds_stage

        run_id, run_date, now = airflow_glue.run_facts()
        return feeds_stage.build(run_id, chunk, run_date, now)

    @task
    def summarise(parts: list[dict[str, Any]]) -> dict[str, Any]:
        from schoolslink import airflow_glue, runs

        run_id, _, now = airflow_glue.run_facts()
        return runs.finish(run_id, "school_feeds", airflow_glue.started_at(), now, runs.merge_counts(list(parts)))

    summarise(build.expand(chunk=plan()))


school_feeds_dag = school_feeds()
