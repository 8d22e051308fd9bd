"""A trust that takes files: the night's school context goes over MESH, end to end through Airflow.

The trust's Airflow Connection names its MESH mailbox. `schoolslink demo` runs the night (pull by FHIR,
ingest, feeds); the delivery is queued as one FHIR batch Bundle; the `mesh_exchange` DAG sends it over mutual
TLS to the real mesh-sandbox; the trust downloads and acknowledges it; the next `mesh_exchange` run marks it
delivered. Nothing of ours is written to the trust's FHIR server, and a re-run queues nothing new.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, select

from connectors.fhir.client import FhirClient
from connectors.fhir.server import MedplumServer
from schoolslink.mapping import fhir_inbound as fin
from tests.integration.conftest_mesh import SCHOOL_SIDE, TRUST_SIDE, MeshPeer
from tests.integration.demo_cli import run_demo

pytestmark = pytest.mark.slow
NIGHT = "2026-11-26"


def _env(home: Path, base: str, mesh_config: Path) -> dict[str, str]:
    return {**os.environ, "SCHOOLSLINK_HOME": str(home), "SCHOOLSLINK_KEY": "mesh-delivery-key",
            "SCHOOLSLINK_MESH_CONFIG": str(mesh_config),
            "AIRFLOW_CONN_SCHOOLSLINK_FHIR_R9X": json.dumps(
                {"conn_type": "http", "host": base, "extra": {"mesh_mailbox": TRUST_SIDE}})}


def _demo(env: dict[str, str], home: Path, base: str) -> dict[str, Any]:
    return run_demo(home, base, NIGHT, seed=11, env=env)[0]


def _mesh_exchange(env: dict[str, str], home: Path) -> None:
    from schoolslink.airflow_runner import airflow_env

    run_env = {**airflow_env(home), **{k: v for k, v in env.items() if k.startswith(("SCHOOLSLINK_", "AIRFLOW_CONN"))}}
    res = subprocess.run([sys.executable, "-m", "schoolslink.airflow_runner", "mesh_exchange"], env=run_env,
                         capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout.strip().splitlines()[-1])["state"] == "success"


def test_a_trust_that_takes_files_gets_the_nights_context_over_mesh(mesh: MeshPeer, tmp_path: Path) -> None:
    home = tmp_path / "home"
    config = tmp_path / "mesh.json"
    config.write_text(json.dumps(mesh.settings(SCHOOL_SIDE)))
    with MedplumServer(log_path=tmp_path / "medplum.log") as server:
        env = _env(home, server.base_url, config)
        night = _demo(env, home, server.base_url)
        assert night["ok"], night
        sent = night["summaries"]["mis_ingest"]["sent"]
        assert sent > 0

        eng = create_engine(f"sqlite:///{home / 'state.db'}")
        from schoolslink.store.schema import ledger, mesh_messages, outbox

        with eng.connect() as conn:
            [msg] = conn.execute(select(mesh_messages).where(mesh_messages.c.direction == "out")).mappings().all()
            refs = {r for (r,) in conn.execute(select(outbox.c.resource_ref).where(outbox.c.status == "sent"))}
            ledger_runs = {r for (r,) in conn.execute(select(ledger.c.run_id).where(
                ledger.c.recipient == "ODS:R9X"))}
        assert msg["status"] == "pending" and msg["peer_mailbox"] == TRUST_SIDE
        assert msg["workflow_id"] == "SCHOOLSLINK_CONTEXT"
        assert msg["run_id"] in ledger_runs  # an auditor joins the disclosure to the message by run

        _mesh_exchange(env, home)
        with mesh.connector(TRUST_SIDE) as trust:
            [message_id] = trust.inbox()
            bundle = json.loads(trust.download(message_id))
            trust.acknowledge(message_id)
        assert bundle["type"] == "batch"
        assert {f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in bundle["entry"]} == refs
        assert all(e["request"]["method"] == "PUT" for e in bundle["entry"])
        assert len(bundle["entry"]) == sent

        _mesh_exchange(env, home)
        with eng.connect() as conn:
            after = conn.execute(select(mesh_messages.c.status, mesh_messages.c.message_id).where(
                mesh_messages.c.local_id == msg["local_id"])).one()
        assert tuple(after) == ("delivered", message_id)

        with FhirClient(server.base_url) as client:  # the trust's FHIR server got nothing of ours
            assert not [r for t in ("Observation", "Communication") for r in client.all_resources(t)
                        if fin.is_ours(r)]

        again = _demo(env, home, server.base_url)  # the same night again: nothing changed, nothing queued
        assert again["ok"]
        with eng.connect() as conn:
            assert len(conn.execute(select(mesh_messages.c.local_id).where(
                mesh_messages.c.direction == "out")).all()) == 1
        eng.dispose()
