"""The demo end to end, as a user runs it: `schoolslink demo` through Airflow against the real Medplum server.

Asserts on what arrived at the trust's server and in the schools' feeds, and on what did not arrive
anywhere: every value the synthetic trust marks as never-to-leave (and every identity of a pupil whose
consent does not cover a direction) is searched in all its renderings in everything Medplum holds
that we wrote, every feed, every log, the Airflow metadata database and the GX results.

The second night runs after a rotation of the pseudonym key (version 1 -> 2, the old key kept as previous): it
must change no resource id and no state-store key, so it sends nothing new, while its ledger entries carry the new
key's subjects and version and a query by UPN still finds the child's entries under both.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from connectors.fhir.client import FhirClient
from connectors.fhir.server import MedplumServer
from schoolslink.constants import OUR_META_SOURCE
from tests import leakscan
from tests.integration.demo_cli import run_demo

pytestmark = pytest.mark.slow
RUN_DATE = "2026-11-26"
SCHOOLS, PUPILS = "6", "1800"
KEY_V1, KEY_V2 = "e2e-test-key", "e2e-test-key-rotated"
ROTATED = {"SCHOOLSLINK_KEY": KEY_V2, "SCHOOLSLINK_KEY_VERSION": "2", "SCHOOLSLINK_KEY_PREVIOUS": f"1:{KEY_V1}"}


@dataclass
class DemoRun:
    home: Path
    base: str
    manifest: dict[str, Any]
    first: dict[str, Any]
    second: dict[str, Any]
    outputs: str


def _demo(home: Path, base: str, *extra: str, env: dict[str, str] | None = None) -> tuple[dict[str, Any], str]:
    return run_demo(home, base, RUN_DATE, *extra, schools=SCHOOLS, pupils=PUPILS, seed=None, clean_input=False,
                    key=KEY_V1, extra_env=env)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoRun]:
    home = tmp_path_factory.mktemp("demo")
    with MedplumServer(log_path=home.parent / "medplum.log") as server:
        first, out1 = _demo(home, server.base_url)
        second, out2 = _demo(home, server.base_url, "--keep", env=ROTATED)  # after a pseudonym key rotation
        manifest = json.loads((home / "synth-manifest.json").read_text())
        yield DemoRun(home, server.base_url, manifest, first, second, out1 + out2)


RESOURCE_TYPES = ("Patient", "Organization", "PractitionerRole", "ServiceRequest", "EpisodeOfCare", "Appointment",
                  "Consent", "Observation", "QuestionnaireResponse", "Communication", "DocumentReference")


def _everything(base: str) -> list[dict[str, Any]]:
    with FhirClient(base) as client:
        return [r for rtype in RESOURCE_TYPES for r in client.all_resources(rtype)]


def _our_resources(base: str) -> list[dict[str, Any]]:
    with FhirClient(base) as client:
        out = []
        for rtype in ("Observation", "QuestionnaireResponse", "Communication", "DocumentReference", "Patient"):
            out += [r for r in client.all_resources(rtype) if (r.get("meta") or {}).get("source") == OUR_META_SOURCE]
        return out


def test_both_runs_succeed_through_airflow(demo: DemoRun) -> None:
    for run in (demo.first, demo.second):
        assert run["ok"]
        assert [r["state"] for r in run["runs"]] == ["success"] * 3
        assert [r["dag_id"] for r in run["runs"]] == ["nhs_sync", "mis_ingest", "school_feeds"]


def test_consented_pupils_context_arrived_and_nobody_elses(demo: DemoRun) -> None:
    observations = [r for r in _our_resources(demo.base) if r["resourceType"] == "Observation"]
    by_patient: dict[str, set[str]] = {}
    for o in observations:
        by_patient.setdefault(o["subject"]["reference"], set()).add(o["code"]["coding"][0]["code"])
    expected = {f"Patient/{c['patient_id']}" for c in demo.manifest["cases"] if c["expect_school_to_trust"]}
    assert set(by_patient) == expected
    assert expected, "the synthetic trust has consented pupils"
    for items in by_patient.values():
        assert items <= {"attendance_percent", "sen_provision", "exclusions_fixed_count", "year_group"}
        assert "attendance_percent" in items


def test_no_patient_was_written_and_second_run_adds_no_version(demo: DemoRun) -> None:
    ours = _our_resources(demo.base)
    assert ours and not [r for r in ours if r["resourceType"] == "Patient"]
    everything = _everything(demo.base)
    seeded = sum(len(json.loads(p.read_text())["entry"]) for p in (demo.home / "seed" / "fhir").glob("bundle-*.json"))
    assert len(everything) == seeded + len(ours)
    with FhirClient(demo.base) as client:
        for r in everything:  # the trust's own resources and ours: one version each after two runs
            assert client.history_count(r["resourceType"], r["id"]) == 1, f"{r['resourceType']}/{r['id']}"
    s2 = demo.second["summaries"]["mis_ingest"]
    assert s2.get("sent", 0) == 0
    assert s2.get("unchanged_not_sent", 0) == len([r for r in ours if r["resourceType"] == "Observation"])


def test_feeds_carry_exactly_the_consented_pupils(demo: DemoRun) -> None:
    feeds = demo.home / "out" / "feeds"
    rows: dict[str, dict[str, str]] = {}
    for f in feeds.glob(f"*/{RUN_DATE}/feed.json"):
        doc = json.loads(f.read_text())
        manifest = json.loads((f.parent / "manifest.json").read_text())
        assert manifest["rows"] == len(doc["rows"])
        assert doc["link_contacts"] and doc["link_contacts"][0]["trust_link_worker_email"]
        for row in doc["rows"]:
            rows[row["upn"]] = row
    expected = {c["upn"]: c for c in demo.manifest["cases"] if c["expect_trust_to_school"]}
    assert set(rows) == set(expected)
    status_of = {"received", "being_assessed", "accepted_waiting", "in_treatment", "not_accepted", "discharged",
                 "moved_to_adult_services", "moved_area"}
    for upn, row in rows.items():
        assert row["status_code"] == expected[upn]["referral_status"]
        assert row["status_code"] in status_of
        assert row["contact_email"].endswith(".nhs.uk") or "@" in row["contact_email"]
    # every synthetic school, the demo's bad-input school for its one good pupil, and its CSV school
    assert len(list(feeds.glob(f"*/{RUN_DATE}/feed.csv"))) == int(SCHOOLS) + 2


def test_bad_input_is_quarantined_or_refused_and_the_rest_goes_on(demo: DemoRun) -> None:
    s = demo.first["summaries"]["mis_ingest"]
    assert s["files"] == int(SCHOOLS) + 3 and s["refused_files"] == 1
    assert s["quarantined"] == 5 and s["read"] == int(PUPILS) + 5 + 3  # + the SIMS CSV school's three
    reasons = " | ".join(s["quarantine_reasons"])
    for why in ("UPN check letter is wrong", "duplicate UPN", "DOB is not a date", "Sex is not one of",
                "entity attack"):
        assert why in reasons
    assert len(list((demo.home / "landing" / "refused").rglob("*.sealed"))) == 1
    assert not list((demo.home / "landing").rglob("*.xml"))  # every export rests sealed


def test_nothing_leaks_anywhere(demo: DemoRun) -> None:
    m = demo.manifest
    to_nhs: dict[str, str] = {}
    to_school: dict[str, str] = {}
    for mk in m["markers"]:
        for form in leakscan.renderings(mk["value"], mk["item"]):
            if mk["where"] in ("nhs", "both"):
                to_nhs[form] = mk["item"]
            if mk["where"] in ("school", "both"):
                to_school[form] = mk["item"]
    # Pupil identities: never in a log, Airflow table, GX result, report or state-store reason, whatever their consent.
    identities = leakscan.identity_needles(m)

    nhs_side = {f"{r['resourceType']}/{r['id']}": json.dumps(r) for r in _our_resources(demo.base)}
    assert nhs_side
    assert leakscan.find(nhs_side, to_nhs) == []
    # Values the trust never had (school-side markers, UPNs) are nowhere on its server at all.
    seed_text = "".join(p.read_text() for p in (demo.home / "seed" / "fhir").glob("bundle-*.json"))
    never_at_trust = {form: what for form, what in to_nhs.items() if form not in seed_text}
    assert any(what == "upn" for what in never_at_trust.values())
    whole_server = {f"{r['resourceType']}/{r['id']}": json.dumps(r) for r in _everything(demo.base)}
    assert leakscan.find(whole_server, never_at_trust) == []

    feed_files = leakscan.texts(sorted((demo.home / "out" / "feeds").rglob("*")))
    assert feed_files
    assert leakscan.find(feed_files, to_school) == []

    places = leakscan.places_without_pupil_data(demo.home, extra_logs=[demo.home.parent / "medplum.log"])
    assert places["logs"] and places["airflow db"] and places["gx"]
    places["demo stdout/stderr"] = {"demo stdout/stderr": demo.outputs}
    places["run summaries"] = {"run summaries": json.dumps([demo.first, demo.second])}
    for where in places.values():
        assert leakscan.find(where, identities) == []


def test_plain_data_only_with_consent_and_no_pupil_files_left_in_the_work_store(
        demo: DemoRun, monkeypatch: pytest.MonkeyPatch) -> None:
    import sqlite3

    from schoolslink.keys import learner_key

    monkeypatch.setenv("SCHOOLSLINK_KEY", "e2e-test-key")
    db = sqlite3.connect(demo.home / "state.db")
    plain = {k for (k,) in db.execute("select learner_key from learners where plain is not null")}
    total = db.execute("select count(*) from learners").fetchone()[0]
    assert 0 < len(plain) < total
    for c in demo.manifest["cases"]:
        key = learner_key(c["upn"])
        if c["case"] in ("no_consent", "refused", "withdrawn", "expired", "parents_disagree"):
            assert key not in plain, c["case"]
        if c["expect_trust_to_school"] or c["expect_school_to_trust"]:
            assert key in plain, c["case"]
    from schoolslink.pipeline.ingest import PLAIN_FIELDS

    # Minimisation: even for a consented learner, only what the feeds and the agreed items need.
    kept = {k for (doc,) in db.execute("select plain from learners where plain is not null") for k in json.loads(doc)}
    assert kept <= set(PLAIN_FIELDS) and {"upn", "surname", "dob"} <= kept
    assert not kept & {"address_lines", "postcode", "contacts", "ethnicity", "fsm_eligible", "nhs_number"}
    assert list((demo.home / "work").rglob("*.jsonl")) == []


def test_a_same_night_rerun_keeps_what_changed_since_the_last_night(demo: DemoRun) -> None:
    # The second run rebuilt tonight's feeds: every row is still new to the school, not "unchanged".
    for f in (demo.home / "out" / "feeds").glob(f"*/{RUN_DATE}/feed.json"):
        for row in json.loads(f.read_text())["rows"]:
            assert row["changed"] == "new"


def test_may_share_agrees_with_every_disclosure_the_runs_made(demo: DemoRun, monkeypatch: pytest.MonkeyPatch) -> None:
    """The one-question gate (`may_share`) and the pipeline's bulk gates must agree: for every linked learner,
    trust and item an agreement could carry, `may_share` says yes exactly when the ledger records that item as
    sent to that trust (school -> trust) or shown to the learner's school in a feed (trust -> school)."""
    from datetime import date

    from sqlalchemy import create_engine, select

    from schoolslink.constants import PURPOSE_SUPPORT
    from schoolslink.governance.agreement import load_agreements
    from schoolslink.governance.share import may_share
    from schoolslink.keys import ledger_subject
    from schoolslink.model import Direction
    from schoolslink.store.schema import ledger, links, trust_referrals

    monkeypatch.setenv("SCHOOLSLINK_HOME", str(demo.home))
    monkeypatch.setenv("SCHOOLSLINK_KEY", "e2e-test-key")
    agreements = load_agreements()
    day = date.fromisoformat(RUN_DATE)
    eng = create_engine(f"sqlite:///{demo.home / 'state.db'}")
    with eng.connect() as conn:
        sent = {(r.direction, r.subject_key, r.recipient.split(":", 1)[1] if r.direction == "school_to_trust"
                 else None, item)
                for r in conn.execute(select(ledger)) for item in r.data_items.split(",")}  # ledger subjects
        linked = conn.execute(select(links.c.learner_key, links.c.trust_ods, links.c.patient_ref)).all()
        referred = {(r.trust_ods, r.patient_ref) for r in conn.execute(
            select(trust_referrals.c.trust_ods, trust_referrals.c.patient_ref))}
        agree_s2t = ["attendance_percent", "sen_provision", "exclusions_fixed_count", "year_group"]
        checked = 0
        for key, trust, pref in linked:
            for item in agree_s2t:
                d = may_share(conn, agreements, key, trust, Direction.SCHOOL_TO_TRUST, PURPOSE_SUPPORT, item, day)
                # attendance, SEN, exclusions and year group are sent only when the learner has a value for them
                if ("school_to_trust", ledger_subject(key), trust, item) in sent:
                    assert d.allowed, (key, item, d.reason)
                elif item == "attendance_percent":
                    assert not d.allowed, (key, item, d.reason)
                checked += 1
            if (trust, pref) in referred:
                d = may_share(conn, agreements, key, trust, Direction.TRUST_TO_SCHOOL, PURPOSE_SUPPORT,
                              "referral_status", day)
                assert d.allowed == (("trust_to_school", ledger_subject(key), None, "referral_status") in sent), (
                    key, d.reason)
                checked += 1
    eng.dispose()
    assert checked > 100 and any(s[0] == "trust_to_school" for s in sent)


def test_a_pseudonym_key_rotation_changes_no_id_and_keeps_every_entry_findable(
        demo: DemoRun, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from sqlalchemy import create_engine, select

    from schoolslink.audit.commands import cmd_audit_query
    from schoolslink.keys import learner_key
    from schoolslink.store.schema import ledger
    from tests.integration.test_audit_tools import _query_ns

    # The id key (here the version-1 key, kept as previous) named every learner, link and outbox row on both nights,
    # so the second found them all under their old keys and sent nothing (test above: one version each, 0 sent).
    monkeypatch.setenv("SCHOOLSLINK_HOME", str(demo.home))
    for name, value in ROTATED.items():
        monkeypatch.setenv(name, value)
    eng = create_engine(f"sqlite:///{demo.home / 'state.db'}")
    with eng.connect() as conn:
        rows = [dict(r) for r in conn.execute(select(ledger.c.seq, ledger.c.key_version, ledger.c.subject_key)
                                              .order_by(ledger.c.seq)).mappings()]
    eng.dispose()
    versions = [r["key_version"] for r in rows]
    assert "1" in versions and "2" in versions and versions == sorted(versions)  # night 1 under v1, then v2
    by_subject: dict[str, set[str]] = {}
    for r in rows:
        by_subject.setdefault(r["subject_key"], set()).add(r["key_version"])
    assert all(len(v) == 1 for v in by_subject.values()), "a subject pseudonym belongs to one key version"

    # A child disclosed on both nights: found by UPN under both keys while the old one is held, not after it is let go.
    import hmac
    from hashlib import sha256

    def subject_under(key: str, state_key: str) -> str:
        digest = hmac.new(key.encode(), f"ledger-subject\x1f{state_key}".encode(), sha256).hexdigest()
        return f"{state_key[:3]}-{digest[:24]}"

    case = next(c for c in demo.manifest["cases"] if c.get("upn")
                and subject_under(KEY_V1, learner_key(c["upn"])) in by_subject
                and subject_under(KEY_V2, learner_key(c["upn"])) in by_subject)
    capsys.readouterr()
    assert cmd_audit_query(_query_ns(upn=case["upn"], json=True)) == 0
    found = json.loads(capsys.readouterr().out)["entries"]
    assert {e["key_version"] for e in found} == {"1", "2"}
    mine = {subject_under(k, learner_key(case["upn"])) for k in (KEY_V1, KEY_V2)}
    assert {r["seq"] for r in rows if r["subject_key"] in mine} <= {e["seq"] for e in found}
    monkeypatch.delenv("SCHOOLSLINK_KEY_PREVIOUS")  # without the version-1 key nothing may stand in for the id key
    assert cmd_audit_query(_query_ns(upn=case["upn"], json=True)) == 1
    assert "SCHOOLSLINK_ID_KEY" in json.loads(capsys.readouterr().out)["error"]
    monkeypatch.setenv("SCHOOLSLINK_ID_KEY", KEY_V1)  # the procedure's first step
    assert cmd_audit_query(_query_ns(upn=case["upn"], json=True)) == 0
    assert {e["key_version"] for e in json.loads(capsys.readouterr().out)["entries"]} == {"2"}
