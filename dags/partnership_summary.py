"""partnership_summary: each month's summary pages, one per partner school and one per trust (HTML).

On the 1st of each month at 06:00 Europe/London (DST-safe), for the month just ended: referrals, outcomes and
reasons, waits, and how quickly trust changes reached the schools, under disclosure control, written to
SCHOOLSLINK_HOME/out/summaries/<YYYY-MM>/. Wiring only; XCom carries the month and counts.
"""

from __future__ import annotations

from typing import Any

import pendulum
from airflow.sdk import dag, task


@dag(
    dag_id="partnership_summary",
    schedule="0 6 1 * *",
    start_date=pendulum.datetime(2026, 9, 1, tz="Europe/London"),
    catchup=False,
    max_active_runs=1,
    tags=["schoolslink", "reporting"],
    doc_md=__doc__,
)
def partnership_summary() -> None:
    @task
    def month() -> str:
        from schoolslink import airflow_glue, summary

        _, run_date, _ = airflow_glue.run_facts()
        return summary.month_before(run_date)

    @task
    def build(which: str) -> dict[str, Any]:
        from schoolslink import airflow_glue, summary

        airflow_glue.run_facts()
        return {"month": which, **summary.build_month(which).as_dict()}

    @task
    def summarise(counts: dict[str, Any]) -> dict[str, Any]:
        from schoolslink import airflow_glue, runs

        run_id, _, now = airflow_glue.run_facts()
        return runs.finish(run_id, "partnership_summary", airflow_glue.started_at(), now, runs.merge_counts([counts]))

    summarise(build(month()))


partnership_summary_dag = partnership_summary()
