"""The postcode-district routing table: read and checked at load."""

from __future__ import annotations

from pathlib import Path

import pytest

from schoolslink.errors import ConfigurationError
from schoolslink.governance.routing import load_routing, routing_path


def test_the_shipped_table_loads_and_routes() -> None:
    table = load_routing(routing_path())
    assert table.trust_for_school("900001") == "R9X" and table.trust_for_school("900005") == "R9Y"
    assert table.trust_for_school("123456") is None


def test_no_table_routes_nothing(tmp_path: Path) -> None:
    assert load_routing(tmp_path / "none.yaml").trust_for_school("900001") is None


@pytest.mark.parametrize("text, why", [
    ("schools: {'12345': ZZ1}\n", "not a URN"),
    ("schools: {'900001': 'not a district'}\n", "not a postcode district"),
    ("districts: {ZZ1: 'r 9x'}\n", "not an ODS code"),
    ("trusts: {}\n", "only 'schools' and 'districts'"),
    ("schools: [\n", "not valid YAML"),
])
def test_a_bad_table_is_refused_with_the_reason(tmp_path: Path, text: str, why: str) -> None:
    p = tmp_path / "t.yaml"
    p.write_text(text)
    with pytest.raises(ConfigurationError, match=why):
        load_routing(p)
