"""nhs_sync stages: pull each trust's changes by `_lastUpdated` watermark into the state store.

We read, never write, the trust's Patient: only its keyed NHS-number pseudonym, its match hash, the
school it names, whether its NHS number is verified and whether it is restricted are kept. Our own
writes (meta.source / tag) are skipped. The watermark advances only after a type's rows are stored.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from typing import Any

from sqlalchemy import Connection, select

from connectors.fhir.client import FhirClient
from schoolslink.endpoints import fhir_base
from schoolslink.governance import register
from schoolslink.governance.agreement import load_agreements
from schoolslink.governance.matching import match_pending
from schoolslink.mapping import fhir_inbound as fin
from schoolslink.pipeline.common import quarantine_rows, store
from schoolslink.store.schema import (
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


def _watermark(conn: Connection, source: str, rtype: str) -> str | None:
    v = conn.execute(
        select(watermarks.c.value).where(watermarks.c.source == source, watermarks.c.resource_type == rtype)
    ).scalar()
    return str(v) if v is not None else None


def _batches(it: Iterator[dict[str, Any]], n: int) -> Iterator[list[dict[str, Any]]]:
    buf: list[dict[str, Any]] = []
    for x in it:
        buf.append(x)
        if len(buf) >= n:
            yield buf
            buf = []
    if buf:
        yield buf


def pull_trust(run_id: str, trust_ods: str) -> dict[str, Any]:
    base = fhir_base(trust_ods)
    counts: dict[str, int] = defaultdict(int)
    eng = store()
    if base is None:
        with eng.begin() as conn:
            quarantine_rows(conn, run_id, f"pull:{trust_ods}", [(None, None, f"no FHIR endpoint configured "
                                                                  f"for trust {trust_ods}: nothing pulled")])
        return {"trusts_without_endpoint": 1}
    source = f"fhir:{trust_ods}"
    with FhirClient(base) as client:
        for rtype in TYPES:
            with eng.connect() as conn:
                since = _watermark(conn, source, rtype)
            newest = since
            for batch in _batches(client.search_since(rtype, since, page_size=1000), BATCH):
                ours = [r for r in batch if fin.is_ours(r)]
                theirs = [r for r in batch if not fin.is_ours(r)]
                counts["pulled_own_writes_skipped"] += len(ours)
                with eng.begin() as conn:
                    _store(conn, run_id, trust_ods, rtype, theirs, counts)
                for r in batch:
                    lu = r.get("meta", {}).get("lastUpdated")
                    if lu and (newest is None or lu > newest):
                        newest = lu
            if newest and newest != since:
                with eng.begin() as conn:
                    upsert(conn, watermarks, [{"source": source, "resource_type": rtype, "value": newest}],
                           ["source", "resource_type"])
    return dict(counts)


def _store(conn: Connection, run_id: str, trust: str, rtype: str, batch: list[dict[str, Any]],
           counts: dict[str, int]) -> None:
    rows: list[dict[str, Any]] = []
    bad: list[tuple[str | None, str | None, str]] = []
    for res in batch:
        try:
            row = fin.canonical(rtype, res)
        except fin.InboundError as exc:
            bad.append((f"{rtype}/{res.get('id', '?')}", exc.field, str(exc)))
            continue
        if row is None:
            continue
        rows.append(row if rtype == "Consent" else {**row, "trust_ods": trust, "updated_run": run_id})
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
    elif rtype == "Consent":
        refs = sorted({r["patient_ref"] for r in rows})
        keys = dict(conn.execute(select(patients.c.patient_ref, patients.c.patient_key)
                                 .where(patients.c.trust_ods == trust, patients.c.patient_ref.in_(refs))).all())
        consents = [fin.consent_record(r, keys, trust) for r in rows]
        register.save(conn, [c for c in consents if c is not None], "fhir", run_id)
    counts[f"pulled_{rtype}"] += len(rows)


def match_all(run_id: str) -> dict[str, int]:
    with store().begin() as conn:
        m = match_pending(conn, run_id)
    return {"linked_now": m.linked, "to_review": m.review}


