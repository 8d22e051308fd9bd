"""The state store on SQLite and PostgreSQL: migrations, upserts, the ledger chain, the outbox, matching."""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy import Engine, select

from schoolslink import ledger, outbox
from schoolslink.governance.matching import match_pending
from schoolslink.keys import learner_key, match_hash, patient_key
from schoolslink.model import Direction, Disclosure, ReviewReason
from schoolslink.store.db import migrate
from schoolslink.store.schema import learners, links, patients, review_queue
from schoolslink.store.upsert import upsert

AT = datetime(2026, 11, 26, 2, 0, tzinfo=UTC)


def _disclosure(i: int) -> Disclosure:
    return Disclosure(run_id="run-1", dag_id="mis_ingest", direction=Direction.SCHOOL_TO_TRUST,
                      recipient="ODS:R9X", subject_key=f"lrn-{i:04d}", data_items=("sen_provision",),
                      agreement_id="demo", agreement_version="1.0", consent_id=f"school:900001:{i}",
                      mapping_version="m1", content_hash=f"{i:064x}")


def test_migrations_are_idempotent_and_create_every_table(store: Engine, store_url: str) -> None:
    migrate(store_url)  # a second time changes nothing
    names = set(sa.inspect(store).get_table_names())
    assert {"learners", "consents", "patients", "links", "review_queue", "outbox", "ledger", "watermarks",
            "quarantine", "runs", "trust_referrals", "feed_rows", "learner_events", "source_ids"} <= names


def test_the_migrations_build_exactly_the_schema_the_code_uses(store: Engine) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from schoolslink.store.schema import metadata

    with store.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    assert [d for d in diff if not (isinstance(d, tuple) and d[0] == "remove_table" and d[1].name ==
                                    "alembic_version")] == []


def test_ledger_chain_verifies_and_catches_an_edit(store: Engine) -> None:
    with store.begin() as conn:
        assert ledger.append(conn, [_disclosure(i) for i in range(5)], AT) == 5
    with store.begin() as conn:
        ledger.append(conn, [_disclosure(i) for i in range(5, 8)], AT)
    with store.connect() as conn:
        r = ledger.verify(conn)
        assert r.ok and r.entries == 8
    with store.begin() as conn:
        conn.execute(sa.update(ledger.ledger).where(ledger.ledger.c.seq == 3).values(recipient="ODS:EVIL"))
    with store.connect() as conn:
        r = ledger.verify(conn)
        assert not r.ok and r.first_bad_seq == 3


def test_ledger_catches_a_truncated_tail(store: Engine) -> None:
    with store.begin() as conn:
        ledger.append(conn, [_disclosure(i) for i in range(4)], AT)
        conn.execute(sa.delete(ledger.ledger).where(ledger.ledger.c.seq == 4))
    with store.connect() as conn:
        r = ledger.verify(conn)
        assert not r.ok and "tail" in r.message


def test_outbox_skips_only_what_the_destination_already_has(store: Engine) -> None:
    res = {"resourceType": "Observation", "id": "o1", "status": "final"}
    h = outbox.content_hash(res)
    with store.begin() as conn:
        assert outbox.unchanged(conn, "fhir:R9X", {"Observation/o1": h}) == set()
        outbox.record(conn, "fhir:R9X", [("Observation/o1", "lrn-1", h, "sent", None)], "run-1")
    with store.begin() as conn:
        assert outbox.unchanged(conn, "fhir:R9X", {"Observation/o1": h}) == {"Observation/o1"}
        assert outbox.unchanged(conn, "fhir:OTHER", {"Observation/o1": h}) == set()
        changed = outbox.content_hash({**res, "status": "amended"})
        assert outbox.unchanged(conn, "fhir:R9X", {"Observation/o1": changed}) == set()


def test_first_identity_match(store: Engine) -> None:
    def roll(upn: str, surname: str, forename: str, dob: str, **flags: bool) -> dict[str, object]:
        return {"learner_key": learner_key(upn), "school_urn": "900001",
                "match_hash": match_hash("900001", surname, forename, dob), "looked_after": False,
                "adopted": False, "child_protection": False, "do_not_tell_parent": False, "competent": False,
                "left_school": False, "age_years": 12, "plain": None, "updated_run": "r", **flags}

    def patient(ref: str, nhs: str, surname: str, forename: str, dob: str, *, verified: bool = True,
                restricted: bool = False, urn: str | None = "900001") -> dict[str, object]:
        return {"trust_ods": "R9X", "patient_ref": ref, "patient_key": patient_key(nhs), "school_urn": urn,
                "match_hash": match_hash(urn or "", surname, forename, dob), "verified": verified,
                "restricted": restricted, "version_id": "1", "updated_run": "r"}

    with store.begin() as conn:
        upsert(conn, learners, [
            roll("B801200005001", "Ashby", "Tomasz", "2013-04-01"),
            roll("R674123101121", "Twin", "Ann", "2012-01-02"),
            roll("R201100018042", "Twin", "Ann", "2012-01-02"),
            roll("P207000016049", "Care", "Lee", "2011-05-05", looked_after=True),
        ], ["learner_key"])
        upsert(conn, patients, [
            patient("Patient/1", "9990000018", "ASHBY", "Tomasz", "2013-04-01"),
            patient("Patient/2", "9990000026", "Twin", "Ann", "2012-01-02"),
            patient("Patient/3", "9990000034", "Care", "Lee", "2011-05-05"),
            patient("Patient/4", "9990000042", "Ashby", "Tomasz", "2013-04-01", verified=False),
            patient("Patient/5", "9990000050", "Nobody", "Here", "2010-01-01"),
            patient("Patient/6", "9990000069", "Ashby", "Tomasz", "2013-04-01", restricted=True),
            patient("Patient/7", "9990000077", "Ashby", "Tomasz", "2013-04-01", urn=None),
        ], ["trust_ods", "patient_ref"])
        counts = match_pending(conn, "run-1")
    assert (counts.linked, counts.review) == (1, 6)
    with store.connect() as conn:
        linked = conn.execute(select(links.c.patient_ref, links.c.learner_key)).all()
        assert linked == [("Patient/1", learner_key("B801200005001"))]
        reasons = dict(conn.execute(select(review_queue.c.patient_ref, review_queue.c.reason)).all())
    assert reasons == {
        "Patient/2": ReviewReason.SEVERAL_CANDIDATES.value,
        "Patient/3": ReviewReason.SENSITIVE_CASE.value,
        "Patient/4": ReviewReason.UNVERIFIED_NHS_NUMBER.value,
        "Patient/5": ReviewReason.NO_CANDIDATE.value,
        "Patient/6": ReviewReason.RESTRICTED.value,
        "Patient/7": ReviewReason.NO_SCHOOL_NAMED.value,
    }
    # A second pass over the same patients changes nothing.
    with store.begin() as conn:
        again = match_pending(conn, "run-2")
    assert again.linked == 0


def test_a_link_is_suspended_when_the_case_becomes_sensitive_and_never_re_pointed(store: Engine) -> None:
    def roll(upn: str, **flags: bool) -> dict[str, object]:
        return {"learner_key": learner_key(upn), "school_urn": "900001",
                "match_hash": match_hash("900001", "Ashby", "Tomasz", "2013-04-01"), "looked_after": False,
                "adopted": False, "child_protection": False, "do_not_tell_parent": False, "competent": False,
                "left_school": False, "age_years": 12, "plain": None, "updated_run": "r", **flags}

    def patient(ref: str, nhs: str, restricted: bool = False) -> dict[str, object]:
        return {"trust_ods": "R9X", "patient_ref": ref, "patient_key": patient_key(nhs), "school_urn": "900001",
                "match_hash": match_hash("900001", "Ashby", "Tomasz", "2013-04-01"), "verified": True,
                "restricted": restricted, "version_id": "1", "updated_run": "r"}

    with store.begin() as conn:
        upsert(conn, learners, [roll("B801200005001")], ["learner_key"])
        upsert(conn, patients, [patient("Patient/1", "9990000018")], ["trust_ods", "patient_ref"])
        assert match_pending(conn, "run-1").linked == 1
    # The trust creates a duplicate Patient for the same child: the link is not re-pointed.
    with store.begin() as conn:
        upsert(conn, patients, [patient("Patient/2", "9990000026")], ["trust_ods", "patient_ref"])
        assert match_pending(conn, "run-2").linked == 0
        reason = conn.execute(select(review_queue.c.reason).where(review_queue.c.patient_ref == "Patient/2")).scalar()
        assert reason == ReviewReason.ALREADY_LINKED.value
        assert conn.execute(select(links.c.patient_ref)).scalar() == "Patient/1"
    # The school records the child as looked after: the link is suspended and waits for a person.
    with store.begin() as conn:
        upsert(conn, learners, [roll("B801200005001", looked_after=True)], ["learner_key"])
        match_pending(conn, "run-3")
        assert conn.execute(select(links.c.withdrawn)).scalar() is True
        reason = conn.execute(select(review_queue.c.reason).where(review_queue.c.patient_ref == "Patient/1")).scalar()
        assert reason == ReviewReason.BECAME_SENSITIVE.value
