"""Scored identity matching through `match_pending` on the state store (SQLite and PostgreSQL).

The roll is stored as ingest stores it (keys from `learner_match_keys` of the canonical learner) and the trust's
Patients as the nhs_sync pull stores them (FHIR Patient JSON read by the fhir-patient-match mapping), so the test
also shows the two sides key the same child the same way. Every child is invented. The optional PDS trace runs
against the local PDS sandbox stand-in (tests/integration/pds_server.py) serving the sandbox's own responses.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import Engine, select

from connectors.pds import PdsFhirClient
from schoolslink.constants import (
    CONFIDENTIALITY_SYSTEM,
    EDUCATIONAL_ESTABLISHMENT_EXT,
    NHS_NUMBER_SYSTEM,
    NHS_NUMBER_VERIFICATION_EXT,
    SCHOOL_URN_SYSTEM,
)
from schoolslink.governance.matching import match_pending
from schoolslink.keys import learner_key, learner_match_keys, match_hash
from schoolslink.mapping import fhir_inbound as fin
from schoolslink.model import MatchMethod, ReviewReason
from schoolslink.store.schema import learners, links, match_candidates, metadata, patients, review_queue
from schoolslink.store.upsert import upsert
from tests.integration.pds_server import MOCKS, PDS_CORPUS, PdsServer

URN = "900001"
TRUST = "R9X"


def pupil(upn: str, surname: str, forename: str, dob: str, sex: str = "F", postcode: str = "LS1 6AE", *,
          preferred_forename: str = "", consented: bool = False, **flags: bool) -> dict[str, Any]:
    """A learners row as ingest writes it; `consented` keeps the plain record (as an active consent does)."""
    plain = {"upn": upn, "school_urn": URN, "surname": surname, "forename": forename, "dob": dob, "sex": sex,
             "postcode": postcode, "preferred_forename": preferred_forename, "preferred_surname": "",
             "nhs_number": None}
    return {"learner_key": learner_key(upn), "school_urn": URN, "match_hash": match_hash(URN, surname, forename, dob),
            "match_keys": learner_match_keys(plain), "looked_after": False, "adopted": False,
            "child_protection": False, "do_not_tell_parent": False, "competent": False, "left_school": False,
            "age_years": 12, "plain": plain if consented else None, "updated_run": "r", **flags}


def patient(pid: str, nhs: str, family: str, given: str, dob: str, gender: str = "female",
            postcode: str | None = "LS1 6AE", *, verified: bool = True, restricted: bool = False) -> dict[str, Any]:
    """A patients row as the nhs_sync pull stores it, from the trust's FHIR Patient."""
    res: dict[str, Any] = {
        "resourceType": "Patient", "id": pid,
        "extension": [{"url": EDUCATIONAL_ESTABLISHMENT_EXT,
                       "valueIdentifier": {"system": SCHOOL_URN_SYSTEM, "value": URN}}],
        "identifier": [{"system": NHS_NUMBER_SYSTEM, "value": nhs, "extension": [{
            "url": NHS_NUMBER_VERIFICATION_EXT,
            "valueCodeableConcept": {"coding": [{"code": "01" if verified else "02"}]}}]}],
        "name": [{"use": "official", "family": family, "given": [given]}],
        "gender": gender, "birthDate": dob, "meta": {"versionId": "1"},
    }
    if postcode:
        res["address"] = [{"use": "home", "postalCode": postcode}]
    if restricted:
        res["meta"]["security"] = [{"system": CONFIDENTIALITY_SYSTEM, "code": "R"}]
    row = fin.canonical("Patient", res)
    assert row is not None
    return {**row, "trust_ods": TRUST, "updated_run": "r"}


def roll() -> list[dict[str, Any]]:
    """The school's roll (built under the test's key, so not at import)."""
    return [
        pupil("ASHBY-ANN", "Ashby", "Ann", "2013-04-07"),
        pupil("ASHBY-BETH", "Ashby", "Beth", "2013-04-07"),  # Ann's twin
        pupil("KHAN-SAMI", "Khan", "Sami", "2012-09-30", "M", "LS2 9JT"),
        pupil("OKAFOR-THOMAS", "Okafor", "Thomas", "2012-11-30", "M", "LS6 1AA", preferred_forename="Tom"),
        pupil("WREN-ELSIE", "Wren", "Elsie", "2011-03-08", "F", "LS7 2BB"),
        pupil("LUND-MAYA", "Lund", "Maya", "2014-02-20", "F", "LS8 3CC"),
        pupil("CHEN-LEO", "Chen", "Leo", "2013-06-01", "M", "LS9 4DD"),  # an older sibling of Chen Mia (not on roll)
    ]


def trust_patients() -> list[dict[str, Any]]:
    """The trust's Patients naming the school."""
    return [
        patient("exact", "9990000018", "KHAN", "Sami", "2012-09-30", "male", "LS2 9JT"),
        patient("scored", "9990000026", "Lund", "Maya", "2014-02-20", "female", "ls8 3cc", verified=False),
        patient("twin-ann", "9990000034", "Ashby", "Ann", "2013-04-07"),
        patient("twin-beth", "9990000042", "Ashby", "Beth", "2013-04-07", postcode=None),
        patient("preferred", "9990000050", "Okafor", "Tom", "2012-11-30", "male", postcode=None),
        patient("swapped", "9990000069", "Wren", "Elsie", "2011-08-03", "female", "LS7 2BB"),
        patient("typo", "9990000077", "Lunde", "Maya", "2014-02-20", "female", "LS8 3CC"),
        patient("sibling", "9990000085", "Chen", "Mia", "2015-01-09", "female", "LS9 4DD"),
    ]


# Plain values that must never reach the store (the roll has no consent here, so no `plain`).
PLAIN = ["Ashby", "ASHBY", "Khan", "KHAN", "Okafor", "Wren", "Lund", "Chen", "Sami", "Maya", "Thomas", "Elsie",
         "2013-04-07", "2012-09-30", "2014-02-20", "2011-08-03", "LS1 6AE", "LS2", "LS8", "9990000018", "9990000026"]


def _store_all(conn: sa.Connection) -> None:
    upsert(conn, learners, roll(), ["learner_key"])
    upsert(conn, patients, trust_patients(), ["trust_ods", "patient_ref"])


def test_scored_matching_through_the_store(store: Engine) -> None:
    with store.begin() as conn:
        _store_all(conn)
        counts = match_pending(conn, "run-1")
    assert (counts.linked, counts.review, counts.traced) == (2, 6, 0)
    with store.connect() as conn:
        linked = {r.patient_ref: (r.learner_key, r.method, r.confidence) for r in conn.execute(select(links))}
        reviews = {r.patient_ref: (r.reason, r.candidate_learner_key) for r in conn.execute(select(review_queue))}
        weighed = [dict(r) for r in conn.execute(
            select(match_candidates).order_by(match_candidates.c.patient_ref, match_candidates.c.rank)).mappings()]
    assert linked["Patient/exact"] == (learner_key("KHAN-SAMI"), MatchMethod.VERIFIED_NHS_NUMBER_NAME_DOB.value, 1.0)
    ref, method, confidence = linked["Patient/scored"]
    assert (ref, method) == (learner_key("LUND-MAYA"), MatchMethod.SCORED_DEMOGRAPHICS.value) and confidence > 0.999
    assert reviews == {
        "Patient/twin-ann": (ReviewReason.AMBIGUOUS.value, learner_key("ASHBY-ANN")),
        "Patient/twin-beth": (ReviewReason.AMBIGUOUS.value, learner_key("ASHBY-BETH")),
        "Patient/preferred": (ReviewReason.LOW_SCORE.value, learner_key("OKAFOR-THOMAS")),
        "Patient/swapped": (ReviewReason.LOW_SCORE.value, learner_key("WREN-ELSIE")),
        "Patient/typo": (ReviewReason.LOW_SCORE.value, learner_key("LUND-MAYA")),
        "Patient/sibling": (ReviewReason.NO_CANDIDATE.value, None),
    }
    by_patient: dict[str, list[dict[str, Any]]] = {}
    for w in weighed:
        by_patient.setdefault(w["patient_ref"], []).append(w)
    assert set(by_patient) == set(reviews) - {"Patient/sibling"}
    ann = by_patient["Patient/twin-ann"]
    assert [(w["learner_key"], w["rank"], w["exact"]) for w in ann] == [
        (learner_key("ASHBY-ANN"), 1, True), (learner_key("ASHBY-BETH"), 2, False)]
    assert ann[0]["agreement"] == "surname=exact forename=exact dob=exact sex=agree postcode=exact"
    assert ann[1]["agreement"] == "surname=exact forename=disagree dob=exact sex=agree postcode=exact"
    assert ann[1]["score"] == pytest.approx(21.39)
    [preferred] = by_patient["Patient/preferred"]
    assert preferred["score"] == pytest.approx(22.18) and "forename=preferred" in preferred["agreement"]
    [swapped] = by_patient["Patient/swapped"]
    assert "dob=swapped" in swapped["agreement"] and swapped["score"] < 28
    [typo] = by_patient["Patient/typo"]
    assert "surname=phonetic" in typo["agreement"] and typo["score"] < 28

    # A second run changes nothing, and keeps one set of candidates per patient.
    with store.begin() as conn:
        again = match_pending(conn, "run-2")
    assert (again.linked, again.review) == (0, 6)
    with store.connect() as conn:
        assert conn.execute(select(sa.func.count()).select_from(match_candidates)).scalar() == len(weighed)


def test_a_corrected_roll_links_and_its_candidates_go(store: Engine) -> None:
    with store.begin() as conn:
        _store_all(conn)
        match_pending(conn, "run-1")
        # The trust corrects the date of birth it had with day and month swapped.
        upsert(conn, patients, [patient("swapped", "9990000069", "Wren", "Elsie", "2011-03-08", "female", "LS7 2BB")],
               ["trust_ods", "patient_ref"])
        counts = match_pending(conn, "run-2")
    assert counts.linked == 1
    with store.connect() as conn:
        assert conn.execute(select(links.c.learner_key).where(links.c.patient_ref == "Patient/swapped")).scalar() \
            == learner_key("WREN-ELSIE")
        left = conn.execute(select(match_candidates.c.patient_ref).distinct()).scalars().all()
        assert "Patient/swapped" not in left
        assert conn.execute(select(review_queue).where(review_queue.c.patient_ref == "Patient/swapped")).first() \
            is None


def test_the_store_holds_no_names_dates_of_birth_postcodes_or_nhs_numbers(store: Engine) -> None:
    with store.begin() as conn:
        _store_all(conn)
        match_pending(conn, "run-1")
    with store.connect() as conn:
        dump = json.dumps({t.name: [list(map(str, r)) for r in conn.execute(select(t))]
                           for t in metadata.sorted_tables})
    for value in PLAIN:
        assert value not in dump, value


def test_a_sensitive_pupil_or_a_restricted_record_never_links_by_score(store: Engine) -> None:
    with store.begin() as conn:
        upsert(conn, learners, [pupil("LUND-MAYA", "Lund", "Maya", "2014-02-20", "F", "LS8 3CC", adopted=True)],
               ["learner_key"])
        upsert(conn, patients, [
            patient("scored", "9990000026", "Lund", "Maya", "2014-02-20", "female", "LS8 3CC", verified=False),
            patient("restricted", "9990000034", "Lund", "Maya", "2014-02-20", "female", "LS8 3CC", restricted=True),
        ], ["trust_ods", "patient_ref"])
        counts = match_pending(conn, "run-1")
        reasons = dict(conn.execute(select(review_queue.c.patient_ref, review_queue.c.reason)).tuples().all())
    assert counts.linked == 0
    assert reasons == {"Patient/scored": ReviewReason.SENSITIVE_CASE.value,
                       "Patient/restricted": ReviewReason.RESTRICTED.value}


# The optional PDS trace -----------------------------------------------------------------------------------------

@pytest.fixture()
def pds() -> Iterator[PdsServer]:
    if not PDS_CORPUS.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"corpus missing in CI: {PDS_CORPUS}")
        pytest.skip(f"corpus not present: {PDS_CORPUS}")
    with PdsServer() as server:
        yield server


def _jane(conn: sa.Connection, *, consented: bool = True, nhs: str = "9000000009") -> None:
    """Jane Smith (the sandbox's own test patient) at school; the trust knows her as Janey, with no address."""
    upsert(conn, learners, [pupil("SMITH-JANE", "Smith", "Jane", "2010-10-22", "F", "LS1 6AE",
                                  preferred_forename="Janey", consented=consented)], ["learner_key"])
    upsert(conn, patients, [patient("jane", nhs, "Smith", "Janey", "2010-10-22", postcode=None)],
           ["trust_ods", "patient_ref"])


def _reason(conn: sa.Connection, ref: str = "Patient/jane") -> str | None:
    return conn.execute(select(review_queue.c.reason).where(review_queue.c.patient_ref == ref)).scalar()


def test_without_a_trace_the_candidate_waits(store: Engine) -> None:
    with store.begin() as conn:
        _jane(conn)
        counts = match_pending(conn, "run-1")
        assert (counts.linked, counts.traced) == (0, 0) and _reason(conn) == ReviewReason.LOW_SCORE.value


def test_a_trace_finding_the_trusts_number_links(store: Engine, pds: PdsServer) -> None:
    confident = json.loads((MOCKS / "PatientSearch.json").read_text())
    confident = copy.deepcopy(confident)
    confident["entry"][0]["search"]["score"] = 1.0
    pds.sandbox.add_search("Smith", "Jane", "2010-10-22", confident)
    with store.begin() as conn, PdsFhirClient(pds.base_url, sleep=lambda _s: None) as trace:
        _jane(conn)
        counts = match_pending(conn, "run-1", trace=trace)
        method = conn.execute(select(links.c.method).where(links.c.patient_ref == "Patient/jane")).scalar()
    assert (counts.linked, counts.traced, counts.linked_by_trace) == (1, 1, 1)
    assert method == MatchMethod.PDS_TRACE.value
    seen = pds.sandbox.requests[-1].query
    assert seen["family"] == ["Smith"] and seen["given"] == ["Jane"] and seen["birthdate"] == ["eq2010-10-22"]


def test_the_sandboxs_fuzzy_result_does_not_confirm(store: Engine, pds: PdsServer) -> None:
    with store.begin() as conn, PdsFhirClient(pds.base_url, sleep=lambda _s: None) as trace:
        _jane(conn)  # the canned PatientSearch.json: 9000000009 at score 0.75, below PDS_MIN_SCORE
        counts = match_pending(conn, "run-1", trace=trace)
        assert (counts.linked, counts.traced) == (0, 1) and _reason(conn) == ReviewReason.LOW_SCORE.value


def test_a_trace_finding_another_number_or_a_restricted_record_never_links(store: Engine, pds: PdsServer) -> None:
    other = json.loads((MOCKS / "PatientSearch.json").read_text())
    other["entry"][0]["search"]["score"] = 1.0
    pds.sandbox.add_search("Smith", "Jane", "2010-10-22", other)  # 9000000009
    with store.begin() as conn, PdsFhirClient(pds.base_url, sleep=lambda _s: None) as trace:
        _jane(conn, nhs="9990000018")
        match_pending(conn, "run-1", trace=trace)
        assert _reason(conn) == ReviewReason.NHS_NUMBER_DISAGREES.value
    with store.begin() as conn, PdsFhirClient(pds.base_url, sleep=lambda _s: None) as trace:
        # Janet Smythe: the sandbox's restricted (meta.security R) record.
        upsert(conn, learners, [pupil("SMYTHE-JANET", "Smythe", "Janet", "2005-06-16", preferred_forename="Jan",
                                      consented=True)], ["learner_key"])
        upsert(conn, patients, [patient("janet", "9000000025", "Smythe", "Jan", "2005-06-16", postcode=None)],
               ["trust_ods", "patient_ref"])
        counts = match_pending(conn, "run-2", trace=trace)
        assert counts.linked == 0 and _reason(conn, "Patient/janet") == ReviewReason.RESTRICTED.value


def test_a_failed_trace_leaves_the_candidate_waiting_and_no_consent_no_trace(store: Engine, pds: PdsServer) -> None:
    pds.sandbox.fail_next(503, n=3)
    with store.begin() as conn, PdsFhirClient(pds.base_url, max_retries=2, sleep=lambda _s: None) as trace:
        _jane(conn)
        counts = match_pending(conn, "run-1", trace=trace)
        assert (counts.linked, counts.traced, counts.trace_failed) == (0, 1, 1)
        assert _reason(conn) == ReviewReason.LOW_SCORE.value
    before = len(pds.sandbox.requests)
    with store.begin() as conn, PdsFhirClient(pds.base_url, sleep=lambda _s: None) as trace:
        _jane(conn, consented=False)  # no plain record kept for her: nothing to trace with
        counts = match_pending(conn, "run-2", trace=trace)
        assert (counts.linked, counts.traced) == (0, 0)
    assert len(pds.sandbox.requests) == before


def test_migration_0003_keeps_the_roll_and_rereads_every_patient(store_url: str, sl_home: object) -> None:
    """Upgrading a store at 0002: rows stay, the new columns are empty, and the Patient watermark is forgotten so
    the next pull stores every Patient's match keys (other types keep theirs)."""
    from alembic import command

    from schoolslink.store.db import alembic_config, engine_for, migrate
    from schoolslink.store.schema import watermarks

    eng = engine_for(store_url)
    cfg = alembic_config(store_url)
    with eng.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0002")
    old = {k: v for k, v in pupil("KHAN-SAMI", "Khan", "Sami", "2012-09-30").items() if k != "match_keys"}
    with eng.begin() as conn:
        conn.execute(sa.table("learners", *(sa.column(c) for c in old)).insert(), [
            {**old, "plain": None}])
        conn.execute(sa.table("watermarks", sa.column("source"), sa.column("resource_type"), sa.column("value"))
                     .insert(), [{"source": "fhir:R9X", "resource_type": t, "value": "2026-11-01T00:00:00Z"}
                                 for t in ("Patient", "ServiceRequest")])
    migrate(store_url)
    with eng.connect() as conn:
        row = conn.execute(select(learners.c.learner_key, learners.c.match_keys)).one()
        assert row == (learner_key("KHAN-SAMI"), None)
        assert conn.execute(select(watermarks.c.resource_type)).scalars().all() == ["ServiceRequest"]
