"""Every shipped mapping file fits the published JSON Schema, and the schema refuses what lint refuses."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from schoolslink.mapping.engine import MAPPINGS_DIR

SCHEMA = json.loads((MAPPINGS_DIR / "schema" / "mapping-file.schema.json").read_text())
FILES = sorted(p for p in MAPPINGS_DIR.rglob("*.yaml") if not p.name.endswith(".tests.yaml"))


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(MAPPINGS_DIR)) for p in FILES])
def test_shipped_file_fits_the_schema(path: Path) -> None:
    doc = yaml.safe_load(path.read_text())
    jsonschema.validate(doc, SCHEMA)


@pytest.mark.parametrize("bad", [
    {"mapping": "x", "kind": "template", "input": "i", "output": "o", "template": {}, "sauce": 1},
    {"mapping": "x", "kind": "template", "input": "i", "output": "o", "template": {"a": {"$pth": "b"}}},
    {"table": "t", "codes": {"a": "A"}},
    {"table": "t", "unmapped": "default", "codes": {"a": "A"}},
])
def test_schema_refuses_what_lint_refuses(bad: dict[str, object]) -> None:
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, SCHEMA)
