"""The school's nightly status feed: for each pupil the agreement and consent cover, where their
referral stands tonight, in plain English (CSV for MIS import, JSON), with a manifest of row counts
and SHA-256, written atomically into `SCHOOLSLINK_HOME/out/feeds/<URN>/<date>/`.

Rows come from the declarative mapping `mappings/feed-out/school-feed-row.yaml`: a column whose
data item the agreement or the consent does not allow is never filled. Every row is a
disclosure to the school and gets a ledger entry. The feeds issue adds HTML, changes-only files,
signposting and delivery to S3/SFTP.

Corrections: when a link is found wrong (`match review unlink`), each school that was sent status rows
about the learner from that trust gets one correction row in its next feed, and only in that feed (a
same-night re-run carries it again): the pupil's UPN and names as the school holds them, the trust,
`status_code` `entered-in-error`, a status telling the school to disregard every earlier row for the pupil
from that trust, `changed` `correction`, and nothing else. It is not gated by consent or agreement (it
discloses nothing about the child) and gets a ledger entry with item `retraction`. `feed_rows` keeps
the state: `content_hash` holds `review.CORRECTION_DUE` + the decision id until a feed carries it, then
`review.CORRECTION_SENT` + the decision id (in `prev_hash` if the same night also carries a new status row).
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
from schoolslink.governance.review import (
    CORRECTION_DUE,
    CORRECTION_SENT,
    confirmed_for_case,
    is_marker,
    retraction_reason,
)
from schoolslink.mapping.engine import load_mappings
from schoolslink.model import Direction, Disclosure
from schoolslink.pipeline.common import store
from schoolslink.settings import feeds_dir
from schoolslink.status import approaching_adulthood, derive
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
CORRECTION_CODE = "entered-in-error"
CORRECTION_STATUS = ("Sent in error: disregard every earlier status row for this pupil from this trust; "
                     "nothing from it applied to this pupil")
CORRECTION_VERSION = f"feed-correction-{FEED_VERSION}"  # the ledger's mapping_version for a correction row


@dataclass(frozen=True, slots=True)
class FeedCounts:
    schools: int
    rows: int
    refused_by_consent: int
    no_agreement: int
    corrections: int = 0


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
            totals["corrections"] += sum(1 for r in rows if r["changed"] == "correction")
            staged = _stage_feed(urn, feed_date, rows, agreements, run_id)
            ledger.append(conn, disclosures, at)
            upsert(conn, feed_rows, _not_over_new_corrections(conn, urn, state),
                   ["school_urn", "learner_key", "trust_ods"])
        _publish(staged, feed_dir(urn, feed_date))
        totals["schools"] += 1
        totals["rows"] += len(rows)
        totals["refused"] += refused
        totals["no_agreement"] += no_agreement
    return FeedCounts(totals["schools"], totals["rows"], totals["refused"], totals["no_agreement"],
                      totals["corrections"])


def _school_rows(
    conn: Connection, run_id: str, urn: str, feed_date: date, agreements: list[Agreement]
) -> tuple[list[dict[str, Any]], list[Disclosure], int, int, list[dict[str, Any]]]:
    pupils = {
        r["learner_key"]: dict(r)
        for r in conn.execute(
            select(learners).where(learners.c.school_urn == urn, learners.c.plain.is_not(None),
                                   learners.c.left_school.is_(False))
        ).mappings()
    }
    lks = live_links(conn, list(pupils))
    # A sensitive case is shown only over a link a person confirmed knowing the case (match review confirm).
    confirmed = confirmed_for_case(conn, [(p, lk) for key, p in pupils.items() if is_sensitive(p)
                                          for lk in lks.get(key, [])])
    lks = {key: [lk for lk in v if not is_sensitive(pupils[key]) or (key, lk["trust_ods"]) in confirmed]
           for key, v in lks.items()}
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
    corrections: dict[tuple[str, str], str] = {}  # (learner, trust) -> the unlink decision tonight corrects
    for r in conn.execute(select(feed_rows).where(feed_rows.c.school_urn == urn)):
        prev_hash, prev_date, decision = _before_tonight(r, feed_date)
        previous[(r.learner_key, r.trust_ods)] = (prev_hash, prev_date)
        if decision is not None:
            corrections[(r.learner_key, r.trust_ods)] = decision
    consents = register.load_for(conn, list(pupils) + [x["patient_key"] for v in lks.values() for x in v])
    mappings = load_mappings()

    rows, state, disclosures = _corrections(conn, run_id, urn, feed_date, corrections)
    corrected = {(s["learner_key"], s["trust_ods"]): s["content_hash"] for s in state}
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
                    # the trust's own flag, or within six months of 18
                    "transition": bool(ref["transition"]) or approaching_adulthood(plain.get("dob"), feed_date),
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
            if (key, trust) in corrected:  # tonight also corrects what came before: keep that for a re-run
                state = [s for s in state if (s["learner_key"], s["trust_ods"]) != (key, trust)]
                prev_hash, prev_date = corrected[(key, trust)], None
            state.append({"school_urn": urn, "learner_key": key, "trust_ods": trust, "content_hash": h,
                          "feed_date": feed_date, "prev_hash": prev_hash, "prev_date": prev_date})
            rows.append(row)
    return rows, disclosures, refused, no_agreement, state


def _not_over_new_corrections(conn: Connection, urn: str, state: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The state to keep, less what would overwrite a correction made due while this feed was being built
    (an unlink that raced the build): that correction then goes in the next feed."""
    due = {(r.learner_key, r.trust_ods): CORRECTION_SENT + r.content_hash.removeprefix(CORRECTION_DUE)
           for r in conn.execute(select(feed_rows.c.learner_key, feed_rows.c.trust_ods, feed_rows.c.content_hash)
                                 .where(feed_rows.c.school_urn == urn,
                                        feed_rows.c.content_hash.startswith(CORRECTION_DUE, autoescape=True)))}
    return [s for s in state if (s["learner_key"], s["trust_ods"]) not in due
            or due[(s["learner_key"], s["trust_ods"])] in (s["content_hash"], s["prev_hash"])]


def _before_tonight(r: Any, feed_date: date) -> tuple[str | None, date | None, str | None]:
    """From a feed_rows row: (hash, date) of the status row the school had before tonight (None, None if
    none, or if what it had was a correction), and the unlink decision whose correction tonight's feed
    carries (None: no correction tonight)."""
    h, prev = r.content_hash, r.prev_hash
    if h.startswith(CORRECTION_DUE):
        return None, None, h.removeprefix(CORRECTION_DUE)
    if r.feed_date < feed_date:  # tonight's feed is not built yet: the row is what the school has
        return (None, None, None) if is_marker(h) else (h, r.feed_date, None)
    # a re-run of tonight's feed: carry again what the first build carried
    if h.startswith(CORRECTION_SENT):
        return None, None, h.removeprefix(CORRECTION_SENT)
    if prev is not None and prev.startswith(CORRECTION_SENT):
        return None, None, prev.removeprefix(CORRECTION_SENT)
    return (None, None, None) if is_marker(prev) else (prev, r.prev_date, None)


def _corrections(conn: Connection, run_id: str, urn: str, feed_date: date, due: dict[tuple[str, str], str]
                 ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[Disclosure]]:
    """Tonight's correction rows (rows, feed_rows state, ledger entries): identity and the correction only."""
    rows: list[dict[str, Any]] = []
    state: list[dict[str, Any]] = []
    disclosures: list[Disclosure] = []
    plain = {r["learner_key"]: r["plain"] for r in conn.execute(
        select(learners.c.learner_key, learners.c.plain)
        .where(learners.c.learner_key.in_(sorted({k for k, _ in due})))).mappings()} if due else {}
    for (key, trust), decision in sorted(due.items()):
        who = plain.get(key) or {}  # the school's own identifiers for its pupil, while the store holds them
        row = dict.fromkeys(COLUMNS, "")
        row.update(upn=who.get("upn") or "", surname=who.get("surname") or "", forename=who.get("forename") or "",
                   trust_ods=trust, status=CORRECTION_STATUS, status_code=CORRECTION_CODE)
        h = hashlib.sha256(json.dumps(row, sort_keys=True, default=str).encode()).hexdigest()
        row["changed"] = "correction"
        agreement_id, agreement_version = ledger.last_agreement(conn, key, f"URN:{urn}")
        disclosures.append(Disclosure(
            run_id=run_id, dag_id="school_feeds", direction=Direction.TRUST_TO_SCHOOL, recipient=f"URN:{urn}",
            subject_key=key, data_items=(ledger.RETRACTION,), agreement_id=agreement_id,
            agreement_version=agreement_version, consent_id=retraction_reason(conn, decision),
            mapping_version=CORRECTION_VERSION, content_hash=h,
        ))
        state.append({"school_urn": urn, "learner_key": key, "trust_ods": trust,
                      "content_hash": CORRECTION_SENT + decision, "feed_date": feed_date, "prev_hash": None,
                      "prev_date": None})
        rows.append(row)
    return rows, state, disclosures


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
