"""The pseudonymising log filter (schoolslink/logfilter.py, docs/governance/logging.md)."""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Iterator
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
    text = f"phone 01632 960123, order {NOT_NHS}, bad upn {bad_upn}, long 12345678901234"
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


# speed ----------------------------------------------------------------------------------------------------------


def test_speed_on_plain_text_and_on_typical_records() -> None:
    plain = [f"Task instance state updated for school feeds chunk, nothing to report here: row {'abc' * (i % 5)}"
             for i in range(1000)]
    plain = [s.replace("row", "rows") for s in plain]
    t0 = time.perf_counter()
    for _ in range(100):
        for s in plain:
            logfilter.pseudonymise(s)
    rate = 100_000 / (time.perf_counter() - t0)
    assert rate > 100_000, f"{rate:,.0f} plain records/s"

    typical = [f"mis_ingest run manual__2026-11-26T15:21:54.195158+00:00 chunk {i}: read {i * 7} pupils, "
               f"quarantined {i % 3}" for i in range(1000)]
    t0 = time.perf_counter()
    for _ in range(20):
        for s in typical:
            logfilter.pseudonymise(s)
    rate = 20_000 / (time.perf_counter() - t0)
    assert rate > 20_000, f"{rate:,.0f} typical records/s"

    filt = logfilter.PseudonymisingFilter()
    records = [logging.LogRecord("schoolslink.x", logging.INFO, __file__, 1, "plain message %s", ("text",), None)
               for _ in range(20_000)]
    t0 = time.perf_counter()
    for r in records:
        filt.filter(r)
    rate = 20_000 / (time.perf_counter() - t0)
    assert rate > 100_000, f"{rate:,.0f} plain LogRecords/s through the filter"
