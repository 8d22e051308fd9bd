"""school_feeds: each school's status feed for tonight, nightly in Europe/London: full and changes-only CSV and
JSON, an accessible HTML page, and a manifest (docs/feeds.md).

The cron is in Europe/London, so it stays at 02:00 local time across the clock changes. Wiring only.
`deliver` then puts each built feed where a school that takes files wants it (folder, S3, SFTP) and sends
the feed-ready emails (docs/feed-delivery.md); it runs once the builds are done, even if a chunk failed, so
the schools whose feeds were built still get them. XCom carries counts only.
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

    @task(trigger_rule="all_done")
    def deliver(parts: list[dict[str, Any]] | None) -> dict[str, int]:
        from schoolslink import airflow_glue
        from schoolslink.pipeline import feed_delivery

        run_id, run_date, _ = airflow_glue.run_facts()
        return feed_delivery.deliver(run_id, run_date)  # Connections through Airflow (set by run_facts)

    @task
    def purge_values() -> dict[str, int]:
        """Disclosed values kept beside the ledger are erased past their agreement's retention; entries stay."""
        from schoolslink import airflow_glue
        from schoolslink.retention import purge

        _, _, now = airflow_glue.run_facts()
        return {f"retention_{k}": v for k, v in purge(now).items()}

    @task
    def summarise(parts: list[dict[str, Any]], delivered: dict[str, int], purged: dict[str, int]) -> dict[str, Any]:
        from schoolslink import airflow_glue, runs

        run_id, _, now = airflow_glue.run_facts()
        counts = runs.merge_counts([*parts, delivered, purged])
        return runs.finish(run_id, "school_feeds", airflow_glue.started_at(), now, counts)

    built = build.expand(chunk=plan())
    summarise(built, deliver(built), purge_values())


school_feeds_dag = school_feeds()
