"""NHS number, UPN and ULN check digits (schoolslink.identifiers)."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schoolslink.identifiers import (
    TEST_NHS_NUMBER_COUNT,
    UPN_ALPHABET,
    is_temporary_upn,
    is_valid_nhs_number,
    is_valid_uln,
    is_valid_upn,
    make_test_nhs_number,
    make_upn,
    nhs_number_check_digit,
    normalise_nhs_number,
    normalise_upn,
    uln_check_digit,
    upn_check_letter,
)
from tests.paths import CORPORA

MIS = CORPORA / "mis"

# NHS number -------------------------------------------------------------------------------------------------


def test_nhs_number_check_digit() -> None:
    assert nhs_number_check_digit("943476591") == 9  # 943 476 5919, the NHS's published example
    assert nhs_number_check_digit("999000001") == 8
    assert nhs_number_check_digit("999000005") == 0  # remainder 11 -> 0
    assert nhs_number_check_digit("999000000") is None  # remainder 10: no valid number starts so


@pytest.mark.parametrize("bad", ["", "99900000", "9990000001", "99900000a", "٩٩٩٠٠٠٠٠١"])
def test_nhs_number_check_digit_needs_nine_ascii_digits(bad: str) -> None:
    with pytest.raises(ValueError):
        nhs_number_check_digit(bad)


@pytest.mark.parametrize("good", ["9434765919", "9990000018", "9990000050", "9999999999"])
def test_valid_nhs_numbers(good: str) -> None:
    assert is_valid_nhs_number(good)


@pytest.mark.parametrize(
    "bad",
    [
        "9434765918",  # wrong check digit
        "9990000000",  # 999000000 has check 10: never valid, whatever the tenth digit
        "999 000 0018",  # validation takes the bare ten digits
        "999000001",
        "99900000188",
        "999000001X",
        "٩٩٩٠٠٠٠٠١٨",  # Arabic-Indic digits pass str.isdigit but are not an NHS number
        "",
    ],
)
def test_invalid_nhs_numbers(bad: str) -> None:
    assert not is_valid_nhs_number(bad)


def test_normalise_nhs_number() -> None:
    assert normalise_nhs_number("999 000 0018") == "9990000018"
    assert normalise_nhs_number(" 999-000-0018\t") == "9990000018"
    assert is_valid_nhs_number(normalise_nhs_number("943 476 5919"))


def test_make_test_nhs_number_is_the_nth_valid_number_in_the_999_range() -> None:
    assert make_test_nhs_number(0) == "9990000018"  # 999000000 is skipped (check digit 10)
    expected: list[str] = []
    k = 999_000_000
    while len(expected) < 3000:
        check = nhs_number_check_digit(str(k))
        if check is not None:
            expected.append(f"{k}{check}")
        k += 1
    assert [make_test_nhs_number(n) for n in range(3000)] == expected
    assert make_test_nhs_number(TEST_NHS_NUMBER_COUNT - 1) == "9999999999"
    with pytest.raises(ValueError):
        make_test_nhs_number(TEST_NHS_NUMBER_COUNT)
    with pytest.raises(ValueError):
        make_test_nhs_number(-1)


@given(st.integers(min_value=0, max_value=TEST_NHS_NUMBER_COUNT - 2))
def test_make_test_nhs_number_valid_ascending_in_range(n: int) -> None:
    a, b = make_test_nhs_number(n), make_test_nhs_number(n + 1)
    assert is_valid_nhs_number(a) and is_valid_nhs_number(b)
    assert "9990000000" <= a < b <= "9999999999"
    # nothing valid is skipped between them
    for k in range(int(a[:9]) + 1, int(b[:9])):
        assert nhs_number_check_digit(str(k)) is None


# UPN --------------------------------------------------------------------------------------------------------

VALID_UPNS = ["B801200005001", "R674123101121", "R201100018042", "P207000016049", "T20110001804V"]


@pytest.mark.parametrize("upn", VALID_UPNS)
def test_valid_upns(upn: str) -> None:
    assert is_valid_upn(upn)
    assert upn_check_letter(upn[1:]) == upn[0]


@pytest.mark.parametrize(
    "bad",
    [
        "A801200005001",  # wrong check letter (python-stdnum's negative example)
        "Q207000016049",  # the Arbor/Juniper help page's mis-added example
        "b801200005001",  # letters are upper case
        " B801200005001",
        "B80120000500",
        "B8012000050011",
        "B80120000500I",  # I, O and S are not UPN letters
        "BX01200005001",  # characters 2-12 are digits
        "0381021010022",  # MTC corpus: a digit where the check letter belongs
        "",
    ],
)
def test_invalid_upns(bad: str) -> None:
    assert not is_valid_upn(bad)


def test_temporary_upns() -> None:
    assert is_temporary_upn("T20110001804V")
    assert not is_temporary_upn("R201100018042")
    assert not is_temporary_upn("A20110001804V")  # temporary shape, wrong check letter


def test_upn_check_letter_rejects_malformed_input() -> None:
    for bad in ("80120000500", "8012000050011", "80120000500I", "8X1200005001"):
        with pytest.raises(ValueError):
            upn_check_letter(bad)


def test_normalise_upn() -> None:
    assert normalise_upn(" b801200005001\n") == "B801200005001"


def test_make_upn_layout() -> None:
    upn = make_upn(999, 1001, 42)
    assert upn[1:4] == "999" and upn[4:8] == "1001" and upn[8:] == "00042"
    assert is_valid_upn(upn) and not is_temporary_upn(upn)
    with_year = make_upn(999, 1001, 7, year=2026)
    assert with_year[8:10] == "26" and with_year[10:] == "007" and is_valid_upn(with_year)
    temp = make_upn(999, 1001, 24, temporary=True)
    assert temp[12] in UPN_ALPHABET and is_temporary_upn(temp)
    temp_year = make_upn(999, 1001, 2299, temporary=True, year=2025)
    assert temp_year[8:10] == "25" and is_temporary_upn(temp_year)


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        ((1000, 1, 1), {}),
        ((-1, 1, 1), {}),
        ((999, 10000, 1), {}),
        ((999, 1, 100000), {}),
        ((999, 1, 230000), {"temporary": True}),
        ((999, 1, 1000), {"year": 2026}),
        ((999, 1, 2300), {"temporary": True, "year": 2026}),
    ],
)
def test_make_upn_rejects_out_of_range(args: tuple[int, int, int], kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        make_upn(*args, **kwargs)  # type: ignore[arg-type]


def test_make_upn_distinct_for_distinct_serials() -> None:
    upns = {make_upn(999, 1001, s) for s in range(5000)}
    upns |= {make_upn(999, 1001, s, temporary=True) for s in range(5000)}
    assert len(upns) == 10000


_CHARS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_VALUE = {**{d: int(d) for d in "0123456789"}, **{c: i for i, c in enumerate(UPN_ALPHABET)}}

upn_args = st.tuples(
    st.integers(0, 999),
    st.integers(0, 9999),
    st.booleans(),
    st.integers(0, 99_999),
    st.one_of(st.none(), st.integers(0, 2099)),
)


def _make(la: int, estab: int, temporary: bool, serial: int, year: int | None) -> str:
    if year is None:
        serial %= 230_000 if temporary else 100_000
    else:
        serial %= 2300 if temporary else 1000
    return make_upn(la, estab, serial, temporary, year=year)


@given(upn_args)
def test_make_upn_always_valid(args: tuple[int, int, bool, int, int | None]) -> None:
    upn = _make(*args)
    assert len(upn) == 13
    assert is_valid_upn(upn)
    assert is_temporary_upn(upn) == args[2]


@given(upn_args, st.integers(0, 12), st.sampled_from(_CHARS))
def test_one_changed_character_is_caught(
    args: tuple[int, int, bool, int, int | None], position: int, char: str
) -> None:
    upn = _make(*args)
    if upn[position] == char:
        return
    changed = upn[:position] + char + upn[position + 1 :]
    # 23 is prime and every weight is below it, so a change of value at any position changes the sum mod 23.
    # The one exception: the 13th character swapped between a digit and the letter of the same value
    # (e.g. 3 <-> D), which is the same UPN in its temporary spelling.
    same_value = position == 12 and _VALUE.get(char) == _VALUE[upn[12]]
    assert is_valid_upn(changed) == same_value


# Corpora ----------------------------------------------------------------------------------------------------


def _require(path: Path) -> None:
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"corpus missing in CI: {path} (../shared/corpora beside the clone)")
        pytest.skip(f"corpus not present: {path}")


def test_mtc_census_corpus_64_of_79_upns_pass() -> None:
    path = MIS / "dfe-mtc-gpl3" / "pupil-census-data.csv"
    _require(path)
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 79
    failing_lines = [n for n, row in enumerate(rows, start=2) if not is_valid_upn(row["UPN"])]
    assert 79 - len(failing_lines) == 64
    assert failing_lines == [*range(2, 15), 39, 78]  # as the corpus README lists them
    assert upn_check_letter("999999609170") == "T"  # README: A999999609170 should be T999999609170


def test_mtc_wrong_check_letter_corpus() -> None:
    path = MIS / "dfe-mtc-gpl3" / "multiple_pupils_wrong_check_letter.csv"
    _require(path)
    with path.open(newline="", encoding="utf-8") as f:
        upns = [row["UPN"] for row in csv.DictReader(f)]
    assert "0381021010022" in upns and not is_valid_upn("0381021010022")


def test_giap_corpus_upns_and_ulns() -> None:
    folder = MIS / "dfe-giap-mit"
    _require(folder)

    def values(name: str, key: str) -> list[str]:
        doc = json.loads((folder / f"{name}_searchindex_returns_many_pupils.json").read_text("utf-8"))
        return [str(row[key]) for row in doc["value"]]

    passing = {name: [u for u in values(name, "UPN") if is_valid_upn(u)] for name in ("npd", "fe", "pupilpremium")}
    assert passing == {
        "npd": ["P657894610886", "T69759857681R"],
        "fe": [],
        "pupilpremium": ["Q245247798301"],
    }
    assert is_temporary_upn("T69759857681R")
    ulns = values("fe", "ULN")
    assert [u for u in ulns if is_valid_uln(u)] == ["1000000000"]


# ULN --------------------------------------------------------------------------------------------------------


def test_uln_vectors() -> None:
    assert is_valid_uln("1000000000")  # 10*1 = 10; 10 mod 11 = 10; 10 - 10 = 0
    assert is_valid_uln("1000102504")  # the example in the LRS-rule validator ulnTools' README
    assert uln_check_digit("100010250") == 4
    assert uln_check_digit("100000001") == 9  # 10 + 1*2 = 12; 12 mod 11 = 1; 10 - 1 = 9
    assert uln_check_digit("100000006") is None  # 10 + 6*2 = 22: remainder 0, no valid ULN


@pytest.mark.parametrize(
    "bad", ["1000000001", "1000102505", "0000000042", "100000000", "10000000000", "100000000X", " 1000000000"]
)
def test_invalid_ulns(bad: str) -> None:
    assert not is_valid_uln(bad)


@given(st.integers(100_000_000, 999_999_999))
def test_uln_check_digit_builds_valid_ulns(first: int) -> None:
    first9 = str(first)
    check = uln_check_digit(first9)
    if check is None:
        assert not any(is_valid_uln(f"{first9}{d}") for d in range(10))
    else:
        assert is_valid_uln(f"{first9}{check}")
        assert sum(is_valid_uln(f"{first9}{d}") for d in range(10)) == 1
