"""Reading a `Retry-After` header the same way in every connector (RFC 9110: delay-seconds or an HTTP-date)."""

from __future__ import annotations

import email.utils
import math
from datetime import UTC, datetime

__all__ = ["retry_after_seconds"]


def retry_after_seconds(value: str | None, cap: float) -> float | None:
    """Seconds to wait, from 0 to `cap`, or None when the header is absent or unreadable. Accepts whole or
    decimal seconds and HTTP dates (a date in the past means no wait)."""
    if not value or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    if not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), cap)
