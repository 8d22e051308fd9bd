"""Every golden test beside every shipped mapping, one pytest case each (also `schoolslink mappings test`)."""

from __future__ import annotations

import pytest

from schoolslink.mapping.engine import load_mappings
from schoolslink.mapping.goldens import GoldenResult, run_goldens

RESULTS = run_goldens(load_mappings())


@pytest.mark.parametrize("result", RESULTS, ids=[f"{r.mapping}: {r.name}" for r in RESULTS])
def test_golden(result: GoldenResult) -> None:
    assert result.ok, f"{result.file}:{result.line}: {result.message}"


def test_there_are_goldens_for_every_mapping() -> None:
    assert {r.mapping for r in RESULTS} == set(load_mappings().mappings)
