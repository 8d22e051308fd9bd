"""GX validation of parsed learners over a non-identifying feature frame (schoolslink.validation)."""

from __future__ import annotations

import json
import os
import re
import sys
from datetime import date
from pathlib import Path
from typing import Any

import pytest

from schoolslink import validation
from schoolslink.model import Learner
from schoolslink.validation import (
    FEATURE_COLUMNS,
    build_feature_frame,
    validate_learner_features,
)

RUN_DATE = date(2026, 11, 25)
GOOD_UPNS = ["B801200005001", "R674123101121", "R201100018042"]
TEMPORARY_UPN = "T20110001804V"
BAD_UPN = "A801200005001"  # check letter should be B
GOOD_NHS = "9990000018"
BAD_NHS = "9990000019"  # fails modulus 11

FORBIDDEN_RESULT_KEYS = {
    "unexpected_list",
    "partial_unexpected_list",
    "partial_unexpected_counts",
    "partial_unexpected_index_list",
    "unexpected_rows",
    "unexpected_index_query",
    "observed_value",
    "details",
}


def learner(**overrides: Any) -> Learner:
    values: dict[str, Any] = {
        "upn": GOOD_UPNS[0],
        "school_urn": "900001",
        "surname": "SMITHSON",
        "forename": "Alexandra",
        "dob": date(2013, 3, 4),
        "sex": "F",
        "year_group": "8",
        "sen_provision": "N",
        "enrol_status": "C",
        "attendance_sessions_possible": 300,
        "attendance_sessions_attended": 285,
    }
    values.update(overrides)
    return Learner(**values)


def good_batch() -> list[Learner]:
    return [
        learner(upn=GOOD_UPNS[0], nhs_number=GOOD_NHS),
        learner(upn=GOOD_UPNS[1], sex="M", year_group="R", dob=date(2021, 6, 1)),
        learner(
            upn=GOOD_UPNS[2],
            sex="U",
            year_group="13",
            sen_provision="E",
            dob=date(2008, 11, 26),
            attendance_sessions_possible=None,
            attendance_sessions_attended=None,
        ),
        learner(upn=GOOD_UPNS[0], sen_provision="K", enrol_status="M", nhs_number="999 000 0018"),
    ]


def bad_batch() -> list[Learner]:
    return [
        learner(upn=GOOD_UPNS[0]),  # 0: fine
        learner(upn=BAD_UPN),  # 1: wrong check letter
        learner(upn=GOOD_UPNS[1], dob=date(1850, 1, 1)),  # 2: age 176
        learner(upn=GOOD_UPNS[2], sex="Q"),  # 3: unknown sex code
        learner(attendance_sessions_possible=300, attendance_sessions_attended=420),  # 4: 140%
        learner(nhs_number=BAD_NHS),  # 5: NHS number fails modulus 11
        learner(upn=GOOD_UPNS[1], sex="M"),  # 6: fine
    ]


@pytest.fixture
def fresh_runtime(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the next validation build its GX context anew (the module caches one per process)."""
    monkeypatch.setattr(validation, "_RUNTIME", None)


# --------------------------------------------------------------------------------------------------
# feature frame


def test_feature_frame_has_only_derived_features() -> None:
    frame = build_feature_frame(good_batch(), RUN_DATE)
    assert tuple(frame.columns) == FEATURE_COLUMNS
    assert frame["record"].tolist() == [0, 1, 2, 3]
    text = frame.to_json()
    for personal in ("SMITHSON", "Alexandra", "900001", GOOD_UPNS[0], GOOD_NHS, "2013-03-04"):
        assert personal not in text


def test_feature_frame_values() -> None:
    frame = build_feature_frame(
        [
            learner(dob=date(2012, 11, 25), nhs_number=GOOD_NHS),  # birthday on the run date
            learner(dob=date(2012, 11, 26), attendance_sessions_possible=0),  # birthday tomorrow
            learner(upn=TEMPORARY_UPN, nhs_number=BAD_NHS),
            learner(upn=" b801200005001 ", nhs_number="999-000-0018"),  # as some MIS exports have them
        ],
        RUN_DATE,
    )
    assert frame["dob_age_years"].tolist() == [14, 13, 13, 13]
    assert frame["attendance_percent"].tolist()[0] == pytest.approx(95.0)
    assert frame["attendance_percent"].isna().tolist() == [False, True, False, False]
    assert frame["has_nhs_number"].tolist() == [True, False, True, True]
    assert frame["nhs_number_valid"].isna().tolist() == [False, True, False, False]
    assert [frame["nhs_number_valid"][i] for i in (0, 2, 3)] == [True, False, True]
    assert frame["upn_valid"].tolist() == [True, True, True, True]
    assert frame["upn_temporary"].tolist() == [False, False, True, False]


# --------------------------------------------------------------------------------------------------
# validation


def test_good_batch_passes() -> None:
    summary = validate_learner_features(build_feature_frame(good_batch(), RUN_DATE))
    assert summary.success, summary.failed_expectations
    assert summary.evaluated == 4
    assert summary.failed_expectations == []
    assert summary.bad_records == {}
    assert summary.warnings == []
    assert summary.result_path is None
    assert summary.expectations_evaluated == 12


def test_bad_batch_names_the_records_and_reasons() -> None:
    summary = validate_learner_features(build_feature_frame(bad_batch(), RUN_DATE))
    assert not summary.success
    assert summary.evaluated == 7
    assert set(summary.bad_records) == {1, 2, 3, 4, 5}
    assert summary.bad_records[1] == ["UPN is not 13 characters or its check letter is wrong"]
    assert summary.bad_records[2] == ["date of birth gives an age outside 2-25"]
    assert summary.bad_records[3] == ["sex code is not M, F or U"]
    assert summary.bad_records[4] == ["attendance is outside 0-100% (sessions attended exceed sessions possible)"]
    assert summary.bad_records[5] == ["NHS number fails the modulus 11 check"]
    assert set(summary.failed_expectations) == {
        "expect_column_values_to_be_in_set(upn_valid)",
        "expect_column_values_to_be_between(dob_age_years)",
        "expect_column_values_to_be_in_set(sex)",
        "expect_column_values_to_be_between(attendance_percent)",
        "expect_column_values_to_be_in_set(nhs_number_valid)",
    }


def test_one_record_collects_every_reason() -> None:
    batch = [learner(), learner(upn=BAD_UPN, sex="Q", enrol_status="Z", dob=None)]
    summary = validate_learner_features(build_feature_frame(batch, RUN_DATE))
    assert set(summary.bad_records) == {1}
    assert summary.bad_records[1] == [
        "UPN is not 13 characters or its check letter is wrong",
        "date of birth is missing",
        "sex code is not M, F or U",
        "enrolment status is not C, M, S, F or O",
    ]


def test_retired_and_temporary_codes_warn_without_quarantine() -> None:
    batch = [
        learner(),
        learner(sen_provision="S"),
        learner(upn=TEMPORARY_UPN),
        learner(year_group="Y7"),
        learner(sen_provision="Z"),
    ]
    summary = validate_learner_features(build_feature_frame(batch, RUN_DATE))
    assert summary.bad_records == {4: ["SEN provision code is not E, K, N or S"]}
    assert set(summary.warning_records) == {1, 2, 3, 4}
    assert summary.warning_records[1][0].startswith("SEN provision S (statement) is a retired code")
    assert summary.warning_records[2][0].startswith("temporary UPN")
    assert summary.warning_records[3][0].startswith("year group is not a National Curriculum year")
    assert set(summary.warnings) == {
        "expect_column_values_to_be_in_set(sen_provision)",
        "expect_column_values_to_be_in_set(upn_temporary)",
        "expect_column_values_to_be_in_set(year_group)",
    }
    only_warnings = validate_learner_features(build_feature_frame(batch[:4], RUN_DATE))
    assert only_warnings.success
    assert only_warnings.bad_records == {}


def test_repeated_record_position_fails() -> None:
    frame = build_feature_frame(good_batch(), RUN_DATE)
    frame.loc[3, "record"] = 1
    summary = validate_learner_features(frame)
    assert not summary.success
    assert set(summary.bad_records) == {1}
    assert summary.bad_records[1][0].startswith("record position is repeated")


def test_empty_batch_passes() -> None:
    summary = validate_learner_features(build_feature_frame([], RUN_DATE))
    assert summary.success
    assert summary.evaluated == 0
    assert summary.bad_records == {}


def test_expectation_that_cannot_run_fails_the_batch() -> None:
    frame = build_feature_frame(good_batch(), RUN_DATE)
    frame["attendance_percent"] = "n/a"
    summary = validate_learner_features(frame)
    assert not summary.success
    assert summary.failed_expectations == ["expect_column_values_to_be_between(attendance_percent) raised an error"]
    assert summary.bad_records == {}


def test_frame_without_the_features_is_refused() -> None:
    frame = build_feature_frame(good_batch(), RUN_DATE).drop(columns=["sex"])
    with pytest.raises(ValueError, match="sex"):
        validate_learner_features(frame)


# --------------------------------------------------------------------------------------------------
# governance: no unexpected values, no progress bars, no files or network


def _assert_no_values(document: Any) -> None:
    """No unexpected-value item anywhere, and every index list holds bare record positions."""
    if isinstance(document, dict):
        for key, value in document.items():
            assert key not in FORBIDDEN_RESULT_KEYS, key
            if key == "unexpected_index_list":
                assert all(type(v) is int for v in value), value
            _assert_no_values(value)
    elif isinstance(document, list):
        for value in document:
            _assert_no_values(value)


@pytest.mark.parametrize("gx_excludes_values", [True, False], ids=["gx-excludes", "gx-returns-values"])
def test_result_keeps_no_unexpected_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gx_excludes_values: bool
) -> None:
    if not gx_excludes_values:  # the sanitiser alone must strip what GX returns by default
        result_format = dict(validation._RESULT_FORMAT)
        del result_format["exclude_unexpected_values"]
        result_format["partial_unexpected_count"] = 20
        monkeypatch.setattr(validation, "_RESULT_FORMAT", result_format)
    summary = validate_learner_features(build_feature_frame(bad_batch(), RUN_DATE), data_docs_dir=tmp_path / "docs")
    assert summary.result_path is not None
    assert summary.result_path.parent == tmp_path / "docs"
    stored = summary.result_path.read_text(encoding="utf-8")
    assert json.loads(stored) == json.loads(json.dumps(summary.result, default=str))
    for text in (stored, json.dumps(summary.result, default=str), repr(summary)):
        assert '"Q"' not in text and "'Q'" not in text  # the unknown sex code
        assert not re.search(r"(?<![0-9A-Za-z.])176(?![0-9A-Za-z])", text)  # the absurd age
        assert "140.0" not in text and not re.search(r"(?<![0-9A-Za-z.])140(?![0-9A-Za-z])", text)
        for value in (BAD_UPN, BAD_NHS, "1850"):
            assert value not in text
    _assert_no_values(json.loads(stored))
    _assert_no_values(summary.result)
    failing = [r for r in summary.result["results"] if not r["success"]]
    assert {tuple(r["result"]["unexpected_index_list"]) for r in failing} == {
        (1,),
        (2,),
        (3,),
        (4,),
        (5,),
    }


def test_no_progress_bar_output(capfd: pytest.CaptureFixture[str], fresh_runtime: None) -> None:
    batch = good_batch() * 500 + bad_batch()
    validate_learner_features(build_feature_frame(batch, RUN_DATE))
    out, err = capfd.readouterr()
    assert "Calculating Metrics" not in err + out
    assert "it/s" not in err + out
    assert err == ""


def test_context_is_ephemeral_and_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_runtime: None) -> None:
    home = tmp_path / "home"
    home.mkdir()
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    monkeypatch.delenv("GX_ANALYTICS_ENABLED", raising=False)
    connects: list[Any] = []
    watching = True

    def audit(event: str, args: tuple[Any, ...]) -> None:
        if watching and event == "socket.connect":
            connects.append(args[1])

    sys.addaudithook(audit)
    try:
        validate_learner_features(build_feature_frame(bad_batch(), RUN_DATE))
    finally:
        watching = False
    assert connects == []
    assert list(work.iterdir()) == []  # no gx/ folder, nothing at all
    assert list(home.iterdir()) == []  # no ~/.great_expectations
    assert os.environ["GX_ANALYTICS_ENABLED"] == "false"
    runtime = validation._runtime()
    assert runtime.context.mode == "ephemeral"
    assert runtime.context.config.analytics_enabled is False
    progress = runtime.context.variables.progress_bars
    assert progress.globally is False and progress.metric_calculations is False


def test_context_is_built_once() -> None:
    first = validation._runtime()
    validate_learner_features(build_feature_frame(good_batch(), RUN_DATE))
    assert validation._runtime() is first
