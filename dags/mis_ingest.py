"""mis_ingest: school MIS exports -> the school context each trust may have, as FHIR resources we own.

pull MIS APIs (Wonde) -> landing zone (sealed) -> parse CTF / CSV / Wonde -> validate (Great
Expectations) -> govern (agreement, consent, identity match, leavers and moves) -> map -> outbox -> FHIR
batch of PUT by id -> ledger. Fanned out over a few chunks of schools.
Wiring only: every task calls one function of schoolslink/.
"""

from __future__ import annotations

from typing import Any

import pendulum
from airflow.sdk import dag, task

from schoolslink.schedules import event_schedule


@dag(
    dag_id="mis_ingest",
    schedule=event_schedule("mis_ingest", "15 * * * *", "landing"),  # a landed file, or the hourly sweep
    start_date=pendulum.datetime(2026, 9, 1, tz="Europe/London"),
    catchup=False,
    max_active_runs=1,
    tags=["schoolslink", "school-to-trust"],
    doc_md=__doc__,
)
def mis_ingest() -> None:
    @task
    def pull() -> dict[str, int]:
        from schoolslink import airflow_glue
        from schoolslink.pipeline import pull

        run_id, _, now = airflow_glue.run_facts()
        return pull.pull_sources(run_id, now)

    @task
    def plan(pulled: dict[str, int]) -> list[dict[str, Any]]:
        from schoolslink import airflow_glue
        from schoolslink.pipeline import ingest

        run_id, _, _ = airflow_glue.run_facts()
        return ingest.plan(run_id, airflow_glue.max_chunks())

    @task
    def parse_validate(chunk: dict[str, Any]) -> dict[str, Any]:
        from schoolslink import airflow_glue
        from schoolslink.pipeline import ingest

        run_id, run_date, _ = airflow_glue.run_facts()
        return ingest.parse_validate(run_id, chunk, run_date)

    @task
    def govern_map(part: dict[str, Any]) -> dict[str, Any]:
        from schoolslink import airflow_glue
        from schoolslink.pipeline import ingest

        run_id, run_date, _ = airflow_glue.run_facts()
        return ingest.govern_map(run_id, part, run_date)

    # Runs even when no school sent an export tonight (the mapped tasks are then skipped): retractions due
    # and withdrawal notices must not wait for an export. A failed upstream task still stops it.
    @task(trigger_rule="none_failed")
    def deliver(parts: list[dict[str, Any]], pulled: dict[str, int]) -> dict[str, Any]:
        from schoolslink import airflow_glue, runs
        from schoolslink.pipeline import ingest

        run_id, run_date, now = airflow_glue.run_facts()
        parts = list(parts)
        sent = ingest.deliver(run_id, parts, run_date, now)
        summary = {**runs.merge_counts(parts), **pulled, **sent}
        return runs.finish(run_id, "mis_ingest", airflow_glue.started_at(), now, summary)

    pulled = pull()
    deliver(govern_map.expand(part=parse_validate.expand(chunk=plan(pulled))), pulled)


mis_ingest_dag = mis_ingest()
