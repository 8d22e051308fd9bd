"""Pure rules of review decisions and retraction: the entered-in-error resource, the feed's correction state,
and the staff text a decision may keep. No peer needed."""

from __future__ import annotations

from datetime import date
from types import SimpleNamespace
from typing import Any

import pytest

from schoolslink.constants import OUR_META_SOURCE
from schoolslink.errors import DecisionRefused
from schoolslink.feeds import _before_tonight
from schoolslink.governance.review import CORRECTION_DUE, CORRECTION_SENT, check_staff_text
from schoolslink.mapping import ukcore
from schoolslink.pipeline.retraction import entered_in_error

D = date(2026, 11, 26)
H, OLD = "a" * 64, "b" * 64


def _ours(**extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Observation", "id": "sl-0123456789abcdef",
        "meta": {"source": OUR_META_SOURCE, "versionId": "3", "lastUpdated": "2026-11-26T02:00:00Z",
                 "author": {"reference": "Practitioner/x"},
                 "tag": [{"system": "https://fhir.schoolslink.org.uk/CodeSystem/origin", "code": "schoolslink"}]},
        "status": "final",
        "code": {"coding": [{"system": "https://fhir.schoolslink.org.uk/CodeSystem/school-context",
                             "code": "attendance_percent"}]},
        "subject": {"reference": "Patient/p1"},
        "valueQuantity": {"value": 91.5, "unit": "%", "system": "http://unitsofmeasure.org", "code": "%"},
        **extra,
    }


def test_entered_in_error_keeps_everything_ours_and_passes_the_uk_core_check() -> None:
    current = _ours()
    out = entered_in_error(current)
    assert out is not None and out["status"] == "entered-in-error"
    assert out["meta"] == {"source": OUR_META_SOURCE, "tag": current["meta"]["tag"]}  # the server's meta dropped
    assert {k: v for k, v in out.items() if k not in ("meta", "status")} == \
        {k: v for k, v in current.items() if k not in ("meta", "status")}
    assert ukcore.check(out) == [] and ukcore.check_slow(out) == []
    assert current["status"] == "final"  # the input is not changed


def test_entered_in_error_never_touches_what_is_not_ours() -> None:
    assert entered_in_error({**_ours(), "meta": {"source": "https://trust.example/ehr"}}) is None
    assert entered_in_error({k: v for k, v in _ours().items() if k != "meta"}) is None


def _row(content_hash: str, feed_date: date, prev_hash: str | None = None,
         prev_date: date | None = None) -> SimpleNamespace:
    return SimpleNamespace(content_hash=content_hash, feed_date=feed_date, prev_hash=prev_hash, prev_date=prev_date)


@pytest.mark.parametrize(("row", "expected"), [
    # an ordinary row from an earlier night, and a re-run of tonight's feed
    (_row(H, date(2026, 11, 25)), (H, date(2026, 11, 25), None)),
    (_row(H, D, OLD, date(2026, 11, 24)), (OLD, date(2026, 11, 24), None)),
    # a correction is due: tonight carries it, whenever the unlink happened
    (_row(CORRECTION_DUE + "d1", date(2026, 11, 25), OLD, date(2026, 11, 24)), (None, None, "d1")),
    (_row(CORRECTION_DUE + "d1", D), (None, None, "d1")),
    # carried tonight: a re-run carries it again (alone, or beside a new status row)...
    (_row(CORRECTION_SENT + "d1", D), (None, None, "d1")),
    (_row(H, D, CORRECTION_SENT + "d1"), (None, None, "d1")),
    # ...and a later night does not; a status row after a correction is new to the school
    (_row(CORRECTION_SENT + "d1", date(2026, 11, 25)), (None, None, None)),
    (_row(H, date(2026, 11, 25), CORRECTION_SENT + "d1"), (H, date(2026, 11, 25), None)),
])
def test_a_correction_is_carried_by_the_next_feed_only(row: SimpleNamespace,
                                                       expected: tuple[str | None, date | None, str | None]) -> None:
    assert _before_tonight(row, D) == expected


@pytest.mark.parametrize("text", [
    "", "   ", "x" * 141,
    "NHS 999 000 0018", "9990000018", "999-000-0018",  # an NHS number, as people write it
    "UPN A999100116007", "a999100116007",  # a UPN
    "dob 04/03/2012", "born 2012-03-04",  # a date
])
def test_staff_text_that_could_hold_pupil_data_is_refused(text: str) -> None:
    with pytest.raises(DecisionRefused) as exc:
        check_staff_text("the reason", text, 140)
    assert text.strip() == "" or text.strip() not in str(exc.value)  # the refusal never repeats it


def test_staff_text_is_kept_tidy() -> None:
    assert check_staff_text("the reason", "  twin  mix-up:\n the other twin ", 140) == "twin mix-up: the other twin"
    assert check_staff_text("the reviewer's name", "Jo O'Neill-Smith", 100) == "Jo O'Neill-Smith"
