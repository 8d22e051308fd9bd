"""`schoolslink summary --month YYYY-MM`: the CLI contract (exit codes, one JSON document with --json)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from schoolslink.cli import main


def test_a_month_writes_pages_and_reports_counts(sl_home: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from schoolslink.store.db import migrate

    migrate()
    out = tmp_path / "summaries"
    assert main(["summary", "--month", "2026-11", "--out", str(out), "--json"]) == 0
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert doc["ok"] is True and doc["month"] == "2026-11" and doc["out"] == str(out.resolve())
    assert doc["summary_school_pages"] == len(list(out.glob("school-*.html")))
    assert doc["summary_trust_pages"] == len(list(out.glob("trust-*.html"))) >= 1


@pytest.mark.parametrize("month", ["2026-13", "November", "2026-1"])
def test_a_bad_month_is_a_usage_error(sl_home: Path, month: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["summary", "--month", month]) == 2
    assert "month must be YYYY-MM" in capsys.readouterr().err
