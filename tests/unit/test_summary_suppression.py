"""The monthly partnership summary's disclosure control, statistics and month handling (schoolslink/summary.py).

Counts under 5 (zero too) show as "fewer than 5" and never as the number; every other count is rounded to the
nearest 5; a rate or percentile computed from a suppressed count is not shown; an empty month still makes
pages, with nothing but suppressed counts on them.
"""

from __future__ import annotations

import re
import statistics
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest

from schoolslink import summary as s
from schoolslink.governance.agreement import load_agreements

MONTH = "2026-11"
REASONS = s.ReasonLabels({"01": "Duplicate", "02": "Not appropriate", "03": "Incomplete"}, "Another reason")


def ref(outcome: s.Outcome, *, received: date = date(2026, 11, 10), code: str | None = None,
        wait_end: date | None = None, school: str = "900001", trust: str = "R9X") -> s.ReferralFact:
    return s.ReferralFact(trust, school, received, outcome, code, wait_end)


@pytest.mark.parametrize(("n", "expected"), [
    (0, None), (1, None), (4, None), (5, 5), (7, 5), (8, 10), (12, 10), (13, 15), (22, 20), (23, 25), (100, 100),
    (1002, 1000), (1003, 1005),
])
def test_counts_under_five_are_suppressed_and_the_rest_rounded_to_five(n: int, expected: int | None) -> None:
    assert s.rounded(n) == expected
    shown = s.shown(n)
    assert shown.suppressed is (expected is None)
    assert shown.text == ("fewer than 5" if expected is None else f"{expected:,}")


def test_a_negative_count_is_a_bug() -> None:
    with pytest.raises(ValueError):
        s.rounded(-1)


def test_a_rate_needs_both_counts_unsuppressed() -> None:
    assert s.rate(12, 8) == 60
    assert s.rate(4, 20) is None  # the numerator is suppressed
    assert s.rate(20, 4) is None  # ... or its complement: 20/24 would give the 4 away
    assert s.rate(0, 0) is None
    assert s.rate(5, 5) == 50
    assert s.rate(2, 1) is None


def test_percentiles_interpolate_between_closest_ranks() -> None:
    xs = [float(x) for x in range(1, 11)]
    assert s.percentile(xs, 50) == pytest.approx(5.5)
    assert s.percentile(xs, 90) == pytest.approx(9.1)
    assert s.percentile([7.0], 90) == 7.0
    assert s.percentile([3.0, 1.0, 2.0], 0) == 1.0 and s.percentile([3.0, 1.0, 2.0], 100) == 3.0
    data = [3.0, 14.0, 15.0, 21.0, 30.0, 31.0, 60.0]
    q = statistics.quantiles(data, n=10, method="inclusive")
    assert s.percentile(data, 90) == pytest.approx(q[8])
    assert s.percentile(data, 50) == pytest.approx(statistics.median(data))
    with pytest.raises(ValueError):
        s.percentile([], 50)


def test_percentiles_from_fewer_than_five_values_are_not_shown() -> None:
    assert not s.spread([1.0, 2.0, 3.0, 4.0]).available
    assert s.spread([1.0, 2.0, 3.0, 4.0]).n.text == "fewer than 5"
    five = s.spread([10.0, 20.0, 30.0, 40.0, 50.0])
    assert five.available and five.median == 30.0 and five.p90 == pytest.approx(46.0) and five.n.text == "5"


def test_months() -> None:
    assert s.month_bounds("2028-02") == (date(2028, 2, 1), date(2028, 2, 29))
    assert s.month_bounds("2026-12") == (date(2026, 12, 1), date(2026, 12, 31))
    assert s.month_before(date(2027, 1, 1)) == "2026-12"
    assert s.month_before(date(2026, 11, 30)) == "2026-10"
    for bad in ("2026-13", "2026-1", "26-11", "2026-11-01", ""):
        with pytest.raises(s.SummaryError):
            s.month_bounds(bad)


def test_figures_apply_the_rules_to_every_cell() -> None:
    refs = ([ref(s.Outcome.ACCEPTED, wait_end=date(2026, 11, 10) + timedelta(days=d)) for d in (5, 10, 15, 20)]
            + [ref(s.Outcome.ACCEPTED)] * 8
            + [ref(s.Outcome.NOT_ACCEPTED, code="02")] * 3 + [ref(s.Outcome.NOT_ACCEPTED, code="99")] * 2
            + [ref(s.Outcome.NOT_ACCEPTED)] * 3
            + [ref(s.Outcome.AWAITING)] * 2
            + [ref(s.Outcome.ACCEPTED, received=date(2026, 10, 31))])  # last month: not counted as received
    f = s.figures("x", MONTH, refs, [], REASONS)
    assert f.referrals.text == "20"  # 22 -> 20
    outcomes = {b.label: b for b in f.outcomes}
    assert outcomes["Accepted"].count.text == "10"  # 12
    assert outcomes["Not accepted"].count.text == "10"  # 8
    assert outcomes["Waiting for a decision"].count.text == "fewer than 5"
    assert outcomes["Waiting for a decision"].share is None
    assert outcomes["Accepted"].share == 55  # 12 of 22
    assert f.acceptance_rate == 60  # 12 accepted of 20 decided
    reasons = {b.label: b.count.text for b in f.reasons}
    # Every reason is listed, whether or not it occurred, so a listed reason never tells that it did.
    assert list(reasons) == ["Duplicate", "Not appropriate", "Incomplete", "Another reason", s.NO_REASON_TEXT]
    assert set(reasons.values()) == {"fewer than 5"}
    assert not f.waits.available  # four waits ended in the month: not shown


def test_waits_are_those_that_ended_in_the_month() -> None:
    refs = [ref(s.Outcome.ACCEPTED, received=date(2026, 9, 1), wait_end=date(2026, 11, d)) for d in (1, 2, 3)]
    refs += [ref(s.Outcome.ACCEPTED, received=date(2026, 11, 1), wait_end=date(2026, 11, 1) + timedelta(days=d))
             for d in (0, 7)]
    refs += [ref(s.Outcome.ACCEPTED, received=date(2026, 11, 20), wait_end=date(2026, 12, 2))]  # ends next month
    refs += [ref(s.Outcome.ACCEPTED, received=date(2026, 11, 20), wait_end=date(2026, 11, 19))]  # out of order
    f = s.figures("x", MONTH, refs, [], REASONS)
    assert f.waits.available and f.waits.n.text == "5"
    assert f.waits.median == 61.0  # [0, 7, 61, 62, 63]
    assert f.waits.p90 == pytest.approx(62.6)
    assert s.days_text(f.waits.p90) == "63 days"


def test_time_to_reach_the_school() -> None:
    t0 = datetime(2026, 11, 5, 10, 0, tzinfo=UTC)
    changes = [s.ChangeFact("R9X", "900001", t0, True, t0 + timedelta(hours=h)) for h in (2, 4, 6, 8, 10, 30)]
    changes.append(s.ChangeFact("R9X", "900001", t0, False, None))
    f = s.figures("x", MONTH, [], changes, REASONS)
    assert f.lag.available and f.lag.median == pytest.approx(7.0) and s.hours_text(f.lag.median) == "7 hours"
    assert f.lag_pending.text == "fewer than 5"
    assert f.lag_exact == "all"
    assert s.hours_text(0.2) == "less than 1 hour" and s.hours_text(72) == "3.0 days"


def _facts(refs: list[s.ReferralFact]) -> s.StoreFacts:
    return s.StoreFacts(referrals=refs, changes=[], trust_data_at=datetime(2026, 11, 30, 23, 0, tzinfo=UTC),
                        roll_schools={"900001", "900002"})


def test_a_page_never_shows_a_suppressed_number() -> None:
    refs = [ref(s.Outcome.ACCEPTED)] * 9 + [ref(s.Outcome.NOT_ACCEPTED, code="01")] * 3
    pages = s.build_pages(MONTH, _facts(refs), load_agreements(), REASONS)
    school = next(p for p in pages if p.code == "900001")
    html = s.render(school)
    row = re.search(r"<th scope=\"row\">Not accepted</th><td class=\"num\">(.*?)</td>", html)
    assert row is not None and "fewer than 5" in row.group(1) and "3" not in row.group(1)
    accepted = re.search(r"<th scope=\"row\">Accepted</th><td class=\"num\">(.*?)</td>", html)
    assert accepted is not None and accepted.group(1) == "10"  # 9 -> 10
    assert "Acceptance rate" in html and "not shown" in html  # 9 of 12 would give the 3 away
    assert "<script" not in html and "http://" not in html.replace("http://www.w3.org/2000/svg", "")
    assert "https://" not in html
    assert html.count("<svg") == html.count("<title id=") == html.count("<desc id=")


def test_an_empty_month_still_makes_every_page(sl_home: Path) -> None:
    from schoolslink.store.db import migrate

    migrate()
    counts = s.build_summaries("2026-10", sl_home / "out" / "summaries" / "2026-10")
    assert counts == s.SummaryCounts(school_pages=0, trust_pages=1, referrals=0, changes_measured=0)
    html = (sl_home / "out" / "summaries" / "2026-10" / "trust-R9X.html").read_text()
    assert "October 2026" in html and "has not read any records from a trust yet" in html
    assert "fewer than 5" in html
    assert not re.search(r"<td class=\"num\">\d", html)  # not one count, rate or wait
    pages = s.build_pages("2026-10", _facts([]), load_agreements(), REASONS)
    assert [(p.kind, p.code) for p in pages] == [("school", "900001"), ("school", "900002"), ("trust", "R9X")]
    for p in pages:
        assert p.totals.referrals.suppressed and p.totals.acceptance_rate is None and not p.totals.waits.available
