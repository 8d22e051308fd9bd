"""Golden tests beside each mapping: `<mapping file>.tests.yaml` holds `given` / `expect` cases.

    tests:
      - name: attendance only, as the agreement allows
        given: {...}              # the input record
        context: {...}            # optional: run variables the caller gives (trust_ods, ...)
        allowed: [item, ...]      # optional: the data items agreement and consent allow
        expect: {...}             # the whole output, exactly ("$mapping_version" stands for the hash)
      - name: an impossible date is a mapping error
        given: {...}
        expect_error: "a date is not a real date"   # part of the reason

Run by `schoolslink mappings test [PATH]` and by pytest (tests/unit/test_mapping_goldens.py).
Golden tests run with a fixed, published key (GOLDEN_KEY), so deterministic ids are stable in the file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from schoolslink.mapping.engine import MappingError, MappingSet
from schoolslink.mapping.yamlnodes import LDict, MappingFileError, line_of
from schoolslink.mapping.yamlnodes import load as load_yaml

GOLDEN_KEY = "schoolslink-golden-tests-key"
CASE_KEYS = {"name", "given", "context", "allowed", "expect", "expect_error", "expect_items"}


@dataclass(frozen=True)
class GoldenResult:
    file: str
    line: int
    mapping: str
    name: str
    ok: bool
    message: str = ""


def tests_file_for(mapping_path: Path) -> Path:
    return mapping_path.with_name(mapping_path.name.removesuffix(".yaml") + ".tests.yaml")


def _plain(x: Any) -> Any:
    return json.loads(json.dumps(x))


def run_goldens(ms: MappingSet, only: Path | None = None) -> list[GoldenResult]:
    saved = os.environ.get("SCHOOLSLINK_KEY")
    os.environ["SCHOOLSLINK_KEY"] = GOLDEN_KEY
    try:
        return _run_all(ms, only)
    finally:
        if saved is None:
            os.environ.pop("SCHOOLSLINK_KEY", None)
        else:
            os.environ["SCHOOLSLINK_KEY"] = saved


def _substitute(x: Any, version: str) -> Any:
    if x == "$mapping_version":
        return version
    if isinstance(x, dict):
        return {k: _substitute(v, version) for k, v in x.items()}
    if isinstance(x, list):
        return [_substitute(v, version) for v in x]
    return x


def _run_all(ms: MappingSet, only: Path | None) -> list[GoldenResult]:
    results: list[GoldenResult] = []
    for m in sorted(ms.mappings.values(), key=lambda m: str(m.path)):
        if only is not None and only.resolve() not in (m.path.resolve(), *m.path.resolve().parents):
            continue
        tf = tests_file_for(m.path)
        if not tf.exists():
            results.append(GoldenResult(str(m.path), 1, m.name, "(no tests)", False,
                                        f"{tf.name} is missing: every mapping needs golden tests"))
            continue
        doc = load_yaml(tf)
        if not isinstance(doc, LDict) or set(doc) != {"tests"} or not isinstance(doc["tests"], list) \
                or not doc["tests"]:
            raise MappingFileError(tf, line_of(doc), "a tests file has one key, tests: a list of cases")
        for case in doc["tests"]:
            results.append(_run_case(ms, m.name, tf, case))
    return results


def _run_case(ms: MappingSet, name: str, tf: Path, case: Any) -> GoldenResult:
    line = line_of(case)
    if not isinstance(case, LDict):
        raise MappingFileError(tf, line, "each test case is a mapping")
    unknown = set(case) - CASE_KEYS
    if unknown:
        raise MappingFileError(tf, line_of(case, sorted(unknown)[0]), f"unknown key {sorted(unknown)[0]!r} in a test")
    if "name" not in case or "given" not in case or ("expect" in case) == ("expect_error" in case):
        raise MappingFileError(tf, line, "a test needs name, given, and exactly one of expect / expect_error")
    label = str(case["name"])
    allowed = case.get("allowed")
    cm = ms.compile(name, [str(a) for a in allowed] if allowed is not None else None)
    try:
        out, items = cm.run_with_items(_plain(case["given"]), _plain(case.get("context") or {}), record_key=label)
    except MappingError as exc:
        if "expect_error" in case and str(case["expect_error"]) in exc.reason:
            return GoldenResult(str(tf), line, name, label, True)
        return GoldenResult(str(tf), line, name, label, False, f"mapping error: {exc.reason}")
    if "expect_error" in case:
        return GoldenResult(str(tf), line, name, label, False, "expected a mapping error, got an output")
    got, want = _plain(out), _substitute(_plain(case["expect"]), cm.version)
    if got != want:
        return GoldenResult(str(tf), line, name, label, False, _diff(want, got))
    if "expect_items" in case and sorted(set(items)) != sorted({str(i) for i in case["expect_items"]}):
        return GoldenResult(str(tf), line, name, label, False, f"items {sorted(set(items))} != expected")
    return GoldenResult(str(tf), line, name, label, True)


def _diff(want: Any, got: Any, path: str = "") -> str:
    if isinstance(want, dict) and isinstance(got, dict):
        for k in sorted(set(want) | set(got)):
            if k not in got:
                return f"{path}.{k} expected but missing"
            if k not in want:
                return f"{path}.{k} not expected (got {json.dumps(got[k])[:80]})"
            if want[k] != got[k]:
                return _diff(want[k], got[k], f"{path}.{k}")
    if isinstance(want, list) and isinstance(got, list):
        if len(want) != len(got):
            return f"{path or '.'}: {len(want)} items expected, got {len(got)}"
        for i, (a, b) in enumerate(zip(want, got, strict=True)):
            if a != b:
                return _diff(a, b, f"{path}[{i}]")
    return f"{path or '.'}: expected {json.dumps(want)[:80]}, got {json.dumps(got)[:80]}"
