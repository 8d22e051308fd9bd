"""nhs_sync stages: pull each trust's changes by `_lastUpdated` watermark into the state store.

We read, never write, the trust's Patient: only its keyed NHS-number pseudonym, its match hash and per-attribute
match keys (keyed hashes: schoolslink/governance/scoring.py), the school it names, whether its NHS number is
verified and whether it is restricted are kept. Our own writes (meta.source / tag) are skipped. The watermark
advances only after a type's rows are stored. Matching then runs, with a PDS trace only when one is configured
(`SCHOOLSLINK_PDS_TRACE_URL`; off by default).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from typing import Any

from sqlalchemy import Connection, Engine, select

from connectors.fhir.client import FhirClient
from connectors.fhir.errors import FhirError, FhirTransientError
from connectors.fhir.pull import IncrementalPull, PullState, state_columns
from connectors.pds.client import PdsFhirClient
from schoolslink.endpoints import FhirEndpoint, fhir_endpoint
from schoolslink.errors import SchoolslinkError, TransientError
from schoolslink.governance import register
from schoolslink.governance.agreement import load_agreements
from schoolslink.governance.matching import match_pending
from schoolslink.logfilter import remember_names
from schoolslink.mapping import fhir_inbound as fin
from schoolslink.model import Consent, ConsentDecision
from schoolslink.pipeline.common import quarantine_rows, store
from schoolslink.store.query import chunks
from schoolslink.store.schema import (
    consents,
    patients,
    trust_appointments,
    trust_episodes,
    trust_practitioners,
    trust_referrals,
    watermarks,
)
from schoolslink.store.upsert import upsert

# Order matters only for readability of counts: every row stands alone and joins at feed time.
TYPES = ("PractitionerRole", "Patient", "ServiceRequest", "EpisodeOfCare", "Appointment", "Consent")
BATCH = 5000


def trusts_to_pull() -> list[str]:
    return sorted({t.ods for a in load_agreements() for t in a.trusts})


def pull_state(conn: Connection, source: str, rtype: str) -> PullState:
    """Where the last pull of `rtype` from `source` got to (empty: never pulled)."""
    row = conn.execute(select(watermarks.c.value, watermarks.c.seen).where(
        watermarks.c.source == source, watermarks.c.resource_type == rtype)).first()
    if row is None:
        return PullState()
    return PullState.of(row.value or None, row.seen)


def watermark(conn: Connection, source: str, rtype: str) -> str | None:
    """The greatest `meta.lastUpdated` the last pull of `rtype` from `source` processed (None: never pulled)."""
    return pull_state(conn, source, rtype).watermark


def pull_trust(run_id: str, trust_ods: str) -> dict[str, Any]:
    """Pull every type; a type that fails (peer or store) keeps its watermark and does not stop the others.

    A resource that cannot be read is quarantined by reference (`Type/id`) and the pull goes on. If a whole
    type failed, that is quarantined too and, once every other type is pulled, raised (names only: no
    values), so the task fails and is retried.
    """
    endpoint = fhir_endpoint(trust_ods)
    counts: dict[str, int] = defaultdict(int)
    eng = store()
    if endpoint is None:
        with eng.begin() as conn:
            quarantine_rows(conn, run_id, f"pull:{trust_ods}", [(None, None, f"no FHIR endpoint configured "
                                                                  f"for trust {trust_ods}: nothing pulled")])
        return {"trusts_without_endpoint": 1}
    source = f"fhir:{trust_ods}"
    failed: list[tuple[str, Exception]] = []
    with endpoint.client() as client:
        for rtype in TYPES:
            if rtype == "Consent" and any(t == "Patient" for t, _ in failed):
                # A Consent is stored against its Patient's key: without this run's Patients, new ones would
                # be dropped and the watermark passed. Wait for the next run.
                failed.append((rtype, SchoolslinkError("not pulled because the Patient pull failed")))
                continue
            try:
                _pull_type(eng, client, run_id, trust_ods, source, rtype, counts, endpoint)
            except Exception as exc:  # noqa: BLE001 - one type's failure must not stop the others
                failed.append((rtype, exc))
                counts["pulled_types_failed"] += 1
                try:
                    reason = (f"pulling {rtype} failed ({_describe(exc)}); its watermark stays, so the next "
                              f"run reads those changes again")
                    with eng.begin() as conn:
                        quarantine_rows(conn, run_id, f"fhir:{trust_ods}:{rtype}", [(None, None, reason)])
                except Exception:  # noqa: BLE001, S110 - the store itself may be what failed; we raise below
                    pass
    if failed:
        what = "; ".join(f"{rtype}: {_describe(exc)}" for rtype, exc in failed)
        err_type = TransientError if all(isinstance(e, FhirTransientError) for _, e in failed) else SchoolslinkError
        raise err_type(f"pull from trust {trust_ods}: {len(failed)} resource type(s) failed ({what}); "
                       f"the other types were pulled") from None
    return dict(counts)


def _describe(exc: Exception) -> str:
    """What failed, safe for logs: the FHIR client's messages carry no ids or bodies; others only by class."""
    if isinstance(exc, FhirError | SchoolslinkError):
        return f"{type(exc).__name__}: {exc}"
    return type(exc).__name__


def _pull_type(eng: Engine, client: FhirClient, run_id: str, trust_ods: str, source: str, rtype: str,
               counts: dict[str, int], endpoint: FhirEndpoint) -> None:
    with eng.connect() as conn:
        state = pull_state(conn, source, rtype)
    pull = IncrementalPull(client, rtype, state, overlap=endpoint.overlap, page_size=endpoint.page_size,
                           is_own=fin.is_ours)
    for batch in pull.batches(BATCH):
        with eng.begin() as conn:
            _store(conn, run_id, trust_ods, rtype, batch, counts)
    counts["pulled_own_writes_skipped"] += pull.stats.own_skipped
    counts["pulled_overlap_already_seen"] += pull.stats.already_seen
    after = pull.next_state()
    if after != state:
        with eng.begin() as conn:
            upsert(conn, watermarks, [{"source": source, "resource_type": rtype, **state_columns(after)}],
                   ["source", "resource_type"])


def _read(rtype: str, res: dict[str, Any]) -> dict[str, Any] | None:
    """`fin.canonical`, with any unexpected failure turned into an InboundError that names no value."""
    try:
        return fin.canonical(rtype, res)
    except fin.InboundError:
        raise
    except Exception as exc:  # noqa: BLE001 - one odd resource is quarantined, never the end of the pull
        raise fin.InboundError("structure", f"{rtype} could not be read ({type(exc).__name__})") from None


def _store(conn: Connection, run_id: str, trust: str, rtype: str, batch: list[dict[str, Any]],
           counts: dict[str, int]) -> None:
    if rtype == "Consent":
        _store_consents(conn, run_id, trust, batch, counts)
        return
    rows: list[dict[str, Any]] = []
    bad: list[tuple[str | None, str | None, str]] = []
    if rtype == "Patient":  # hidden if ever logged: the mapping reduces them to keyed hashes below
        remember_names(_patient_names(batch))
    for res in batch:
        try:
            row = _read(rtype, res)
        except fin.InboundError as exc:
            bad.append((f"{rtype}/{res.get('id', '?')}", exc.field, str(exc)))
            continue
        if row is None:
            continue
        rows.append({**row, "trust_ods": trust, "updated_run": run_id})
    if rtype == "PractitionerRole":  # the named workers schools may contact: hidden if ever logged
        remember_names(r["name"] for r in rows)
    if bad:
        counts["pulled_quarantined"] += quarantine_rows(conn, run_id, f"fhir:{trust}:{rtype}", bad)
    if not rows:
        return
    if rtype == "Patient":
        upsert(conn, patients, rows, ["trust_ods", "patient_ref"])
    elif rtype == "ServiceRequest":
        upsert(conn, trust_referrals, rows, ["trust_ods", "referral_ref"])
    elif rtype == "EpisodeOfCare":
        upsert(conn, trust_episodes, rows, ["trust_ods", "episode_ref"])
    elif rtype == "Appointment":
        upsert(conn, trust_appointments, rows, ["trust_ods", "appointment_ref"])
    elif rtype == "PractitionerRole":
        upsert(conn, trust_practitioners, rows, ["trust_ods", "role_ref"])
    counts[f"pulled_{rtype}"] += len(rows)


def _patient_names(batch: list[dict[str, Any]]) -> Iterator[object]:
    """Every family and given name (and name text) of a batch of Patients, whatever shape a resource is in."""
    for res in batch:
        names = res.get("name")
        for n in names if isinstance(names, list) else ():
            if isinstance(n, dict):
                given = n.get("given")
                yield from (n.get("family"), n.get("text"), *(given if isinstance(given, list) else (given,)))


def _store_consents(conn: Connection, run_id: str, trust: str, batch: list[dict[str, Any]],
                    counts: dict[str, int]) -> None:
    """Each Consent resource's current version replaces what we stored for it: one record per school it names,
    and every stored record it no longer yields (entered-in-error, draft, a school removed, ...) forgotten, so
    nothing keeps permitting. An unreadable version (or one whose Patient we do not hold) is quarantined and
    its stored permits forgotten; its stored refusals stay (fail closed) until a usable version arrives."""
    latest: dict[str, dict[str, Any] | None] = {}  # Consent/<id> -> its canonical row (None: yields no record)
    unreadable: set[str] = set()
    bad: list[tuple[str | None, str | None, str]] = []
    for res in batch:  # in _lastUpdated order: a later version of the same Consent wins
        ref = f"Consent/{res['id']}" if res.get("id") else None
        try:
            row = _read("Consent", res)
        except fin.InboundError as exc:
            bad.append((ref or "Consent/?", exc.field, str(exc)))
            if ref:
                latest.pop(ref, None)
                unreadable.add(ref)
            continue
        if ref:
            unreadable.discard(ref)
            latest[ref] = row
    if bad:
        counts["pulled_quarantined"] += quarantine_rows(conn, run_id, f"fhir:{trust}:Consent", bad)
    if not latest and not unreadable:
        return

    refs = sorted({r["patient_ref"] for r in latest.values() if r is not None})
    keys: dict[str, str] = {}
    for part in chunks(refs):
        keys.update(conn.execute(select(patients.c.patient_ref, patients.c.patient_key).where(
            patients.c.trust_ods == trust, patients.c.patient_ref.in_(part))).tuples().all())
    records: list[Consent] = []
    keep: set[str] = set()
    bad_patient: list[tuple[str | None, str | None, str]] = []
    for ref, row in list(latest.items()):
        if row is not None and row["patient_ref"] not in keys:
            # As good as unreadable: its stored permits go, its stored refusals stay.
            bad_patient.append((ref, "patient", "Consent's Patient is not known here (not yet pulled, or "
                                                "quarantined): the consent is not applied"))
            del latest[ref]
            unreadable.add(ref)
            continue
        recs = fin.consent_records(row, keys, trust) if row is not None else []
        records.extend(recs)
        keep.update(c.consent_id for c in recs)

    stale: list[str] = []
    prefix = f"fhir:{trust}:Consent/"
    stored = conn.execute(select(consents.c.consent_id, consents.c.decision).where(
        consents.c.consent_id.startswith(prefix, autoescape=True))).tuples().all()
    for cid, decision in stored:
        ref = "Consent/" + cid[len(prefix):].split(":", 1)[0]  # ids: fhir:<trust>:Consent/<id>[:<urn>]
        if cid in keep:
            continue
        if ref in latest or (ref in unreadable and decision != ConsentDecision.DENY.value):
            stale.append(cid)
    if bad_patient:
        counts["pulled_quarantined"] += quarantine_rows(conn, run_id, f"fhir:{trust}:Consent", bad_patient)
    counts["consents_forgotten"] += register.forget(conn, stale)
    register.save(conn, records, "fhir", run_id)
    counts["pulled_Consent"] += len(latest)
    counts["consent_records"] += len(records)


def match_all(run_id: str) -> dict[str, int]:
    """Match every pending trust Patient; with the PDS trace when one is configured (counts say what it did)."""
    trace = PdsFhirClient.from_env()
    try:
        with store().begin() as conn:
            m = match_pending(conn, run_id, trace=trace)
    finally:
        if trace is not None:
            trace.close()
    counts = {"linked_now": m.linked, "to_review": m.review}
    if trace is not None:
        counts.update({"pds_traced": m.traced, "linked_by_pds_trace": m.linked_by_trace,
                       "pds_trace_failed": m.trace_failed})
    return counts


