"""hl7_ingest: HL7v2 messages the MLLP listener stored and acknowledged -> the state store, off the hot path.

The full parse (hl7apy) -> validate -> map (mappings/hl7v2-in/) -> apply of every pending message, each in a
transaction of its own: ADT patients and merges, REF referrals (docs/hl7v2.md). A bad message is quarantined with
its reason and stays in the store; the rest go on. Identity matching then runs for the patients that changed.
Runs on each stored message's event, and every ten minutes as a sweep. Wiring only; tasks return counts.
"""

from __future__ import annotations

from typing import Any

import pendulum
from airflow.sdk import dag, task

from schoolslink.schedules import event_schedule


@dag(
    dag_id="hl7_ingest",
    schedule=event_schedule("hl7_ingest", "*/10 * * * *", "hl7v2"),  # a stored message, or the sweep
    start_date=pendulum.datetime(2026, 9, 1, tz="Europe/London"),
    catchup=False,
    max_active_runs=1,
    tags=["schoolslink", "trust-to-school"],
    doc_md=__doc__,
)
def hl7_ingest() -> None:
    @task
    def apply() -> dict[str, int]:
        from schoolslink import airflow_glue
        from schoolslink.pipeline import hl7_apply

        run_id, _, _ = airflow_glue.run_facts()
        return hl7_apply.apply_pending(run_id)

    @task
    def match(applied: dict[str, int]) -> dict[str, int]:
        from schoolslink import airflow_glue
        from schoolslink.pipeline import hl7_apply

        run_id, _, _ = airflow_glue.run_facts()
        return hl7_apply.match(run_id, applied)

    @task
    def finish(applied: dict[str, int], matched: dict[str, int]) -> dict[str, Any]:
        from schoolslink import airflow_glue, runs

        run_id, _, now = airflow_glue.run_facts()
        return runs.finish(run_id, "hl7_ingest", airflow_glue.started_at(), now, {**applied, **matched})

    applied: Any = apply()  # XComArgs here: each task receives the counts
    matched: Any = match(applied)
    finish(applied, matched)


hl7_ingest_dag = hl7_ingest()
