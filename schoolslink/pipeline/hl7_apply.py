"""hl7_ingest stage: HL7v2 messages the listener stored (and acknowledged) -> the state store, off the hot path.

Each pending message, in store id order: parse (connectors/hl7v2/parse.py, hl7apy) -> validate (a message type we
apply, the segments it needs, a trust in a data sharing agreement) -> map (mappings/hl7v2-in/) -> apply, in a
transaction of its own, then marked `applied` in the message store. A message that cannot be used is marked
`quarantined` with a reason naming the field (never a value) and recorded in `quarantine`; the rest go on, and the
message itself stays in the store. A state store that fails (down, locked) raises: the message stays pending.

What each message becomes (docs/hl7v2.md), in the shape the FHIR pull gives (schoolslink/pipeline/sync.py):

* ADT A01/A03/A04/A08/A28/A31: the trust's patient -> its `patients` row (keyed pseudonyms only), as a FHIR Patient
  becomes one; the registered GP practice (PD1-3) rides on the event and is not stored (no column holds it).
* ADT A40: the surviving patient's row, and the prior patient merged into it: its links, review item, referrals
  move to the surviving patient, its match candidates and its row go (`_merge`).
* REF I12/I13/I14: the referral -> its `trust_referrals` row, as a ServiceRequest becomes one.

Idempotent: a row is written only when it differs from the stored one in more than `updated_run`, so a message
applied twice changes nothing the second time. Identity matching then runs as after a FHIR pull (`match`).
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import date
from typing import Any

from sqlalchemy import Connection, Engine, Table, delete, select, update
from sqlalchemy.exc import DataError, IntegrityError, SQLAlchemyError

from connectors.hl7v2.fastcheck import T_NHS_CHECK
from connectors.hl7v2.parse import Hl7Refused, parse
from connectors.hl7v2.store import MessageStore, StoredMessage
from schoolslink.mapping import fhir_inbound as fin
from schoolslink.mapping.engine import MAPPINGS_DIR, load_mappings
from schoolslink.model import ReviewReason
from schoolslink.pipeline import sync
from schoolslink.pipeline.common import quarantine_rows, store
from schoolslink.store.schema import links, match_candidates, patients, review_queue, trust_referrals
from schoolslink.store.upsert import upsert

log = logging.getLogger(__name__)

BATCH = 500  # messages read from the store at a time

PATIENT, MERGE, REFERRAL = "patient", "merge", "referral"
# The messages we apply (MSH-9.1^MSH-9.2) and what each becomes; the listener takes no others.
KINDS: dict[str, str] = {
    **dict.fromkeys(("ADT^A01", "ADT^A03", "ADT^A04", "ADT^A08", "ADT^A28", "ADT^A31"), PATIENT),
    "ADT^A40": MERGE,
    **dict.fromkeys(("REF^I12", "REF^I13", "REF^I14"), REFERRAL),
}
# The segments each kind cannot do without (MSH is always there).
REQUIRED: dict[str, tuple[str, ...]] = {PATIENT: ("PID",), MERGE: ("PID", "MRG"), REFERRAL: ("RF1", "PID")}
MAPPINGS = {PATIENT: "hl7v2-adt-patient", MERGE: "hl7v2-adt-merge", REFERRAL: "hl7v2-ref-referral"}
# The rows are those of the FHIR readers: the same columns, in the same order (fhir_inbound.MAPPINGS).
PATIENT_COLUMNS = fin.MAPPINGS["Patient"][1]
REFERRAL_COLUMNS, REFERRAL_DATES = fin.MAPPINGS["ServiceRequest"][1], fin.MAPPINGS["ServiceRequest"][2]
# Where a stored text column's value comes from, to name the field when it is too long for its column.
_SOURCE_FIELD = {"trust_ods": "MSH-4", "patient_ref": "PID-3", "prior_ref": "MRG-1", "referral_ref": "RF1-6",
                 "team_type": "RF1-3", "version_id": "MSH-10"}
_HL7_FIELD = re.compile(r"[A-Z][A-Z0-9]{2}-\d+")
_ODS = re.compile(r"[A-Z0-9]{3,6}")
_MESSAGE_TYPE = re.compile(r"[A-Z0-9]{3}\^[A-Z0-9]{3}")

# Loaded when this module is imported, so a broken mapping file stops the DAG at once (naming the file and line)
# instead of quarantining every message. Only the HL7v2 readers: a mapping elsewhere being edited cannot stop this.
_MAPPING_SET = load_mappings(MAPPINGS_DIR / "hl7v2-in")


Row = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Hl7Event:
    """The canonical event one message becomes: pseudonymous rows and references only, never a message value."""

    kind: str  # patient | merge | referral
    message_type: str  # e.g. ADT^A08
    trust_ods: str
    patient: Row | None = None  # patients row (no trust_ods, no updated_run): patient and merge
    gp_practice: str | None = None  # the registered GP practice's ODS code (PD1-3): for routing, not stored
    prior_ref: str | None = None  # merge: the prior patient, merged into `patient`
    referral: Row | None = None  # trust_referrals row (no trust_ods, no updated_run): referral


# parse -> validate -> map (no I/O) ----------------------------------------------------------------------------


def read(body: bytes, trusts: Collection[str]) -> Hl7Event:
    """One stored message -> its canonical event. `trusts`: the ODS codes of the trusts in a data sharing agreement.

    Raises `Hl7Refused` (field and reason, never a value) for a message that cannot be applied."""
    parsed = parse(body)
    kind = KINDS.get(parsed.message_type)
    if kind is None:
        shown = parsed.message_type if _MESSAGE_TYPE.fullmatch(parsed.message_type) else "this message type"
        raise Hl7Refused("MSH-9", f"MSH-9: {shown} is not a message type we apply ({', '.join(KINDS)})")
    for seg in REQUIRED[kind]:
        if seg not in parsed.segments:
            raise Hl7Refused(seg, f"{seg}: segment missing: an {parsed.message_type} message needs one")
    view = parsed.segments
    if kind == REFERRAL:
        out = _map(REFERRAL, view)
        trust = out.pop("trust_ods")
        referral = _row(out, REFERRAL_COLUMNS, REFERRAL_DATES)
        event = Hl7Event(kind, parsed.message_type, trust, referral=referral)
    else:
        # HL7v2 ADT has no field for the school: the patient names none, and waits in review (docs/hl7v2.md).
        out = _map(PATIENT, view, school_urn=None)
        trust = out.pop("trust_ods")
        prior = _map(MERGE, view)["prior_ref"] if kind == MERGE else None
        event = Hl7Event(kind, parsed.message_type, trust, patient=_row(out, PATIENT_COLUMNS, ()),
                         gp_practice=out.get("gp_practice"), prior_ref=prior)
    _check_trust(trust, trusts)
    _check_lengths(patients, {**(event.patient or {}), "trust_ods": trust, "prior_ref": event.prior_ref})
    _check_lengths(trust_referrals, event.referral or {})
    return event


def _map(kind: str, view: Mapping[str, Any], **variables: Any) -> Row:
    cm = _MAPPING_SET.compile(MAPPINGS[kind])
    try:
        out = cm.fn(view, {"mapping_version": cm.version, **variables})[0]
    except fin.InboundError as exc:
        field = _HL7_FIELD.match(exc.field)
        if field:
            raise Hl7Refused(field.group(0), str(exc)) from None
        if exc.field == "identifier":  # patient_key, shared with the FHIR reader: it names the FHIR element
            raise Hl7Refused("PID-3", T_NHS_CHECK) from None
        raise Hl7Refused(exc.field, str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - a message the mapping cannot read is refused, never the end of a run
        raise Hl7Refused("structure", f"the message could not be mapped ({type(exc).__name__}): check it against "
                                      f"docs/hl7v2.md") from None
    return dict(out)


def _row(out: Row, columns: tuple[str, ...], dates: tuple[str, ...]) -> Row:
    """The stored row: every column present (None where the message has nothing), ISO dates as `date`."""
    row = {c: out.get(c) for c in columns}
    for c in dates:
        value = row[c]
        if value:
            row[c] = date.fromisoformat(str(value))
    return row


def _check_trust(trust: str, trusts: Collection[str]) -> None:
    if trust not in trusts:
        shown = f"trust {trust}" if _ODS.fullmatch(trust) else "the sending facility"
        raise Hl7Refused("MSH-4", f"MSH-4: {shown} is in no data sharing agreement: nothing from it is applied "
                                  f"(check the sending facility is the trust's ODS code)")


def _check_lengths(table: Table, row: Row) -> None:
    """A value too long for its column is refused naming its field (the store would refuse the whole row)."""
    for column, value in row.items():
        limit = getattr(table.c[column.replace("prior_ref", "patient_ref")].type, "length", None)
        if isinstance(value, str) and limit is not None and len(value) > limit:
            field = _SOURCE_FIELD.get(column, column)
            raise Hl7Refused(field, f"{field}: longer than we can keep ({limit} characters with its prefix)")


# apply (one message, one transaction) -------------------------------------------------------------------------


def apply(conn: Connection, run_id: str, event: Hl7Event) -> Counter[str]:
    """Write one message's event to the state store (in the caller's transaction); counts of what changed."""
    counts: Counter[str] = Counter()
    trust = event.trust_ods
    if event.patient is not None:
        row = {**event.patient, "trust_ods": trust}
        counts["hl7_patients_changed" if _write(conn, patients, row, ("trust_ods", "patient_ref"), run_id)
               else "hl7_unchanged"] += 1
    if event.kind == MERGE and event.prior_ref and event.patient is not None \
            and event.prior_ref != event.patient["patient_ref"]:
        counts.update(_merge(conn, run_id, trust, event.prior_ref, event.patient))
    if event.referral is not None:
        row = {**event.referral, "trust_ods": trust}
        counts["hl7_referrals_changed" if _write(conn, trust_referrals, row, ("trust_ods", "referral_ref"), run_id)
               else "hl7_unchanged"] += 1
    return counts


def _write(conn: Connection, table: Table, row: Row, keys: tuple[str, ...], run_id: str) -> bool:
    """Upsert `row` unless the stored row already says the same (apart from `updated_run`): True when written."""
    stored = conn.execute(select(*(table.c[c] for c in row)).where(*(table.c[k] == row[k] for k in keys))
                          ).mappings().first()
    if stored is not None and all(stored[c] == v for c, v in row.items()):
        return False
    upsert(conn, table, [{**row, "updated_run": run_id}], list(keys))
    return True


def _merge(conn: Connection, run_id: str, trust: str, prior_ref: str, survivor: Row) -> Counter[str]:
    """ADT A40: what pointed at the prior patient now points at the surviving one; the prior patient's row goes.

    Links move (with the surviving patient's key). If the surviving patient was already linked to another pupil, the
    moved link is withdrawn (not disclosed) and the surviving patient waits for a person (review reason AMBIGUOUS).
    The prior patient's review item moves too, unless the surviving patient has one (that one stays); a surviving
    patient linked now has no open item. Referrals move; match candidates of the prior patient go (the next match
    weighs the surviving one)."""
    counts: Counter[str] = Counter({"hl7_merges": 1})
    at = (links.c.trust_ods == trust)
    surv_ref, surv_key = survivor["patient_ref"], survivor["patient_key"]
    prior_links = conn.execute(select(links.c.learner_key, links.c.withdrawn).where(
        at, links.c.patient_ref == prior_ref)).all()
    surv_linked = conn.execute(select(links.c.learner_key).where(
        at, links.c.patient_ref == surv_ref, links.c.withdrawn.is_(False))).scalars().first()
    linked_now = False  # the survivor has a live link it did not have: its open review item goes
    for learner_key, withdrawn in prior_links:
        conflict = not withdrawn and surv_linked is not None and surv_linked != learner_key
        values: Row = {"patient_ref": surv_ref, "patient_key": surv_key}  # linked_run: who linked, kept
        if conflict:
            values["withdrawn"] = True
        conn.execute(update(links).where(at, links.c.learner_key == learner_key).values(**values))
        counts["hl7_links_moved"] += 1
        linked_now = linked_now or (not withdrawn and surv_linked is None)
        if conflict:
            counts["hl7_links_withdrawn_on_merge"] += 1
            upsert(conn, review_queue, [{
                "trust_ods": trust, "patient_ref": surv_ref, "patient_key": surv_key, "school_urn": None,
                "candidate_learner_key": learner_key, "reason": ReviewReason.AMBIGUOUS.value, "status": "open",
                "updated_run": run_id}], ["trust_ods", "patient_ref"])
    rq = (review_queue.c.trust_ods == trust)
    if linked_now:
        conn.execute(delete(review_queue).where(rq, review_queue.c.patient_ref.in_((surv_ref, prior_ref)),
                                                review_queue.c.status == "open"))
    has_item = conn.execute(select(review_queue.c.patient_ref).where(
        rq, review_queue.c.patient_ref == surv_ref)).first() is not None
    if has_item:
        conn.execute(delete(review_queue).where(rq, review_queue.c.patient_ref == prior_ref))
    else:
        counts["hl7_review_items_moved"] += conn.execute(
            update(review_queue).where(rq, review_queue.c.patient_ref == prior_ref)
            .values(patient_ref=surv_ref, patient_key=surv_key, updated_run=run_id)).rowcount
    counts["hl7_referrals_moved"] += conn.execute(
        update(trust_referrals).where(trust_referrals.c.trust_ods == trust, trust_referrals.c.patient_ref == prior_ref)
        .values(patient_ref=surv_ref, updated_run=run_id)).rowcount
    conn.execute(delete(match_candidates).where(match_candidates.c.trust_ods == trust,
                                                match_candidates.c.patient_ref == prior_ref))
    counts["hl7_prior_patients_removed"] += conn.execute(
        delete(patients).where(patients.c.trust_ods == trust, patients.c.patient_ref == prior_ref)).rowcount
    return counts


# the drain --------------------------------------------------------------------------------------------------


def apply_pending(run_id: str, messages: MessageStore | None = None, *, batch: int = BATCH) -> dict[str, int]:
    """Apply every pending message, in store id order, each in a transaction of its own; counts only."""
    messages = messages or MessageStore()
    eng = store()
    trusts = frozenset(sync.trusts_to_pull())
    counts: Counter[str] = Counter()
    seen: set[int] = set()
    while True:
        todo = sorted((m for m in messages.pending(batch) if m.id not in seen), key=lambda m: m.id)
        if not todo:
            break
        for msg in todo:
            seen.add(msg.id)
            _apply_one(eng, run_id, messages, msg, trusts, counts)
    return dict(counts)


def _apply_one(eng: Engine, run_id: str, messages: MessageStore, msg: StoredMessage, trusts: Collection[str],
               counts: Counter[str]) -> None:
    counts["hl7_read"] += 1
    try:
        event = read(msg.body, trusts)
        with eng.begin() as conn:
            counts.update(apply(conn, run_id, event))
    except Hl7Refused as exc:
        _quarantine(eng, run_id, messages, msg, exc.field, exc.reason, counts)
        return
    except (IntegrityError, DataError) as exc:  # the store refused the rows: this message's data, not the store
        _quarantine(eng, run_id, messages, msg, "structure",
                    f"the message's values could not be stored ({type(exc).__name__}): check it against "
                    f"docs/hl7v2.md", counts)
        return
    except SQLAlchemyError:
        raise  # the state store is down or locked: the message stays pending for the next run
    except Exception as exc:  # noqa: BLE001 - one odd message is quarantined, never the end of the run
        _quarantine(eng, run_id, messages, msg, "structure",
                    f"the message could not be read ({type(exc).__name__})", counts)
        return
    messages.mark(msg.id, "applied")
    counts["hl7_applied"] += 1
    counts[f"hl7_{event.kind}"] += 1


def _quarantine(eng: Engine, run_id: str, messages: MessageStore, msg: StoredMessage, field: str, reason: str,
                counts: Counter[str]) -> None:
    with eng.begin() as conn:
        quarantine_rows(conn, run_id, f"hl7_messages/{msg.id}", [(f"{msg.message_type} {msg.control_id}", field,
                                                                  reason)])
    messages.mark(msg.id, "quarantined", reason)
    counts["hl7_quarantined"] += 1
    log.warning("HL7v2 message %s (%s %s) quarantined: %s", msg.id, msg.message_type, msg.control_id, reason)


def match(run_id: str, applied: Mapping[str, int]) -> dict[str, int]:
    """Identity matching after the messages are applied, as after a FHIR pull (`sync.match_all`), when a patient
    changed; nothing to do otherwise."""
    if not applied.get("hl7_patients_changed"):
        return {}
    return sync.match_all(run_id)
