"""`match review` decisions and the retraction of a wrong link, on both state-store backends and the real FHIR peer.

The scenario runs the pipeline's stages night by night as the DAGs do (nhs_sync: pull, match; mis_ingest:
plan, parse + validate, govern + map, deliver; school_feeds: plan, build) for a small synthetic trust. Night 1
a learner is linked, their school context reaches the trust and their status the school's feed; then a person
unlinks the link as wrong. Night 2 each resource sent under it is re-sent entered-in-error (read back from
Medplum, a new version in its _history), its outbox row is retracted, the ledger records every retraction and
still verifies, and the school's feed carries one correction row and no status for the pupil. Night 3 carries
neither, and nothing is ever sent again under the withdrawn link.

The CLI tests drive `schoolslink match review` in-process on state seeded directly (keys only); `unlink --now`
retracts at once against Medplum. The peer is shared by the session, so resources are found through our own
outbox rows and versions are compared before and after, never assumed.
"""

from __future__ import annotations

import csv
import io
import json
import uuid
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, insert, select

from connectors.fhir.client import FhirClient
from connectors.fhir.server import MedplumServer
from schoolslink.cli import main
from schoolslink.constants import OUR_META_SOURCE
from schoolslink.governance import register, review
from schoolslink.governance.matching import match_pending
from schoolslink.keys import learner_key, ledger_subject
from schoolslink.mapping import ukcore
from schoolslink.model import (
    Consent,
    ConsentDecision,
    ConsentGiver,
    Direction,
    MatchMethod,
    ReviewReason,
)
from schoolslink.pipeline import feeds_stage, ingest, sync
from schoolslink.pipeline.retraction import entered_in_error
from schoolslink.store.schema import feed_rows, learners, ledger, links, outbox, patients, review_queue, runs
from schoolslink.synth import synthesise

TRUST = "R9X"  # the trust agreements/demo-partnership.yaml names
URN = "900001"
DAY1 = date(2026, 11, 26)
REASON = "twin mix-up: the trust's record is the other twin"
FEED_IDENTITY = {"upn", "surname", "forename", "trust_ods", "status", "status_code", "changed"}


@pytest.fixture()
def peer(medplum: MedplumServer, monkeypatch: pytest.MonkeyPatch) -> MedplumServer:
    monkeypatch.setenv(f"SCHOOLSLINK_FHIR_BASE_{TRUST}", medplum.base_url)
    return medplum


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def cli_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any]]:
    code, out, err = cli(capsys, *argv, "--json")
    assert err == ""
    doc: dict[str, Any] = json.loads(out)  # one JSON document, nothing else
    return code, doc


# -- the scenario, night by night ---------------------------------------------------------------------------


def _night(n: int, day: date) -> dict[str, Any]:
    """One night as the DAGs run it: nhs_sync, then mis_ingest, then school_feeds."""
    at = datetime.combine(day, time(2, 0), tzinfo=UTC)
    counts: dict[str, Any] = {**sync.pull_trust(f"nhs-{n}", TRUST), **sync.match_all(f"nhs-{n}")}
    parts = [ingest.govern_map(f"mis-{n}", ingest.parse_validate(f"mis-{n}", chunk, day), day)
             for chunk in ingest.plan(f"mis-{n}", 1)]
    counts.update(ingest.deliver(f"mis-{n}", parts, day, at))
    counts.update(_feeds(f"feeds-{n}", day))
    return counts


def _feeds(run_id: str, day: date) -> dict[str, Any]:
    at = datetime.combine(day, time(2, 0), tzinfo=UTC)
    counts: dict[str, Any] = {}
    for chunk in feeds_stage.plan(1):
        counts.update(feeds_stage.build(run_id, chunk, day, at))
    return counts


def _seed(base: str, home: Path) -> None:
    with FhirClient(base, timeout=60) as client:
        for bundle in sorted((home / "seed" / "fhir").glob("bundle-*.json")):
            results = client.put_batch([e["resource"] for e in json.loads(bundle.read_text())["entry"]])
            assert all(r.ok for r in results), [r.message for r in results if not r.ok]


def _feed_rows_of(home: Path, day: date, upn: str) -> list[dict[str, str]]:
    folder = home / "out" / "feeds" / URN / day.isoformat()
    from_json = [{c: "" if v is None else str(v) for c, v in r.items()}
                 for r in json.loads((folder / "feed.json").read_text())["rows"] if r["upn"] == upn]
    from_csv = [r for r in csv.DictReader(io.StringIO((folder / "feed.csv").read_text())) if r["upn"] == upn]
    assert from_csv == from_json
    return from_json


def _outbox(store: Engine, key: str) -> dict[str, str]:
    with store.connect() as conn:
        return {r.resource_ref: r.status for r in conn.execute(
            select(outbox.c.resource_ref, outbox.c.status)
            .where(outbox.c.destination == f"fhir:{TRUST}", outbox.c.subject_key == key))}


def _ledger(store: Engine, key: str) -> list[Any]:
    with store.connect() as conn:
        return list(conn.execute(select(ledger).where(ledger.c.subject_key == ledger_subject(key))
                                 .order_by(ledger.c.seq)))


def _versions(base: str, refs: list[str]) -> dict[str, tuple[dict[str, Any], int]]:
    with FhirClient(base) as client:
        return {ref: (client.read(*ref.split("/")), client.history_count(*ref.split("/"))) for ref in refs}


def test_a_wrong_link_is_retracted_and_nothing_more_is_sent(
        peer: MedplumServer, store: Engine, sl_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = synthesise(sl_home, schools=1, pupils=200, seed=4242, as_of=DAY1)
    _seed(peer.base_url, sl_home)
    case = next(c for c in manifest.cases if c.case == "consented")
    key = learner_key(case.upn)
    identity = {case.upn, case.surname, case.forename, case.nhs_number, case.dob}

    # Night 1: linked; the school context reaches the trust; the school sees the referral's status.
    _night(1, DAY1)
    with store.connect() as conn:
        link = conn.execute(select(links).where(links.c.learner_key == key)).mappings().one()
    assert link["patient_ref"] == f"Patient/{case.patient_id}" and not link["withdrawn"]
    assert link["method"] == MatchMethod.VERIFIED_NHS_NUMBER_NAME_DOB.value
    sent = _outbox(store, key)
    refs = sorted(sent)
    assert refs and set(sent.values()) == {"sent"}
    before = _versions(peer.base_url, refs)
    for res, _ in before.values():
        assert res["status"] == "final" and res["subject"]["reference"] == link["patient_ref"]
    [night1_row] = _feed_rows_of(sl_home, DAY1, case.upn)
    assert night1_row["status_code"] == case.referral_status and night1_row["changed"] == "new"

    # A person finds the link wrong.
    code, out, err = cli(capsys, "match", "review", "unlink", key, TRUST, "--by", "Sam Reviewer", "--reason", REASON)
    assert code == 0 and err == ""
    assert key in out and not any(v in out for v in identity)
    with store.connect() as conn:
        decision = conn.execute(select(runs.c.run_id, runs.c.summary).where(runs.c.dag_id == "match_review")).one()
        assert conn.execute(select(links.c.withdrawn).where(links.c.learner_key == key)).scalar() is True
        assert conn.execute(select(review_queue.c.status).where(
            review_queue.c.patient_ref == link["patient_ref"])).scalar() == "rejected"
    assert decision.run_id in out
    assert decision.summary["action"] == "unlink" and decision.summary["by"] == "Sam Reviewer"
    assert decision.summary["retractions_due"] == len(refs) and decision.summary["feed_corrections_due"] == 1
    assert set(_outbox(store, key).values()) == {"retract"}

    # Night 2: each resource is re-sent entered-in-error, first thing in the delivery; the feed corrects.
    night2 = _night(2, DAY1 + timedelta(days=1))
    assert night2["retracted"] == len(refs) and night2.get("retractions_still_due", 0) == 0
    assert night2["feed_corrections"] == 1
    after = _versions(peer.base_url, refs)
    for ref in refs:
        res, versions = after[ref]
        old, old_versions = before[ref]
        assert res["status"] == "entered-in-error"
        assert versions == old_versions + 1  # one new version in _history
        assert res["meta"]["source"] == OUR_META_SOURCE and res["meta"]["tag"] == old["meta"]["tag"]
        assert {k: v for k, v in res.items() if k not in ("meta", "status")} == \
            {k: v for k, v in old.items() if k not in ("meta", "status")}
        assert ukcore.check(entered_in_error(res) or {}) == []
    assert set(_outbox(store, key).values()) == {"retracted"}

    [correction] = _feed_rows_of(sl_home, DAY1 + timedelta(days=1), case.upn)
    assert correction["status_code"] == "entered-in-error" and correction["changed"] == "correction"
    assert correction["trust_ods"] == TRUST and correction["surname"] == case.surname
    assert "disregard" in correction["status"]
    assert {c: v for c, v in correction.items() if c not in FEED_IDENTITY and v} == {}  # nothing else about them

    entries = _ledger(store, key)
    retractions = [e for e in entries if e.data_items == "retraction"]
    to_trust = [e for e in retractions if e.direction == Direction.SCHOOL_TO_TRUST.value]
    to_school = [e for e in retractions if e.direction == Direction.TRUST_TO_SCHOOL.value]
    assert len(to_trust) == len(refs) and {e.recipient for e in to_trust} == {f"ODS:{TRUST}"}
    assert {e.run_id for e in to_trust} == {"mis-2"}
    assert [(e.recipient, e.run_id) for e in to_school] == [(f"URN:{URN}", "feeds-2")]
    for e in retractions:
        assert e.consent_id == f"{decision.run_id}: {REASON}" and e.agreement_id == "demo-partnership"
    sent_hashes = {e.content_hash for e in to_trust}
    with FhirClient(peer.base_url) as client:
        from schoolslink.outbox import content_hash
        assert sent_hashes == {content_hash(entered_in_error(client.read(*r.split("/"))) or {}) for r in refs}
    # Nothing new was disclosed about the pupil after the unlink: night 2 sent only the retractions.
    assert [e for e in entries if e.run_id in ("mis-2", "feeds-2") and e.data_items != "retraction"] == []
    code, doc = cli_json(capsys, "audit", "verify")
    assert code == 0 and doc["ok"] and doc["entries"] == len(_all_ledger(store))

    # A re-run of night 2's feed carries the same correction again, once.
    _feeds("feeds-2-rerun", DAY1 + timedelta(days=1))
    assert [r["changed"] for r in _feed_rows_of(sl_home, DAY1 + timedelta(days=1), case.upn)] == ["correction"]

    # Night 3: no correction, no status, nothing sent or retracted again; the link stays withdrawn.
    night3 = _night(3, DAY1 + timedelta(days=2))
    assert night3.get("retracted", 0) == 0 and night3["feed_corrections"] == 0
    assert _feed_rows_of(sl_home, DAY1 + timedelta(days=2), case.upn) == []
    assert {ref: n for ref, (_, n) in _versions(peer.base_url, refs).items()} == \
        {ref: n for ref, (_, n) in after.items()}
    assert set(_outbox(store, key).values()) == {"retracted"}
    assert [e for e in _ledger(store, key) if e.run_id in ("mis-3", "feeds-3")] == []
    with store.connect() as conn:
        assert conn.execute(select(links.c.withdrawn, links.c.patient_ref).where(links.c.learner_key == key)).one() \
            == (True, link["patient_ref"])
        assert conn.execute(select(feed_rows.c.content_hash).where(feed_rows.c.learner_key == key)).scalar() \
            == f"retracted:{decision.run_id}"
    code, doc = cli_json(capsys, "audit", "verify")
    assert code == 0 and doc["ok"]


def _all_ledger(store: Engine) -> list[Any]:
    with store.connect() as conn:
        return list(conn.execute(select(ledger.c.seq)))


# -- the CLI on seeded state ---------------------------------------------------------------------------------


def _learner(key: str, urn: str = URN, *, age: int = 12, competent: bool = False, **flags: bool) -> dict[str, Any]:
    return {"learner_key": key, "school_urn": urn, "match_hash": f"h-{key}", "looked_after": False,
            "adopted": False, "child_protection": False, "do_not_tell_parent": False, "competent": competent,
            "left_school": False, "age_years": age, "plain": None, "updated_run": "seed", **flags}


def _patient(ref: str, *, restricted: bool = False, urn: str | None = URN) -> dict[str, Any]:
    return {"trust_ods": TRUST, "patient_ref": ref, "patient_key": f"pat-{ref.split('/')[1]}", "school_urn": urn,
            "match_hash": None, "verified": True, "restricted": restricted, "version_id": "1", "updated_run": "seed"}


def _item(ref: str, reason: ReviewReason, candidate: str | None, urn: str | None = URN) -> dict[str, Any]:
    return {"trust_ods": TRUST, "patient_ref": ref, "patient_key": f"pat-{ref.split('/')[1]}", "school_urn": urn,
            "candidate_learner_key": candidate, "reason": reason.value, "status": "open", "updated_run": "seed"}


def _seed_state(store: Engine, learners_: list[dict[str, Any]], patients_: list[dict[str, Any]],
                items: list[dict[str, Any]], links_: list[dict[str, Any]] | None = None) -> None:
    with store.begin() as conn:
        for table, rows in ((learners, learners_), (patients, patients_), (review_queue, items),
                            (links, links_ or [])):
            if rows:
                conn.execute(insert(table), rows)


def _consent(key: str, giver: ConsentGiver, decision: ConsentDecision = ConsentDecision.PERMIT) -> Consent:
    return Consent(consent_id=f"school:{URN}:{uuid.uuid4().hex[:8]}", subject_key=key, given_by=giver,
                   decision=decision, directions=tuple(Direction), purposes=("cypmhs-school-support",),
                   valid_from=date(2026, 9, 1), school_urn=URN)


def _link_row(store: Engine, key: str) -> dict[str, Any] | None:
    with store.connect() as conn:
        row = conn.execute(select(links).where(links.c.learner_key == key,
                                               links.c.trust_ods == TRUST)).mappings().first()
    return dict(row) if row is not None else None


def _status(store: Engine, ref: str) -> str | None:
    with store.connect() as conn:
        return conn.execute(select(review_queue.c.status).where(review_queue.c.trust_ods == TRUST,
                                                                review_queue.c.patient_ref == ref)).scalar()


def test_list_shows_open_items_with_keys_only(store: Engine, capsys: pytest.CaptureFixture[str]) -> None:
    _seed_state(store, [_learner("lrn-a"), _learner("lrn-b", "900002")],
                [_patient("Patient/p1"), _patient("Patient/p2", urn="900002"), _patient("Patient/p3")],
                [_item("Patient/p1", ReviewReason.SENSITIVE_CASE, "lrn-a"),
                 _item("Patient/p2", ReviewReason.NO_CANDIDATE, None, "900002"),
                 {**_item("Patient/p3", ReviewReason.NO_CANDIDATE, None), "status": "rejected"}])
    code, doc = cli_json(capsys, "match", "review", "list")
    assert code == 0 and doc["ok"] and doc["count"] == 2
    assert doc["items"][0] == {"trust_ods": TRUST, "patient_ref": "Patient/p1", "school_urn": URN,
                               "reason": ReviewReason.SENSITIVE_CASE.value, "candidate_learner_key": "lrn-a"}
    assert [i["patient_ref"] for i in cli_json(capsys, "match", "review", "list", "--school", "900002")[1]["items"]] \
        == ["Patient/p2"]
    assert cli_json(capsys, "match", "review", "list", "--trust", "RXX")[1]["count"] == 0
    code, out, err = cli(capsys, "match", "review", "list")
    assert code == 0 and err == "" and "2 open review item(s)" in out and "lrn-a" in out and "Patient/p3" not in out
    code, _, err = cli(capsys, "match", "review", "list", "--bogus")
    assert code == 2


def test_confirm_links_as_a_person_decided_and_refuses_what_the_rules_refuse(
        store: Engine, capsys: pytest.CaptureFixture[str]) -> None:
    _seed_state(store,
                [_learner("lrn-ok"), _learner("lrn-other"), _learner("lrn-elsewhere", "900002"),
                 _learner("lrn-la", looked_after=True), _learner("lrn-dntp", age=14, do_not_tell_parent=True),
                 _learner("lrn-cp", child_protection=True)],
                [_patient("Patient/ok"), _patient("Patient/none"), _patient("Patient/r", restricted=True),
                 _patient("Patient/la"), _patient("Patient/dntp"), _patient("Patient/cp"), _patient("Patient/far")],
                [_item("Patient/ok", ReviewReason.UNVERIFIED_NHS_NUMBER, "lrn-ok"),
                 _item("Patient/none", ReviewReason.NO_CANDIDATE, None),
                 _item("Patient/r", ReviewReason.RESTRICTED, None),
                 _item("Patient/la", ReviewReason.SENSITIVE_CASE, "lrn-la"),
                 _item("Patient/dntp", ReviewReason.SENSITIVE_CASE, "lrn-dntp"),
                 _item("Patient/cp", ReviewReason.SENSITIVE_CASE, "lrn-cp"),
                 _item("Patient/far", ReviewReason.NO_CANDIDATE, None)])
    confirm = ("match", "review", "confirm", TRUST)
    by = ("--by", "Jo Engineer", "--date", "2026-11-26")

    code, doc = cli_json(capsys, *confirm, "Patient/ok", *by)
    assert code == 0 and doc["ok"] and doc["learner_key"] == "lrn-ok" and doc["decision"].startswith("match_review")
    lk = _link_row(store, "lrn-ok")
    assert lk is not None and lk["patient_ref"] == "Patient/ok" and lk["method"] == "confirmed_by_reviewer"
    assert lk["confidence"] == 1.0 and lk["confirmed_by"] == "Jo Engineer" and not lk["withdrawn"]
    assert lk["linked_run"] == doc["decision"] and _status(store, "Patient/ok") == "confirmed"

    refusals = [
        ((*confirm, "Patient/ok", *by), "already confirmed"),  # no longer open
        ((*confirm, "Patient/unknown", *by), "no review item"),
        ((*confirm, "Patient/r", "--learner", "lrn-other", *by), "restricted"),
        ((*confirm, "Patient/none", *by), "--learner"),  # no candidate, none named
        ((*confirm, "Patient/none", "--learner", "lrn-nobody", *by), "no learner"),
        ((*confirm, "Patient/far", "--learner", "lrn-elsewhere", *by), "not on the roll"),
        ((*confirm, "Patient/none", "--learner", "lrn-ok", *by), "already linked to another patient"),
        ((*confirm, "Patient/la", *by), "local-authority-consent"),  # sensitive: needs --rule-met
        ((*confirm, "Patient/la", "--rule-met", "safeguarding-lead-agreed", *by), "looked-after"),
        ((*confirm, "Patient/la", "--rule-met", "local-authority-consent", *by), "not met"),  # none on the register
        ((*confirm, "Patient/dntp", "--rule-met", "young-person-consent", *by), "not met"),  # under 16, not competent
        ((*confirm, "Patient/cp", "--rule-met", "post-adoption-identity-checked", *by), "safeguarding-lead-agreed"),
    ]
    for argv, why in refusals:
        code, doc = cli_json(capsys, *argv)
        assert code == 1 and doc["ok"] is False and why in doc["refused"], (argv, doc)
        code, out, err = cli(capsys, *argv)
        assert code == 1 and out == "" and why in err
    for key in ("lrn-other", "lrn-la", "lrn-dntp", "lrn-cp"):
        assert _link_row(store, key) is None
    assert {_status(store, r) for r in ("Patient/none", "Patient/r", "Patient/la", "Patient/far")} == {"open"}

    # The rules met: the local authority's consent on the register; the safeguarding lead's agreement attested.
    with store.begin() as conn:
        register.save(conn, [_consent("lrn-la", ConsentGiver.LOCAL_AUTHORITY)], "school", "seed")
    code, doc = cli_json(capsys, *confirm, "Patient/la", "--rule-met", "local-authority-consent", *by)
    assert code == 0 and doc["rules_met"] == ["local-authority-consent"] and doc["case_flags"] == ["looked_after"]
    code, doc = cli_json(capsys, *confirm, "Patient/cp", "--rule-met", "safeguarding-lead-agreed", *by)
    assert code == 0 and _link_row(store, "lrn-cp") is not None
    with store.begin() as conn:  # a refusal by the same party wins over its permit
        register.save(conn, [_consent("lrn-dntp", ConsentGiver.YOUNG_PERSON),
                             _consent("lrn-dntp", ConsentGiver.YOUNG_PERSON, ConsentDecision.DENY)], "school", "seed",
                      competent={"lrn-dntp": True})
        conn.execute(learners.update().where(learners.c.learner_key == "lrn-dntp").values(competent=True))
    code, doc = cli_json(capsys, *confirm, "Patient/dntp", "--rule-met", "young-person-consent", *by)
    assert code == 1 and "not met" in doc["refused"]

    # Usage errors: no --by; a rule that does not exist.
    assert cli(capsys, *confirm, "Patient/none")[0] == 2
    assert cli(capsys, *confirm, "Patient/la", "--rule-met", "the-head-said-so", *by)[0] == 2


def test_reject_is_final_for_the_matcher(store: Engine, capsys: pytest.CaptureFixture[str]) -> None:
    key = "lrn-twin"
    _seed_state(store, [{**_learner(key), "match_hash": "same"}],
                [{**_patient("Patient/t"), "match_hash": "same", "verified": False}],
                [_item("Patient/t", ReviewReason.UNVERIFIED_NHS_NUMBER, key)])
    code, out, err = cli(capsys, "match", "review", "reject", TRUST, "Patient/t", "--by", "Jo Engineer",
                         "--reason", "not our pupil")
    assert code == 0 and "will not be matched again" in out and err == ""
    assert _status(store, "Patient/t") == "rejected"
    with store.begin() as conn:  # the trust verifies the number: still never matched automatically
        conn.execute(patients.update().values(verified=True))
        match_pending(conn, "later")
    assert _link_row(store, key) is None and _status(store, "Patient/t") == "rejected"
    code, doc = cli_json(capsys, "match", "review", "reject", TRUST, "Patient/t", "--by", "Jo Engineer")
    assert code == 1 and "already rejected" in doc["refused"]
    code, doc = cli_json(capsys, "match", "review", "reject", TRUST, "Patient/x", "--by", "Jo Engineer")
    assert code == 1 and "no review item" in doc["refused"]
    assert cli(capsys, "match", "review", "reject", TRUST, "Patient/t")[0] == 2  # --by is required


def test_unlink_refusals_and_a_relink_to_the_right_patient(store: Engine, capsys: pytest.CaptureFixture[str]) -> None:
    key = "lrn-mixed"
    _seed_state(store, [_learner(key)], [_patient("Patient/wrong"), _patient("Patient/right")],
                [_item("Patient/right", ReviewReason.ALREADY_LINKED, key)],
                [{"learner_key": key, "trust_ods": TRUST, "patient_key": "pat-wrong", "patient_ref": "Patient/wrong",
                  "method": MatchMethod.VERIFIED_NHS_NUMBER_NAME_DOB.value, "confidence": 1.0, "confirmed_by": None,
                  "withdrawn": False, "linked_run": "seed"}])
    unlink = ("match", "review", "unlink")
    code, doc = cli_json(capsys, *unlink, "lrn-nobody", TRUST, "--by", "Jo Engineer", "--reason", "wrong")
    assert code == 1 and "no link" in doc["refused"]
    for reason in ("NHS no 999 000 0018 is the other child", "UPN A999100116007", "born 04/03/2012"):
        code, doc = cli_json(capsys, *unlink, key, TRUST, "--by", "Jo Engineer", "--reason", reason)
        assert code == 1 and "pupil identifiers" in doc["refused"]
        assert not any(part in json.dumps(doc) for part in ("0018", "A999100116007", "2012"))
    assert _link_row(store, key)["withdrawn"] is False  # type: ignore[index]
    assert cli(capsys, *unlink, key, TRUST, "--by", "Jo Engineer")[0] == 2  # --reason is required

    # The right patient cannot be confirmed while the wrong link stands; after unlink it can.
    code, doc = cli_json(capsys, "match", "review", "confirm", TRUST, "Patient/right", "--by", "Jo Engineer")
    assert code == 1 and "unlink it first" in doc["refused"]
    code, doc = cli_json(capsys, *unlink, key, TRUST, "--by", "Jo Engineer", "--reason", "wrong child")
    assert code == 0 and doc["retractions_due"] == 0 and doc["feed_corrections_due"] == 0
    with store.connect() as conn:  # what a delivery racing the unlink finds, to retract what it just sent
        assert review.unlink_decisions(conn, TRUST, [key, "lrn-nobody"]) == {key: doc["decision"]}
    assert _status(store, "Patient/wrong") == "rejected"
    with store.connect() as conn:
        assert conn.execute(select(review_queue.c.reason).where(
            review_queue.c.patient_ref == "Patient/wrong")).scalar().startswith("a reviewer found the link wrong")
    code, doc = cli_json(capsys, "match", "review", "confirm", TRUST, "Patient/right", "--by", "Jo Engineer")
    assert code == 0
    lk = _link_row(store, key)
    assert lk is not None and lk["patient_ref"] == "Patient/right" and not lk["withdrawn"]
    with store.connect() as conn:
        assert review.unlink_decisions(conn, TRUST, [key]) == {}
    with store.begin() as conn:  # the wrong patient is never matched to anyone automatically again
        match_pending(conn, "later")
        assert conn.execute(select(links.c.learner_key).where(links.c.patient_ref == "Patient/wrong")).all() == []


def test_unlink_now_retracts_at_once(peer: MedplumServer, store: Engine, capsys: pytest.CaptureFixture[str]) -> None:
    from schoolslink import outbox as ob
    from schoolslink.keys import resource_id

    key, prefix = f"lrn-{uuid.uuid4().hex[:20]}", uuid.uuid4().hex[:8]
    obs = {
        "resourceType": "Observation", "id": resource_id("Observation", TRUST, key, "year_group"),
        "meta": {"source": OUR_META_SOURCE,
                 "tag": [{"system": "https://fhir.schoolslink.org.uk/CodeSystem/origin", "code": "schoolslink"}]},
        "status": "final",
        "code": {"coding": [{"system": "https://fhir.schoolslink.org.uk/CodeSystem/school-context",
                             "code": "year_group"}]},
        "subject": {"reference": f"Patient/{prefix}-p"}, "valueString": "8",
    }
    assert ukcore.check(obs) == []
    with FhirClient(peer.base_url) as client:
        assert client.put_batch([obs])[0].ok
        versions = client.history_count("Observation", obs["id"])
    ref = f"Observation/{obs['id']}"
    _seed_state(store, [_learner(key)], [_patient(f"Patient/{prefix}-p")], [],
                [{"learner_key": key, "trust_ods": TRUST, "patient_key": "pat-x", "patient_ref": f"Patient/{prefix}-p",
                  "method": MatchMethod.VERIFIED_NHS_NUMBER_NAME_DOB.value, "confidence": 1.0, "confirmed_by": None,
                  "withdrawn": False, "linked_run": "seed"}])
    with store.begin() as conn:
        ob.record(conn, f"fhir:{TRUST}", [(ref, key, ob.content_hash(obs), "sent", None)], "mis-1")
        conn.execute(insert(feed_rows).values(school_urn=URN, learner_key=key, trust_ods=TRUST,
                                              content_hash="a" * 64, feed_date=DAY1))

    code, doc = cli_json(capsys, "match", "review", "unlink", key, TRUST, "--by", "Jo Engineer",
                         "--reason", "wrong child", "--now")
    assert code == 0 and doc["ok"] and doc["sent_now"]["retracted"] == 1 and doc["feed_corrections_due"] == 1
    with FhirClient(peer.base_url) as client:
        now = client.read("Observation", obs["id"])
        assert now["status"] == "entered-in-error" and now["valueString"] == "8"
        assert client.history_count("Observation", obs["id"]) == versions + 1
    assert _outbox(store, key) == {ref: "retracted"}
    [entry] = _ledger(store, key)
    assert (entry.dag_id, entry.run_id, entry.data_items, entry.recipient) == \
        ("match_review", doc["decision"], "retraction", f"ODS:{TRUST}")

    # Run again: nothing is due any more, so nothing is sent twice.
    code, doc = cli_json(capsys, "match", "review", "unlink", key, TRUST, "--by", "Jo Engineer",
                         "--reason", "wrong child", "--now")
    assert code == 0 and doc["retractions_due"] == 0 and doc["sent_now"] == {}
    with FhirClient(peer.base_url) as client:
        assert client.history_count("Observation", obs["id"]) == versions + 1


def test_unlink_now_without_a_reachable_server_stays_due(store: Engine, capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from schoolslink import outbox as ob

    # Nothing listens there; the trust's connection says not to wait long or retry.
    monkeypatch.setenv(f"AIRFLOW_CONN_SCHOOLSLINK_FHIR_{TRUST.upper()}", json.dumps(
        {"host": "http://127.0.0.1:9/fhir/R4", "extra": {"timeout": 2, "max_retries": 0}}))
    key = "lrn-offline"
    _seed_state(store, [_learner(key)], [_patient("Patient/off")], [],
                [{"learner_key": key, "trust_ods": TRUST, "patient_key": "pat-off", "patient_ref": "Patient/off",
                  "method": MatchMethod.VERIFIED_NHS_NUMBER_NAME_DOB.value, "confidence": 1.0, "confirmed_by": None,
                  "withdrawn": False, "linked_run": "seed"}])
    with store.begin() as conn:
        ob.record(conn, f"fhir:{TRUST}", [("Observation/sl-off", key, "b" * 64, "sent", None)], "mis-1")
    code, doc = cli_json(capsys, "match", "review", "unlink", key, TRUST, "--by", "Jo Engineer",
                         "--reason", "wrong child", "--now")
    assert code == 1 and doc["ok"] is False and doc["sent_now"]["retractions_still_due"] == 1
    assert _outbox(store, key) == {"Observation/sl-off": "retract"}  # the next mis_ingest run sends it
    assert _link_row(store, key)["withdrawn"] is True  # type: ignore[index]


def test_a_feed_build_racing_an_unlink_leaves_the_correction_due(store: Engine) -> None:
    from schoolslink.feeds import _not_over_new_corrections

    with store.begin() as conn:
        conn.execute(insert(feed_rows), [
            {"school_urn": URN, "learner_key": k, "trust_ods": TRUST, "content_hash": h, "feed_date": DAY1}
            for k, h in (("lrn-raced", "retract:d9"), ("lrn-carried", "retract:d8"), ("lrn-plain", "c" * 64))])
    tonight = {"school_urn": URN, "trust_ods": TRUST, "feed_date": DAY1 + timedelta(days=1), "prev_date": None}
    state = [{**tonight, "learner_key": "lrn-raced", "content_hash": "d" * 64, "prev_hash": "c" * 64},
             {**tonight, "learner_key": "lrn-carried", "content_hash": "retracted:d8", "prev_hash": None},
             {**tonight, "learner_key": "lrn-plain", "content_hash": "e" * 64, "prev_hash": "c" * 64}]
    with store.connect() as conn:
        kept = _not_over_new_corrections(conn, URN, state)
    assert [s["learner_key"] for s in kept] == ["lrn-carried", "lrn-plain"]


def test_a_sensitive_case_flows_only_after_a_person_confirms_it_and_stops_when_a_new_flag_arises(
        peer: MedplumServer, store: Engine, sl_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A looked-after child is never auto-linked; a person confirms the link with the local authority's consent
    on the register; from the next night their school context reaches the trust and the school sees the status
    (and `may_share` agrees); the link stands night after night; a child-protection flag that arises later
    suspends it again and nothing more flows."""
    from schoolslink.constants import PURPOSE_SUPPORT
    from schoolslink.governance.agreement import load_agreements
    from schoolslink.governance.share import may_share

    manifest = synthesise(sl_home, schools=1, pupils=200, seed=4242, as_of=DAY1)
    _seed(peer.base_url, sl_home)
    case = next(c for c in manifest.cases if c.case == "looked_after")
    key, pref = learner_key(case.upn), f"Patient/{case.patient_id}"
    register_text = (sl_home / "landing" / "consent" / f"{URN}.csv").read_text()

    _night(1, DAY1)
    assert _link_row(store, key) is None and _status(store, pref) == "open"
    assert not _outbox(store, key) and not _feed_rows_of(sl_home, DAY1, case.upn)

    code, doc = cli_json(capsys, "match", "review", "confirm", TRUST, pref, "--by", "Jo Reviewer",
                         "--rule-met", "local-authority-consent", "--date", DAY1.isoformat())
    assert code == 0 and doc["case_flags"] == ["looked_after"], doc

    day2 = DAY1 + timedelta(days=1)
    _night(2, day2)
    lk = _link_row(store, key)
    assert lk is not None and not lk["withdrawn"]
    sent = _outbox(store, key)
    assert sent and set(sent.values()) == {"sent"}
    assert [r["status_code"] for r in _feed_rows_of(sl_home, day2, case.upn)] == [case.referral_status]
    with store.connect() as conn:
        d = may_share(conn, load_agreements(), key, TRUST, Direction.SCHOOL_TO_TRUST, PURPOSE_SUPPORT,
                      "attendance_percent", day2)
    assert d.allowed, d.reason

    day3 = day2 + timedelta(days=1)
    night3 = _night(3, day3)
    lk3 = _link_row(store, key)
    assert lk3 is not None and not lk3["withdrawn"] and night3.get("sent", 0) == 0  # stands; nothing new to send

    # The school now records a child-protection concern: the confirmation did not cover it.
    rows = list(csv.DictReader(io.StringIO(register_text)))
    for r in rows:
        if r["upn"] == case.upn:
            r["child_protection"] = "true"
    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    (sl_home / "landing" / "consent" / f"{URN}.csv").write_text(out.getvalue())
    day4 = day3 + timedelta(days=1)
    _night(4, day4)
    lk4 = _link_row(store, key)
    assert lk4 is not None and lk4["withdrawn"] and _status(store, pref) == "open"
    assert not _feed_rows_of(sl_home, day4, case.upn)
    with store.connect() as conn:
        d = may_share(conn, load_agreements(), key, TRUST, Direction.SCHOOL_TO_TRUST, PURPOSE_SUPPORT,
                      "attendance_percent", day4)
    assert not d.allowed
