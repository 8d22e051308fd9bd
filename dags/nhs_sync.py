"""nhs_sync: each trust's FHIR changes since the watermark -> canonical referral status in the state store.

Searches by `_lastUpdated`, skipping our own writes, then links newly seen patients to learners (no
guessed identity: the rest wait in the review queue). Wiring only.
"""

from __future__ import annotations

from typing import Any

import pendulum
from airflow.sdk import dag, task

from schoolslink.schedules import event_schedule


@dag(
    dag_id="nhs_sync",
    schedule=event_schedule("nhs_sync", "*/30 * * * *", "fhir"),  # a FHIR notification, or the sweep
    start_date=pendulum.datetime(2026, 9, 1, tz="Europe/London"),
    catchup=False,
    max_active_runs=1,
    tags=["schoolslink", "trust-to-school"],
    doc_md=__doc__,
)
def nhs_sync() -> None:
    @task
    def trusts() -> list[str]:
        from schoolslink.pipeline import sync

        return sync.trusts_to_pull()

    @task
    def pull(trust_ods: str) -> dict[str, Any]:
        from schoolslink import airflow_glue
        from schoolslink.pipeline import sync

        run_id, _, _ = airflow_glue.run_facts()
        return sync.pull_trust(run_id, trust_ods)

    @task
    def match(parts: list[dict[str, Any]]) -> dict[str, Any]:
        from schoolslink import airflow_glue, runs
        from schoolslink.pipeline import sync

        run_id, _, now = airflow_glue.run_facts()
        parts = list(parts)
        summary = {**runs.merge_counts(parts), **sync.match_all(run_id)}
        return runs.finish(run_id, "nhs_sync", airflow_glue.started_at(), now, summary)

    match(pull.expand(trust_ods=trusts()))


nhs_sync_dag = nhs_sync()
