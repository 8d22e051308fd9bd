"""The school's nightly status feed: for each pupil the agreement and consent cover, where their
referral stands tonight, in plain English, written atomically into `SCHOOLSLINK_HOME/out/feeds/<URN>/<date>/`
(docs/feeds.md): `feed.csv` and `feed.json` (every row), `changes.csv` and `changes.json` (rows new, changed
or corrected since the school's last feed), `feed.html` (both, as one accessible page) and `manifest.json`
(each file's rows, bytes and SHA-256). The files are staged in a hidden folder and swapped in whole.

Rows come from the declarative mapping `mappings/feed-out/school-feed-row.yaml`: a column whose
data item the agreement or the consent does not allow is never filled. Every row is a
disclosure to the school and gets a ledger entry. A not-accepted or discharged row carries the trust's
signposting (`agreements/signposting/<ODS>.yaml`, schoolslink.governance.signposting) under the outcome
reason's item. Each row also names the trust's link worker from the agreement (not about the child), and
the top of every feed lists the link contacts. `changed` compares with what the school had before tonight
(the days waiting alone growing is not a change); `what_changed` names the columns that changed, only
among those the school may see tonight, from the previous feed's own file.

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

import hashlib
import json
import os
import shutil
from collections import defaultdict
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, select

from schoolslink import feed_render, ledger
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
from schoolslink.governance.signposting import signposting_for
from schoolslink.logfilter import remember_names
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

FEED_VERSION = "2"
COLUMNS = (
    "upn", "surname", "forename", "trust_ods", "referral_received", "status", "status_code", "reason",
    "signposting", "signposting_contact", "days_waiting", "next_appointment", "contact_name", "contact_role",
    "contact_email", "transition", "trust_link_worker", "trust_link_worker_email", "changed", "what_changed",
)
# Columns not from the mapping: the agreement's link worker (nothing about the child) and the change columns.
NOT_MAPPED = ("trust_link_worker", "trust_link_worker_email", "changed", "what_changed")
MAPPED = tuple(c for c in COLUMNS if c not in NOT_MAPPED)
NOT_A_CHANGE = ("days_waiting",)  # grows every night while a pupil waits: not news on its own
# The data item each mapped column carries (what_changed names a column only if its item is allowed tonight)
# and how what_changed names it.
COLUMN_ITEMS = {
    "referral_received": ("referral_received", "referral date"), "status": ("referral_status", "status"),
    "reason": ("outcome_reason", "reason"), "signposting": ("outcome_reason", "where else to go"),
    "signposting_contact": ("outcome_reason", "where else to go"),
    "next_appointment": ("next_appointment", "next appointment"), "contact_name": ("named_contact", "named contact"),
    "contact_role": ("named_contact", "named contact"), "contact_email": ("named_contact", "named contact"),
    "transition": ("transition", "transition"),
}
FILES = ("feed.csv", "feed.json", "changes.csv", "changes.json", "feed.html", "manifest.json")
FEED_MAPPING = "school-feed-row"  # mappings/feed-out/school-feed-row.yaml: which item fills which column
CORRECTION_CODE = "entered-in-error"
CORRECTION_STATUS = ("Sent in error: disregard every earlier status row for this pupil from this trust; "
                     "nothing from it applied to this pupil")
CORRECTION_VERSION = "feed-correction-1"  # the ledger's mapping_version for a correction row


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
            remember_names(r.get(c) for r in rows for c in ("surname", "forename"))  # hidden if ever logged
            totals["corrections"] += sum(1 for r in rows if r["changed"] == "correction")
            staged = _stage_feed(urn, feed_date, rows, agreements, run_id, at)
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

    earlier = _EarlierFeeds()
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
            table = signposting_for(trust)
            signpost = table.for_outcome(st.status.value, st.reason_code) if table is not None else None
            canonical = {
                "pupil": {"upn": plain["upn"], "surname": plain["surname"], "forename": plain["forename"]},
                "trust_ods": trust,
                "referral": {
                    "received": ref["received"].isoformat() if ref["received"] else None,
                    "status": st.status.value, "reason_code": st.reason_code,
                    "signposting": {"text": signpost.text, "contact": signpost.contact} if signpost else None,
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
            row: dict[str, Any] = {c: mapped.get(c, "") for c in MAPPED}
            h = _hash({c: v for c, v in row.items() if c not in NOT_A_CHANGE})  # what `changed` compares
            prev_hash, prev_date = previous.get((key, trust), (None, None))
            link_worker = agreement.trust(trust)
            row.update(trust_link_worker=link_worker.link_worker_name,
                       trust_link_worker_email=link_worker.link_worker_email)
            row["changed"] = "new" if prev_hash is None else ("changed" if prev_hash != h else "")
            row["what_changed"] = _what_changed(row, earlier.get(prev_date, urn).get((plain["upn"], trust)),
                                                allowed)
            disclosures.append(Disclosure(
                run_id=run_id, dag_id="school_feeds", direction=Direction.TRUST_TO_SCHOOL,
                recipient=f"URN:{urn}", subject_key=key, data_items=tuple(sorted(set(sent_items))),
                agreement_id=agreement.id, agreement_version=agreement.version, consent_id=consent_id,
                mapping_version=cm.version, content_hash=_hash(row),  # the row as the school receives it
                values=_sent_values(row, sent_items),
            ))
            if (key, trust) in corrected:  # tonight also corrects what came before: keep that for a re-run
                state = [s for s in state if (s["learner_key"], s["trust_ods"]) != (key, trust)]
                prev_hash, prev_date = corrected[(key, trust)], None
            state.append({"school_urn": urn, "learner_key": key, "trust_ods": trust, "content_hash": h,
                          "feed_date": feed_date, "prev_hash": prev_hash, "prev_date": prev_date})
            rows.append(row)
    return rows, disclosures, refused, no_agreement, state


# The data item each filled column carries, for the ledger's commitments (the identity columns carry none).
_ITEM_OF_COLUMN = {**{c: item for c, (item, _) in COLUMN_ITEMS.items()}, "status_code": "referral_status",
                   "days_waiting": "days_waiting"}


def _sent_values(row: dict[str, Any], sent_items: Any) -> dict[str, str]:
    """Per data item sent, its filled columns' text as the school receives it (ledger.value_text of
    {column: text}): what the ledger commits to."""
    by_item: dict[str, dict[str, str]] = defaultdict(dict)
    for col, item in _ITEM_OF_COLUMN.items():
        text = row.get(col)
        if item in sent_items and text not in (None, ""):
            by_item[item][col] = str(text)
    return {item: ledger.value_text(cols) for item, cols in by_item.items()}


def _hash(row: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(row, sort_keys=True, default=str).encode()).hexdigest()


class _EarlierFeeds:
    """The rows of the school's earlier feeds, from their own feed.json, read once each: only to say *what* changed
    (whether a row changed is decided by the stored hashes). A feed that is gone or unreadable says nothing."""

    def __init__(self) -> None:
        self._by_date: dict[tuple[str, date], dict[tuple[str, str], dict[str, Any]]] = {}

    def get(self, day: date | None, urn: str) -> dict[tuple[str, str], dict[str, Any]]:
        if day is None:
            return {}
        if (urn, day) not in self._by_date:
            rows: dict[tuple[str, str], dict[str, Any]] = {}
            try:
                doc = json.loads((feed_dir(urn, day) / "feed.json").read_text(encoding="utf-8"))
                for r in doc.get("rows", []):
                    if isinstance(r, dict) and r.get("status_code") != CORRECTION_CODE:
                        rows[(str(r.get("upn")), str(r.get("trust_ods")))] = r
            except (OSError, ValueError, AttributeError):
                rows = {}
            self._by_date[(urn, day)] = rows
        return self._by_date[(urn, day)]


def _what_changed(row: dict[str, Any], before: dict[str, Any] | None, allowed: frozenset[str] | set[str]) -> str:
    """Plain English for `changed`, naming only columns whose data item the school may see tonight."""
    if row["changed"] == "new":
        return "New in this feed"
    if row["changed"] != "changed":
        return ""
    names: list[str] = []
    if before is not None:
        for col, (item, name) in COLUMN_ITEMS.items():
            now, then = row.get(col, ""), before.get(col, "")
            if item in allowed and str("" if now is None else now) != str("" if then is None else then) \
                    and name not in names:
                names.append(name)
    return f"Changed: {', '.join(names)}" if names else "Changed since the last feed"


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
        h = _hash({c: v for c, v in row.items() if c not in ("changed", "what_changed")})
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


def link_contacts(agreements: list[Agreement], urn: str, feed_date: date) -> list[dict[str, Any]]:
    """The top of every feed: per active agreement covering the school and trust, the trust's named link worker
    and the school's link contact (from the agreement; nothing about any child)."""
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
    return contacts


def feed_document(urn: str, feed_date: date, rows: list[dict[str, Any]], contacts: list[dict[str, Any]],
                  mapping_version: str, kind: str = "full") -> dict[str, Any]:
    """feed.json (kind full: every row) or changes.json (kind changes: rows new, changed or corrected), as
    schoolslink/schemas/school-feed.schema.json publishes it."""
    public = [{c: r.get(c, "") for c in COLUMNS} for r in rows if kind == "full" or r.get("changed")]
    return {
        "$schema": feed_render.SCHEMA_ID, "feed_version": FEED_VERSION, "kind": kind, "school_urn": urn,
        "date": feed_date.isoformat(), "mapping_version": mapping_version, "link_contacts": contacts,
        "trusts": sorted({r["trust_ods"] for r in public}), "columns": list(COLUMNS),
        "counts": {"rows": len(public), "new": sum(r["changed"] == "new" for r in public),
                   "changed": sum(r["changed"] == "changed" for r in public),
                   "corrections": sum(r["changed"] == "correction" for r in public)},
        "rows": public,
    }


def render_feed(full: dict[str, Any], changes: dict[str, Any]) -> dict[str, tuple[bytes, int]]:
    """Every file of a feed folder except the manifest: name -> (bytes, rows)."""
    return {
        "feed.csv": (feed_render.csv_bytes(COLUMNS, full["rows"]), len(full["rows"])),
        "feed.json": (feed_render.json_bytes(full), len(full["rows"])),
        "changes.csv": (feed_render.csv_bytes(COLUMNS, changes["rows"]), len(changes["rows"])),
        "changes.json": (feed_render.json_bytes(changes), len(changes["rows"])),
        "feed.html": (feed_render.html_bytes(full, changes), len(full["rows"])),
    }


def _stage_feed(urn: str, feed_date: date, rows: list[dict[str, Any]], agreements: list[Agreement],
                run_id: str, at: datetime | None = None) -> Path:
    """Write the feed's files into a hidden folder beside where it will be published."""
    final = feed_dir(urn, feed_date)
    tmp = final.with_name(f".{final.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    version = load_mappings().get(FEED_MAPPING).version
    contacts = link_contacts(agreements, urn, feed_date)
    full = feed_document(urn, feed_date, rows, contacts, version, "full")
    changes = feed_document(urn, feed_date, rows, contacts, version, "changes")
    files = render_feed(full, changes)
    for name, (data, _) in files.items():
        (tmp / name).write_bytes(data)
    manifest = {
        "school_urn": urn, "date": feed_date.isoformat(), "run_id": run_id, "feed_version": FEED_VERSION,
        "schema": feed_render.SCHEMA_ID, "built_at": at.isoformat() if at else None, "rows": len(full["rows"]),
        "changes": len(changes["rows"]), "mapping_version": version,
        "files": {name: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "rows": n,
                         "media_type": _MEDIA_TYPES[name]}
                  for name, (data, n) in files.items()},
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return tmp


_MEDIA_TYPES = {"feed.csv": "text/csv; charset=utf-8", "changes.csv": "text/csv; charset=utf-8",
                "feed.json": "application/json", "changes.json": "application/json",
                "feed.html": "text/html; charset=utf-8"}


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
