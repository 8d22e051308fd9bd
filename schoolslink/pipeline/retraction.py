"""Retraction: what was sent under a link found wrong is marked entered-in-error on the trust's server.

`match review unlink` makes every outbox row of the trust about the learner due (status `retract`, its
`run_id` the decision). Here, for each such row: read the resource we own back from the trust's server
(`GET Type/id`), and `PUT` it again by the same id with `status: entered-in-error` and nothing else
changed, so its `meta.source` and tags still mark it ours (the incremental pull skips our echo) and it still
passes the UK Core check; then, in one transaction, the row becomes `retracted` (with the new version's
hash) and the ledger gets one entry per resource: direction school_to_trust, the trust as recipient, the
learner key as subject, item `retraction`, the agreement of the disclosure it retracts, and the decision
id and reason in place of a consent (the ledger's "why").

Runs first in every mis_ingest delivery (`schoolslink.pipeline.delivery.deliver_outbound`), and at once
from `match review unlink --now`. A resource the server no longer has needs nothing (recorded as
retracted, no ledger entry); a resource already entered-in-error (a retry after a crash between PUT and
commit) is not sent again; anything else that fails stays due, with its reason quarantined, and the next
run tries again. Nothing logged or quarantined holds more than keys, references and counts.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, select

from connectors.fhir.client import EntryResult
from connectors.fhir.errors import FhirError, FhirNotFoundError
from schoolslink import ledger, outbox
from schoolslink.constants import OUR_META_SOURCE
from schoolslink.endpoints import FhirEndpoint, fhir_endpoint
from schoolslink.governance.review import retraction_reason
from schoolslink.mapping import ukcore
from schoolslink.model import Direction, Disclosure
from schoolslink.pipeline.common import quarantine_rows, store
from schoolslink.store.schema import ledger as ledger_table

ENTERED_IN_ERROR = "entered-in-error"
MAPPING_VERSION_SYSTEM = "https://fhir.schoolslink.org.uk/CodeSystem/mapping-version"


def entered_in_error(current: dict[str, Any]) -> dict[str, Any] | None:
    """Our resource as the server holds it, marked entered-in-error; None if it is not ours to change.

    The server's own meta (versionId, lastUpdated, author) is dropped; our source and tags are kept.
    """
    meta = current.get("meta") or {}
    if not isinstance(meta, dict) or meta.get("source") != OUR_META_SOURCE:
        return None
    out = {k: v for k, v in current.items() if k not in ("meta", "text")}
    out["meta"] = {"source": OUR_META_SOURCE, **({"tag": meta["tag"]} if meta.get("tag") else {})}
    out["status"] = ENTERED_IN_ERROR
    return out


def send_due(run_id: str, dag_id: str, at: datetime, trusts: list[str] | None = None) -> dict[str, int]:
    """Send every retraction that is due (to these trusts, or all); counts of what happened."""
    eng = store()
    with eng.connect() as conn:
        due = outbox.due_for_retraction(conn, [f"fhir:{t}" for t in trusts] if trusts is not None else None)
    counts: dict[str, int] = defaultdict(int)
    for dest, rows in sorted(due.items()):
        trust = dest.removeprefix("fhir:")
        endpoint = fhir_endpoint(trust)
        if endpoint is None:
            counts["retractions_no_endpoint"] += len(rows)
            with eng.begin() as conn:
                quarantine_rows(conn, run_id, f"retract:{trust}", [(None, None, (
                    f"no FHIR endpoint configured for trust {trust}: {len(rows)} retraction(s) wait for the first "
                    "run after the endpoint is configured"))])
            continue
        _send_to(eng, endpoint, dest, trust, rows, run_id, dag_id, at, counts)
    return dict(counts)


def _send_to(eng: Engine, endpoint: FhirEndpoint, dest: str, trust: str, rows: list[dict[str, Any]], run_id: str,
             dag_id: str, at: datetime, counts: dict[str, int]) -> None:
    todo: list[tuple[dict[str, Any], dict[str, Any]]] = []
    already: list[tuple[dict[str, Any], dict[str, Any]]] = []
    gone: list[dict[str, Any]] = []
    refused: list[tuple[dict[str, Any], str]] = []
    failure: FhirError | None = None
    results: list[EntryResult] = []
    with endpoint.client() as client:
        try:
            for row in rows:
                rtype, _, rid = row["resource_ref"].partition("/")
                try:
                    current = client.read(rtype, rid)
                except FhirNotFoundError:
                    gone.append(row)
                    continue
                res = entered_in_error(current)
                if res is None:
                    refused.append((row, "the resource on the trust's server is not marked as ours: not changed"))
                    continue
                problems = ukcore.check(res)
                if problems:
                    refused.append((row, "the entered-in-error version fails the UK Core check: "
                                         + "; ".join(problems)))
                    continue
                (already if current.get("status") == ENTERED_IN_ERROR else todo).append((row, res))
            if todo:
                results = client.put_batch([res for _, res in todo], conditional=endpoint.conditional_writes)
        except FhirError as exc:  # the server failed part-way: what landed is recorded, the rest stays due
            failure = exc
            results = list(exc.partial_results)
    landed = [(row, res) for (row, res), r in zip(todo, results, strict=False) if r.ok]
    refused += [(row, f"refused by the trust's server: {r.message}")
                for (row, _), r in zip(todo, results, strict=False) if not r.ok]
    with eng.begin() as conn:
        done = landed + [(row, res) for row, res in already if not _in_ledger(conn, row, outbox.content_hash(res))]
        outbox.record(conn, dest, [(row["resource_ref"], row["subject_key"], outbox.content_hash(res),
                                    outbox.RETRACTED, None) for row, res in landed + already], run_id)
        outbox.record(conn, dest, [(row["resource_ref"], row["subject_key"], row["content_hash"], outbox.RETRACTED,
                                    "not on the trust's server: nothing to mark") for row in gone], run_id)
        ledger.append(conn, [_disclosure(conn, run_id, dag_id, trust, row, res) for row, res in done], at)
        for row, why in refused:
            outbox.note_failure(conn, dest, row["resource_ref"], why)
        quarantine_rows(conn, run_id, f"retract:{trust}", [(row["subject_key"], None, why) for row, why in refused])
        if failure is not None:
            quarantine_rows(conn, run_id, f"retract:{trust}", [(None, None, (
                f"the trust's server failed during retraction ({type(failure).__name__}): what was not marked "
                "stays due and the next run sends it"))])
    counts["retracted"] += len(landed)
    counts["retracted_already_marked"] += len(already)
    counts["retracted_not_on_server"] += len(gone)
    counts["retractions_refused"] += len(refused)
    counts["retractions_still_due"] += len(rows) - len(landed) - len(already) - len(gone) - len(refused)


def _in_ledger(conn: Connection, row: dict[str, Any], h: str) -> bool:
    q = select(ledger_table.c.seq).where(ledger_table.c.subject_key.in_(ledger.subjects_of(row["subject_key"])),
                                         ledger_table.c.content_hash == h,
                                         ledger_table.c.data_items == ledger.RETRACTION).limit(1)
    return conn.execute(q).first() is not None


def _disclosure(conn: Connection, run_id: str, dag_id: str, trust: str, row: dict[str, Any],
                res: dict[str, Any]) -> Disclosure:
    recipient = f"ODS:{trust}"
    agreement_id, agreement_version = ledger.last_agreement(conn, row["subject_key"], recipient, row["content_hash"])
    tags = (res.get("meta") or {}).get("tag") or []
    mapping = next((t.get("code") for t in tags if isinstance(t, dict) and t.get("system") == MAPPING_VERSION_SYSTEM),
                   None)
    return Disclosure(
        run_id=run_id, dag_id=dag_id, direction=Direction.SCHOOL_TO_TRUST, recipient=recipient,
        subject_key=row["subject_key"], data_items=(ledger.RETRACTION,), agreement_id=agreement_id,
        agreement_version=agreement_version, consent_id=retraction_reason(conn, row["run_id"]),
        mapping_version=str(mapping or ledger.RETRACTION)[:64], content_hash=outbox.content_hash(res),
    )
