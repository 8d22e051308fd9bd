"""CTF versions are configuration: a new academic year's version is one line in a code table and a test file.

mappings/code-tables/ctf-versions.yaml lists the versions read; tests/data/ctf/ctf-<version>.xml is the
synthetic file that comes with each. CTF 24 may carry Gender, CTF 25 carries Sex.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from connectors.mis.ctf import CtfReader, configured_ctf_versions
from connectors.mis.errors import CtfRefused
from schoolslink.mapping.engine import MAPPINGS_DIR, load_mappings

DATA = Path(__file__).resolve().parents[1] / "data" / "ctf"


@pytest.fixture(autouse=True)
def _no_env_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SCHOOLSLINK_CTF_VERSIONS", raising=False)


@pytest.mark.parametrize("version", ["24", "25"])
def test_each_configured_version_reads_its_test_file(version: str) -> None:
    assert version in configured_ctf_versions()
    result = CtfReader().read(DATA / f"ctf-{version}.xml")
    assert result.header.major_version == version and result.header.qualifier == "partial"
    assert [lr.sex for lr in result.learners] == ["F", "M"] and not result.quarantined


def test_a_version_not_configured_is_refused_naming_those_accepted() -> None:
    with pytest.raises(CtfRefused, match=r"CTF version 26\.0 is not accepted here \(accepted: 24, 25\)"):
        CtfReader().read(DATA / "ctf-26.xml")


def test_a_new_academic_years_version_is_one_line_of_configuration(tmp_path: Path) -> None:
    root = tmp_path / "mappings"
    shutil.copytree(MAPPINGS_DIR, root)
    table = root / "code-tables" / "ctf-versions.yaml"
    table.write_text(table.read_text() + '  "26": Sex\n')
    ms = load_mappings(root)
    assert configured_ctf_versions(ms) == ("24", "25", "26")
    result = CtfReader(mappings=ms).read(DATA / "ctf-26.xml")
    assert result.header.major_version == "26" and len(result.learners) == 2


def test_the_environment_overrides_the_table(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCHOOLSLINK_CTF_VERSIONS", "26")
    assert CtfReader().read(DATA / "ctf-26.xml").header.major_version == "26"
    with pytest.raises(CtfRefused, match="not accepted"):
        CtfReader().read(DATA / "ctf-25.xml")
