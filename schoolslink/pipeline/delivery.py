"""Delivery to a trust's FHIR server through the outbox, with consent checked again just before sending.

Order for each destination: re-read agreements, consent, links and flags (a withdrawal, a suspended
link or a case that became sensitive since extraction stops the record), drop what the trust already
has (outbox hash), PUT the rest by id in `batch` Bundles, then record outbox status and one ledger row
per resource that landed, in one transaction. An entry the server refuses is quarantined with its
reason while its bundle-mates land; if the server fails part-way, what landed is recorded and the rest
is sent again by the next run.

Retractions go first: every resource due for retraction (a link found wrong, `match review unlink`) is
marked entered-in-error on its trust's server before anything new is sent (schoolslink/pipeline/retraction.py).
"""

from __future__ import annotations

from collections import defaultdict
from datetime import date, datetime
from typing import Any

from sqlalchemy import Connection

from schoolslink import ledger, outbox, workstore
from schoolslink.constants import PURPOSE_SUPPORT as PURPOSE
from schoolslink.endpoints import fhir_endpoint
from schoolslink.governance import register, review
from schoolslink.governance.agreement import Agreement, agreement_for, load_agreements
from schoolslink.governance.consent import ConsentFacts, decide
from schoolslink.governance.matching import is_sensitive, live_links
from schoolslink.governance.review import confirmed_for_case
from schoolslink.model import Direction, Disclosure
from schoolslink.pipeline import fhir_write, retraction
from schoolslink.pipeline.common import quarantine_rows, store
from schoolslink.store.query import rows_by
from schoolslink.store.schema import learners


def deliver_outbound(
    run_id: str, dag_id: str, keys: list[str], run_date: date, at: datetime
) -> dict[str, Any]:
    by_dest: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for key in keys:
        for row in workstore.read_jsonl(key):
            by_dest[row["destination"]].append(row)
    counts: dict[str, int] = defaultdict(int)
    for name, n in retraction.send_due(run_id, dag_id, at).items():
        counts[name] += n
    agreements = load_agreements()
    eng = store()
    for dest, rows in sorted(by_dest.items()):
        endpoint = fhir_endpoint(dest)
        with eng.begin() as conn:
            rows = _recheck(conn, rows, agreements, run_date, counts)
            hashes = {f"Observation/{r['resource']['id']}": outbox.content_hash(r["resource"]) for r in rows}
            have = outbox.unchanged(conn, f"fhir:{dest}", hashes)
        todo = [r for r in rows if f"Observation/{r['resource']['id']}" not in have]
        counts["unchanged_not_sent"] += len(rows) - len(todo)
        if not todo:
            continue
        if endpoint is None:
            counts["no_endpoint"] += len(todo)
            with eng.begin() as conn:
                quarantine_rows(conn, run_id, f"deliver:{dest}",
                                [(None, None, f"no FHIR endpoint configured for trust {dest}: {len(todo)} "
                                  "record(s) not sent; they are mapped and sent by the first run after the "
                                  "endpoint is configured")])
            continue
        # The server failing part-way is not an exception: what landed is recorded, the rest is sent next run.
        outcome = fhir_write.write(endpoint, [r["resource"] for r in todo], run_id)
        results = outcome.results
        sent, disclosures, failed = [], [], []
        for r, res in zip(todo, results, strict=False):
            ref = f"{res.resource_type}/{res.id}"
            h = hashes[ref]
            if res.ok:
                sent.append((ref, r["subject_key"], h, "sent", None))
                disclosures.append(_disclosure(run_id, dag_id, dest, r, h))
            else:
                failed.append((ref, r["subject_key"], h, "failed", res.message))
        unsent = todo[len(results):]
        with eng.begin() as conn:
            outbox.record(conn, f"fhir:{dest}", sent + failed, run_id)
            ledger.append(conn, disclosures, at)
            # A link unlinked as wrong while this batch was in flight: what just landed under it is due too.
            for key, decision in review.unlink_decisions(conn, dest, [subj for _, subj, _, _, _ in sent]).items():
                counts["retractions_due_raced"] += outbox.mark_for_retraction(conn, f"fhir:{dest}", key, decision)
            quarantine_rows(conn, run_id, f"deliver:{dest}",
                            [(subj, None, f"refused by the trust's server: {err}") for _, subj, _, _, err in failed])
            why = outcome.failure_reason(len(todo))
            if why is not None:
                quarantine_rows(conn, run_id, f"deliver:{dest}", [(None, None, why)])
        counts["sent"] += len(sent)
        counts["refused_by_server"] += len(failed)
        counts["not_sent_server_failed"] += len(unsent)
    return dict(counts)


def _disclosure(run_id: str, dag_id: str, dest: str, r: dict[str, Any], h: str) -> Disclosure:
    return Disclosure(
        run_id=run_id, dag_id=dag_id, direction=Direction.SCHOOL_TO_TRUST, recipient=f"ODS:{dest}",
        subject_key=r["subject_key"], data_items=(r["item"],), agreement_id=r["agreement_id"],
        agreement_version=r["agreement_version"], consent_id=r["consent_id"],
        mapping_version=r["mapping_version"], content_hash=h, values=_sent_values(r),
    )


def _sent_values(r: dict[str, Any]) -> dict[str, str] | None:
    """The Observation's value[x] as sent, for the ledger's commitment to the item (None: it has none)."""
    sent = {k: v for k, v in r["resource"].items() if k.startswith("value")}
    return {r["item"]: ledger.value_text(sent)} if sent else None


def _recheck(conn: Connection, rows: list[dict[str, Any]], agreements: list[Agreement], run_date: date,
             counts: dict[str, int]) -> list[dict[str, Any]]:
    """Agreement, link, flags and consent again, from the store as it is now."""
    subjects = sorted({r["subject_key"] for r in rows})
    facts: dict[str, ConsentFacts] = {}
    stopped: set[str] = set()
    learner_rows = {key: lr for key, [lr] in rows_by(conn, learners, "learner_key", subjects).items()}
    live = live_links(conn, subjects)
    for key, lr in learner_rows.items():
        facts[key] = ConsentFacts.of(lr)
        if lr["left_school"] or lr["plain"] is None:
            stopped.add(key)
    # A sensitive case goes only over a link a person confirmed knowing the case (match review confirm).
    confirmed = confirmed_for_case(conn, [(lr, lk) for key, lr in learner_rows.items() if is_sensitive(lr)
                                          for lk in live.get(key, [])])
    links_now = {(key, lk["trust_ods"], lk["patient_ref"]) for key, lks in live.items() if key in learner_rows
                 for lk in lks if not is_sensitive(learner_rows[key]) or (key, lk["trust_ods"]) in confirmed}
    records = register.load_for(conn, subjects + sorted({r["patient_key"] for r in rows}))
    keep = []
    for r in rows:
        agreement = agreement_for(agreements, r["school_urn"], r["destination"], run_date, PURPOSE)
        if agreement is None or r["item"] not in agreement.allowed(Direction.SCHOOL_TO_TRUST):
            counts["stopped_at_delivery_agreement"] += 1
            continue
        if (r["subject_key"], r["destination"], r["patient_ref"]) not in links_now or r["subject_key"] in stopped \
                or r["subject_key"] not in facts:
            counts["stopped_at_delivery_link_or_flags"] += 1
            continue
        recs = register.for_school(records.get(r["subject_key"], []) + records.get(r["patient_key"], []),
                                   r["school_urn"])
        d = decide(recs, facts[r["subject_key"]], Direction.SCHOOL_TO_TRUST, PURPOSE, run_date, r["item"])
        if not d.allowed or d.consent_id is None:
            counts["stopped_at_delivery_consent"] += 1
            continue
        keep.append({**r, "consent_id": d.consent_id, "agreement_id": agreement.id,
                     "agreement_version": agreement.version})
    return keep

