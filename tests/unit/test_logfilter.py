"""The pseudonymising log filter (schoolslink/logfilter.py, docs/governance/logging.md)."""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from schoolslink import logfilter
from schoolslink.identifiers import make_test_nhs_number, make_upn, uln_check_digit

NHS = make_test_nhs_number(4242)
NHS_SPACED = f"{NHS[:3]} {NHS[3:6]} {NHS[6:]}"
NHS_HYPHENS = f"{NHS[:3]}-{NHS[3:6]}-{NHS[6:]}"
UPN = make_upn(999, 1001, 77)
TEMP_UPN = make_upn(999, 1001, 77, temporary=True)
ULN = "100000001" + str(uln_check_digit("100000001"))
NOT_NHS = "1234567890"  # fails modulus 11: not an NHS number (nor a ULN), left as it is


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("SCHOOLSLINK_KEY", "logfilter-test-key")
    logfilter.forget_names()
    yield
    logfilter.forget_names()


def p(text: str) -> str:
    return logfilter.pseudonymise(text)


def test_reference_identifiers_are_what_the_test_thinks() -> None:
    from schoolslink.identifiers import is_valid_nhs_number, is_valid_uln, is_valid_upn

    assert is_valid_nhs_number(NHS) and is_valid_upn(UPN) and is_valid_upn(TEMP_UPN) and is_valid_uln(ULN)
    assert not is_valid_nhs_number(NOT_NHS) and not is_valid_uln(NOT_NHS) and not is_valid_nhs_number(ULN)


@pytest.mark.parametrize(("value", "kind"), [
    (NHS, "nhs"), (NHS_SPACED, "nhs"), (NHS_HYPHENS, "nhs"), ("943 476 5919", "nhs"), (UPN, "upn"),
    (UPN.lower(), "upn"), (TEMP_UPN, "upn"), (ULN, "uln"), ("SY1 2AB", "pc"), ("ST104QP", "pc"),
    ("LIVUWOOD^GRODAIN", "name"), ("2013-05-01", "dob"), ("01/09/2013", "dob"),
])
def test_each_identifier_kind_is_replaced_by_a_keyed_token(value: str, kind: str) -> None:
    out = p(f"found {value}, then more")
    assert value not in out
    assert out.startswith(f"found <{kind}:") and out.endswith(">, then more")
    assert out == p(f"found {value}, then more")  # deterministic


def test_same_value_same_token_in_every_rendering_and_a_different_key_gives_a_different_token(
        monkeypatch: pytest.MonkeyPatch) -> None:
    tok = p(NHS)
    assert tok == p(NHS_SPACED) == p(NHS_HYPHENS) == logfilter.token("nhs", NHS)
    assert p(UPN) == p(UPN.lower())
    assert p(NHS) != p(make_test_nhs_number(4243))
    monkeypatch.setenv("SCHOOLSLINK_KEY", "another-key")
    assert p(NHS) != tok
    assert NHS not in tok and NHS[-4:] not in tok


@pytest.mark.parametrize("text", [
    f"nhs_number={NHS}", f'"value": "{NHS}"', f"{NHS},{UPN},LIVUWOOD,Grodain", f"|{NHS}^^^NHS^NH|",
    f"GET /Patient?identifier=https%3A%2F%2Ffhir.nhs.uk%2FId%2Fnhs-number%7C{NHS} 200",
    f"identifier=https://fhir.nhs.uk/Id/nhs-number|{NHS}", f"(upn='{UPN}')", f"<UPN>{UPN}</UPN>",
])
def test_identifiers_are_found_in_the_shapes_logs_give_them(text: str) -> None:
    out = p(text)
    assert NHS not in out and UPN not in out


def test_dates_of_birth_after_a_key_in_hl7_pid7_or_standalone_in_a_pupils_years() -> None:
    assert "2019-05-01" not in p("dob=2019-05-01") and "2000-01-02" not in p('"birthDate": "2000-01-02"')
    assert "1970-01-02" not in p("<DOB>1970-01-02</DOB>")  # after a key: any year
    assert "03/04/1971" not in p("DateOfBirth: 03/04/1971")
    out = p("PID|1||9434765919^^^NHS^NH||SMITH^JOHN^^^MR||20130501|F|||1 Road^^Town^^SY1 2AB")
    for value in ("20130501", "9434765919", "SMITH^JOHN", "SY1 2AB"):
        assert value not in out
    assert "2013-05-01" not in p("born 2013-05-01") and "2013-05-01" not in p("Timestamp('2013-05-01 00:00:00')")


def test_run_dates_timestamps_run_ids_urns_and_ods_codes_survive() -> None:
    year = time.gmtime().tm_year
    text = (f"run manual__{year}-11-26T15:21:45.172474+00:00 for {year}-11-26 and {year - 1}-11-26, "
            f"scheduled__{year}-11-26T02:00:00+00:00 at {year}-11-26 02:00:00,123 "
            "ts 2026-11-26T15:21:52.332030Z urn 900001 ods R9X RXX01 team F01 source C2 reason 05 "
            "work/manual__2026-11-26T15_21_54.195158_00_00/chunk-1 key lrn-f548f124f47d6b08f16c "
            "pat-a396ba5fedee1100eebc sl-e2e836d1a4175e4c3bc52680aef5465897cb0a8c count 1000 ADT^A01 "
            "took 12.5 s, 308 pupils, 64 resources; 1970-01-01T00:00:00Z epoch")
    assert p(text) == text


def test_invalid_check_digits_are_left_alone() -> None:
    bad_upn = ("A" if UPN[0] != "A" else "B") + UPN[1:]
    text = f"order {NOT_NHS}, bad upn {bad_upn}, long 12345678901234"
    assert p(text) == text


def test_tokens_are_stable_under_a_second_pass() -> None:
    once = p(f"{NHS} {UPN} SY1 2AB 2013-05-01 LIVUWOOD^GRODAIN")
    assert p(once) == once


def test_known_names_registry() -> None:
    text = "pupil Livuwood Grodain moved; Anne-Marie Smith-Jones too; livuwoodx stays"
    assert p(text) == text
    logfilter.remember_names(["LIVUWOOD", "Grodain", "Anne-Marie", "Smith-Jones", "", "x", None])
    out = p(text)
    for name in ("Livuwood", "Grodain", "Anne", "Marie", "Smith", "Jones"):
        assert name not in out
    assert "livuwoodx stays" in out and out.count("<name:") >= 4
    assert p("LIVUWOOD") == p("livuwood")
    logfilter.forget_names()
    assert p(text) == text


# stdlib logging ------------------------------------------------------------------------------------------------


@pytest.fixture()
def captured() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    logfilter.install()
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(logging.Formatter("%(name)s %(message)s"))
    lg = logging.getLogger("schoolslink.test_logfilter")
    lg.addHandler(handler)
    lg.setLevel(logging.DEBUG)
    lg.propagate = False
    try:
        yield lg, buf
    finally:
        lg.removeHandler(handler)


def test_message_and_args_are_replaced(captured: tuple[logging.Logger, io.StringIO]) -> None:
    lg, buf = captured
    lg.info(f"probe {NHS}")
    lg.info("probe %s and %s at %d", UPN, NHS_SPACED, 3)
    lg.info("probe %(upn)s", {"upn": UPN})
    lg.warning("count %d for urn %s", 5, "900001")
    lg.info("probe %s", [NHS, {"dob": "2013-05-01"}])
    text = buf.getvalue()
    assert NHS not in text and UPN not in text and NHS_SPACED not in text and "2013-05-01" not in text
    assert "count 5 for urn 900001" in text and text.count("<nhs:") == 3 and text.count("<upn:") == 2


def test_tracebacks_and_exception_messages_are_replaced(captured: tuple[logging.Logger, io.StringIO]) -> None:
    lg, buf = captured
    try:
        raise ValueError(f"no patient with NHS number {NHS}")
    except ValueError:
        lg.exception("lookup failed")
    text = buf.getvalue()
    assert NHS not in text and "lookup failed" in text and "ValueError: no patient with NHS number <nhs:" in text


def test_a_record_the_filter_cannot_read_is_still_written_and_nothing_raises() -> None:
    class Nasty:
        def __str__(self) -> str:
            raise RuntimeError("no")

    rec = logging.LogRecord("x", logging.INFO, __file__, 1, "bad %s %s", (Nasty(),), None)
    assert logfilter.PseudonymisingFilter().filter(rec) is True
    assert isinstance(rec.getMessage(), str)


def test_install_is_idempotent_and_covers_root_handlers_children_and_last_resort() -> None:
    root = logging.getLogger()
    handler = logging.StreamHandler(io.StringIO())
    root.addHandler(handler)
    try:
        for _ in range(3):
            logfilter.install()
        ours = [f for f in handler.filters if isinstance(f, logfilter.PseudonymisingFilter)]
        assert len(ours) == 1
        assert len([f for f in root.filters if isinstance(f, logfilter.PseudonymisingFilter)]) == 1
        assert logging.lastResort is not None
        assert any(isinstance(f, logfilter.PseudonymisingFilter) for f in logging.lastResort.filters)
        factory = logging.getLogRecordFactory()
        assert getattr(factory, "_schoolslink_logfilter", False)
        # a child logger of a third-party library, propagating to the root's handler
        logging.getLogger("httpx.some.child").warning("GET /Patient?identifier=%s", NHS)
        stream = handler.stream
        assert isinstance(stream, io.StringIO)
        assert NHS not in stream.getvalue() and "<nhs:" in stream.getvalue()
    finally:
        root.removeHandler(handler)


# structlog ----------------------------------------------------------------------------------------------------


def test_structlog_event_dicts_are_walked() -> None:
    ed: dict[str, Any] = {"event": f"probe {NHS}", "upn": UPN, "nested": {"rows": [NHS_SPACED, 3, None]},
                          "n": int(NHS), "count": 5, "timestamp": "2026-11-26T02:00:00Z", "_record": object()}
    out = logfilter.structlog_processor(None, "info", ed)
    flat = repr({k: v for k, v in out.items() if k != "_record"})
    assert NHS not in flat and UPN not in flat and NHS_SPACED not in flat
    assert out["count"] == 5 and out["timestamp"] == "2026-11-26T02:00:00Z" and "_record" in out
    assert out["n"].startswith("<nhs:")


def test_structlog_exception_info_is_rendered_and_replaced() -> None:
    try:
        raise KeyError(f"{UPN}")
    except KeyError as exc:
        out = logfilter.structlog_processor(None, "error", {"event": "failed", "exc_info": exc})
    assert "exc_info" not in out and UPN not in out["exception"] and "<upn:" in out["exception"]


def test_structlog_chain_gets_the_processor_once_before_its_renderer() -> None:
    import structlog

    buf = io.StringIO()
    structlog.configure(processors=[structlog.processors.add_log_level, structlog.processors.KeyValueRenderer()],
                        logger_factory=structlog.PrintLoggerFactory(buf), cache_logger_on_first_use=False)
    try:
        logfilter.install()
        logfilter.install()
        procs = structlog.get_config()["processors"]
        assert sum(1 for x in procs if x is logfilter.structlog_processor) == 1
        assert procs[-2] is logfilter.structlog_processor
        structlog.get_logger("t").info("probe", nhs=NHS, upn=UPN)
        assert NHS not in buf.getvalue() and UPN not in buf.getvalue() and "<nhs:" in buf.getvalue()
    finally:
        structlog.reset_defaults()


# emails, phone numbers, addresses ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [
    "contact jane.smith@nhs.net today", "mailto:Jane.Smith@NHS.net.", "<jane.smith@nhs.net>",
    '"email": "jane.smith@nhs.net"', "GET /x?email=jane.smith%40nhs.net&n=1", "to=JANE.SMITH@nhs.net,",
])
def test_an_email_address_in_any_shape_is_one_token(text: str) -> None:
    out = p(text)
    assert "jane" not in out.lower() and "smith" not in out.lower() and "nhs.net" not in out
    assert logfilter.token("email", "jane.smith@nhs.net") in out


@pytest.mark.parametrize("address", [
    "a.b-c+tag@sub.example.co.uk", "o'brien@example.org", "sam.worker@cypmhs.example.nhs.uk", "x_1@a-b.io",
])
def test_staff_and_unusual_addresses_are_replaced(address: str) -> None:
    out = p(f"sent to {address}.")
    assert out.startswith("sent to <email:") and out.endswith(">.") and address not in out


@pytest.mark.parametrize("number", [
    "07700 900123", "07700900123", "07700-900-123", "0770 090 0123", "07700 900 123", "+44 7700 900123",
    "+447700900123", "+44 (0)7700 900123", "+44(0)7700 900 123", "0044 7700 900123", "(07700) 900123",
])
def test_a_mobile_number_in_every_usual_spelling_is_one_token(number: str) -> None:
    out = p(f"parent mobile {number}, ok")
    assert out == f"parent mobile {logfilter.token('tel', '07700900123')}, ok"


@pytest.mark.parametrize(("number", "national"), [
    ("01632 960123", "01632960123"), ("01632-960-123", "01632960123"), ("(01632) 960123", "01632960123"),
    ("01632 960 123", "01632960123"), ("+44 1632 960123", "01632960123"), ("020 7946 0123", "02079460123"),
    ("0207 946 0123", "02079460123"), ("(020) 7946 0123", "02079460123"), ("+44 (0)20 7946 0123", "02079460123"),
    ("0121 496 0123", "01214960123"), ("0161-496-0123", "01614960123"), ("0113 496 0123", "01134960123"),
    ("0300 123 4567", "03001234567"), ("0800 123 456", "0800123456"), ("0845 600 1234", "08456001234"),
    ("01632 96012", "0163296012"), ("0163296012", "0163296012"), ("016977 4567", "0169774567"),
    ("%2B441632960123", "01632960123"),
])
def test_landline_and_non_geographic_numbers(number: str, national: str) -> None:
    assert p(f"tel {number}|") == f"tel {logfilter.token('tel', national)}|"


@pytest.mark.parametrize("address", [
    "12 Mill Road", "12a Church Street", "12A Church St", "12-14 High St.", "7 ST MARY'S ROAD", "4 Orchard close",
    "10 Downing Street", "1 The Green", "22B Baker St", "3 Kestle Bury Gardens", "5 Old Quarry Mews",
    "Flat 3, 12 Mill Road", "Flat 3 12 Mill Road", "Apartment 4, 7 Church Lane", "Flat 2b, 9 Heron Way",
    "9 Hawthorn Rise", "101 Station Rd", "15 Park View", "8 Victoria Avenue", "2 Mkbcdfghjklm Terrace",
])
def test_a_street_address_is_one_token(address: str) -> None:
    out = p(f"lives at {address}, Shrewsbury")
    assert out.startswith("lives at <addr:") and out.endswith(">, Shrewsbury")
    assert p(f"lives at {address}") == p(f"lives at {address.upper()}")  # any case: one token


def test_negatives_survive_untouched() -> None:
    year = time.gmtime().tm_year
    lines = [
        f"run scheduled__{year}-11-26T02:00:00+00:00 at {year}-11-26 02:00:00,123 for {year}-11-26",
        "2026-11-26T15:21:52.332030Z ods R9X RXX01 urn 100001 900001 redis 127.0.0.1:6379 localhost:8080",
        "wrote 1048576 bytes (1.0 MiB) in 0.00041s; took 12.5 s, 3 retries, 0 errors, 2026 rows",
        '"GET /fhir/R4/Patient?_count=500 HTTP/1.1" 200 OK, HTTP/1.1 404, status 503',
        "sha256 0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef e3b0c44298fc1c149afbf4c8996fb924",
        "uuid 550e8400-e29b-41d4-a716-446655440000 01234567-89ab-cdef-0123-456789abcdef",
        "apache-airflow 3.3.2 hl7apy 1.3.5 python 3.11.7 redis 8.1.0 pkg@1.2.3",
        "MSH-10 MSG00001 control id 0000012345 20261126020000 ADT^A01^ADT_A01 2.5.1",
        "SELECT * FROM learners WHERE urn IN (100001, 100002) AND year = 7 LIMIT 1000 OFFSET 0",
        "INSERT INTO runs (run_id, counts) VALUES (?, ?) [generated in 0.00041s] ('x', '{\"n\": 12}')",
        "postgresql+psycopg://postgres@127.0.0.1:5432/test @task user@host",
        "stored 64 resources (PractitionerRole 12, Patient 24, ServiceRequest 28) in 1.53 s",
        "pid 4242 port 8103 chunk 0001 0002 0003 epoch 1764122400 ms 1764122400123 +0000",
        "NameError: name 'foo' is not defined; KeyError: 'surname'; logger_name=airflow.task hostname=Web",
        "WHERE surname = ? AND forename = :forename, name=fhir-patient-match name='landing.mis' surname=None",
    ]
    for line in lines:
        assert p(line) == line


# names after a key ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "names"), [
    ("name=Zophiela next", ["Zophiela"]), ("surname: qwylbrandt", ["qwylbrandt"]),
    ('"forename": "Zophiela"', ["Zophiela"]), ("given=Zophiela family=Qwylbrandt", ["Zophiela", "Qwylbrandt"]),
    ("patient_name=Zophiela Qwylbrandt, count=3", ["Zophiela", "Qwylbrandt"]),
    ("contact=Zophiela Qwylbrandt", ["Zophiela", "Qwylbrandt"]), ("contact: parent Qwylbrandt", ["Qwylbrandt"]),
    ("{'surname': 'Qwylbrandt', 'given': ['Zophiela', 'Anne-Marie']}", ["Qwylbrandt", "Zophiela", "Anne"]),
    ('"name": [{"use": "official", "family": "Qwylbrandt", "given": ["Zophiela"]}]', ["Qwylbrandt", "Zophiela"]),
    ("<Surname>Qwylbrandt</Surname><Forename>Zophiela</Forename>", ["Qwylbrandt", "Zophiela"]),
    ("firstName: Zophiela lastName: O'Qwyl givenName=Zo familyName=Qwylbrandt", ["Zophiela", "Qwyl", "Qwylbrandt"]),
    ("preferred_surname='Qwylbrandt' FORENAME = Zophiela", ["Qwylbrandt", "Zophiela"]),
    ("row.surname = 'Qwylbrandt'", ["Qwylbrandt"]),
])
def test_key_hinted_names_are_replaced(text: str, names: list[str]) -> None:
    out = p(text)
    for name in names:
        assert name not in out
    assert "<name:" in out and p(out) == out
    if "count=3" in text:
        assert out.endswith(", count=3")


def test_key_hinted_name_tokens_agree_with_the_registry() -> None:
    logfilter.remember_names(["Qwylbrandt"])
    assert p("surname=Qwylbrandt") == f"surname={p('Qwylbrandt')}" == f"surname={logfilter.token('name', 'qwylbrandt')}"


def test_name_keys_in_dicts_and_structlog_event_dicts() -> None:
    out = logfilter.pseudonymise_value({"surname": "Qwylbrandt", "given": ("Zophiela",), "name": "fhir-x",
                                        "nested": {"forename": "zo", "count": 3}, "Name": "Qwyl Brandt"})
    assert out["name"] == "fhir-x" and out["nested"]["count"] == 3 and isinstance(out["given"], tuple)
    assert "Qwyl" not in repr(out) and "Zophiela" not in repr(out) and "'zo'" not in repr(out)
    ed = logfilter.structlog_processor(None, "info", {"event": "matched", "family": "Qwylbrandt",
                                                      "contact": "parent", "patient_name": "Zophiela Q"})
    assert ed["contact"] == "parent" and ed["event"] == "matched"
    assert ed["family"] == logfilter.token("name", "qwylbrandt") and "Zophiela" not in ed["patient_name"]


def test_remember_names_skips_titles_as_parts() -> None:
    logfilter.remember_names(["Dr Sam Qwylbrandt"])
    out = p("Dr Sam Qwylbrandt called; Dr Other too")
    assert "Sam" not in out and "Qwylbrandt" not in out and out.count("Dr ") == 2


# HL7 segments ---------------------------------------------------------------------------------------------------


PID = ("PID|1||9434765919^^^NHS^NH~RX123456^^^RX9^MR||QWYLBRANDT^ZOPHIELA^ANNE^^MISS||20130501|F|||"
       "12 Mill Road^Flat 3^Shrewsbury^Shropshire^SY1 2AB^GBR^H||07700900123^PRN^CP^zo.q@example.org~"
       "^NET^Internet^amy@example.org|^WPN^PH^^44^1632^960123")


def test_a_raw_pid_segment_keeps_its_structure_and_loses_every_personal_value() -> None:
    out = p(f"received {PID}\rPV1|1|O|ward")
    fields = out.split("\r")[0].split("|")
    for value in ("9434765919", "RX123456", "QWYLBRANDT", "ZOPHIELA", "ANNE", "20130501", "Mill", "Flat 3",
                  "Shrewsbury", "Shropshire", "SY1 2AB", "07700900123", "zo.q", "amy@", "1632", "960123"):
        assert value not in out, value
    assert fields[3] == f"{logfilter.token('nhs', '9434765919')}^^^NHS^NH~{logfilter.token('id', 'RX123456')}^^^RX9^MR"
    assert fields[5] == f"{logfilter.token('name', 'QWYLBRANDT^ZOPHIELA^ANNE')}^^^^MISS"
    assert fields[7] == logfilter.token("dob", "20130501") and fields[8] == "F"
    assert fields[11].startswith("<addr:") and fields[11].endswith("^^^^^GBR^H")
    assert fields[13].startswith(logfilter.token("tel", "07700900123") + "^PRN^CP^<email:")
    assert fields[14] == f"^WPN^PH^^^^{logfilter.token('tel', '01632960123')}"
    assert out.endswith("\rPV1|1|O|ward") and p(out) == out


def test_pid_in_a_repr_and_nk1() -> None:
    msg = repr(f"MSH|^~\\&|A|B\r{PID}\rNK1|1|QWYLBRANDT^JANE|MTH|1 Road^^Town^^SY1 2AB|07700 900123\rPV1|1|O")
    out = p(msg)
    for value in ("9434765919", "QWYLBRANDT", "ZOPHIELA", "JANE", "20130501", "Mill", "SY1 2AB", "07700"):
        assert value not in out, value
    assert "\\rPV1|1|O" in out and "NK1|1|<name:" in out and "|MTH|<addr:" in out


def test_new_kinds_are_stable_under_a_second_pass() -> None:
    once = p(f"jane@nhs.net 07700 900123 12 Mill Road surname=Qwylbrandt {PID}")
    assert p(once) == once and "<email:" in once and "<tel:" in once and "<addr:" in once


def test_the_pre_checks_let_every_new_kind_through_and_leave_plain_text_as_it_is() -> None:
    for text in ("jane@nhs.net", "jane%40nhs.net", "07700 900123", "+44 7700 900123", "12 Mill Road",
                 "Flat 3, 12 Mill Road", f"{PID}"):
        assert logfilter._QUICK.search(text) is not None
        assert p(text) != text
    for text in ("name=Zophiela", "Surname: Qwylbrandt", "<GivenName>Zo<", "FAMILY=Qwylbrandt", "contact: Zo"):
        assert logfilter._QUICK.search(text) is None  # the name-key pass has a pre-check of its own
        assert p(text) != text
    plain = "Task instance state updated for school feeds chunk, nothing to report here"
    assert p(plain) is plain


# through real logging and structlog ------------------------------------------------------------------------------


def test_new_kinds_through_a_logging_handler(captured: tuple[logging.Logger, io.StringIO]) -> None:
    lg, buf = captured
    lg.info("contact %s on %s at %s", "jane.smith@nhs.net", "07700 900123", "Flat 3, 12 Mill Road")
    lg.warning("pupil record %s", {"surname": "Qwylbrandt", "given": ["Zophiela"], "count": 3})
    lg.error("bad segment: %r", PID)
    try:
        raise ValueError("no worker with email sam.worker@cypmhs.example.nhs.uk")
    except ValueError:
        lg.exception("lookup failed")
    text = buf.getvalue()
    for value in ("jane.smith", "07700", "Mill Road", "Qwylbrandt", "Zophiela", "sam.worker", "QWYLBRANDT", "SY1 2AB"):
        assert value not in text, value
    assert "'count': 3" in text and "ValueError: no worker with email <email:" in text
    assert text.count("<email:") >= 4 and text.count("<tel:") >= 2 and text.count("<addr:") >= 2


def test_new_kinds_through_a_structlog_chain() -> None:
    import structlog

    buf = io.StringIO()
    structlog.configure(processors=[structlog.processors.add_log_level, structlog.processors.JSONRenderer()],
                        logger_factory=structlog.PrintLoggerFactory(buf), cache_logger_on_first_use=False)
    try:
        logfilter.install()
        structlog.get_logger("t").info("contact jane.smith@nhs.net", phone="+44 (0)7700 900123",
                                       address="12 Mill Road", surname="Qwylbrandt", forename="zophiela",
                                       name="fhir-patient-match", count=3)
        text = buf.getvalue()
        for value in ("jane.smith", "7700", "Mill Road", "Qwylbrandt", "zophiela"):
            assert value not in text, value
        assert '"name": "fhir-patient-match"' in text and '"count": 3' in text
        assert logfilter.token("tel", "07700900123") in text and logfilter.token("name", "qwylbrandt") in text
    finally:
        structlog.reset_defaults()


# the trust pull registers the names it reads -----------------------------------------------------------------


def test_the_trust_pull_registers_patient_and_worker_names(sl_home: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from collections import defaultdict

    from schoolslink.pipeline import sync
    from schoolslink.store.db import migrate

    url = f"sqlite:///{tmp_path / 'state.db'}"
    monkeypatch.setenv("SCHOOLSLINK_DB_URL", url)
    eng = migrate(url)
    patient = {
        "resourceType": "Patient", "id": "pat-1",
        "extension": [{"url": "https://fhir.schoolslink.org.uk/StructureDefinition/Extension-EducationalEstablishment",
                       "valueIdentifier": {"system": "https://fhir.schoolslink.org.uk/Id/school-urn",
                                           "value": "900001"}}],
        "identifier": [{"system": "https://fhir.nhs.uk/Id/nhs-number", "value": NHS}],
        "name": [{"use": "official", "family": "Qwylbrandt", "given": ["Zophiela", "Ysolde"]},
                 {"use": "usual", "text": "Zo Qwyl-Brandt"}],
        "birthDate": "2013-05-01",
    }
    unreadable = {"resourceType": "Patient", "id": "pat-2", "name": [{"family": "Vextramor", "given": "Ulpha"}],
                  "identifier": "not a list"}
    role = {"resourceType": "PractitionerRole", "id": "prole-1", "practitioner": {"display": "Dr Sam Oxbrindle"},
            "code": [{"text": "Mental Health Nurse"}]}
    text = "seen Qwylbrandt Zophiela Ysolde Zo Qwyl-Brandt Vextramor Ulpha with Dr Sam Oxbrindle"
    assert p(text) == text
    counts: dict[str, int] = defaultdict(int)
    with eng.begin() as conn:
        sync._store(conn, "manual__2026-11-26", "R9X", "Patient", [patient, unreadable], counts)
        sync._store(conn, "manual__2026-11-26", "R9X", "PractitionerRole", [role], counts)
    assert counts["pulled_Patient"] == 1 and counts["pulled_quarantined"] == 1
    assert counts["pulled_PractitionerRole"] == 1
    out = p(text)
    for name in ("Qwylbrandt", "Zophiela", "Ysolde", "Zo ", "Qwyl", "Brandt", "Vextramor", "Ulpha", "Sam", "Oxbrindle"):
        assert name not in out, name
    assert out.startswith("seen <name:") and "with Dr <name:" in out
