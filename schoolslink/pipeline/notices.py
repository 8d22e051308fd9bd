"""Notices to a trust, each a FHIR Communication we own with no data item about the child.

Move notices: when a pupil with a live link to a trust moves to another school (a `moved` learner event),
that trust is told once, where the old school's agreement with it asks (`notices: {move: true}`) and consent
to share with it stands: the day, and whose CYPMHS area the new school is in, by the partnership's
postcode-district table (schoolslink/governance/routing.py), never the new school itself. Never for a
sensitive case.

Withdrawal notices: a trust that was sent a learner's school context is told when the consent is withdrawn.

Runs in mis_ingest's deliver stage, after the night's delivery. For every learner and trust to which we have
sent school context (outbox rows `sent`), over a live link, where the agreement between the learner's school
and that trust asks for notices (`notices: {withdrawal: true}`) and the consent rules now say "consent
withdrawn" for school -> trust, the trust gets one Communication we own (mappings/fhir-out/withdrawal-notice):
about its own Patient, from the school, with the day of withdrawal; no data item about the child. It is sent
once for each withdrawn consent record (its id is keyed on that record; its outbox row says it was sent),
and recorded in the ledger (item `withdrawal_notice`, the withdrawn consent's id, the agreement version).

Nothing else is sent about the learner after a withdrawal: the extraction and delivery gates see to that.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import date, datetime
from typing import Any

from sqlalchemy import Connection, select

from schoolslink import ledger, outbox
from schoolslink.constants import PURPOSE_SUPPORT as PURPOSE
from schoolslink.endpoints import fhir_endpoint
from schoolslink.governance import register
from schoolslink.governance.agreement import Agreement, agreement_for, load_agreements
from schoolslink.governance.consent import ConsentFacts, decide
from schoolslink.governance.matching import is_sensitive, live_links
from schoolslink.governance.routing import load_routing
from schoolslink.mapping.engine import CompiledMapping, load_mappings
from schoolslink.model import Direction, Disclosure
from schoolslink.pipeline import fhir_write
from schoolslink.pipeline.common import quarantine_rows, store
from schoolslink.store.query import rows_by
from schoolslink.store.schema import consents, learner_events, learners
from schoolslink.store.schema import outbox as outbox_table

MAPPING = "withdrawal-notice"
ITEM = "withdrawal_notice"
MOVE_MAPPING = "move-notice"
MOVE_ITEM = "move_notice"


def _sent_subjects(conn: Connection) -> dict[str, set[str]]:
    """Trust ODS -> learner keys we have sent school context to (and not retracted)."""
    out: dict[str, set[str]] = defaultdict(set)
    q = select(outbox_table.c.destination, outbox_table.c.subject_key).where(
        outbox_table.c.status == outbox.SENT, outbox_table.c.resource_ref.like("Observation/%")).distinct()
    for dest, subject in conn.execute(q):
        if dest.startswith("fhir:"):
            out[dest.removeprefix("fhir:")].add(subject)
    return out


def _withdrawn_on(conn: Connection, consent_id: str) -> date | None:
    return conn.execute(select(consents.c.withdrawn_on).where(consents.c.consent_id == consent_id)).scalar()


def notices_due(conn: Connection, run_date: date, at: datetime) -> dict[str, list[dict[str, Any]]]:
    """Trust ODS -> the notices to send: resource, subject, consent id, agreement (id, version)."""
    agreements = load_agreements()
    cm = load_mappings().compile(MAPPING)
    due: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for trust, subjects in sorted(_sent_subjects(conn).items()):
        keys = sorted(subjects)
        rows = {k: v[0] for k, v in rows_by(conn, learners, "learner_key", keys).items()}
        lks = live_links(conn, keys)
        pairs = [(k, lk) for k in keys for lk in lks.get(k, []) if lk["trust_ods"] == trust and k in rows]
        records = register.load_for(conn, [k for k, _ in pairs] + [lk["patient_key"] for _, lk in pairs])
        for key, lk in pairs:
            lr = rows[key]
            agreement = agreement_for(agreements, lr["school_urn"], trust, run_date, PURPOSE)
            if agreement is None or not agreement.notify_withdrawal:
                continue
            recs = register.for_school(records.get(key, []) + records.get(lk["patient_key"], []), lr["school_urn"])
            d = decide(recs, ConsentFacts.of(lr), Direction.SCHOOL_TO_TRUST, PURPOSE, run_date)
            if d.allowed or d.reason != "consent withdrawn" or d.consent_id is None:
                continue
            withdrawn = _withdrawn_on(conn, d.consent_id) or run_date
            due[trust].append(_notice(cm, key, d.consent_id, agreement, {
                "learner_key": key, "school_urn": lr["school_urn"], "trust_ods": trust,
                "patient_ref": lk["patient_ref"], "consent_id": d.consent_id, "withdrawn_on": withdrawn.isoformat(),
                "sent": at.isoformat()}))
    return due


def _notice(cm: CompiledMapping, subject_key: str, consent_id: str, agreement: Agreement,
            record: dict[str, Any]) -> dict[str, Any]:
    """One notice, mapped and checked, with what its ledger entry needs."""
    resource = cm.run(record, record_key=subject_key)
    return {"resource": resource, "subject_key": subject_key, "consent_id": consent_id,
            "agreement": (agreement.id, agreement.version), "mapping_version": cm.version,
            "problems": cm.problems(resource)}


def send_withdrawal_notices(run_id: str, dag_id: str, run_date: date, at: datetime) -> dict[str, int]:
    with store().connect() as conn:
        due = notices_due(conn, run_date, at)
    return _send(run_id, dag_id, at, due, MAPPING, ITEM, "withdrawal_notices")


def move_notices_due(conn: Connection, run_date: date, at: datetime) -> dict[str, list[dict[str, Any]]]:
    """Trust ODS -> move notices to send: for each `moved` event of a learner with a live link to a trust, where
    the old school's agreement with that trust asks for them and consent to share with it stands."""
    agreements = load_agreements()
    routing = load_routing()
    cm = load_mappings().compile(MOVE_MAPPING)
    events = list(conn.execute(select(learner_events).where(learner_events.c.kind == "moved")).mappings())
    if not events:
        return {}
    keys = sorted({e["learner_key"] for e in events})
    rows = {k: v[0] for k, v in rows_by(conn, learners, "learner_key", keys).items()}
    lks = live_links(conn, keys)
    records = register.load_for(conn, keys + [lk["patient_key"] for v in lks.values() for lk in v])
    due: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in events:
        lr = rows.get(e["learner_key"])
        if lr is None or lr["left_school"] or is_sensitive(lr):
            continue  # a sensitive case's whereabouts are never sent on by this notice
        for lk in lks.get(e["learner_key"], []):
            trust = lk["trust_ods"]
            agreement = agreement_for(agreements, e["from_urn"], trust, run_date, PURPOSE)
            if agreement is None or not agreement.notify_move:
                continue
            recs = register.for_school(records.get(e["learner_key"], []) + records.get(lk["patient_key"], []),
                                       e["from_urn"])
            d = decide(recs, ConsentFacts.of(lr), Direction.SCHOOL_TO_TRUST, PURPOSE, run_date)
            if not d.allowed or d.consent_id is None:
                continue
            due[trust].append(_notice(cm, e["learner_key"], d.consent_id, agreement, {
                "learner_key": e["learner_key"], "from_urn": e["from_urn"], "trust_ods": trust,
                "patient_ref": lk["patient_ref"], "event_id": str(e["id"]), "moved_on": e["at"].date().isoformat(),
                "area_trust": routing.trust_for_school(e["to_urn"] or ""), "sent": at.isoformat()}))
    return due


def send_move_notices(run_id: str, dag_id: str, run_date: date, at: datetime) -> dict[str, int]:
    with store().connect() as conn:
        due = move_notices_due(conn, run_date, at)
    return _send(run_id, dag_id, at, due, MOVE_MAPPING, MOVE_ITEM, "move_notices")


def _send(run_id: str, dag_id: str, at: datetime, due: dict[str, list[dict[str, Any]]], mapping: str, item: str,
          what: str) -> dict[str, int]:
    """Send each trust's notices once (a notice already sent, by its id, is not sent again); outbox and ledger."""
    counts: dict[str, int] = defaultdict(int)
    eng = store()
    for trust, notices in sorted(due.items()):
        with eng.begin() as conn:
            refs = {f"Communication/{n['resource']['id']}": n for n in notices}
            have = {r for (r,) in conn.execute(select(outbox_table.c.resource_ref).where(
                outbox_table.c.destination == f"fhir:{trust}", outbox_table.c.status == outbox.SENT,
                outbox_table.c.resource_ref.in_(list(refs))))}
            bad = [n for n in notices if n["problems"]]
            quarantine_rows(conn, run_id, f"mapping:{mapping}", [(n["subject_key"], None, "; ".join(n["problems"]))
                                                                 for n in bad])
        todo = [n for ref, n in refs.items() if ref not in have and not n["problems"]]
        if not todo:
            continue
        endpoint = fhir_endpoint(trust)
        if endpoint is None:
            counts[f"{what}_waiting_for_endpoint"] += len(todo)
            continue
        outcome = fhir_write.write(endpoint, [n["resource"] for n in todo], run_id)
        sent, disclosures, refused = [], [], []
        for n, res in zip(todo, outcome.results, strict=False):
            h = outbox.content_hash(n["resource"])
            if not res.ok:
                counts[f"{what}_refused"] += 1
                refused.append((n["subject_key"], None, f"{what} refused by the trust's server: {res.message}"))
                continue
            sent.append((f"Communication/{n['resource']['id']}", n["subject_key"], h, outbox.SENT, None))
            disclosures.append(Disclosure(
                run_id=run_id, dag_id=dag_id, direction=Direction.SCHOOL_TO_TRUST, recipient=f"ODS:{trust}",
                subject_key=n["subject_key"], data_items=(item,), agreement_id=n["agreement"][0],
                agreement_version=n["agreement"][1], consent_id=n["consent_id"],
                mapping_version=n["mapping_version"], content_hash=h,
                values={item: ledger.value_text(n["resource"].get("payload"))}))
        with eng.begin() as conn:
            outbox.record(conn, f"fhir:{trust}", sent, run_id)
            ledger.append(conn, disclosures, at)
            quarantine_rows(conn, run_id, f"notice:{trust}", refused)
            why = outcome.failure_reason(len(todo), f"{what}(s)")
            if why is not None:
                quarantine_rows(conn, run_id, f"notice:{trust}", [(None, None, why)])
        counts[f"{what}_sent"] += len(sent)
        counts[f"{what}_not_sent"] += len(todo) - len(sent)
    return dict(counts)
