"""`Retry-After` read one way for every connector: seconds or an HTTP date, never negative, never past the cap."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from connectors.retry_after import retry_after_seconds


@pytest.mark.parametrize(("value", "expected"), [
    (None, None), ("", None), ("  ", None), ("soon", None), ("nan", None), ("inf", None),
    ("0", 0.0), ("7", 7.0), (" 2.5 ", 2.5), ("-3", 0.0), ("9999", 300.0),
])
def test_seconds(value: str | None, expected: float | None) -> None:
    assert retry_after_seconds(value, 300.0) == expected


def test_http_dates() -> None:
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=120), usegmt=True)
    got = retry_after_seconds(later, 300.0)
    assert got is not None and 100 < got <= 120
    assert retry_after_seconds(format_datetime(datetime.now(UTC) - timedelta(hours=1), usegmt=True), 300.0) == 0.0
    assert retry_after_seconds(format_datetime(datetime.now(UTC) + timedelta(hours=1), usegmt=True), 30.0) == 30.0
