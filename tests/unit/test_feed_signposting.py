"""Per-trust signposting tables (schoolslink/governance/signposting.py, agreements/signposting/<ODS>.yaml)."""

from __future__ import annotations

from pathlib import Path

import pytest

from schoolslink.errors import AgreementError
from schoolslink.governance.agreement import load_agreement
from schoolslink.governance.signposting import (
    SignpostingError,
    check_all,
    check_for_agreement,
    load_signposting,
    signposting_for,
)

REPO = Path(__file__).resolve().parents[2]
GOOD = """trust: R1A
services:
  kooth: {name: Kooth, offer: free online counselling for 11 to 25 year olds, url: https://www.kooth.com}
  gp: {name: GP, offer: can refer again, contact: the family's GP practice}
  crisis: {name: NHS 111 option 2, offer: urgent mental health help, phone: "111, option 2"}
rejection:
  "02": {services: [kooth, gp]}
closure:
  "04": {services: [kooth]}
default:
  services: [gp, crisis]
"""


def _write(tmp_path: Path, text: str, name: str = "R1A") -> Path:
    p = tmp_path / f"{name}.yaml"
    p.write_text(text)
    return p


def test_the_demo_trusts_table_loads_and_covers_every_listed_code() -> None:
    [table] = check_all(REPO / "agreements" / "signposting")
    assert table.trust_ods == "R9X"
    assert set(table.rejection) == {"01", "02", "03"}
    assert set(table.closure) >= {"02", "04", "05", "07", "08", "09"}
    text = table.for_outcome("not_accepted", "02")
    assert text is not None and "Kooth" in text.text and "Mental Health Support Team" in text.text
    assert "111" in text.contact and "@" in text.contact
    agreement = load_agreement(REPO / "agreements" / "demo-partnership.yaml")
    assert check_for_agreement(agreement, REPO / "agreements" / "signposting") == {"R9X": table}


def test_lookup_by_outcome_with_default(tmp_path: Path) -> None:
    t = load_signposting(_write(tmp_path, GOOD))
    hit = t.for_outcome("not_accepted", "02")
    assert hit is not None and hit.text.startswith("Kooth: free online counselling")
    assert hit.contact == "Kooth: https://www.kooth.com; GP: the family's GP practice"
    default = t.for_outcome("discharged", "09")
    assert default is not None and default.text.startswith("GP: can refer again")
    assert default.contact.endswith("NHS 111 option 2: phone 111, option 2")
    assert t.for_outcome("discharged", None) == default
    assert t.for_outcome("in_treatment", None) is None and t.for_outcome("moved_area", "03") is None


def test_a_trust_without_a_file_gets_no_signposting(tmp_path: Path) -> None:
    assert signposting_for("R2B", tmp_path) is None
    _write(tmp_path, GOOD)
    assert signposting_for("R1A", tmp_path) is not None


@pytest.mark.parametrize("change, line, message", [
    (('"02": {services: [kooth, gp]}', '"07": {services: [kooth, gp]}'), 7, "unknown MHSDS code '07'"),
    (('"04": {services: [kooth]}', '"77": {services: [kooth]}'), 9, "unknown MHSDS code '77'"),
    (('services: [gp, crisis]', 'services: [gp, samaritans]'), 11, "unknown service 'samaritans'"),
    (("trust: R1A", "trust: R9X"), 1, "must be the ODS code the file is named after"),
    (("default:\n  services: [gp, crisis]\n", "colour: blue\n"), 10, "unknown key(s): colour"),
    (("offer: can refer again", "offer: can refer again; or not"), 4, "must not hold ';'"),
    (("url: https://www.kooth.com", "url: http://www.kooth.com"), 3, "url must start with https://"),
    (("closure:\n", "closure: [\n"), 0, "not valid YAML"),
])
def test_a_bad_file_is_refused_naming_file_and_line(tmp_path: Path, change: tuple[str, str], line: int,
                                                    message: str) -> None:
    text = GOOD.replace(*change)
    assert text != GOOD
    p = _write(tmp_path, text)
    with pytest.raises(SignpostingError) as exc:
        load_signposting(p)
    assert isinstance(exc.value, AgreementError)  # `agreement check` and the feed build report it as such
    assert str(exc.value).startswith(f"{p}:") and message in str(exc.value)
    if line:
        assert str(exc.value).startswith(f"{p}:{line}:"), str(exc.value)


def test_agreement_check_checks_the_signposting_beside_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    from schoolslink.cli import main
    from tests.paths import REPO

    shutil.copy(REPO / "agreements" / "demo-partnership.yaml", tmp_path / "agreement.yaml")
    assert main(["agreement", "check", str(tmp_path / "agreement.yaml")]) == 0
    assert "signposting for R9X:" in capsys.readouterr().out
    (tmp_path / "signposting").mkdir()
    (tmp_path / "signposting" / "R9X.yaml").write_text("trust: R9X\nservices:\n  x: [\n")
    assert main(["agreement", "check", str(tmp_path / "agreement.yaml")]) == 1
    assert "signposting/R9X.yaml:4: not valid YAML" in capsys.readouterr().err
