"""mis_ingest stages: landing zone -> parse CTF -> validate (GX) -> govern -> map -> outbox -> FHIR -> ledger.

Each function is one Airflow task's work over a chunk of schools; they hand each other storage keys.
One school's bad export halts that school only: it is refused whole, moved aside, and the reason
recorded; the other schools go on.
"""

from __future__ import annotations

import shutil
from collections import defaultdict
from datetime import date, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, select

from connectors.mis.consent_register import RegisterFlags, read_register
from connectors.mis.ctf import CtfReader
from connectors.mis.errors import MisInputError
from schoolslink import workstore
from schoolslink.governance import register
from schoolslink.governance.agreement import Agreement, agreement_for, load_agreements
from schoolslink.governance.consent import ConsentFacts, decide
from schoolslink.governance.matching import match_pending
from schoolslink.keys import learner_key, match_hash
from schoolslink.mapping import school_context
from schoolslink.model import Consent, Direction, Learner
from schoolslink.pipeline.common import age_on, as_date, chunked, quarantine_rows, store
from schoolslink.settings import home, landing_dir
from schoolslink.store.schema import learners, links
from schoolslink.store.upsert import upsert
from schoolslink.validation import build_feature_frame, validate_learner_features

PURPOSE = "cypmhs-school-support"


def plan(run_id: str, max_chunks: int) -> list[dict[str, Any]]:
    """The schools with an export in the landing zone, split into chunks (URNs are not pupil data)."""
    root = landing_dir() / "mis"
    urns = sorted(p.name for p in root.iterdir() if p.is_dir() and any(p.glob("*.xml"))) if root.exists() else []
    slug = workstore.run_slug(run_id)
    return [{"run": slug, "chunk": i, "schools": part} for i, part in enumerate(chunked(urns, max_chunks))]


def _newest_export(urn: str) -> Path | None:
    files = sorted((landing_dir() / "mis" / urn).glob("*.xml"))
    return files[-1] if files else None


def _key_of(path: Path) -> str:
    return str(path.relative_to(home()))


def _move_aside(path: Path) -> None:
    dest = landing_dir() / "refused" / path.parent.name
    dest.mkdir(parents=True, exist_ok=True)
    shutil.move(str(path), dest / path.name)


def parse_validate(run_id: str, chunk: dict[str, Any], run_date: date) -> dict[str, Any]:
    """Parse each school's newest CTF, refuse bad files whole, quarantine bad records (reader + GX)."""
    reader = CtfReader()
    accepted: list[Learner] = []
    sources: list[str] = []
    counts = {"files": 0, "refused_files": 0, "read": 0, "quarantined": 0}
    eng = store()
    with eng.begin() as conn:
        for urn in chunk["schools"]:
            path = _newest_export(urn)
            if path is None:
                continue
            counts["files"] += 1
            key = _key_of(path)
            try:
                result = reader.read(path)
            except MisInputError as exc:
                counts["refused_files"] += 1
                quarantine_rows(conn, run_id, key, [(None, None, f"file refused: {exc}")])
                _move_aside(path)
                continue
            if result.header.source_urn != urn:
                counts["refused_files"] += 1
                quarantine_rows(conn, run_id, key, [(None, "URN", "file refused: the CTF's source URN is not "
                                                     "the school whose folder it landed in")])
                _move_aside(path)
                continue
            counts["read"] += len(result.learners) + len(result.quarantined)
            counts["quarantined"] += quarantine_rows(
                conn, run_id, key, [(q.record, q.field, q.reason) for q in result.quarantined]
            )
            for lr in result.learners:
                accepted.append(lr)
                sources.append(key)

        frame = build_feature_frame(accepted, run_date)
        docs = workstore.path_for(f"{chunk['run']}/chunk-{chunk['chunk']}/gx")
        summary = validate_learner_features(frame, data_docs_dir=docs)
        bad = summary.bad_records
        if bad:
            counts["quarantined"] += quarantine_rows(
                conn, run_id, "gx:learners",
                [(f"{sources[i].rsplit('/', 1)[-1]}#{i}", None, "; ".join(reasons)) for i, reasons in bad.items()],
            )
    good = [lr for i, lr in enumerate(accepted) if i not in bad]
    key = f"{chunk['run']}/chunk-{chunk['chunk']}/learners.jsonl"
    workstore.write_jsonl(key, (lr.to_dict() for lr in good))
    return {"run": chunk["run"], "chunk": chunk["chunk"], "schools": chunk["schools"], "learners_key": key,
            "accepted": len(good), "gx_success": summary.success, **counts}


def govern_map(run_id: str, part: dict[str, Any], run_date: date) -> dict[str, Any]:
    """Record the roll (hashes; plain data only with consent), consents, links; map what may go to each trust."""
    agreements = load_agreements()
    rows = list(workstore.read_jsonl(part["learners_key"]))
    counts: dict[str, int] = defaultdict(int)
    outbound: list[dict[str, Any]] = []
    eng = store()
    with eng.begin() as conn:
        flags: dict[str, RegisterFlags] = {}
        for urn in part["schools"]:
            reg_path = landing_dir() / "consent" / f"{urn}.csv"
            if not reg_path.exists():
                continue
            reg = read_register(reg_path, urn)
            register.save(conn, reg.consents, "school", run_id,
                          competent={k: f.competent for k, f in reg.flags.items()})
            flags.update(reg.flags)
            counts["consent_records"] += len(reg.consents)
            counts["consent_rows_quarantined"] += quarantine_rows(conn, run_id, _key_of(reg_path), reg.quarantined)

        keys = [learner_key(r["upn"]) for r in rows]
        consents = register.load_for(conn, keys)
        roll = []
        for r, key in zip(rows, keys, strict=True):
            dob = date.fromisoformat(r["dob"])
            fl = flags.get(key, RegisterFlags())
            lf = r["flags"]
            facts = ConsentFacts(age_on(dob, run_date), fl.competent, bool(lf["looked_after"]))
            any_consent = any(
                decide(consents.get(key, []), facts, d, PURPOSE, run_date).allowed for d in Direction
            )
            counts["with_consent"] += any_consent
            roll.append({
                "learner_key": key, "school_urn": r["school_urn"],
                "match_hash": match_hash(r["school_urn"], r["surname"], r["forename"], r["dob"]),
                "looked_after": bool(lf["looked_after"]), "adopted": bool(lf["adopted"]),
                "child_protection": fl.child_protection or bool(lf["child_protection"]),
                "do_not_tell_parent": fl.do_not_tell_parent or bool(lf["do_not_tell_parent"]),
                "competent": fl.competent, "left_school": bool(r.get("leaving_date")), "age_years": facts.age_years,
                "plain": r if any_consent else None, "updated_run": run_id,
            })
        upsert(conn, learners, roll, ["learner_key"])
        counts["learners"] = len(roll)
        m = match_pending(conn, run_id, part["schools"])
        counts["linked_now"] = m.linked
        counts["to_review"] = m.review
        outbound = _map_outbound(conn, run_id, roll, consents, agreements, run_date, counts)
    key = f"{part['run']}/chunk-{part['chunk']}/outbound.jsonl"
    workstore.write_jsonl(key, outbound)
    carried: dict[str, Any] = {
        k: part[k] for k in ("files", "refused_files", "read", "quarantined", "accepted") if k in part
    }
    return {"run": part["run"], "chunk": part["chunk"], "outbound_key": key, "outbound": len(outbound),
            **carried, **dict(counts)}


def _linked(conn: Connection, keys: list[str]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for i in range(0, len(keys), 900):
        q = select(links).where(links.c.learner_key.in_(keys[i : i + 900]), links.c.withdrawn.is_(False))
        for r in conn.execute(q).mappings():
            out[r["learner_key"]].append(dict(r))
    return out


def allowed_items(
    agreement: Agreement, records: list[Consent], facts: ConsentFacts, direction: Direction, at: date
) -> tuple[frozenset[str], str | None, str]:
    """Agreement ∩ consent: the items that may go, the consent id that allows them, or why none may."""
    items, consent_id, reason = set(), None, "the agreement lists no item for this direction"
    for item in sorted(agreement.allowed(direction)):
        d = decide(records, facts, direction, PURPOSE, at, item)
        if d.allowed:
            items.add(item)
            consent_id = consent_id or d.consent_id
        else:
            reason = d.reason
    return frozenset(items), consent_id, reason


def _map_outbound(
    conn: Connection,
    run_id: str,
    roll: list[dict[str, Any]],
    consents: dict[str, list[Consent]],
    agreements: list[Agreement],
    run_date: date,
    counts: dict[str, int],
) -> list[dict[str, Any]]:
    by_key = {r["learner_key"]: r for r in roll}
    linked = _linked(conn, list(by_key))
    trust_side = register.load_for(conn, [lk["patient_key"] for ls in linked.values() for lk in ls])
    out = []
    for key, lks in linked.items():
        r = by_key[key]
        if r["left_school"]:
            counts["not_sent_left_school"] += 1
            continue
        for lk in lks:
            agreement = agreement_for(agreements, r["school_urn"], lk["trust_ods"], run_date)
            if agreement is None:
                counts["refused_no_agreement"] += 1
                continue
            records = consents.get(key, []) + trust_side.get(lk["patient_key"], [])
            facts = ConsentFacts(r["age_years"], r["competent"], r["looked_after"])
            items, consent_id, _why = allowed_items(agreement, records, facts, Direction.SCHOOL_TO_TRUST, run_date)
            if not items or r["plain"] is None or consent_id is None:
                counts["refused_by_consent"] += 1
                continue
            values = school_context.context_items(r["plain"])
            resources = school_context.observations(
                learner_key=key, school_urn=r["school_urn"], trust_ods=lk["trust_ods"],
                patient_ref=lk["patient_ref"], values=values, allowed=items, effective=run_date,
            )
            for res, problem in zip(resources, school_context.check(resources), strict=True):
                if problem:
                    counts["mapping_errors"] += 1
                    quarantine_rows(conn, run_id, "mapping:school_context", [(key, None, problem)])
                    continue
                out.append({
                    "destination": lk["trust_ods"], "subject_key": key, "patient_key": lk["patient_key"],
                    "school_urn": r["school_urn"], "item": res["code"]["coding"][0]["code"],
                    "agreement_id": agreement.id, "agreement_version": agreement.version,
                    "consent_id": consent_id, "mapping_version": school_context.MAPPING_VERSION,
                    "resource": res,
                })
            counts["learners_mapped"] += 1
    return out


def deliver(run_id: str, parts: list[dict[str, Any]], run_date: date, at: datetime) -> dict[str, Any]:
    """Re-check consent, skip what each trust already has, PUT the rest by id, record in outbox and ledger."""
    from schoolslink.pipeline.delivery import deliver_outbound

    return deliver_outbound(run_id, "mis_ingest", [p["outbound_key"] for p in parts], run_date, at)


__all__ = ["as_date", "deliver", "govern_map", "parse_validate", "plan"]
