"""The school consent register CSV: a bad row costs that row only (quarantined by column, never by value);
a file that is not the register is refused whole; `read_register` never raises for bad content."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import pytest

from connectors.mis.consent_register import COLUMNS, read_register
from schoolslink.keys import learner_key
from schoolslink.model import ConsentDecision, ConsentGiver, Direction

URN = "900001"
HEADER = ",".join(COLUMNS)
GOOD = ("r1,B801200005001,parent,permit,trust_to_school;school_to_trust,cypmhs-school-support,2026-09-01,,,"
        "false,false,false")
UPN2 = "C801200005002"


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCHOOLSLINK_KEY", "unit")


def write(tmp_path: Path, *lines: str, data: bytes | None = None) -> Path:
    p = tmp_path / f"{URN}.csv"
    p.write_bytes(data if data is not None else ("\n".join(lines) + "\n").encode())
    return p


def row(**over: str) -> str:
    values = dict(zip(COLUMNS, GOOD.split(","), strict=True))
    values.update(record_id="r2", upn=UPN2)
    values.update(over)
    return ",".join(values[c] for c in COLUMNS)


def assert_no_values(reg_quarantined: list[tuple[str, str, str]], *values: str) -> None:
    text = repr(reg_quarantined)
    for v in values:
        assert v not in text


def test_a_good_register_reads_and_is_scoped_to_its_school(tmp_path: Path) -> None:
    reg = read_register(write(tmp_path, HEADER, GOOD), URN)
    assert reg.refused is None and reg.quarantined == []
    [c] = reg.consents
    assert c.consent_id == f"school:{URN}:r1" and c.school_urn == URN
    assert c.subject_key == learner_key("B801200005001") and c.given_by is ConsentGiver.PARENT
    assert c.decision is ConsentDecision.PERMIT and c.valid_from == date(2026, 9, 1) and c.valid_to is None
    assert c.directions == (Direction.TRUST_TO_SCHOOL, Direction.SCHOOL_TO_TRUST)


def test_bad_given_by_is_quarantined_by_column_name_not_value(tmp_path: Path) -> None:
    reg = read_register(write(tmp_path, HEADER, GOOD, row(given_by="Mrs Smith-Jones")), URN)
    assert [c.consent_id for c in reg.consents] == [f"school:{URN}:r1"]
    [(where, field, reason)] = reg.quarantined
    assert where == "row#3" and field == "given_by"
    assert "parent, young_person, local_authority" in reason
    assert_no_values(reg.quarantined, "Smith", UPN2)


def test_bad_valid_to_date_quarantines_that_row_only(tmp_path: Path) -> None:
    reg = read_register(write(tmp_path, HEADER, row(valid_to="31/07/2027"), GOOD), URN)
    assert [c.consent_id for c in reg.consents] == [f"school:{URN}:r1"]
    assert [(w, f) for w, f, _ in reg.quarantined] == [("row#2", "valid_to")]
    assert "not a date" in reg.quarantined[0][2]
    assert_no_values(reg.quarantined, "31/07/2027", "2027", UPN2)
    assert learner_key(UPN2) not in reg.flags  # nothing of a quarantined row counts, not even its flags


def test_bad_withdrawn_on_date_quarantines_that_row_only(tmp_path: Path) -> None:
    reg = read_register(write(tmp_path, HEADER, row(withdrawn_on="soon"), GOOD), URN)
    assert len(reg.consents) == 1 and [f for _, f, _ in reg.quarantined] == ["withdrawn_on"]


def test_short_and_blank_rows_are_quarantined_not_raised(tmp_path: Path) -> None:
    short = ",".join(row().split(",")[:6])  # stops after purposes
    reg = read_register(write(tmp_path, HEADER, short, ",,,,,,,,,,,", GOOD), URN)
    assert [c.consent_id for c in reg.consents] == [f"school:{URN}:r1"]
    assert [(w, f) for w, f, _ in reg.quarantined] == [("row#2", "valid_from"), ("row#3", "record_id")]
    assert "ends before column valid_from" in reg.quarantined[0][2]
    assert_no_values(reg.quarantined, UPN2)


def test_a_row_with_more_values_than_columns_is_quarantined(tmp_path: Path) -> None:
    # An unquoted comma in purposes shifts every later column: never read a shifted row.
    reg = read_register(write(tmp_path, HEADER, row(purposes="a,b"), GOOD), URN)
    assert len(reg.consents) == 1 and [(w, f) for w, f, _ in reg.quarantined] == [("row#2", "row")]


def test_a_repeated_record_id_counts_for_none_of_its_rows(tmp_path: Path) -> None:
    reg = read_register(write(tmp_path, HEADER, GOOD, row(record_id="r1", decision="deny")), URN)
    assert reg.consents == [] and [(w, f) for w, f, _ in reg.quarantined] == [("row#2", "record_id"),
                                                                             ("row#3", "record_id")]


def test_a_missing_column_refuses_the_file(tmp_path: Path) -> None:
    header = ",".join(c for c in COLUMNS if c != "withdrawn_on")
    line = ",".join(v for c, v in zip(COLUMNS, GOOD.split(","), strict=True) if c != "withdrawn_on")
    reg = read_register(write(tmp_path, header, line), URN)
    assert reg.consents == [] and reg.flags == {}
    assert reg.refused is not None and "withdrawn_on" in reg.refused
    assert reg.quarantined == []


def test_an_empty_file_is_refused(tmp_path: Path) -> None:
    reg = read_register(write(tmp_path, data=b""), URN)
    assert reg.consents == [] and reg.refused is not None


def test_a_non_utf8_file_is_refused(tmp_path: Path) -> None:
    data = (HEADER + "\n" + row(purposes="caf\u00e9") + "\n").encode("cp1252")
    reg = read_register(write(tmp_path, data=data), URN)
    assert reg.consents == [] and reg.refused is not None and "UTF-8" in reg.refused


def test_a_file_that_is_not_csv_is_refused(tmp_path: Path) -> None:
    reg = read_register(write(tmp_path, data=b"PK\x03\x04" + bytes(range(256))), URN)  # e.g. an .xlsx
    assert reg.consents == [] and reg.refused is not None
    reg = read_register(write(tmp_path, '{"record_id": "r1", "upn": "B801200005001"}'), URN)
    assert reg.consents == [] and reg.refused is not None and "lacks column" in reg.refused
    unterminated = HEADER + "\n" + GOOD + "\n" + 'r3,"' + "x" * 200_000  # a field past the csv size limit
    reg = read_register(write(tmp_path, unterminated), URN)
    assert reg.consents == [] and reg.refused is not None and "CSV" in reg.refused


def test_a_flag_that_is_not_yes_or_no_holds_its_row_back(tmp_path: Path) -> None:
    # child_protection and do_not_tell_parent decide who may see a record: never guessed as "no"
    reg = read_register(write(tmp_path, HEADER, GOOD, row(child_protection="maybe")), URN)
    assert [c.consent_id for c in reg.consents] == [f"school:{URN}:r1"]
    assert [(w, f) for w, f, _ in reg.quarantined] == [("row#3", "child_protection")]
    assert learner_key(UPN2) not in reg.flags


def test_a_direction_that_is_not_one_is_quarantined_by_column(tmp_path: Path) -> None:
    reg = read_register(write(tmp_path, HEADER, GOOD, row(directions="school_to_trust;everyone")), URN)
    assert [(w, f) for w, f, _ in reg.quarantined] == [("row#3", "directions")]
    assert "school_to_trust, trust_to_school" in reg.quarantined[0][2]
    assert_no_values(reg.quarantined, "everyone", UPN2)
