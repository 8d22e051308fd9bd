"""Agreements are code's input: loading refuses anything that could widen or blur what is shared."""

from __future__ import annotations

import re
from datetime import date
from pathlib import Path

import pytest

from schoolslink.cli import main
from schoolslink.errors import AgreementError
from schoolslink.governance.agreement import agreement_for, load_agreement, load_agreements
from schoolslink.model import Direction

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "agreements" / "demo-partnership.yaml"


def test_the_demo_agreement_loads_and_covers_the_synthetic_schools() -> None:
    a = load_agreement(DEMO)
    assert a.covers_school("900001") and a.covers_school("900500") and not a.covers_school("100001")
    assert a.covers_trust("R9X")
    assert "attendance_percent" in a.allowed(Direction.SCHOOL_TO_TRUST)
    assert "named_contact" in a.allowed(Direction.TRUST_TO_SCHOOL)
    p = "cypmhs-school-support"
    assert agreement_for(load_agreements(), "900001", "R9X", date(2026, 11, 26), p) == a
    assert agreement_for(load_agreements(), "900001", "R9X", date(2027, 9, 1), p) is None  # expired
    assert agreement_for(load_agreements(), "900001", "RXX", date(2026, 11, 26), p) is None
    # an agreement made for another purpose never lends its items
    assert agreement_for(load_agreements(), "900001", "R9X", date(2026, 11, 26), "service-evaluation") is None


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("  school_to_trust:\n    items: [attendance_percent,",
         "  school_to_trust:\n    items: [ethnicity, attendance_percent,", "unknown data item(s) ethnicity"),
        ("purposes: [", "purpose_typo: 1\npurposes: [", "unknown key(s): purpose_typo"),
        ("  school_to_trust:", "  sideways:", "unknown direction 'sideways'"),
        ("effective_from: 2026-09-01", "effective_from: soon", "effective_from must be a date"),
    ],
)
def test_a_bad_agreement_is_refused_with_the_file_and_reason(tmp_path: Path, old: str, new: str, message: str) -> None:
    text = DEMO.read_text()
    assert old in text
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace(old, new, 1))
    with pytest.raises(AgreementError, match=re.escape(message)) as exc:
        load_agreement(bad)
    assert str(bad) in str(exc.value)


def test_agreement_check_command(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["agreement", "check", str(DEMO)]) == 0
    out = capsys.readouterr().out
    assert "school_to_trust may carry: attendance_percent" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("id: x\n")
    assert main(["agreement", "check", str(bad)]) == 1
    assert main(["agreement"]) == 2
