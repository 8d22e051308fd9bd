"""The school's nightly status feed: for each pupil the agreement and consent cover, where their
referral stands tonight, in plain English (CSV for MIS import, JSON), with a manifest of row counts
and SHA-256, written atomically into `SCHOOLSLINK_HOME/out/feeds/<URN>/<date>/`.

Rows come from the declarative mapping `mappings/feed-out/school-feed-row.yaml`: a column whose
data item the agreement or the consent does not allow is never filled. Every row is a
disclosure to the school and gets a ledger entry. The feeds issue adds HTML, changes-only files,
corrections, signposting and delivery to S3/SFTP.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
from collections import defaultdict
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, select

from schoolslink import ledger
from schoolslink.constants import PURPOSE_SUPPORT as PURPOSE
from schoolslink.governance import register
from schoolslink.governance.agreement import Agreement, agreement_for, load_agreements
from schoolslink.governance.consent import ConsentFacts, allowed_items
from schoolslink.governance.matching import is_sensitive, live_links
from schoolslink.mapping.engine import load_mappings
from schoolslink.model import Direction, Disclosure
from schoolslink.pipeline.common import store
from schoolslink.settings import feeds_dir
from schoolslink.status import derive
from schoolslink.store.query import rows_by
from schoolslink.store.schema import (
    feed_rows,
    learners,
    trust_appointments,
    trust_episodes,
    trust_practitioners,
    trust_referrals,
)
from schoolslink.store.upsert import upsert

FEED_VERSION = "1"
COLUMNS = (
    "upn", "surname", "forename", "trust_ods", "referral_received", "status", "status_code", "reason",
    "days_waiting", "next_appointment", "contact_name", "contact_role", "contact_email", "transition",
    "changed",
)
FEED_MAPPING = "school-feed-row"  # mappings/feed-out/school-feed-row.yaml: which item fills which column


@dataclass(frozen=True, slots=True)
class FeedCounts:
    schools: int
    rows: int
    refused_by_consent: int
    no_agreement: int


def feed_dir(urn: str, feed_date: date) -> Path:
    return feeds_dir() / urn / feed_date.isoformat()


def build_school_feeds(run_id: str, urns: list[str], feed_date: date, at: datetime) -> FeedCounts:
    agreements = load_agreements()
    totals: dict[str, int] = defaultdict(int)
    eng = store()
    for urn in urns:
        # The feed is written aside, the ledger and feed state commit, and only then is the feed put in
        # place: a feed a school can read always has its ledger rows.
        with eng.begin() as conn:
            rows, disclosures, refused, no_agreement, state = _school_rows(conn, run_id, urn, feed_date, agreements)
            staged = _stage_feed(urn, feed_date, rows, agreements, run_id)
            ledger.append(conn, disclosures, at)
            upsert(conn, feed_rows, state, ["school_urn", "learner_key", "trust_ods"])
        _publish(staged, feed_dir(urn, feed_date))
        totals["schools"] += 1
        totals["rows"] += len(rows)
        totals["refused"] += refused
        totals["no_agreement"] += no_agreement
    return FeedCounts(totals["schools"], totals["rows"], totals["refused"], totals["no_agreement"])


def _school_rows(
    conn: Connection, run_id: str, urn: str, feed_date: date, agreements: list[Agreement]
) -> tuple[list[dict[str, Any]], list[Disclosure], int, int, list[dict[str, Any]]]:
    pupils = {
        r["learner_key"]: dict(r)
        for r in conn.execute(
            select(learners).where(learners.c.school_urn == urn, learners.c.plain.is_not(None),
                                   learners.c.left_school.is_(False))
        ).mappings()
        if not is_sensitive(r)
    }
    lks = live_links(conn, list(pupils))
    patient_refs = sorted({x["patient_ref"] for v in lks.values() for x in v})
    refs = rows_by(conn, trust_referrals, "patient_ref", patient_refs)
    refs = {k: [r for r in v if r["fhir_status"] != "entered-in-error"] for k, v in refs.items()}
    referral_refs = sorted({r["referral_ref"] for v in refs.values() for r in v})
    eps = rows_by(conn, trust_episodes, "referral_ref", referral_refs)
    appts = rows_by(conn, trust_appointments, "referral_ref", referral_refs)
    role_refs = sorted({r["performer_ref"] for v in refs.values() for r in v if r["performer_ref"]}
                       | {e["care_manager_ref"] for v in eps.values() for e in v if e["care_manager_ref"]})
    roles = {k: v[0] for k, v in rows_by(conn, trust_practitioners, "role_ref", role_refs).items()}
    # What the school had before tonight: a re-run of tonight's feed compares with the same thing.
    previous: dict[tuple[str, str], tuple[str | None, date | None]] = {}
    for r in conn.execute(select(feed_rows).where(feed_rows.c.school_urn == urn)):
        if r.feed_date < feed_date:
            previous[(r.learner_key, r.trust_ods)] = (r.content_hash, r.feed_date)
        else:
            previous[(r.learner_key, r.trust_ods)] = (r.prev_hash, r.prev_date)
    consents = register.load_for(conn, list(pupils) + [x["patient_key"] for v in lks.values() for x in v])
    mappings = load_mappings()

    rows: list[dict[str, Any]] = []
    state: list[dict[str, Any]] = []
    disclosures: list[Disclosure] = []
    refused = no_agreement = 0
    for key, pupil in sorted(pupils.items()):
        for lk in lks.get(key, []):
            trust = lk["trust_ods"]
            candidates = [r for r in refs.get(lk["patient_ref"], []) if r["trust_ods"] == trust]
            if not candidates:
                continue
            agreement = agreement_for(agreements, urn, trust, feed_date, PURPOSE)
            if agreement is None:
                no_agreement += 1
                continue
            recs = register.for_school(consents.get(key, []) + consents.get(lk["patient_key"], []), urn)
            allowed, consent_id = allowed_items(agreement, recs, ConsentFacts.of(pupil), Direction.TRUST_TO_SCHOOL,
                                                PURPOSE, feed_date)
            if not allowed or consent_id is None:
                refused += 1
                continue
            ref = max(candidates, key=lambda r: (r["received"] or date.min, r["referral_ref"]))
            st = derive(ref, eps.get(ref["referral_ref"], []), appts.get(ref["referral_ref"], []), feed_date)
            ep_mgr = next(
                (e["care_manager_ref"] for e in eps.get(ref["referral_ref"], []) if e["care_manager_ref"]), None
            )
            role = roles.get(ep_mgr or ref["performer_ref"] or "")
            plain = pupil["plain"]
            canonical = {
                "pupil": {"upn": plain["upn"], "surname": plain["surname"], "forename": plain["forename"]},
                "trust_ods": trust,
                "referral": {
                    "received": ref["received"].isoformat() if ref["received"] else None,
                    "status": st.status.value, "reason_code": st.reason_code,
                    "days_waiting": (feed_date - ref["received"]).days if ref["received"] else None,
                    "next_appointment": st.next_appointment.isoformat() if st.next_appointment else None,
                    "contact": {"name": (role or {}).get("name"), "role": (role or {}).get("role"),
                                "email": (role or {}).get("email")},
                    "transition": bool(ref["transition"]),
                },
            }
            cm = mappings.compile(FEED_MAPPING, allowed)
            mapped, sent_items = cm.run_with_items(canonical, record_key=key)
            row = {c: mapped.get(c, "") for c in COLUMNS if c != "changed"}
            h = hashlib.sha256(json.dumps(row, sort_keys=True, default=str).encode()).hexdigest()
            prev_hash, prev_date = previous.get((key, trust), (None, None))
            row["changed"] = "new" if prev_hash is None else ("changed" if prev_hash != h else "")
            disclosures.append(Disclosure(
                run_id=run_id, dag_id="school_feeds", direction=Direction.TRUST_TO_SCHOOL,
                recipient=f"URN:{urn}", subject_key=key, data_items=tuple(sorted(set(sent_items))),
                agreement_id=agreement.id, agreement_version=agreement.version, consent_id=consent_id,
                mapping_version=cm.version, content_hash=h,
            ))
            state.append({"school_urn": urn, "learner_key": key, "trust_ods": trust, "content_hash": h,
                          "feed_date": feed_date, "prev_hash": prev_hash, "prev_date": prev_date})
            rows.append(row)
    return rows, disclosures, refused, no_agreement, state


def _stage_feed(urn: str, feed_date: date, rows: list[dict[str, Any]], agreements: list[Agreement],
                run_id: str) -> Path:
    """Write the feed's files into a hidden folder beside where it will be published."""
    final = feed_dir(urn, feed_date)
    tmp = final.with_name(f".{final.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    public = [{c: r[c] for c in COLUMNS} for r in rows]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\r\n")
    w.writeheader()
    w.writerows(public)
    csv_bytes = buf.getvalue().encode("utf-8")
    trusts = sorted({r["trust_ods"] for r in rows})
    contacts = []
    for a in agreements:
        if a.covers_school(urn) and a.active_on(feed_date) and PURPOSE in a.purposes:
            sc = a.school_contact(urn)
            for t in a.trusts:
                contacts.append({"agreement": a.id, "agreement_version": a.version, "trust_ods": t.ods,
                                 "trust_name": t.name, "trust_link_worker": t.link_worker_name,
                                 "trust_link_worker_email": t.link_worker_email,
                                 "school_link_contact": sc[0] if sc else None,
                                 "school_link_contact_email": sc[1] if sc else None})
    version = load_mappings().get(FEED_MAPPING).version
    doc = {"feed_version": FEED_VERSION, "mapping_version": version, "school_urn": urn, "date": feed_date.isoformat(),
           "link_contacts": contacts, "trusts": trusts, "rows": public}
    json_bytes = json.dumps(doc, indent=1).encode("utf-8")
    (tmp / "feed.csv").write_bytes(csv_bytes)
    (tmp / "feed.json").write_bytes(json_bytes)
    manifest = {
        "school_urn": urn, "date": feed_date.isoformat(), "run_id": run_id, "rows": len(public),
        "mapping_version": version,
        "files": {
            "feed.csv": {"sha256": hashlib.sha256(csv_bytes).hexdigest(), "bytes": len(csv_bytes)},
            "feed.json": {"sha256": hashlib.sha256(json_bytes).hexdigest(), "bytes": len(json_bytes)},
        },
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return tmp


def _publish(tmp: Path, final: Path) -> None:
    """Swap the staged folder into place: a school sees the whole old feed or the whole new one."""
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
