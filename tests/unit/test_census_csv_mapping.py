"""The census CSV column map over the DfE sample files in ../shared/corpora/mis (a column-map kind at work)."""

from __future__ import annotations

import csv
import os

import pytest

from schoolslink.identifiers import is_valid_upn
from schoolslink.mapping.engine import MappingError, load_mappings
from tests.paths import CORPORA

MTC = CORPORA / "mis" / "dfe-mtc-gpl3"


def _rows(name: str) -> list[dict[str, str]]:
    path = MTC / name
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"corpus missing in CI: {path}")
        pytest.skip(f"corpus not present: {path}")
    with path.open(newline="", encoding="utf-8-sig") as f:
        return list(csv.DictReader(f))


def _map_all(name: str) -> tuple[list[dict[str, str]], list[tuple[str, str]]]:
    cm = load_mappings().compile("census-csv-learner")
    ok, errors = [], []
    for i, r in enumerate(_rows(name), start=2):
        try:
            ok.append(cm.run(r, record_key=f"row#{i}"))
        except MappingError as exc:
            errors.append((exc.record_key, exc.reason))
    return ok, errors


def test_census_rows_map_and_us_style_dates_are_refused_not_guessed() -> None:
    # The sample file writes 43 dates of birth as M/D/YY (1/13/05): a DD/MM/YYYY export must not
    # read those as the 1st of the 13th month, nor as the year 5. Each is a record error; the rest map.
    ok, errors = _map_all("pupil-census-data.csv")
    assert len(ok) + len(errors) == 79
    assert len(errors) == 43 and {reason for _, reason in errors} == {"a date is not a real date in the expected form"}
    assert {o["sex"] for o in ok} <= {"M", "F"}
    assert all(o["dob"][:2] in {"19", "20"} for o in ok)
    assert {o["sen_provision"] for o in ok} <= {"N", "K", "E", "S"}
    # check letters are judged after mapping, by the identifiers module (23 of the 36 mapped pass)
    assert sum(is_valid_upn(o["upn"]) for o in ok) == 23


def test_the_empty_sex_row_is_refused_with_its_column() -> None:
    ok, errors = _map_all("pupilCensusDataEmptyGender.csv")
    assert ("row#2", "ValueError: required column Sex is empty") in errors
    assert len(ok) == 35
