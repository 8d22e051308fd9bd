"""One way to write our resources to a trust, for delivery and notices alike (retractions, which read the
trust's current version first, use the FHIR client directly).

By the endpoint's settings: ``batch`` Bundles of ``PUT Type/id`` (our deterministic ids; the default), or
conditional ``PUT Type?identifier=...`` for servers that assign ids; ``bundle_size`` per Bundle. A server that
fails part-way is not an exception here: what landed is in ``results``, the rest is ``unsent`` and the caller
records both (the next run sends what is left).

A trust that takes files (``mesh_mailbox`` on its endpoint) gets the same ``batch`` Bundle of ``PUT Type/id``
as one MESH message (workflow ``SCHOOLSLINK_CONTEXT``), queued durably, its body sealed, in its own
transaction; the ``mesh_exchange`` DAG sends it and tracks it to delivered or dead letter
(schoolslink/pipeline/mesh_exchange.py). Every entry then counts as handed over (status 202); the message's
fate is in ``mesh_messages``, under the same run id as the ledger entries.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from connectors.fhir.client import EntryResult
from connectors.fhir.errors import FhirError
from schoolslink.endpoints import FhirEndpoint
from schoolslink.errors import ConfigurationError


@dataclass
class WriteOutcome:
    """Per resource sent, in order: its result; ``failure`` when the server failed before the end."""

    results: list[EntryResult] = field(default_factory=list)
    failure: FhirError | ConfigurationError | None = None

    def unsent(self, total: int) -> int:
        return total - len(self.results)

    def failure_reason(self, total: int, what: str = "record(s)") -> str | None:
        if self.failure is None:
            return None
        if isinstance(self.failure, ConfigurationError):
            return f"{self.failure}: {self.unsent(total)} {what} not sent; they go with the first run after it is"
        return (f"the trust's server failed part-way ({type(self.failure).__name__}: {self.failure}): "
                f"{self.unsent(total)} {what} not sent this run; the next run sends them")


def write(endpoint: FhirEndpoint, resources: Sequence[dict[str, Any]], run_id: str | None = None) -> WriteOutcome:
    """Write ``resources`` to ``endpoint``."""
    if not resources:
        return WriteOutcome()
    if endpoint.mesh_mailbox:
        return _queue_for_mesh(endpoint.mesh_mailbox, resources, run_id)
    with endpoint.client() as client:
        try:
            return WriteOutcome(client.put_batch(resources, conditional=endpoint.conditional_writes))
        except FhirError as exc:
            return WriteOutcome(list(exc.partial_results), exc)


def _queue_for_mesh(recipient: str, resources: Sequence[dict[str, Any]], run_id: str | None) -> WriteOutcome:
    from connectors.mesh.client import WORKFLOW_CONTEXT
    from schoolslink.pipeline.common import store
    from schoolslink.pipeline.mesh_exchange import mesh_config, queue_message

    config = mesh_config()
    if config is None:
        return WriteOutcome([], ConfigurationError(
            f"the trust takes files over MESH (mailbox {recipient}) but MESH is not configured here "
            "(config/mesh.json or SCHOOLSLINK_MESH_CONFIG)"))
    bundle = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}} for r in resources]}
    data = json.dumps(bundle, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    with store().begin() as conn:
        queue_message(conn, mailbox=config.mailbox, recipient=recipient, workflow_id=WORKFLOW_CONTEXT, data=data,
                      run_id=run_id)
    return WriteOutcome([EntryResult(str(r["resourceType"]), str(r["id"]), 202, True) for r in resources])
