"""Delivery to a trust on a bad day, end to end through Airflow (`schoolslink demo`) against the real Medplum
server behind a loopback proxy that counts requests and injects faults.

Night 1: the first batch write gets a 500, the retry a 429 with Retry-After; both are retried and the write
succeeds. One Observation is refused by the server with an OperationOutcome: it becomes a quarantine entry
with the server's own words, and its bundle-mates land. Night 1 again (a re-run): the only write is the record
refused before; every unchanged record costs nothing, and no resource gains a second `_history` version.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, select

from connectors.fhir.client import FhirClient
from connectors.fhir.server import MedplumServer
from schoolslink.mapping import fhir_inbound as fin
from tests.integration.demo_cli import run_demo
from tests.integration.fault_proxy import FaultProxy, Seen

pytestmark = pytest.mark.slow
KEY = "delivery-faults-key"
NIGHT = "2026-11-26"
REFUSAL = "Observation.valueCodeableConcept: code 'X' is not in the trust's value set"


def _demo(home: Path, base: str) -> dict[str, Any]:
    return run_demo(home, base, NIGHT, seed=11, key=KEY)[0]


def _observation_writes(seen: list[Seen]) -> list[Seen]:
    return [s for s in seen if s.method == "POST" and any(url.startswith("Observation/") for _, url in s.entries)]


def test_faults_are_retried_refusals_quarantined_and_a_rerun_sends_only_what_is_missing(tmp_path: Path) -> None:
    home = tmp_path / "home"

    def is_obs_write(s: Seen) -> bool:
        return s.method == "POST" and any(url.startswith("Observation/") for _, url in s.entries)

    with MedplumServer(log_path=tmp_path / "medplum.log") as server, FaultProxy(server.base_url) as proxy:
        proxy.fail(500, times=1, match=is_obs_write)
        proxy.fail(429, times=1, retry_after="1", match=is_obs_write)
        proxy.refuse_where(lambda r: r.get("resourceType") == "Observation", REFUSAL, code="code-invalid")

        first = _demo(home, proxy.base_url)
        assert first["ok"], first
        ingest = first["summaries"]["mis_ingest"]
        writes = _observation_writes(proxy.seen)
        assert [s.status for s in writes[:3]] == [500, 429, 200], [s.status for s in writes]
        assert [s.injected for s in writes[:3]] == [True, True, False]
        assert ingest["refused_by_server"] == 1
        assert ingest["sent"] > 0
        [refused_id] = proxy.refused_ids

        eng = create_engine(f"sqlite:///{home / 'state.db'}")
        from schoolslink.store.schema import outbox, quarantine

        with eng.connect() as conn:
            reasons = [r for (r,) in conn.execute(select(quarantine.c.reason).where(
                quarantine.c.source.like("deliver:%")))]
            status = conn.execute(select(outbox.c.status, outbox.c.last_error).where(
                outbox.c.resource_ref == f"Observation/{refused_id}")).one()
        assert reasons == [f"refused by the trust's server: code-invalid: {REFUSAL} @ Observation"]
        assert status.status == "failed" and REFUSAL in status.last_error

        with FhirClient(server.base_url) as client:
            landed = [o for o in client.all_resources("Observation") if fin.is_ours(o)]
            assert len(landed) == ingest["sent"]
            assert refused_id not in {o["id"] for o in landed}

            # The same night again: only the refused record is written (the server takes it now).
            proxy.reset()
            again = _demo(home, proxy.base_url)
            assert again["ok"], again
            writes = _observation_writes(proxy.seen)
            assert [url for s in writes for _, url in s.entries] == [f"Observation/{refused_id}"]
            assert again["summaries"]["mis_ingest"]["unchanged_not_sent"] == ingest["sent"]

            ours = [o for o in client.all_resources("Observation") if fin.is_ours(o)]
            assert len(ours) == ingest["sent"] + 1
            assert {client.history_count("Observation", o["id"]) for o in ours} == {1}
        eng.dispose()
