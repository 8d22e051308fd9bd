"""The school-context values a canonical learner holds, by canonical data item.

The Observations themselves are made by the declarative mapping
`mappings/fhir-out/school-context-observations.yaml`; this module only derives the values it reads.
"""

from __future__ import annotations

from typing import Any

ITEMS = ("attendance_percent", "sen_provision", "exclusions_fixed_count", "year_group")


def context_items(plain: dict[str, Any]) -> dict[str, Any]:
    """The school-context values the canonical learner holds, by canonical item name."""
    possible = plain.get("attendance_sessions_possible")
    attended = plain.get("attendance_sessions_attended")
    attendance = None
    if possible and attended is not None and possible > 0:
        attendance = round(100.0 * attended / possible, 1)
    return {
        "attendance_percent": attendance,
        "sen_provision": plain.get("sen_provision") or None,
        "exclusions_fixed_count": plain.get("exclusions_fixed_count"),
        "year_group": plain.get("year_group") or None,
    }
