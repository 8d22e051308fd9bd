"""The Wonde client and reader against a real HTTP server on 127.0.0.1 (tests/integration/wonde_server.py).

Pulls go over real HTTP; waits between retries are recorded, not slept. Every test asserts what came through:
which students, which requests were made, what was quarantined and why (without any value in the reason).
"""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from connectors.mis.base import MisExport
from connectors.mis.errors import FileRefused, MisInputError
from connectors.mis.wonde import WATERMARK_SLACK, WondeClient, WondeError, read_wonde
from schoolslink.errors import ConfigurationError
from schoolslink.identifiers import make_upn
from tests.integration.wonde_server import WONDE_TIME, FakeStudent, WondeServer, make_student

SCHOOL = "A1930499544"
URN = "900001"
TOKEN = "test-token-not-secret"
LONG_AGO = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)


@pytest.fixture()
def server() -> Iterator[WondeServer]:
    with WondeServer(TOKEN) as s:
        yield s


def _roll(server: WondeServer, n: int, school_id: str = SCHOOL) -> list[FakeStudent]:
    school = server.school(school_id)
    school.students = [make_student(i, updated_at=LONG_AGO) for i in range(1, n + 1)]
    return school.students


def _client(server: WondeServer, sleeps: list[float] | None = None, **kw: Any) -> WondeClient:
    return WondeClient(server.base_url, TOKEN, sleep=(sleeps.append if sleeps is not None else _no_sleep), **kw)


def _no_sleep(_seconds: float) -> None:
    raise AssertionError("no wait was expected")


def _read(doc: dict[str, Any]) -> MisExport:
    return read_wonde(json.dumps(doc).encode())


# Pulls ------------------------------------------------------------------------------------------------------


def test_full_pull_then_incremental_pull_from_the_watermark(server: WondeServer) -> None:
    students = _roll(server, 6)
    with _client(server) as client:
        full = client.pull(SCHOOL, URN, None)
        assert full["format"] == "wonde" and full["version"] == "v1.0"
        assert full["school_urn"] == URN and full["school_id"] == SCHOOL
        assert full["qualifier"] == "full" and full["updated_after"] is None
        assert [s["id"] for s in full["students"]] == [s.id for s in students]
        pulled_at = dt.datetime.fromisoformat(full["pulled_at"])
        assert pulled_at.tzinfo is not None and pulled_at.utcoffset() == dt.timedelta(0)
        first_request = server.seen("students")[0]
        assert "updated_after" not in first_request.query
        assert first_request.query["include"] == "extended_details,contacts,contacts.contact_details"

        # Two students change after the pull; the others do not.
        later = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=5)
        students[1].updated_at = later
        students[4].updated_at = later
        students[4].fields["surname"] = "Changed"
        part = client.pull(SCHOOL, URN, pulled_at)  # the first pull's pulled_at is the watermark

    assert part["qualifier"] == "partial"
    assert part["updated_after"] == pulled_at.isoformat()
    assert [s["id"] for s in part["students"]] == [students[1].id, students[4].id]
    sent = server.seen("students")[-1].query["updated_after"]
    assert sent == (pulled_at - WATERMARK_SLACK).strftime(WONDE_TIME)  # UTC, "YYYY-MM-DD HH:MM:SS"
    assert dt.datetime.fromisoformat(part["pulled_at"]) >= pulled_at

    whole, changed = _read(full), _read(part)
    assert (whole.qualifier, changed.qualifier) == ("full", "partial")
    assert [lr.upn for lr in whole.learners] == [s.upn for s in students]
    assert whole.source_ids == [s.id for s in students]
    assert [lr.upn for lr in changed.learners] == [students[1].upn, students[4].upn]
    assert changed.learners[1].preferred_surname == "Changed"
    assert changed.exported_at == dt.datetime.fromisoformat(part["pulled_at"])
    assert not whole.quarantined and not changed.quarantined


def test_pagination_reads_every_student_once(server: WondeServer) -> None:
    students = _roll(server, 23)
    with _client(server, per_page=5) as client:
        got = list(client.students(SCHOOL, None))
    assert sorted(s["id"] for s in got) == sorted(s.id for s in students)
    assert len(got) == 23
    pages = server.seen("students")
    assert [int(r.query.get("page", "1")) for r in pages] == [1, 2, 3, 4, 5]
    assert all(r.query["per_page"] == "5" for r in pages)
    assert all("extended_details" in s and "contacts" in s for s in got)


def test_bare_next_links_keep_the_filter_and_includes(server: WondeServer) -> None:
    """The documented next link carries only page=: the client adds its own query back."""
    students = _roll(server, 12)
    changed = {s.id for s in students[::2]}
    for s in students[::2]:
        s.updated_at = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)
    server.bare_next_links = True
    with _client(server, per_page=2) as client:
        got = list(client.students(SCHOOL, dt.datetime(2026, 1, 1, tzinfo=dt.UTC)))
    assert {s["id"] for s in got} == changed and len(got) == len(changed)
    assert all(s["extended_details"]["data"]["upn"] for s in got)
    assert all(r.query["updated_after"] == "2025-12-31 23:59:00" for r in server.seen("students"))


def test_429_and_5xx_are_retried_and_then_succeed(server: WondeServer) -> None:
    _roll(server, 3)
    sleeps: list[float] = []
    server.fail_next(3, status=429, retry_after="0")
    with _client(server, sleeps) as client:
        assert len(list(client.students(SCHOOL, None))) == 3
    assert sleeps == [0.0, 0.0, 0.0]  # Retry-After honoured
    assert [r.status for r in server.seen("students")] == [429, 429, 429, 200]

    sleeps.clear()
    server.fail_next(2, status=503, retry_after=None)
    with _client(server, sleeps) as client:
        assert len(list(client.students(SCHOOL, None))) == 3
    assert sleeps == [1.0, 2.0]  # no Retry-After: exponential back-off


def test_too_many_429s_raise_wonde_error(server: WondeServer) -> None:
    _roll(server, 3)
    sleeps: list[float] = []
    server.fail_next(10)
    with _client(server, sleeps, max_retries=2) as client, pytest.raises(WondeError) as err:
        client.pull(SCHOOL, URN, None)
    assert err.value.status == 429
    assert "after 2 retries" in err.value.reason and SCHOOL in err.value.reason
    assert isinstance(err.value, MisInputError)
    assert len(server.seen("students")) == 3 and len(sleeps) == 2


def test_401_raises_at_once_without_the_token(server: WondeServer) -> None:
    _roll(server, 2)
    wrong = "wrong-token-abc123"
    with WondeClient(server.base_url, wrong, sleep=_no_sleep) as client, pytest.raises(WondeError) as err:
        client.pull(SCHOOL, URN, None)
    assert err.value.status == 401
    assert "token" in err.value.reason and SCHOOL in err.value.reason
    for text in (str(err.value), err.value.reason, repr(err.value), repr(client)):
        assert wrong not in text and TOKEN not in text
    assert len(server.seen()) == 1 and not server.seen()[0].authorised


def test_403_and_404_say_what_to_do(server: WondeServer) -> None:
    server.school("A2000000002", approved=False)
    with _client(server) as client:
        with pytest.raises(WondeError, match=r"not\s+approved") as err:
            list(client.students("A2000000002", None))
        assert err.value.status == 403
        with pytest.raises(WondeError, match="not found") as err:
            list(client.students("A9999999999", None))
        assert err.value.status == 404
    assert len(server.seen()) == 2  # neither is retried


def test_a_next_link_to_another_host_is_refused() -> None:
    with WondeServer(TOKEN) as server, WondeServer(TOKEN) as elsewhere:
        _roll(server, 5)
        server.next_base = elsewhere.base_url  # same address, another port: another origin
        with _client(server, per_page=2) as client, pytest.raises(WondeError, match="outside the Wonde base URL"):
            list(client.students(SCHOOL, None))
        assert len(server.seen("students")) == 1
        assert elsewhere.seen() == []  # the token was never sent there


def test_deletions_and_leavers_come_through(server: WondeServer) -> None:
    students = _roll(server, 4)
    school = server.school(SCHOOL)
    leaver_upns = [make_upn(999, 2001, 90), make_upn(999, 2001, 91)]
    school.leavers = [make_student(90 + i, updated_at=LONG_AGO, upn=u) for i, u in enumerate(leaver_upns)]
    school.leavers.append(make_student(92, updated_at=LONG_AGO, upn="not-a-upn"))
    school.leavers.append(make_student(93, updated_at=LONG_AGO, upn=students[0].upn))  # also on the roll
    school.deletions = [
        ({"id": "A1000000077", "type": "student", "restored_at": None}, LONG_AGO),
        ({"id": "A1000000078", "type": "student", "restored_at": None}, LONG_AGO),
        ({"id": "A1000000079", "type": "student", "restored_at": {"date": "2021-01-01 00:00:00.000000"}}, LONG_AGO),
        ({"id": "E1000000001", "type": "employee", "restored_at": None}, LONG_AGO),
    ]
    with _client(server) as client:
        doc = client.pull(SCHOOL, URN, None)
    assert len(doc["leavers"]) == 4 and len(doc["deletions"]) == 3  # type=student filtered at the source
    assert server.seen("deletions")[0].query["type"] == "student"
    assert server.seen("students-leaver")[0].query["include"] == "extended_details"

    export = _read(doc)
    assert export.left == leaver_upns
    assert export.deleted_source_ids == ["A1000000077", "A1000000078"]  # the restored one stands
    assert [lr.upn for lr in export.learners] == [s.upn for s in students]  # leavers are never learners
    assert {(w.record, w.field) for w in export.warnings} == {("leaver#3", "upn"), ("leaver#4", "upn")}
    assert all(students[0].upn not in w.message for w in export.warnings)


# Reading a landed pull --------------------------------------------------------------------------------------


def test_read_wonde_quarantines_bad_records_with_value_free_reasons(server: WondeServer) -> None:
    good = [make_student(i, updated_at=LONG_AGO) for i in range(1, 4)]
    upn = make_upn(999, 2001, 4)
    bad_upn = make_student(4, updated_at=LONG_AGO, upn=("B" if upn[0] != "B" else "C") + upn[1:])  # check letter
    duplicate = make_student(5, updated_at=LONG_AGO, upn=good[0].upn)
    bad_gender = make_student(6, updated_at=LONG_AGO, gender="Q")
    no_dob = make_student(7, updated_at=LONG_AGO, date_of_birth=None)
    future = make_student(8, updated_at=LONG_AGO, date_of_birth={"date": "2999-01-01 00:00:00.000000"})
    unreadable_flag = make_student(9, updated_at=LONG_AGO, ext={"in_lea_care": "maybe"})
    many = make_student(10, updated_at=LONG_AGO, upn="", surname=None, legal_surname=None, gender="Q")
    unscoped = make_student(11, updated_at=LONG_AGO, ext={"in_lea_care": None})  # Wonde's null: not readable
    server.school(SCHOOL).students = [good[0], bad_upn, good[1], duplicate, bad_gender, no_dob, future,
                                      unreadable_flag, good[2], many, unscoped]
    with _client(server) as client:
        doc = client.pull(SCHOOL, URN, None)
    doc["students"].append("not an object")
    export = _read(doc)

    assert [lr.upn for lr in export.learners] == [s.upn for s in good]
    assert export.records == 12
    q = {x.record: x for x in export.quarantined}
    assert set(q) == {"student#2", "student#4", "student#5", "student#6", "student#7", "student#8", "student#10",
                      "student#11", "student#12"}
    assert q["student#2"].field == "upn" and "check letter is wrong" in q["student#2"].reason
    assert q["student#4"].reason == "duplicate UPN in the pull: the same UPN as student #1, which is kept (student #4)"
    assert q["student#5"].field == "gender" and "gender is not one of M, F or U" in q["student#5"].reason
    assert q["student#6"].field == "date_of_birth" and "date_of_birth is missing" in q["student#6"].reason
    assert "after the date of the pull" in q["student#7"].reason
    assert q["student#8"].field == "in_lea_care" and "not true or false" in q["student#8"].reason
    assert q["student#10"].reason.startswith("UPN is missing")
    assert "surname is missing" in q["student#10"].reason and "gender is not one of" in q["student#10"].reason
    assert q["student#11"].field == "in_lea_care" and "check the Wonde token" in q["student#11"].reason
    assert q["student#12"].field == "student"

    everything = [s for s in doc["students"] if isinstance(s, dict)]
    values = {str(v) for s in everything for v in (s.get("surname"), s.get("forename"), s.get("legal_surname"),
                                                    s.get("legal_forename"))} - {"None"}
    values |= {s["extended_details"]["data"]["upn"] for s in everything if s["extended_details"]["data"]["upn"]}
    values |= {s["date_of_birth"]["date"][:10] for s in everything if s.get("date_of_birth")}
    for item in export.quarantined:
        assert not any(v in item.reason for v in values), item.reason


def test_read_wonde_maps_the_canonical_learner(server: WondeServer) -> None:
    s = make_student(1, updated_at=LONG_AGO, ext={"sen_status": "E", "in_lea_care": True, "free_school_meals": True,
                                                  "former_upn": f"{make_upn(999, 1, 5)}, A801200005001",
                                                  "uln": "1000102505"})
    s.contacts.append({"id": "C2", "surname": "Example1", "forename": "Gran1",
                       "relationship": {"relationship": "Grandparent", "parental_responsibility": False,
                                        "priority": 0}})
    server.school(SCHOOL).students = [s]
    with _client(server) as client:
        export = _read(client.pull(SCHOOL, URN, None))
    (learner,) = export.learners
    assert (learner.surname, learner.forename) == ("EXAMPLE1", "Adaline1")  # legal names
    assert (learner.preferred_surname, learner.preferred_forename) == ("Example1", "Ada1")
    assert learner.school_urn == URN and learner.sex == "F"
    assert learner.dob == dt.date(2011, 2, 11)
    assert learner.former_upns == [make_upn(999, 1, 5)] and learner.uln is None
    assert learner.sen_provision == "E" and learner.fsm_eligible is True
    assert learner.flags.looked_after is True and learner.flags.sensitive
    assert [(c["order"], c["relationship"], c["responsibility"]) for c in learner.contacts] == [
        (0, "GRANDPARENT", False), (1, "PARENT", True)]
    assert learner.contacts[1]["phones"] == [{"type": "M", "number": "07700 900001"}]
    assert learner.contacts[1]["email"] == "parent1@example.org"
    assert {(w.field, w.message) for w in export.warnings} == {
        ("uln", "ULN fails its check digit; dropped (student #1)"),
        ("former_upn", "a former UPN fails the UPN check; dropped (student #1)")}


def test_read_wonde_takes_a_path_or_a_stream(tmp_path: Path, server: WondeServer) -> None:
    _roll(server, 2)
    with _client(server) as client:
        raw = json.dumps(client.pull(SCHOOL, URN, None)).encode()
    path = tmp_path / "pull.json"
    path.write_bytes(raw)
    assert len(read_wonde(path).learners) == 2
    assert len(read_wonde(io.BytesIO(raw)).learners) == 2


# Whole documents refused ------------------------------------------------------------------------------------


def _doc(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"format": "wonde", "version": "v1.0", "school_urn": URN, "school_id": SCHOOL,
                           "pulled_at": "2026-01-02T03:04:05+00:00", "updated_after": None, "qualifier": "full",
                           "students": [make_student(1, updated_at=LONG_AGO).render(
                               {"extended_details", "contacts", "contacts.contact_details"})],
                           "leavers": [], "deletions": []}
    doc.update(changes)
    return doc


@pytest.mark.parametrize(("raw", "reason"), [
    (b"", "file is empty"),
    (b"<CTfile></CTfile>", "not JSON"),
    (b"\xff\xfe\x00garbage", "not UTF-8"),
    (b"[1, 2, 3]", "not an object"),
    (json.dumps(_doc(format="ctf")).encode(), "format is not 'wonde'"),
    (json.dumps(_doc(version="v2.0")).encode(), "version is not v1.0"),
    (json.dumps(_doc(school_urn=None)).encode(), "no 6-digit school_urn"),
    (json.dumps(_doc(students={"data": []})).encode(), "students is not a list"),
    (json.dumps(_doc(leavers="none")).encode(), "leavers is not a list"),
    (json.dumps(_doc(updated_after="2026-01-01T00:00:00+00:00")).encode(), "disagrees with its updated_after"),
    (json.dumps(_doc(qualifier="partial")).encode(), "disagrees with its updated_after"),
    (json.dumps(_doc(pulled_at="yesterday")).encode(), "pulled_at is missing or not an ISO date-time"),
    (b'{"format": "wonde", "students": [NaN]}', "NaN, Infinity"),
])
def test_bad_documents_are_refused_whole(raw: bytes, reason: str) -> None:
    with pytest.raises(FileRefused) as err:
        read_wonde(raw)
    assert reason in err.value.reason


def test_a_truncated_pull_is_refused_without_quoting_it() -> None:
    raw = json.dumps(_doc()).encode()
    assert len(read_wonde(raw).learners) == 1
    with pytest.raises(FileRefused) as err:
        read_wonde(raw[: len(raw) * 2 // 3])
    assert "truncated" in err.value.reason
    student = _doc()["students"][0]
    for value in (student["surname"], student["legal_forename"], student["extended_details"]["data"]["upn"]):
        assert value not in err.value.reason
    assert err.value.__cause__ is None


# Configuration and logs -------------------------------------------------------------------------------------


@pytest.mark.parametrize("base", ["ftp://api.wonde.com/v1.0/", "http://api.wonde.com/v1.0/", "api.wonde.com",
                                  "https://user:pw@api.wonde.com/v1.0/"])
def test_only_https_base_urls_and_plain_http_only_to_loopback(base: str) -> None:
    with pytest.raises(ConfigurationError):
        WondeClient(base, TOKEN)


def test_a_school_id_cannot_change_the_path(server: WondeServer) -> None:
    with _client(server) as client, pytest.raises(ConfigurationError):
        list(client.students("../other", None))
    assert server.seen() == []


def test_logs_carry_no_pupil_data_or_token(server: WondeServer, caplog: pytest.LogCaptureFixture) -> None:
    students = _roll(server, 4)
    server.fail_next(1)
    caplog.set_level(logging.DEBUG, logger="connectors.mis.wonde")
    with _client(server, []) as client:
        doc = client.pull(SCHOOL, URN, None)
    assert len(doc["students"]) == 4
    assert "retry 1 of 5" in caplog.text and "pulled 4 students" in caplog.text
    for s in students:
        for value in (s.upn, s.fields["surname"], s.fields["legal_forename"], s.fields["date_of_birth"]["date"][:10]):
            assert value not in caplog.text
    assert TOKEN not in caplog.text
