"""Great Expectations validation of parsed learners, without handing GX any pupil data.

The pipeline never gives GX a pupil's values. `build_feature_frame` turns each parsed learner into
one row of derived, non-identifying features (is the UPN valid, age in years at the run date, code
values, attendance as a percentage, is the NHS number valid), keyed by the learner's position in the
batch. `validate_learner_features` runs the `expectations/learners.json` suite over that frame and
returns a `ValidationSummary`: which records fail, each with reasons a data manager can act on.

GX results keep no unexpected values (DESIGN.md, governance rules): the raw GX result is reduced
to counts and record positions (`_sanitise_result`) before anything is returned or written.

GX is imported lazily (it takes seconds) and its ephemeral context is built once per process,
with progress bars and analytics off. Nothing is written to the working directory: the context
lives in memory, and `Batch.validate` keeps no result in any store.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import uuid
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from schoolslink.errors import ConfigurationError
from schoolslink.identifiers import (
    is_temporary_upn,
    is_valid_nhs_number,
    is_valid_upn,
    normalise_nhs_number,
    normalise_upn,
)
from schoolslink.model import Learner

if TYPE_CHECKING:
    from great_expectations.core import ExpectationSuite, ExpectationSuiteValidationResult
    from great_expectations.core.batch_definition import BatchDefinition

EXPECTATIONS_DIR = Path(__file__).resolve().parent.parent / "expectations"
LEARNERS_SUITE = EXPECTATIONS_DIR / "learners.json"

FEATURE_COLUMNS: tuple[str, ...] = (
    "record",
    "upn_valid",
    "upn_temporary",
    "dob_age_years",
    "sex",
    "year_group",
    "sen_provision",
    "attendance_percent",
    "has_nhs_number",
    "nhs_number_valid",
    "enrol_status",
)

# The only items of a GX expectation result that we keep: counts and percentages. The record
# positions of unexpected rows are kept too, as bare integers (`_record_positions`).
_KEPT_RESULT_ITEMS = (
    "element_count",
    "unexpected_count",
    "unexpected_percent",
    "unexpected_percent_total",
    "unexpected_percent_nonmissing",
    "missing_count",
    "missing_percent",
)
# ... and of the suite result's meta: no batch_spec, no batch_parameters.
_KEPT_META_ITEMS = ("great_expectations_version", "batch_markers", "active_batch_definition")
_RECORD = "record"

# Whole unexpected index lists (COMPLETE, not the first 20), keyed by the record column, with GX
# told to leave out the unexpected values themselves; no row dumps, no pandas query strings.
# `_sanitise_result` strips whatever of that a GX version still returns.
_RESULT_FORMAT: dict[str, Any] = {
    "result_format": "COMPLETE",
    "unexpected_index_column_names": [_RECORD],
    "return_unexpected_index_query": False,
    "include_unexpected_rows": False,
    "exclude_unexpected_values": True,
    "partial_unexpected_count": 0,
}


@dataclass(slots=True)
class ValidationSummary:
    """What a validation found, with record positions and reasons but no values.

    `success` is False when any critical expectation failed; the records it names are in
    `bad_records` (quarantine them). Warning-severity failures do not change `success`: they are in
    `warnings` and `warning_records` (tell the school, keep the record).
    """

    success: bool
    evaluated: int  # records (feature rows) validated
    failed_expectations: list[str]  # critical failures, "expectation_type(column)" ["raised an error"]
    bad_records: dict[int, list[str]]  # record -> reasons
    result_path: Path | None = None  # the sanitised GX result, when data_docs_dir was given
    warnings: list[str] = field(default_factory=list)  # warning failures, "expectation_type(column)"
    warning_records: dict[int, list[str]] = field(default_factory=dict)
    expectations_evaluated: int = 0
    result: dict[str, Any] = field(default_factory=dict)  # the sanitised GX result


# --------------------------------------------------------------------------------------------------
# the feature frame


def build_feature_frame(learners: list[Learner], run_date: date) -> pd.DataFrame:
    """One row of non-identifying features per learner, `record` being its position in `learners`."""
    upn_valid: list[bool] = []
    upn_temporary: list[bool] = []
    age: list[int | None] = []
    attendance: list[float | None] = []
    has_nhs: list[bool] = []
    nhs_valid: list[bool | None] = []
    for learner in learners:
        upn = normalise_upn(learner.upn or "")
        upn_valid.append(is_valid_upn(upn))
        upn_temporary.append(is_temporary_upn(upn))
        age.append(_age_years(learner.dob, run_date))
        attendance.append(_attendance_percent(learner))
        nhs = normalise_nhs_number(learner.nhs_number or "")
        has_nhs.append(bool(nhs))
        nhs_valid.append(is_valid_nhs_number(nhs) if nhs else None)
    return pd.DataFrame(
        {
            "record": pd.array(range(len(learners)), dtype="int64"),
            "upn_valid": pd.array(upn_valid, dtype="bool"),
            "upn_temporary": pd.array(upn_temporary, dtype="bool"),
            "dob_age_years": pd.array(age, dtype="Int64"),
            "sex": [learner.sex for learner in learners],
            "year_group": [learner.year_group for learner in learners],
            "sen_provision": [learner.sen_provision for learner in learners],
            "attendance_percent": pd.array(attendance, dtype="Float64"),
            "has_nhs_number": pd.array(has_nhs, dtype="bool"),
            "nhs_number_valid": pd.array(nhs_valid, dtype="boolean"),
            "enrol_status": [learner.enrol_status for learner in learners],
        },
        columns=list(FEATURE_COLUMNS),
    )


def _age_years(dob: date | None, on: date) -> int | None:
    if dob is None:
        return None
    return on.year - dob.year - ((on.month, on.day) < (dob.month, dob.day))


def _attendance_percent(learner: Learner) -> float | None:
    possible = learner.attendance_sessions_possible
    attended = learner.attendance_sessions_attended
    if possible is None or attended is None or possible <= 0:
        return None
    return attended * 100.0 / possible


# --------------------------------------------------------------------------------------------------
# validation


def validate_learner_features(frame: pd.DataFrame, *, data_docs_dir: Path | None = None) -> ValidationSummary:
    """Validate a feature frame (see `build_feature_frame`) against `expectations/learners.json`.

    Returns the records that fail, with reasons; writes the sanitised GX result (counts and record
    positions only) as JSON under `data_docs_dir` when it is given.
    """
    missing = [c for c in FEATURE_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"feature frame lacks columns: {', '.join(missing)}")
    # `record` also as the frame's named index: GX then reads the unexpected positions off the index
    # in one pass, rather than looking each unexpected row's `record` up cell by cell.
    indexed = frame.set_index(pd.Index(frame[_RECORD], name=_RECORD))
    runtime = _runtime()
    with runtime.lock:
        batch = runtime.batch_definition.get_batch(batch_parameters={"dataframe": indexed})
        raw = batch.validate(runtime.suite, result_format=_RESULT_FORMAT)
    result = _sanitise_result(raw)
    del raw, batch  # the unsanitised result goes no further
    summary = _summarise(result, evaluated=len(frame))
    if data_docs_dir is not None:
        summary.result_path = _write_result(result, Path(data_docs_dir))
    return summary


def _sanitise_result(raw: ExpectationSuiteValidationResult) -> dict[str, Any]:
    """The GX suite result as plain JSON, each expectation result cut to counts and record positions.

    A whitelist: what is not named here (unexpected_list, partial_unexpected_list,
    partial_unexpected_counts, unexpected_rows, unexpected_index_query, observed_value, details,
    batch_spec, batch_parameters, exception tracebacks, anything a later GX adds) is dropped.
    """
    from great_expectations.util import convert_to_json_serializable

    meta: dict[str, Any] = dict(raw.meta or {})
    results: list[dict[str, Any]] = []
    for item in raw.results:
        result = item.result or {}
        kept: dict[str, Any] = {k: convert_to_json_serializable(result[k]) for k in _KEPT_RESULT_ITEMS if k in result}
        if "unexpected_index_list" in result:
            kept["unexpected_index_column_names"] = [_RECORD]
            kept["unexpected_index_list"] = _record_positions(result["unexpected_index_list"])
        config = item.expectation_config
        results.append(
            {
                "success": bool(item.success),
                "expectation_config": config.to_json_dict() if config is not None else {},
                "result": kept,
                "exception_info": _exception_summary(item.exception_info),
            }
        )
    return {
        "success": bool(raw.success),
        "suite_name": raw.suite_name,
        "statistics": convert_to_json_serializable(dict(raw.statistics)),
        "meta": {k: convert_to_json_serializable(meta[k]) for k in _KEPT_META_ITEMS if k in meta},
        "results": results,
    }


def _exception_summary(info: Any) -> dict[str, Any]:
    """Whether the expectation raised, and the first message (no traceback).

    GX gives either one flat dict or, when a metric failed, a dict of them keyed by metric id.
    """
    info = info or {}
    found = [info] if "raised_exception" in info else [v for v in info.values() if isinstance(v, dict)]
    raised = [e for e in found if e.get("raised_exception")]
    return {
        "raised_exception": bool(raised),
        "exception_message": str(raised[0].get("exception_message")) if raised else None,
    }


def _record_positions(index_list: Any) -> list[int]:
    """Record positions from GX's unexpected_index_list, in either of its shapes.

    With exclude_unexpected_values it is one dict of lists (`[{"record": [3, 8]}]`); without, one
    dict per row, each carrying the unexpected value beside the record (`[{"record": 3, "sex": "Q"}]`).
    """
    positions: list[int] = []
    for entry in index_list or []:
        value = entry[_RECORD] if isinstance(entry, dict) else entry
        if isinstance(value, list | tuple):
            positions.extend(int(v) for v in value)
        else:
            positions.append(int(value))
    return positions


def _summarise(result: dict[str, Any], *, evaluated: int) -> ValidationSummary:
    failed: list[str] = []
    warnings: list[str] = []
    bad: dict[int, list[str]] = {}
    warned: dict[int, list[str]] = {}
    for item in result["results"]:
        if item["success"]:
            continue
        config = item["expectation_config"]
        label = f"{config.get('type')}({config.get('kwargs', {}).get('column', '')})"
        if item["exception_info"]["raised_exception"]:
            label += " raised an error"  # a malformed frame, not bad records: see exception_info
        critical = config.get("severity", "critical") == "critical"
        (failed if critical else warnings).append(label)
        reason = (config.get("meta") or {}).get("reason") or f"fails {label}"
        target = bad if critical else warned
        for record in item["result"].get("unexpected_index_list", []):
            reasons = target.setdefault(record, [])
            if reason not in reasons:
                reasons.append(reason)
    return ValidationSummary(
        success=not failed,
        evaluated=evaluated,
        failed_expectations=failed,
        bad_records=dict(sorted(bad.items())),
        warnings=warnings,
        warning_records=dict(sorted(warned.items())),
        expectations_evaluated=int(result["statistics"].get("evaluated_expectations", 0)),
        result=result,
    )


def _write_result(result: dict[str, Any], directory: Path) -> Path:
    """Write the sanitised result as `<suite>-<GX load time>.json`, atomically."""
    directory.mkdir(parents=True, exist_ok=True)
    stamp = str(result["meta"].get("batch_markers", {}).get("ge_load_time") or uuid.uuid4().hex)
    safe = "".join(ch for ch in stamp if ch.isalnum())
    path = directory / f"{result['suite_name']}-{safe}.json"
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".gx-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2, sort_keys=True, default=str)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# --------------------------------------------------------------------------------------------------
# the GX context, built once per process


@dataclass(slots=True)
class _GxRuntime:
    batch_definition: BatchDefinition[Any]
    suite: ExpectationSuite
    lock: threading.Lock
    context: Any  # EphemeralDataContext; kept so the datasource and suite stay alive


_RUNTIME: _GxRuntime | None = None
_RUNTIME_LOCK = threading.Lock()


def _runtime() -> _GxRuntime:
    global _RUNTIME
    if _RUNTIME is None:
        with _RUNTIME_LOCK:
            if _RUNTIME is None:
                _RUNTIME = _build_runtime(LEARNERS_SUITE)
    return _RUNTIME


def _build_runtime(suite_path: Path) -> _GxRuntime:
    # Analytics off before the context exists: GX reads the variable at context creation.
    os.environ["GX_ANALYTICS_ENABLED"] = "false"
    import great_expectations as gx
    from great_expectations.core import ExpectationSuite
    from great_expectations.data_context.types.base import ProgressBarsConfig

    try:
        suite_doc = json.loads(suite_path.read_text(encoding="utf-8"))
        suite = ExpectationSuite(**suite_doc)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigurationError(f"{suite_path}: cannot load the expectation suite: {exc}") from exc

    context = gx.get_context(mode="ephemeral")
    context.enable_analytics(False)
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    suite = context.suites.add(suite)
    datasource = context.data_sources.add_pandas("schoolslink")
    asset = datasource.add_dataframe_asset("learner_features")
    batch_definition = asset.add_batch_definition_whole_dataframe("whole_batch")
    return _GxRuntime(batch_definition=batch_definition, suite=suite, lock=threading.Lock(), context=context)
