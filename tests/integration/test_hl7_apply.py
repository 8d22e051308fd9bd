"""Stored HL7v2 messages -> the state store (schoolslink/pipeline/hl7_apply.py), and the hl7_ingest DAG.

Messages are stored as the listener stores them (connectors/hl7v2/store.py: fastcheck verdict, sealed body, one
commit), on both state-store backends, then applied: patients as keyed pseudonyms only, referrals, an A40 merge
moving links, review items and referrals; a bad message among good ones is quarantined with a reason naming the
field and the rest applied; a re-run applies nothing, and a message applied twice changes nothing. The DAG runs
through Airflow (`dag.test()`), and no NHS number, name, date of birth, postcode or MRN from the messages is in the
task logs, XComs, Airflow's database or the state store's tables that must hold no personal data.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from datetime import date
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, insert, select

from connectors.hl7v2.fastcheck import check
from connectors.hl7v2.store import MessageStore, Pending
from schoolslink.keys import patient_key
from schoolslink.model import ReviewReason
from schoolslink.pipeline import hl7_apply
from schoolslink.store.schema import (
    hl7_messages,
    links,
    match_candidates,
    patients,
    quarantine,
    review_queue,
    trust_referrals,
)
from tests import leakscan
from tests.unit.test_hl7_parse import NHS, NHS_2, TRUST, adt, merge, ref, seg

NHS_3 = "9990000034"
# What the messages below say about people: none of it may be in a place without personal data, nor in the
# pseudonymous rows (patients, referrals) either.
PERSONAL = {NHS: "nhs_number", NHS_2: "nhs_number", NHS_3: "nhs_number", "ASHBY": "surname", "TOMASZ": "forename",
            "QUILLFEATHER": "surname", "MARIGOLD": "forename", "PEVENSEY": "surname", "20130401": "dob",
            "2013-04-01": "dob", "20120607": "dob", "2012-06-07": "dob", "LS1 6AE": "postcode", "LS16AE": "postcode",
            "GRIMWADE": "surname (NK1)"}


def store_messages(ms: MessageStore, *bodies: bytes) -> list[int]:
    """Store messages as the listener does (its hot-path verdict, then one commit); their ids, in order."""
    batch = [Pending(check(b), b) for b in bodies]
    assert [p.checked.ack for p in batch] == ["AA"] * len(bodies)
    ms.write(batch)
    with ms.engine.connect() as conn:
        return list(conn.execute(select(hl7_messages.c.id).order_by(hl7_messages.c.id)).scalars())[-len(bodies):]


def rows(engine: Engine, table: Any) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(select(table)).mappings()]


def statuses(engine: Engine) -> dict[int, tuple[str, str | None]]:
    with engine.connect() as conn:
        return {r.id: (r.status, r.reason) for r in conn.execute(select(hl7_messages.c.id, hl7_messages.c.status,
                                                                         hl7_messages.c.reason))}


def assert_no_personal_values(found: list[dict[str, Any]]) -> None:
    text = json.dumps(found, default=str).upper()
    for value, what in PERSONAL.items():
        assert value.upper() not in text, what


def test_messages_apply_in_order_and_a_bad_one_is_quarantined(store: Engine, store_url: str) -> None:
    ms = MessageStore(store_url)
    ids = store_messages(
        ms,
        adt("A28", control_id="M1", status="NSTS02"),
        adt("A08", "ZU1|1|local^stuff", control_id="M2"),  # an update: now verified; a Z segment, kept and ignored
        adt("A04", control_id="M3", nhs=NHS_2, mrn="RX4000124", name="QUILLFEATHER^MARIGOLD^^^^^L", dob="20120607",
            sex="2"),
        adt("A08", control_id="M4", nhs=NHS_3, mrn="RX4000125", dob="20131301"),  # not a date
        ref("I12", control_id="M5", status="P"),
        ref("I13", control_id="M6", status="A", effective="202610090930"),
        ref("I12", control_id="M7", referral_id="REF0002", nhs=NHS_2, mrn="RX4000124"),
        ref("I14", control_id="M8", referral_id="REF0002", nhs=NHS_2, mrn="RX4000124"),
    )
    counts = hl7_apply.apply_pending("run-1", ms, batch=3)  # several batches
    assert counts["hl7_read"] == 8 and counts["hl7_applied"] == 7 and counts["hl7_quarantined"] == 1
    assert ms.counts() == {"received": 0, "applied": 7, "quarantined": 1}

    bad = ids[3]
    assert statuses(store)[bad] == ("quarantined", "PID-7: date of birth (YYYYMMDD) is not a date")
    [q] = rows(store, quarantine)
    assert (q["source"], q["record"], q["field"], q["reason"]) == (
        f"hl7_messages/{bad}", "ADT^A08 M4", "PID-7", "PID-7: date of birth (YYYYMMDD) is not a date")

    pats = {r["patient_ref"]: r for r in rows(store, patients)}
    assert set(pats) == {"Patient/hl7:RX4000123", "Patient/hl7:RX4000124"}
    first = pats["Patient/hl7:RX4000123"]
    assert (first["trust_ods"], first["patient_key"], first["verified"], first["restricted"], first["version_id"]) \
        == (TRUST, patient_key(NHS), True, False, "M2")  # the A08 after the A28, in store order
    assert pats["Patient/hl7:RX4000124"]["patient_key"] == patient_key(NHS_2)
    assert all(r["school_urn"] is None and r["match_hash"] is None for r in pats.values())  # HL7v2 names no school

    refs = {r["referral_ref"]: r for r in rows(store, trust_referrals)}
    assert {k: (r["patient_ref"], r["fhir_status"], r["received"], r["team_type"]) for k, r in refs.items()} == {
        "ServiceRequest/hl7:REF0001": ("Patient/hl7:RX4000123", "active", date(2026, 10, 9), "D06"),
        "ServiceRequest/hl7:REF0002": ("Patient/hl7:RX4000124", "revoked", date(2026, 10, 8), "D06"),
    }
    assert_no_personal_values(rows(store, patients) + rows(store, trust_referrals) + rows(store, quarantine))

    # A re-run finds nothing to apply.
    assert hl7_apply.apply_pending("run-2", ms) == {}
    # A message applied again (put back to `received`) changes nothing.
    before = rows(store, patients) + rows(store, trust_referrals)
    for i in (ids[1], ids[5]):
        ms.mark(i, "received")
    again = hl7_apply.apply_pending("run-3", ms)
    assert (again["hl7_applied"], again["hl7_unchanged"]) == (2, 2)
    assert "hl7_patients_changed" not in again and "hl7_referrals_changed" not in again
    assert rows(store, patients) + rows(store, trust_referrals) == before  # updated_run is still run-1

    # Identity matching runs as after a FHIR pull: with no school named, each patient waits for a person.
    assert hl7_apply.match("run-3", again) == {}  # no patient changed: nothing to match
    matched = hl7_apply.match("run-1", counts)
    assert matched == {"linked_now": 0, "to_review": 2}
    assert {(r["patient_ref"], r["reason"]) for r in rows(store, review_queue)} == {
        ("Patient/hl7:RX4000123", ReviewReason.NO_SCHOOL_NAMED.value),
        ("Patient/hl7:RX4000124", ReviewReason.NO_SCHOOL_NAMED.value)}


def _link(engine: Engine, learner: str, patient_ref: str, nhs: str) -> None:
    with engine.begin() as conn:
        conn.execute(insert(links).values(
            learner_key=learner, trust_ods=TRUST, patient_key=patient_key(nhs), patient_ref=patient_ref,
            method="confirmed_by_reviewer", confidence=1.0, confirmed_by="A Reviewer", withdrawn=False,
            linked_run="seed"))


def test_a40_merge_moves_links_review_items_and_referrals(store: Engine, store_url: str) -> None:
    ms = MessageStore(store_url)
    prior, survivor, other_prior, lone_prior = ("Patient/hl7:RX4000999", "Patient/hl7:RX4000123",
                                                "Patient/hl7:RX4000998", "Patient/hl7:RX4000997")
    store_messages(ms, adt("A28", control_id="S1", nhs=NHS_3, mrn="RX4000999"), adt("A28", control_id="S2"),
                   ref("I12", control_id="S3", referral_id="REF0009", nhs=NHS_3, mrn="RX4000999"))
    hl7_apply.apply_pending("run-1", ms)
    _link(store, "L1", prior, NHS_3)
    with store.begin() as conn:
        conn.execute(insert(match_candidates).values(trust_ods=TRUST, patient_ref=prior, learner_key="L1", rank=1,
                                                     exact=True, score=30.0, agreement=None, updated_run="seed"))

    ids = store_messages(ms, merge(prior="RX4000999", control_id="S4"))
    counts = hl7_apply.apply_pending("run-2", ms)
    assert (counts["hl7_merges"], counts["hl7_links_moved"], counts["hl7_referrals_moved"],
            counts["hl7_prior_patients_removed"]) == (1, 1, 1, 1)
    [lk] = rows(store, links)
    assert (lk["learner_key"], lk["patient_ref"], lk["patient_key"], lk["withdrawn"]) == (
        "L1", survivor, patient_key(NHS), False)
    assert [r["patient_ref"] for r in rows(store, patients)] == [survivor]
    assert [r["patient_ref"] for r in rows(store, trust_referrals)] == [survivor]
    assert rows(store, match_candidates) == []

    # The same A40 again changes nothing.
    before = [rows(store, t) for t in (links, patients, trust_referrals, review_queue)]
    ms.mark(ids[0], "received")
    again = hl7_apply.apply_pending("run-3", ms)
    assert again["hl7_unchanged"] == 1 and "hl7_links_moved" not in again
    assert [rows(store, t) for t in (links, patients, trust_referrals, review_queue)] == before

    # A prior patient linked to another pupil than the survivor is: that link is withdrawn and a person decides.
    store_messages(ms, adt("A28", control_id="S5", nhs=NHS_2, mrn="RX4000998"))
    hl7_apply.apply_pending("run-4", ms)
    _link(store, "L2", other_prior, NHS_2)
    store_messages(ms, merge(prior="RX4000998", control_id="S6"))
    counts = hl7_apply.apply_pending("run-5", ms)
    assert counts["hl7_links_withdrawn_on_merge"] == 1
    by_learner = {r["learner_key"]: r for r in rows(store, links)}
    assert (by_learner["L1"]["withdrawn"], by_learner["L2"]["withdrawn"]) == (False, True)
    assert by_learner["L2"]["patient_ref"] == survivor
    [item] = rows(store, review_queue)
    assert (item["patient_ref"], item["candidate_learner_key"], item["reason"]) == (
        survivor, "L2", ReviewReason.AMBIGUOUS.value)

    # A prior patient's open review item moves to a survivor that has none; a merge of a patient never seen is fine.
    with store.begin() as conn:
        conn.execute(review_queue.delete())
        conn.execute(links.delete())
        conn.execute(insert(review_queue).values(trust_ods=TRUST, patient_ref=lone_prior, patient_key="pat-x",
                                                 school_urn=None, candidate_learner_key=None, status="open",
                                                 reason=ReviewReason.NO_SCHOOL_NAMED.value, updated_run="seed"))
    store_messages(ms, merge(prior="RX4000997", control_id="S7"), merge(prior="RX4000111", control_id="S8"))
    counts = hl7_apply.apply_pending("run-6", ms)
    assert (counts["hl7_applied"], counts["hl7_review_items_moved"]) == (2, 1)
    [item] = rows(store, review_queue)
    assert (item["patient_ref"], item["patient_key"]) == (survivor, patient_key(NHS))
    assert_no_personal_values(rows(store, patients) + rows(store, links) + rows(store, review_queue))


def test_hl7_ingest_dag_runs_through_airflow_and_leaves_no_personal_data(sl_home: Path) -> None:
    from schoolslink.airflow_runner import airflow_env, ensure_metadata_db
    from schoolslink.store.db import migrate

    migrate()
    ms = MessageStore()
    ids = store_messages(
        ms,
        adt("A08", seg("PD1", f3="High Street Surgery^^B82001", f4="G1^PEVENSEY^ORLA"),
            seg("NK1", f1="1", f2="GRIMWADE^BRONAGH", f3="MTH"), control_id="D1"),
        adt("A04", control_id="D2", nhs=NHS_2, mrn="RX4000124", name="QUILLFEATHER^MARIGOLD^^^^^L",
            dob="20120607"),
        adt("A08", control_id="D3", nhs=NHS_3, mrn="RX4000125", dob="20131301"),
        ref("I12", control_id="D4"),
    )
    env = airflow_env(sl_home)
    ensure_metadata_db(env)
    res = subprocess.run([sys.executable, "-m", "schoolslink.airflow_runner", "hl7_ingest"], env=env,
                         capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout.strip().splitlines()[-1])["state"] == "success"

    af = sl_home / "airflow"
    with sqlite3.connect(af / "airflow.db") as db:
        states = dict(db.execute("select task_id, state from task_instance where dag_id = 'hl7_ingest'").fetchall())
    assert states == {"apply": "success", "match": "success", "finish": "success"}
    assert ms.counts() == {"received": 0, "applied": 3, "quarantined": 1}
    assert statuses(migrate())[ids[2]][0] == "quarantined"
    with sqlite3.connect(sl_home / "state.db") as db:
        [(summary,)] = db.execute("select summary from runs where dag_id = 'hl7_ingest'").fetchall()
    summary = json.loads(summary)
    assert {k: summary[k] for k in ("hl7_read", "hl7_applied", "hl7_quarantined", "hl7_patient", "hl7_referral",
                                    "to_review")} == {"hl7_read": 4, "hl7_applied": 3, "hl7_quarantined": 1,
                                                      "hl7_patient": 2, "hl7_referral": 1, "to_review": 2}
    assert summary["quarantine_reasons"] == {"PID-7: date of birth (YYYYMMDD) is not a date": 1}

    # XComs carry counts only (dicts of counts, and each count alone: Airflow pushes a dict's keys too).
    def counts_only(value: Any) -> bool:
        return isinstance(value, int) or (isinstance(value, dict) and all(map(counts_only, value.values())))

    xcoms = leakscan.xcom_values(af)
    assert xcoms and all(map(counts_only, xcoms)), xcoms
    # No personal value anywhere it must never be: task logs (dag.test() prints them), Airflow's database and
    # files, the state store's tables without personal data. Our log line about the bad message is there.
    output = res.stdout + res.stderr
    assert "quarantined: PID-7: date of birth (YYYYMMDD) is not a date" in output
    needles = {f: what for value, what in PERSONAL.items() for f in leakscan.renderings(value, what)}
    needles.update({"ASHBY^TOMASZ": "name (HL7)", "QUILLFEATHER^MARIGOLD": "name (HL7)", "RX4000125": "mrn"})
    haystacks = {"task output": output, **leakscan.airflow_db(af),
                 **leakscan.texts(p for p in sorted(af.rglob("*")) if p.suffix != ".db"),
                 **leakscan.sqlite_tables(sl_home / "state.db", leakscan.STATE_TABLES_WITHOUT_PUPIL_DATA)}
    assert leakscan.find(haystacks, needles) == []
