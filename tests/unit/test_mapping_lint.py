"""`schoolslink mappings lint` refuses a broken mapping at load, naming the file and line, never silently."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from schoolslink.cli import main
from schoolslink.mapping.engine import MAPPINGS_DIR, load_mappings
from schoolslink.mapping.yamlnodes import MappingFileError

GOOD = """mapping: tiny
kind: template
input: a record
output: a record
template:
  name: {$path: name}
  code: {$table: tiny-table, $of: {$path: code}}
"""
TABLE = """table: tiny-table
unmapped: error
codes:
  a: A
"""


def _tree(tmp_path: Path, mapping: str = GOOD, table: str = TABLE) -> Path:
    root = tmp_path / "mappings"
    root.mkdir()
    (root / "tiny.yaml").write_text(mapping)
    (root / "tiny-table.yaml").write_text(table)
    return root


def _error(root: Path) -> MappingFileError:
    with pytest.raises(MappingFileError) as exc:
        load_mappings(root)
    return exc.value


def test_the_shipped_mappings_lint_clean(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["mappings", "lint"]) == 0
    assert "school-context-observations" in capsys.readouterr().out


def test_a_good_tree_loads(tmp_path: Path) -> None:
    ms = load_mappings(_tree(tmp_path))
    assert ms.compile("tiny").run({"name": "x", "code": "a"}) == {"name": "x", "code": "A"}


def test_unknown_key_names_file_and_line(tmp_path: Path) -> None:
    root = _tree(tmp_path, GOOD.replace("input: a record\n", "input: a record\nsauce: tomato\n"))
    e = _error(root)
    assert e.path.endswith("tiny.yaml") and e.line == 4 and "unknown key 'sauce'" in e.message


def test_unknown_expression_key(tmp_path: Path) -> None:
    root = _tree(tmp_path, GOOD.replace("{$path: name}", "{$pth: name}"))
    e = _error(root)
    assert e.line == 6 and "unknown expression key '$pth'" in e.message


def test_unknown_function_names_file_and_line(tmp_path: Path) -> None:
    root = _tree(tmp_path, GOOD.replace("{$path: name}", "{$fn: shout, $args: [{$path: name}]}"))
    e = _error(root)
    assert e.path.endswith("tiny.yaml") and e.line == 6 and "unknown function 'shout'" in e.message


def test_wrong_number_of_arguments(tmp_path: Path) -> None:
    root = _tree(tmp_path, GOOD.replace("{$path: name}", "{$fn: upper, $args: [a, b]}"))
    assert "upper takes 1-1 arguments, given 2" in _error(root).message


def test_code_table_without_unmapped_policy(tmp_path: Path) -> None:
    root = _tree(tmp_path, table=TABLE.replace("unmapped: error\n", ""))
    e = _error(root)
    assert e.path.endswith("tiny-table.yaml") and e.line == 1 and "needs 'unmapped'" in e.message


def test_unknown_table_fragment_and_variable(tmp_path: Path) -> None:
    assert "unknown code table 'nope'" in _error(_tree(tmp_path, GOOD.replace("tiny-table", "nope"))).message
    shutil.rmtree(tmp_path / "mappings")
    e = _error(_tree(tmp_path, GOOD.replace("{$path: name}", "{$fragment: nope}")))
    assert "unknown fragment 'nope'" in e.message
    shutil.rmtree(tmp_path / "mappings")
    assert "unknown variable 'nope'" in _error(_tree(tmp_path, GOOD.replace("{$path: name}", "{$var: nope}"))).message


def test_malformed_path_and_bad_yaml(tmp_path: Path) -> None:
    assert "malformed path" in _error(_tree(tmp_path, GOOD.replace("{$path: name}", "{$path: 'a..b'}"))).message
    shutil.rmtree(tmp_path / "mappings")
    e = _error(_tree(tmp_path, GOOD.replace("output: a record", "output: [a record")))
    assert "not valid YAML" in e.message and e.line > 0


def test_duplicate_key_is_refused(tmp_path: Path) -> None:
    e = _error(_tree(tmp_path, GOOD.replace("output: a record\n", "output: a record\noutput: b\n")))
    assert "duplicate key 'output'" in e.message and e.line == 5


def test_lint_command_prints_file_line_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _tree(tmp_path, GOOD.replace("{$path: name}", "{$fn: shout, $args: []}"))
    assert main(["mappings", "lint", str(root)]) == 1
    err = capsys.readouterr().err
    assert f"{root / 'tiny.yaml'}:6: unknown function 'shout'" in err


def test_every_shipped_mapping_has_golden_tests() -> None:
    ms = load_mappings(MAPPINGS_DIR)
    for m in ms.mappings.values():
        assert m.path.with_name(m.path.name.removesuffix(".yaml") + ".tests.yaml").exists(), m.name


GATED = """mapping: gated
kind: template
input: a record
output: a record
template:
  status: {$item: referral_status, $path: status}
  waiting:
    $item: days_waiting
    $when: {$eq: [{$path: status}, accepted_waiting]}
    $path: days
"""


def test_a_condition_may_not_read_an_untagged_value_in_a_mapping_that_tags_items(tmp_path: Path) -> None:
    e = _error(_tree(tmp_path, GATED))
    assert e.line == 9 and "a value a condition reads must carry its $item" in e.message


def test_a_withheld_item_cannot_leak_through_a_condition(tmp_path: Path) -> None:
    fixed = GATED.replace("{$path: status}, accepted", "{$path: status, $item: referral_status}, accepted")
    ms = load_mappings(_tree(tmp_path, fixed))
    rec = {"status": "accepted_waiting", "days": 40}
    assert ms.compile("gated").run(rec) == {"status": "accepted_waiting", "waiting": 40}
    # days_waiting allowed, the status withheld: the days are not shown, so they cannot tell the status
    out, items = ms.compile("gated", {"days_waiting"}).run_with_items(rec)
    assert out == {} and items == []


def test_misspelt_item_and_reused_names_are_refused(tmp_path: Path) -> None:
    fixed = GATED.replace("{$path: status}, accepted", "{$path: status, $item: referral_status}, accepted")
    e = _error(_tree(tmp_path, fixed.replace("$item: days_waiting", "$item: days_wating")))
    assert "$item must name a canonical data item" in e.message
    shutil.rmtree(tmp_path / "mappings")
    each = GOOD.replace("{$path: name}", "{$each: kids, $as: mapping_version, $do: {$var: mapping_version}}")
    assert "$as must be a new name" in _error(_tree(tmp_path, each)).message
    shutil.rmtree(tmp_path / "mappings")
    forward = GOOD.replace("template:", "let:\n  a: {$var: b}\n  b: {$path: name}\ntemplate:")
    assert "unknown variable 'b'" in _error(_tree(tmp_path, forward)).message
    shutil.rmtree(tmp_path / "mappings")
    assert "$exists takes a path or an expression" in _error(_tree(tmp_path, GOOD.replace(
        "name: {$path: name}", "name: {$when: {$exists: 5}, $path: name}"))).message


def test_columns_required_with_default_and_non_finite_literals(tmp_path: Path) -> None:
    cols = ("mapping: c\nkind: columns\ninput: csv\noutput: rec\ncolumns:\n"
            "  A: {target: a, required: true, default: x}\n")
    e = _error(_tree(tmp_path, cols))
    assert "cannot also have a default" in e.message and e.line == 6
    shutil.rmtree(tmp_path / "mappings")
    nan = GOOD.replace("{$path: name}", "{$path: name, $default: .nan}")
    out = load_mappings(_tree(tmp_path, nan)).compile("tiny").run({"code": "a"})
    assert out["name"] != out["name"]  # NaN, built as a constant rather than broken generated code
