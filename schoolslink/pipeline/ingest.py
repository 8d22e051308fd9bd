"""mis_ingest stages: landing zone -> parse (CTF, CSV, Wonde) -> validate (GX) -> govern -> map -> outbox -> FHIR.

Each function is one Airflow task's work over a chunk of schools; they hand each other storage keys.
One school's bad export halts that school only: it is refused whole, moved aside, and the reason
recorded; the other schools go on. The work files that carry pupil data live only for the run:
`deliver` removes them, and `plan` removes any a failed run left behind.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import Connection, bindparam, insert, select, update

from connectors.mis.base import MisExport
from connectors.mis.consent_register import ConsentRegister, RegisterFlags, read_register
from connectors.mis.errors import FileRefused, MisInputError
from connectors.mis.read import read_export
from connectors.storage.landing import Landed, LandingZone
from connectors.storage.sealed import SealedFileError
from schoolslink import workstore
from schoolslink.constants import PURPOSE_SUPPORT as PURPOSE
from schoolslink.governance import register
from schoolslink.governance.agreement import Agreement, agreement_for, load_agreements
from schoolslink.governance.consent import ConsentFacts, allowed_items, decide
from schoolslink.governance.matching import is_sensitive, live_links, match_pending
from schoolslink.governance.review import confirmed_for_case
from schoolslink.keys import learner_identity, learner_key, learner_key_of, learner_match_keys, match_hash, source_key
from schoolslink.logfilter import remember_names
from schoolslink.mapping import school_context
from schoolslink.mapping.engine import MappingError, load_mappings
from schoolslink.model import Consent, Direction, Learner
from schoolslink.pipeline.common import age_on, chunked, landing_zone, quarantine_rows, store
from schoolslink.store.query import chunks
from schoolslink.store.schema import learner_events, learners, source_ids
from schoolslink.store.upsert import upsert
from schoolslink.validation import build_feature_frame, validate_learner_features

CONTEXT_MAPPING = "school-context-observations"
# What the govern stage never needs, so it does not go into the work store (minimisation; and memory at scale):
# contacts and address lines are the largest parts of a learner.
WORK_DROPPED = ("contacts", "address_lines", "ethnicity", "fsm_eligible", "enrol_status", "middle_names",
                "exclusions_permanent")
# What is kept in plain for a consented learner: what the feeds and the school-context items need, and no
# more (no address, contacts, ethnicity, free school meals, NHS number or flags: minimisation).
PLAIN_FIELDS = (
    "upn", "uln", "school_urn", "surname", "forename", "preferred_surname", "preferred_forename", "dob",
    "year_group", "sen_provision", "attendance_sessions_possible", "attendance_sessions_attended",
    "attendance_sessions_authorised_absence", "attendance_sessions_unauthorised_absence",
    "exclusions_fixed_count", "export_date",
)


def plan(run_id: str, max_chunks: int) -> list[dict[str, Any]]:
    """Seal what was dropped, drop what is past retention, and split the schools with exports into chunks.

    URNs and storage keys only: never pupil data.
    """
    slug = workstore.run_slug(run_id)
    workstore.purge_pupil_files(keep_run=slug)
    zone = landing_zone()
    zone.intake()
    zone.purge()
    urns = zone.schools("mis")
    return [{"run": slug, "chunk": i, "schools": part} for i, part in enumerate(chunked(urns, max_chunks))]


def _read_school(zone: LandingZone, conn: Connection, run_id: str, urn: str, counts: dict[str, int]
                 ) -> list[tuple[Landed, MisExport]]:
    """The school's newest full export and every export landed after it, oldest first.

    A full export is the whole roll, so what came before it is superseded; a partial one (a change list, an
    incremental pull) applies on top. A file refused whole is moved aside, sealed, with its reason, and
    nothing from it is used; the school's other files still are.
    """
    out: list[tuple[Landed, MisExport]] = []
    for landed in reversed(zone.sealed("mis", urn)):
        counts["files"] += 1
        try:
            with landed.open() as f:
                export = read_export(f, school_urn=urn, name=landed.path.name)
            if export.school_urn is not None and export.school_urn != urn:
                raise FileRefused(f"the export says it is from school {export.school_urn}, but it landed in the "
                                  f"folder of school {urn}: check where it was sent")
        except (MisInputError, SealedFileError) as exc:
            counts["refused_files"] += 1
            moved = zone.move_aside(landed, str(exc))
            quarantine_rows(conn, run_id, str(moved.relative_to(zone.root)), [(None, None, f"file refused: {exc}")])
            continue
        out.append((landed, export))
        if export.qualifier == "full":
            break
    out.reverse()
    return out


def parse_validate(run_id: str, chunk: dict[str, Any], run_date: date) -> dict[str, Any]:
    """Read each school's exports, refuse bad files whole, quarantine bad records (readers + GX)."""
    zone = LandingZone()
    accepted: list[Learner] = []
    labels: list[tuple[str, int, str, str | None, str]] = []  # (file key, position, export date, source id, format)
    full_schools: list[str] = []
    changes: list[dict[str, Any]] = []  # leavers and deletions the source reports: keys only
    counts: dict[str, int] = defaultdict(int)
    with store().begin() as conn:
        for urn in chunk["schools"]:
            merged: dict[str, tuple[Learner, tuple[str, int, str, str | None, str]]] = {}
            exports = _read_school(zone, conn, run_id, urn, counts)
            for landed, ex in exports:
                file_key = landed.key  # once per file: it resolves paths
                exported = (ex.exported_at.date() if ex.exported_at else landed.landed_at.date()).isoformat()
                counts["read"] += ex.records
                counts["quarantined"] += quarantine_rows(
                    conn, run_id, file_key, [(q.record, q.field, q.reason) for q in ex.quarantined])
                ids = ex.source_ids or [None] * len(ex.learners)
                # The roll's names, so the log filter hides any of them that a log line might carry.
                remember_names(n for lr in ex.learners for n in (lr.surname, lr.forename, lr.preferred_surname,
                                                                 lr.preferred_forename, lr.middle_names))
                for k, (lr, sid) in enumerate(zip(ex.learners, ids, strict=True), start=1):
                    merged[learner_identity(lr.upn, lr.uln)] = (lr, (file_key, k, exported, sid, ex.format))
                for ident in ex.left:
                    merged.pop(ident, None)
                    changes.append({"kind": "left", "learner_key": learner_key(ident), "source": file_key})
                for sid in ex.deleted_source_ids:
                    changes.append({"kind": "deleted", "source_key": source_key(ex.format, urn, sid),
                                    "source": file_key})
            if exports and exports[0][1].qualifier == "full":
                full_schools.append(urn)
            for lr, label in merged.values():
                accepted.append(lr)
                labels.append(label)

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
        for f in WORK_DROPPED:  # not needed past this stage: never written to the work store
            d.pop(f, None)
        d["export_date"] = labels[i][2]
        d["source_id"] = labels[i][3]
        d["source_format"] = labels[i][4]
        rows.append(d)
    key = f"{chunk['run']}/chunk-{chunk['chunk']}/learners.jsonl"
    workstore.write_jsonl(key, rows)
    changes_key = f"{chunk['run']}/chunk-{chunk['chunk']}/changes.jsonl"
    workstore.write_jsonl(changes_key, changes)
    return {"run": chunk["run"], "chunk": chunk["chunk"], "schools": chunk["schools"], "learners_key": key,
            "changes_key": changes_key, "full_schools": full_schools, "accepted": len(rows),
            "gx_success": summary.success, **counts}


def _read_registers(conn: Connection, run_id: str, urns: list[str], counts: dict[str, int]
                    ) -> tuple[dict[str, RegisterFlags], set[str]]:
    """Each school's consent register: records saved, flags merged; returns (flags, schools read)."""
    flags: dict[str, RegisterFlags] = {}
    read_ok: set[str] = set()
    zone = LandingZone()
    for urn in urns:
        landed = zone.sealed("consent", urn)
        if not landed:
            continue
        newest = landed[-1]  # a register is the school's whole current register: the newest one replaces
        try:
            with newest.open() as fh:
                reg = read_register(fh.read(), urn)
        except SealedFileError as exc:
            reg = ConsentRegister(refused=str(exc))
        refused = reg.refused
        src = newest.key
        if refused:
            quarantine_rows(conn, run_id, src, [(None, None, f"consent register refused: {refused}")])
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
        counts["consent_rows_quarantined"] += quarantine_rows(conn, run_id, src, reg.quarantined)
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
        keys = [learner_key_of(r) for r in rows]
        prior = _prior(conn, keys)
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
                "match_keys": learner_match_keys(r),
                "looked_after": bool(lf["looked_after"]), "adopted": bool(lf["adopted"]),
                "child_protection": fl.child_protection or bool(lf["child_protection"])
                or bool(prev.get("child_protection")),
                "do_not_tell_parent": fl.do_not_tell_parent or bool(lf["do_not_tell_parent"])
                or bool(prev.get("do_not_tell_parent")),
                "competent": fl.competent or bool(prev.get("competent")),
                "left_school": bool(r.get("leaving_date")) and str(r["leaving_date"]) <= run_date.isoformat(),
                "age_years": age_on(date.fromisoformat(r["dob"]), run_date),
                "plain": None, "updated_run": run_id,
            })
        upsert(conn, learners, roll, ["learner_key"])
        for row in roll:  # stored; matching reads them from the store, so they need not stay in memory
            del row["match_keys"]
        counts["learners"] = len(roll)
        now = datetime.now(UTC)
        events = _roll_events(roll, prior, rows, run_id, now)
        _record_source_ids(conn, rows, keys, run_id)
        changes = list(workstore.read_jsonl(part["changes_key"])) if part.get("changes_key") else []
        counts["marked_left"] = (_renumbered(conn, run_id, rows, keys, events, now)
                                 + _mark_missing_as_left(conn, run_id, part.get("full_schools", []), events, now)
                                 + _apply_reported_leavers(conn, run_id, changes, events, now))
        if events:
            conn.execute(insert(learner_events), events)
        for e in events:
            counts[f"learners_{e['kind']}"] += 1
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
                kept = {k: r[k] for k in PLAIN_FIELDS if r.get(k) not in (None, "", [])}
                row["plain"] = kept
                plain_rows.append({"key": key, "plain": kept})
        if plain_rows:  # one executemany, not a statement a learner
            conn.execute(update(learners).where(learners.c.learner_key == bindparam("key"))
                         .values(plain=bindparam("plain")), plain_rows)
        counts["with_consent"] = len(plain_rows)
        outbound = _map_outbound(conn, run_id, roll, lks, consents, agreements, run_date, counts)
    workstore.remove(part["learners_key"])  # pupil data leaves the work store as soon as it is governed
    if part.get("changes_key"):
        workstore.remove(part["changes_key"])
    key = f"{part['run']}/chunk-{part['chunk']}/outbound.jsonl"
    workstore.write_jsonl(key, outbound)
    carried: dict[str, Any] = {
        k: part[k] for k in ("files", "refused_files", "read", "quarantined", "accepted") if k in part
    }
    return {"run": part["run"], "chunk": part["chunk"], "outbound_key": key, "outbound": len(outbound),
            **carried, **dict(counts)}


def _prior(conn: Connection, keys: list[str]) -> dict[str, tuple[str, bool]]:
    """What the store knew of these learners before this run: (school URN, left school)."""
    out: dict[str, tuple[str, bool]] = {}
    for part in chunks(keys):
        q = select(learners.c.learner_key, learners.c.school_urn, learners.c.left_school).where(
            learners.c.learner_key.in_(part))
        for k, urn, left in conn.execute(q):
            out[k] = (urn, bool(left))
    return out


def _event(key: str, kind: str, from_urn: str | None, to_urn: str | None, source: str, run_id: str,
           at: datetime, other_key: str | None = None) -> dict[str, Any]:
    return {"learner_key": key, "kind": kind, "from_urn": from_urn, "to_urn": to_urn, "source": source,
            "run_id": run_id, "at": at, "other_key": other_key}


def _renumbered(conn: Connection, run_id: str, rows: list[dict[str, Any]], keys: list[str],
                events: list[dict[str, Any]], at: datetime) -> int:
    """A learner whose export states a FormerUPN: the record under that former UPN is the same child under a
    new number. It is marked as left (never deleted, never merged) with a `renumbered` event naming the new
    key. Only what the export states is taken: no record is ever tied to another by inference (an adopted
    child's new UPN comes with no FormerUPN, and nothing links it to the old record)."""
    current = set(keys)
    stated: dict[str, tuple[str, str]] = {}
    for r, k in zip(rows, keys, strict=True):
        for former in r.get("former_upns") or ():
            fk = learner_key(former)
            if fk != k and fk not in current:
                stated[fk] = (k, r["school_urn"])
    if not stated:
        return 0
    old = conn.execute(select(learners.c.learner_key, learners.c.school_urn).where(
        learners.c.learner_key.in_(list(stated)), learners.c.left_school.is_(False))).all()
    _mark_left(conn, run_id, [k for k, _ in old])
    events.extend(_event(k, "renumbered", urn, stated[k][1], "FormerUPN stated on the export", run_id, at,
                         other_key=stated[k][0]) for k, urn in old)
    return len(old)


def _roll_events(roll: list[dict[str, Any]], prior: dict[str, tuple[str, bool]], rows: list[dict[str, Any]],
                 run_id: str, at: datetime) -> list[dict[str, Any]]:
    """A learner now at another school moved; one whose export gives a leaving date left; one back returned."""
    events = []
    for r, raw in zip(roll, rows, strict=True):
        before = prior.get(r["learner_key"])
        if before is None:
            continue
        urn, was_left = before
        src = f"{raw.get('source_format') or 'export'} of school {r['school_urn']}"
        if urn != r["school_urn"]:
            events.append(_event(r["learner_key"], "moved", urn, r["school_urn"], src, run_id, at))
        elif r["left_school"] and not was_left:
            events.append(_event(r["learner_key"], "left", urn, None, src, run_id, at))
        elif was_left and not r["left_school"]:
            events.append(_event(r["learner_key"], "returned", None, urn, src, run_id, at))
    return events


def _record_source_ids(conn: Connection, rows: list[dict[str, Any]], keys: list[str], run_id: str) -> None:
    """Remember each MIS record id (keyed) against its learner, so a deletion naming only that id resolves."""
    ids = [{"source_key": source_key(r["source_format"], r["school_urn"], r["source_id"]), "learner_key": k,
            "updated_run": run_id} for r, k in zip(rows, keys, strict=True) if r.get("source_id")]
    if ids:
        upsert(conn, source_ids, ids, ["source_key"])


def _mark_left(conn: Connection, run_id: str, keys: list[str]) -> None:
    for part in chunks(keys):
        conn.execute(update(learners).where(learners.c.learner_key.in_(part))
                     .values(left_school=True, plain=None, updated_run=run_id))


def _mark_missing_as_left(conn: Connection, run_id: str, full_schools: list[str], events: list[dict[str, Any]],
                          at: datetime) -> int:
    """A full export is the whole roll: a pupil it no longer lists has left, is marked (never deleted), and
    keeps no plain data."""
    if not full_schools:
        return 0
    gone = conn.execute(
        select(learners.c.learner_key, learners.c.school_urn)
        .where(learners.c.school_urn.in_(full_schools), learners.c.updated_run != run_id,
               learners.c.left_school.is_(False))
    ).all()
    _mark_left(conn, run_id, [k for k, _ in gone])
    events.extend(_event(k, "left", urn, None, "not on the school's full export", run_id, at) for k, urn in gone)
    return len(gone)


def _apply_reported_leavers(conn: Connection, run_id: str, changes: list[dict[str, Any]],
                            events: list[dict[str, Any]], at: datetime) -> int:
    """Leavers and deletions a source reports itself (a Wonde pull): marked as left, never deleted."""
    if not changes:
        return 0
    by_source = {c["source_key"]: c for c in changes if c["kind"] == "deleted"}
    resolved: dict[str, str] = {c["learner_key"]: c["source"] for c in changes if c["kind"] == "left"}
    for part in chunks(list(by_source)):
        for sk, lk in conn.execute(select(source_ids.c.source_key, source_ids.c.learner_key)
                                   .where(source_ids.c.source_key.in_(part))):
            resolved.setdefault(lk, by_source[sk]["source"])
    if not resolved:
        return 0
    live = conn.execute(select(learners.c.learner_key, learners.c.school_urn).where(
        learners.c.learner_key.in_(list(resolved)), learners.c.left_school.is_(False))).all()
    _mark_left(conn, run_id, [k for k, _ in live])
    events.extend(_event(k, "left", urn, None, resolved[k], run_id, at) for k, urn in live)
    return len(live)


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
        if r["plain"] is None:  # no active consent from anyone who may decide
            counts["refused_by_consent"] += 1
            continue
        over = lks[key]
        if is_sensitive(r):  # only over a link a person confirmed knowing the case (match review confirm)
            confirmed = confirmed_for_case(conn, [(r, lk) for lk in over])
            over = [lk for lk in over if (key, lk["trust_ods"]) in confirmed]
            if not over:
                counts["not_sent_sensitive_case"] += 1
                continue
        for lk in over:
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
    from schoolslink.pipeline.notices import send_move_notices, send_withdrawal_notices

    keys = [p["outbound_key"] for p in parts]
    try:
        counts = deliver_outbound(run_id, "mis_ingest", keys, run_date, at)
        return {**counts, **send_withdrawal_notices(run_id, "mis_ingest", run_date, at),
                **send_move_notices(run_id, "mis_ingest", run_date, at)}
    finally:
        for k in keys:
            workstore.remove(k)
