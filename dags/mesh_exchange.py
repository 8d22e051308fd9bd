"""mesh_exchange: files to and from NHS CYPMHS mailboxes over MESH, every 15 minutes.

send_pending (messages queued in the state store, oldest first) -> track (acknowledged by the recipient:
delivered; not within SCHOOLSLINK_MESH_DELIVERY_DEADLINE_HOURS: dead letter) -> receive (every inbox message
landed, sealed, in the landing zone under mesh/<our mailbox>/, and only then acknowledged). Settings:
SCHOOLSLINK_HOME/config/mesh.json or SCHOOLSLINK_MESH_CONFIG; without them every task returns
{"mesh_configured": 0}. XComs carry counts only. Wiring only: docs/mesh.md says more.
"""

from __future__ import annotations

from typing import Any

import pendulum
from airflow.sdk import dag, task


@dag(
    dag_id="mesh_exchange",
    schedule="*/15 * * * *",
    start_date=pendulum.datetime(2026, 9, 1, tz="Europe/London"),
    catchup=False,
    max_active_runs=1,
    tags=["schoolslink", "school-to-trust", "trust-to-school", "mesh"],
    doc_md=__doc__,
)
def mesh_exchange() -> None:
    @task
    def send_pending() -> dict[str, int]:
        from schoolslink import airflow_glue
        from schoolslink.pipeline import mesh_exchange as mesh

        run_id, _, now = airflow_glue.run_facts()
        return mesh.run_send(run_id, now)

    @task
    def track(sent: dict[str, int]) -> dict[str, int]:
        from schoolslink import airflow_glue
        from schoolslink.pipeline import mesh_exchange as mesh

        run_id, _, now = airflow_glue.run_facts()
        return mesh.run_track(run_id, now)

    @task
    def receive(sent: dict[str, int], tracked: dict[str, int]) -> dict[str, Any]:
        from schoolslink import airflow_glue, runs
        from schoolslink.pipeline import mesh_exchange as mesh

        run_id, _, now = airflow_glue.run_facts()
        received = mesh.run_receive(run_id, now)
        summary = {**runs.merge_counts([sent, tracked, received]),
                   "mesh_configured": received.get("mesh_configured", 0)}
        return runs.finish(run_id, "mesh_exchange", airflow_glue.started_at(), now, summary)

    sent = send_pending()
    receive(sent, track(sent))


mesh_exchange_dag = mesh_exchange()
