"""mis_ingest stages: landing zone -> parse CTF -> validate (GX) -> govern -> map -> outbox -> FHIR -> ledger.

Each function is one Airflow task's work over a chunk of schools; they hand each other storage keys.
One school's bad export halts that school only: it is refused whole, moved aside, and the reason
recorded; the other schools go on. The work files that carry pupil data live only for the run:
`deliver` removes them, and `plan` removes any a failed run left behind.
"""

from __future__ import annotations

import shutil
from collections import defaultdict
from datetime import date, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, bindparam, select, update

from connectors.mis.consent_register import RegisterFlags, read_register
from connectors.mis.ctf import CtfReader
from connectors.mis.errors import MisInputError
from schoolslink import workstore
from schoolslink.constants import PURPOSE_SUPPORT as PURPOSE
from schoolslink.governance import register
from schoolslink.governance.agreement import Agreement, agreement_for, load_agreements
from schoolslink.governance.consent import ConsentFacts, allowed_items, decide
from schoolslink.governance.matching import is_sensitive, live_links, match_pending
from schoolslink.keys import learner_key, match_hash
from schoolslink.mapping import school_context
from schoolslink.mapping.engine import MappingError, load_mappings
from schoolslink.model import Consent, Direction, Learner
from schoolslink.pipeline.common import age_on, chunked, quarantine_rows, store
from schoolslink.settings import home, landing_dir
from schoolslink.store.query import chunks
from schoolslink.store.schema import learners
from schoolslink.store.upsert import upsert
from schoolslink.validation import build_feature_frame, validate_learner_features

CONTEXT_MAPPING = "school-context-observations"


def plan(run_id: str, max_chunks: int) -> list[dict[str, Any]]:
    """The schools with an export in the landing zone, split into chunks (URNs are not pupil data)."""
    slug = workstore.run_slug(run_id)
    workstore.purge_pupil_files(keep_run=slug)
    root = landing_dir() / "mis"
    urns = sorted(p.name for p in root.iterdir() if p.is_dir() and any(p.glob("*.xml"))) if root.exists() else []
    return [{"run": slug, "chunk": i, "schools": part} for i, part in enumerate(chunked(urns, max_chunks))]


def _newest_export(urn: str) -> Path | None:
    files = sorted((landing_dir() / "mis" / urn).glob("*.xml"))
    return files[-1] if files else None


def _key_of(path: Path) -> str:
    return str(path.relative_to(home()))


def _move_aside(path: Path) -> Path:
    dest = landing_dir() / "refused" / path.parent.name
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / path.name
    shutil.move(str(path), target)
    return target


def parse_validate(run_id: str, chunk: dict[str, Any], run_date: date) -> dict[str, Any]:
    """Parse each school's newest CTF, refuse bad files whole, quarantine bad records (reader + GX)."""
    reader = CtfReader()
    accepted: list[Learner] = []
    labels: list[tuple[str, int, str]] = []  # (file key, position among the file's accepted pupils, export date)
    full_schools: list[str] = []
    counts = {"files": 0, "refused_files": 0, "read": 0, "quarantined": 0}
    with store().begin() as conn:
        for urn in chunk["schools"]:
            path = _newest_export(urn)
            if path is None:
                continue
            counts["files"] += 1
            try:
                result = reader.read(path)
                if result.header.source_urn != urn:
                    raise MisInputError("the CTF's source URN is not the school whose folder it landed in")
            except MisInputError as exc:
                counts["refused_files"] += 1
                moved = _move_aside(path)
                quarantine_rows(conn, run_id, _key_of(moved), [(None, None, f"file refused: {exc}")])
                continue
            key = _key_of(path)
            exported = result.header.datetime.date() if result.header.datetime else run_date
            counts["read"] += len(result.learners) + len(result.quarantined)
            counts["quarantined"] += quarantine_rows(
                conn, run_id, key, [(q.record, q.field, q.reason) for q in result.quarantined]
            )
            if result.header.qualifier == "full":
                full_schools.append(urn)
            for k, lr in enumerate(result.learners, start=1):
                accepted.append(lr)
                labels.append((key, k, exported.isoformat()))

        frame = build_feature_frame(accepted, run_date)
        docs = workstore.path_for(f"{chunk['run']}/chunk-{chunk['chunk']}/gx")
        summary = validate_learner_features(frame, data_docs_dir=docs)
        bad = summary.bad_records
        if bad:
            counts["quarantined"] += quarantine_rows(conn, run_id, "gx:learners", [
                (f"accepted pupil {labels[i][1]} of {labels[i][0].rsplit('/', 1)[-1]}", None, "; ".join(reasons))
                for i, reasons in bad.items()
            ])
    rows = []
    for i, lr in enumerate(accepted):
        if i in bad:
            continue
        d = lr.to_dict()
        d["export_date"] = labels[i][2]
        rows.append(d)
    key = f"{chunk['run']}/chunk-{chunk['chunk']}/learners.jsonl"
    workstore.write_jsonl(key, rows)
    return {"run": chunk["run"], "chunk": chunk["chunk"], "schools": chunk["schools"], "learners_key": key,
            "full_schools": full_schools, "accepted": len(rows), "gx_success": summary.success, **counts}


def _read_registers(conn: Connection, run_id: str, urns: list[str], counts: dict[str, int]
                    ) -> tuple[dict[str, RegisterFlags], set[str]]:
    """Each school's consent register: records saved, flags merged; returns (flags, schools read)."""
    flags: dict[str, RegisterFlags] = {}
    read_ok: set[str] = set()
    for urn in urns:
        path = landing_dir() / "consent" / f"{urn}.csv"
        if not path.exists():
            continue
        reg = read_register(path, urn)
        refused = getattr(reg, "refused", None)
        if refused:
            quarantine_rows(conn, run_id, _key_of(path), [(None, None, f"consent register refused: {refused}")])
            counts["consent_registers_refused"] += 1
            continue
        counts["consent_records_dropped"] += register.replace_school_register(
            conn, urn, reg.consents, run_id, {k: f.competent for k, f in reg.flags.items()})
        for k, f in reg.flags.items():
            mine = flags.setdefault(k, RegisterFlags())
            mine.competent |= f.competent
            mine.child_protection |= f.child_protection
            mine.do_not_tell_parent |= f.do_not_tell_parent
        read_ok.add(urn)
        counts["consent_records"] += len(reg.consents)
        counts["consent_rows_quarantined"] += quarantine_rows(conn, run_id, _key_of(path), reg.quarantined)
    return flags, read_ok


def _stored_flags(conn: Connection, keys: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for part in chunks(keys):
        q = select(learners.c.learner_key, learners.c.competent, learners.c.child_protection,
                   learners.c.do_not_tell_parent).where(learners.c.learner_key.in_(part))
        for r in conn.execute(q).mappings():
            out[r["learner_key"]] = dict(r)
    return out


def govern_map(run_id: str, part: dict[str, Any], run_date: date) -> dict[str, Any]:
    """Record the roll (hashes; plain data only with consent), consents, links; map what may go to each trust."""
    agreements = load_agreements()
    rows = list(workstore.read_jsonl(part["learners_key"]))
    counts: dict[str, int] = defaultdict(int)
    with store().begin() as conn:
        flags, registers_read = _read_registers(conn, run_id, part["schools"], counts)
        keys = [learner_key(r["upn"]) for r in rows]
        # A school whose register could not be read keeps the flags it last gave: a missing file must
        # never clear a child-protection or do-not-tell-parent flag.
        kept = _stored_flags(conn, [k for k, r in zip(keys, rows, strict=True)
                                    if r["school_urn"] not in registers_read])
        roll = []
        for r, key in zip(rows, keys, strict=True):
            fl = flags.get(key, RegisterFlags())
            prev = kept.get(key, {})
            lf = r["flags"]
            roll.append({
                "learner_key": key, "school_urn": r["school_urn"],
                "match_hash": match_hash(r["school_urn"], r["surname"], r["forename"], r["dob"]),
                "looked_after": bool(lf["looked_after"]), "adopted": bool(lf["adopted"]),
                "child_protection": fl.child_protection or bool(lf["child_protection"])
                or bool(prev.get("child_protection")),
                "do_not_tell_parent": fl.do_not_tell_parent or bool(lf["do_not_tell_parent"])
                or bool(prev.get("do_not_tell_parent")),
                "competent": fl.competent or bool(prev.get("competent")),
                "left_school": bool(r.get("leaving_date")),
                "age_years": age_on(date.fromisoformat(r["dob"]), run_date),
                "plain": None, "updated_run": run_id,
            })
        upsert(conn, learners, roll, ["learner_key"])
        counts["learners"] = len(roll)
        counts["marked_left"] = _mark_missing_as_left(conn, run_id, part.get("full_schools", []))
        m = match_pending(conn, run_id, part["schools"])
        counts["linked_now"] = m.linked
        counts["to_review"] = m.review

        # Plain data only for learners with an active consent (school or trust side) for this school.
        lks = live_links(conn, keys)
        consents = register.load_for(conn, keys + [lk["patient_key"] for ls in lks.values() for lk in ls])
        plain_rows = []
        for r, row in zip(rows, roll, strict=True):
            key = row["learner_key"]
            if row["left_school"]:
                continue
            recs = register.for_school(
                consents.get(key, []) + [c for lk in lks.get(key, []) for c in consents.get(lk["patient_key"], [])],
                row["school_urn"])
            facts = ConsentFacts.of(row)
            if any(decide(recs, facts, d, PURPOSE, run_date).allowed for d in Direction):
                row["plain"] = r
                plain_rows.append({"key": key, "plain": r})
        if plain_rows:  # one executemany, not a statement a learner
            conn.execute(update(learners).where(learners.c.learner_key == bindparam("key"))
                         .values(plain=bindparam("plain")), plain_rows)
        counts["with_consent"] = len(plain_rows)
        outbound = _map_outbound(conn, run_id, roll, lks, consents, agreements, run_date, counts)
    workstore.remove(part["learners_key"])  # pupil data leaves the work store as soon as it is governed
    key = f"{part['run']}/chunk-{part['chunk']}/outbound.jsonl"
    workstore.write_jsonl(key, outbound)
    carried: dict[str, Any] = {
        k: part[k] for k in ("files", "refused_files", "read", "quarantined", "accepted") if k in part
    }
    return {"run": part["run"], "chunk": part["chunk"], "outbound_key": key, "outbound": len(outbound),
            **carried, **dict(counts)}


def _mark_missing_as_left(conn: Connection, run_id: str, full_schools: list[str]) -> int:
    """A full export is the whole roll: a pupil it no longer lists has left, and keeps no plain data."""
    if not full_schools:
        return 0
    res = conn.execute(
        update(learners)
        .where(learners.c.school_urn.in_(full_schools), learners.c.updated_run != run_id,
               learners.c.left_school.is_(False))
        .values(left_school=True, plain=None, updated_run=run_id)
    )
    return int(res.rowcount or 0)


def _map_outbound(
    conn: Connection,
    run_id: str,
    roll: list[dict[str, Any]],
    lks: dict[str, list[dict[str, Any]]],
    consents: dict[str, list[Consent]],
    agreements: list[Agreement],
    run_date: date,
    counts: dict[str, int],
) -> list[dict[str, Any]]:
    mappings = load_mappings()
    out = []
    for r in roll:
        key = r["learner_key"]
        if key not in lks:
            continue
        if r["left_school"]:
            counts["not_sent_left_school"] += 1
            continue
        if is_sensitive(r):
            counts["not_sent_sensitive_case"] += 1
            continue
        if r["plain"] is None:  # no active consent from anyone who may decide
            counts["refused_by_consent"] += 1
            continue
        for lk in lks[key]:
            agreement = agreement_for(agreements, r["school_urn"], lk["trust_ods"], run_date, PURPOSE)
            if agreement is None:
                counts["refused_no_agreement"] += 1
                continue
            records = register.for_school(consents.get(key, []) + consents.get(lk["patient_key"], []),
                                          r["school_urn"])
            items, consent_id = allowed_items(agreement, records, ConsentFacts.of(r), Direction.SCHOOL_TO_TRUST,
                                              PURPOSE, run_date)
            if not items or consent_id is None:
                counts["refused_by_consent"] += 1
                continue
            cm = mappings.compile(CONTEXT_MAPPING, items)
            record = {"learner_key": key, "school_urn": r["school_urn"], "trust_ods": lk["trust_ods"],
                      "patient_ref": lk["patient_ref"], "effective": r["plain"].get("export_date"),
                      "values": school_context.context_items(r["plain"])}
            try:
                mapped, sent_items = cm.run_with_items(record, record_key=key)
                resources = mapped.get("resources", [])
            except MappingError as exc:
                counts["mapping_errors"] += 1
                quarantine_rows(conn, run_id, f"mapping:{CONTEXT_MAPPING}", [(key, None, exc.reason)])
                continue
            for res in resources:
                problems = cm.problems(res)
                if res["code"]["coding"][0]["code"] not in set(sent_items) & items:
                    problems = [*problems, "the Observation's code is not an item the mapping was allowed to send"]
                if problems:
                    counts["mapping_errors"] += 1
                    quarantine_rows(conn, run_id, f"mapping:{CONTEXT_MAPPING}", [(key, None, "; ".join(problems))])
                    continue
                out.append({
                    "destination": lk["trust_ods"], "subject_key": key, "patient_key": lk["patient_key"],
                    "patient_ref": lk["patient_ref"], "school_urn": r["school_urn"],
                    "item": res["code"]["coding"][0]["code"], "agreement_id": agreement.id,
                    "agreement_version": agreement.version, "mapping_version": cm.version, "resource": res,
                })
            counts["learners_mapped"] += 1
    return out


def deliver(run_id: str, parts: list[dict[str, Any]], run_date: date, at: datetime) -> dict[str, Any]:
    """Re-check consent, skip what each trust already has, PUT the rest by id, record in outbox and ledger."""
    from schoolslink.pipeline.delivery import deliver_outbound

    keys = [p["outbound_key"] for p in parts]
    try:
        return deliver_outbound(run_id, "mis_ingest", keys, run_date, at)
    finally:
        for k in keys:
            workstore.remove(k)
