"""Within six months of 18 a young person is flagged for transition to adult services."""

from __future__ import annotations

from datetime import date, timedelta

from hypothesis import given
from hypothesis import strategies as st

from schoolslink.status import approaching_adulthood


def test_six_months_before_the_18th_birthday() -> None:
    dob = date(2009, 5, 20)
    assert not approaching_adulthood(dob, date(2026, 11, 19))
    assert approaching_adulthood(dob, date(2026, 11, 20))  # 18 on 2027-05-20
    assert approaching_adulthood("2009-05-20", date(2027, 6, 1))  # over 18 and still at school: flagged
    assert not approaching_adulthood(None, date(2026, 11, 20))


def test_month_ends_and_leap_days() -> None:
    assert approaching_adulthood(date(2008, 8, 31), date(2026, 2, 28))  # 18 on 2026-08-31; Feb has no 31st
    assert not approaching_adulthood(date(2008, 8, 31), date(2026, 2, 27))
    assert approaching_adulthood(date(2008, 2, 29), date(2025, 8, 29))


@given(dob=st.dates(date(1995, 1, 1), date(2020, 12, 31)), on=st.dates(date(2010, 1, 1), date(2040, 12, 31)))
def test_flagged_exactly_from_about_six_months_before_18(dob: date, on: date) -> None:
    eighteen = date(dob.year + 18, dob.month, 28 if (dob.month, dob.day) == (2, 29) else dob.day)
    if on >= eighteen - timedelta(days=181):
        assert approaching_adulthood(dob, on) or on < eighteen - timedelta(days=178)
    if on < eighteen - timedelta(days=185):
        assert not approaching_adulthood(dob, on)
