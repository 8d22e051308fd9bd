"""CSV exports read through declarative layouts (connectors/mis/csv.py, mappings/mis-in/*.yaml with `layout:`).

Every file here is synthetic: names made up, UPNs from make_upn (LA 999, the DfE's test LA), ULNs from the ULN
check digit, NHS numbers from the 999 test range. The DfE sample files come from ../shared/corpora/mis.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import jsonschema
import pytest

from connectors.mis.base import MisExport
from connectors.mis.csv import CsvReader
from connectors.mis.errors import CsvRefused, FileRefused
from schoolslink.cli import main
from schoolslink.errors import ConfigurationError
from schoolslink.identifiers import make_upn, uln_check_digit
from schoolslink.mapping.engine import MAPPINGS_DIR, load_mappings
from schoolslink.mapping.yamlnodes import MappingFileError
from tests.paths import CORPORA

MTC = CORPORA / "mis" / "dfe-mtc-gpl3"
CENSUS_HEADER = ("LEA,Estab,UPN,Surname,Forename,Middlenames,Sex,DOB,NCyearActual,EnrolStatus,FSMeligible,Language,"
                 "SENProvision")


def upn(i: int) -> str:
    return make_upn(999, 1001, i)


def wrong_letter(u: str) -> str:
    """The same UPN with another check letter (still UPN-shaped)."""
    return ("A" if u[0] != "A" else "B") + u[1:]


def uln(i: int) -> str:
    n = 0
    for first9 in (f"{100000000 + k}" for k in range(1000)):
        d = uln_check_digit(first9)
        if d is None:
            continue
        if n == i:
            return f"{first9}{d}"
        n += 1
    raise AssertionError("not enough ULNs")


def write(tmp_path: Path, name: str, lines: Iterable[str], *, encoding: str = "utf-8", bom: bool = False,
          newline: str = "\r\n") -> Path:
    p = tmp_path / name
    data = newline.join(lines) + newline
    p.write_bytes((b"\xef\xbb\xbf" if bom else b"") + data.encode(encoding))
    return p


def corpus(name: str) -> Path:
    path = MTC / name
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"corpus missing in CI: {path}")
        pytest.skip(f"corpus not present: {path}")
    return path


def refused(path: Path | io.BytesIO, **kw: str) -> CsvRefused:
    with pytest.raises(CsvRefused) as exc:
        CsvReader().read(path, **kw)
    assert isinstance(exc.value, FileRefused)
    return exc.value


def reasons(export: MisExport) -> dict[str, str]:
    return {q.record: q.reason for q in export.quarantined}


def assert_value_free(export: MisExport, values: Iterable[str]) -> None:
    """No reason or warning quotes a value from the file (names, identifiers, dates)."""
    texts = [q.reason for q in export.quarantined] + [w.message for w in export.warnings]
    for v in values:
        if len(v) >= 4:
            assert not any(v in t for t in texts), v


# Each shipped layout reads a small hand-made file --------------------------------------------------------------


def test_census_layout_reads_its_export(tmp_path: Path) -> None:
    rows = [
        f"999,1001,{upn(1)},Testsurname,Alexa, ,M,04/03/2012,9,C,0,ENG,K",
        f"999,1001,{upn(2).lower()} ,Testsurname,Bobbi,James,f,15/11/2011,9,,1,ENG,",
        f"999,1001,{wrong_letter(upn(3))},Testsurname,Cyril,,F,01/01/2012,9,C,0,ENG,N",
        f"999,1001,{upn(1)},Othername,Dilys,,F,02/02/2012,9,C,0,ENG,N",
        f"999,1001,{upn(4)},Othername,Ellis,,x,03/03/2012,9,C,0,ENG,N",
    ]
    export = CsvReader().read(write(tmp_path, "census.csv", [CENSUS_HEADER, *rows]), school_urn="900001")
    assert (export.format, export.version, export.qualifier, export.school_urn) == ("csv:census", None, "full",
                                                                                    "900001")
    assert export.records == 5
    assert [(lr.upn, lr.forename, lr.sex, lr.dob, lr.sen_provision, lr.school_urn) for lr in export.learners] == [
        (upn(1), "Alexa", "M", dt.date(2012, 3, 4), "K", "900001"),
        (upn(2), "Bobbi", "F", dt.date(2011, 11, 15), "N", "900001"),  # lower-case UPN and sex read as stated
    ]
    assert reasons(export) == {
        "row#4": "UPN check letter is wrong (row#4)",
        "row#5": "duplicate UPN: the same UPN as row#2 (row#5)",
        "row#6": "Sex is not a sex code this layout reads (row#6)",
    }
    assert [q.field for q in export.quarantined] == ["UPN", "UPN", "Sex"]
    assert_value_free(export, [upn(1), upn(3), wrong_letter(upn(3)), "Othername", "Dilys", "02/02/2012"])


LAYOUT_FILES = {
    "sims": [
        "Adno,UPN,Legal Surname,Legal Forename,Preferred Forename,Gender,DOB,Year,Reg,SEN Status,In Care,NHS Number",
        f"001001,{upn(10)},Testsurname,Alexa,Lex,M,04/03/2012,Year 9,9AB,K - SEN Support,No,999 000 0018",
        f"001002,{upn(11)},Testsurname,Bobbi,,Female,15/11/2011,Year 9,9AB,N - No Special Educational Need,Yes,",
    ],
    "arbor": [
        "UPN,Legal first name,Legal last name,Preferred first name,Date of birth,Gender,Year group,Postcode",
        f"{upn(10)},Alexa,Testsurname,Lex,2012-03-04,Male,Year 9,ab1 2cd",
        f"{upn(11)},Bobbi,Testsurname,,15/11/2011,Female,Year 9,",
    ],
    "bromcom": [
        "Admission Number,UPN,Last Name,First Name,Gender,Date of Birth,Year Group,Tutor Group",
        f"001001,{upn(10)},Testsurname,Alexa,Male,04/03/2012,9,9B",
        f"001002,{upn(11)},Testsurname,Bobbi,Female,15/11/2011,9,9B",
    ],
    "fe-college": [
        "Student Ref,ULN,UPN,Surname,Forenames,Date of Birth,Sex,Postcode",
        f"S001,{uln(0)},{upn(10)},Testsurname,Alexa,04/03/2012,M,AB1 2CD",
        f"S002,{uln(1)},,Testsurname,Bobbi Jo,15/11/2011,F,",
    ],
    "mtc": [
        "Surname,Forename,Middle name(s),Date of birth,Sex,UPN",
        f"Testsurname,Alexa,,04/03/2012,m,{upn(10)}",
        f"Testsurname,Bobbi,,15/11/2011,F,{upn(11)}",
    ],
}


@pytest.mark.parametrize("layout", sorted(LAYOUT_FILES))
def test_each_shipped_layout_reads_a_hand_made_export(tmp_path: Path, layout: str) -> None:
    export = CsvReader().read(write(tmp_path, f"{layout}.csv", LAYOUT_FILES[layout]), school_urn="900002")
    assert export.format == f"csv:{layout}" and export.version is None
    assert export.qualifier == ("partial" if layout == "mtc" else "full")
    assert export.quarantined == [] and export.records == 2
    a, b = export.learners
    assert (a.surname, a.forename, a.dob, a.sex) == ("Testsurname", "Alexa", dt.date(2012, 3, 4), "M")
    assert (b.forename.split()[0], b.dob, b.sex) == ("Bobbi", dt.date(2011, 11, 15), "F")
    assert {a.school_urn, b.school_urn} == {"900002"}
    if layout == "fe-college":
        assert (a.uln, a.upn, b.uln, b.upn) == (uln(0), upn(10), uln(1), "")
        assert b.forename == "Bobbi Jo"
    else:
        assert (a.upn, b.upn) == (upn(10), upn(11))
    assert len(export.source_ids) == 2
    if layout in ("sims", "bromcom"):
        assert export.source_ids == ["001001", "001002"] and a.year_group == "9"
    if layout == "sims":
        assert (a.preferred_forename, a.sen_provision, a.nhs_number) == ("Lex", "K", "9990000018")
        assert (a.flags.looked_after, b.flags.looked_after, b.sen_provision) == (False, True, "N")
    if layout == "arbor":
        assert a.postcode == "AB1 2CD" and a.year_group == "9"


def test_every_shipped_layout_is_exercised_here() -> None:
    names = {lay.name for lay in CsvReader().layouts()}
    assert names >= {"census", "sims", "arbor", "bromcom", "fe-college", "mtc"}
    assert names - {"census"} <= set(LAYOUT_FILES) | {n for n in names if n.startswith("wonde")}


# The DfE sample files --------------------------------------------------------------------------------------------


def test_census_corpus_file() -> None:
    export = CsvReader().read(corpus("pupil-census-data.csv"))
    assert export.format == "csv:census" and export.records == 79
    assert len(export.learners) + len(export.quarantined) == 79
    got = reasons(export)
    # 15 UPNs fail their check letter (file lines 2-14, 39 and 78, as the corpus README says)
    wrong = {r for r, why in got.items() if "UPN check letter is wrong" in why}
    assert wrong == {f"row#{n}" for n in [*range(2, 15), 39, 78]}
    # 43 dates of birth written M/D/YY: refused, never guessed
    assert sum("DOB: a date is not a real date in the expected form" in why for why in got.values()) == 43
    assert all(lr.upn and lr.dob.year in (2004, 2005, 2006) for lr in export.learners)
    assert {lr.sen_provision for lr in export.learners} <= {"N", "K", "E", "S"}
    assert export.school_urn is None and {lr.school_urn for lr in export.learners} == {""}
    text = corpus("pupil-census-data.csv").read_text()
    cells = {c for line in text.splitlines()[1:] for c in line.split(",")}
    assert_value_free(export, cells - {"999", "1001"})


def test_census_corpus_empty_sex_is_held_back_naming_the_column() -> None:
    export = CsvReader().read(corpus("pupilCensusDataEmptyGender.csv"))
    q = export.quarantined[0]
    assert q.record == "row#2" and "Sex is missing" in q.reason


def test_mtc_duplicate_upn_and_mixed_case_sex() -> None:
    export = CsvReader().read(corpus("multiple_pupils_duplicate_upn.csv"))
    assert export.format == "csv:mtc" and export.qualifier == "partial"
    assert [lr.sex for lr in export.learners] == ["F", "F"]  # 'f' in the file
    assert reasons(export) == {"row#3": "duplicate UPN: the same UPN as row#2 (row#3)"}
    assert export.quarantined[0].field == "UPN"


def test_mtc_wrong_check_letter() -> None:
    export = CsvReader().read(corpus("multiple_pupils_wrong_check_letter.csv"))
    assert len(export.learners) == 2 and [lr.sex for lr in export.learners] == ["F", "F"]
    why = reasons(export)["row#3"]
    assert why.startswith("UPN is not a UPN") and "0381021010022" not in why


# Sex and Gender ---------------------------------------------------------------------------------------------


def test_sex_or_gender_in_a_census_export(tmp_path: Path) -> None:
    both = write(tmp_path, "both.csv", [
        "UPN,Surname,Forename,Sex,Gender,DOB",
        f"{upn(20)},Testsurname,Alexa,,m,04/03/2012",  # no Sex: Gender read
        f"{upn(21)},Testsurname,Bobbi,F,M,04/03/2012",  # both: Sex wins
        f"{upn(22)},Testsurname,Cyril,,,04/03/2012",  # neither
    ])
    export = CsvReader().read(both)
    assert [lr.sex for lr in export.learners] == ["M", "F"]
    assert reasons(export) == {"row#4": "Sex is missing (row#4)"}
    gender_only = write(tmp_path, "gender.csv", ["UPN,Surname,Forename,Gender,DOB",
                                                 f"{upn(23)},Testsurname,Dilys,F,04/03/2012"])
    assert [lr.sex for lr in CsvReader().read(gender_only).learners] == ["F"]
    neither = write(tmp_path, "neither.csv", ["UPN,Surname,Forename,DOB", f"{upn(24)},Testsurname,Ellis,04/03/2012"])
    assert refused(neither).reason == "the header row has no Sex column, which the census layout requires"


# Onboarding a new layout: one YAML file, no Python ---------------------------------------------------------

SCHOLARPACK = """mapping: scholarpack-pupils
description: >
  A made-up ScholarPack-style pupil export, for the onboarding test only: semicolons, Windows-1252, a school URN
  column and ISO dates.
kind: columns
input: pupil export (CSV)
output: canonical learner
layout:
  name: scholarpack
  detect: [Pupil UPN, Family Name, Given Name, Birth Date]
  key: upn
  qualifier: full
  delimiter: ";"
  encoding: cp1252
  source_id: Pupil ID
columns:
  Pupil UPN: {target: upn, fn: upper, required: true}
  Family Name: {target: surname, fn: trim, required: true}
  Given Name: {target: forename, fn: trim, required: true}
  Birth Date: {target: dob, fn: date_dmy_or_iso, required: true}
  Sex: {target: sex, fn: upper, table: mis-sex-words, required: true}
  School URN: {target: school_urn, fn: trim}
  Looked After: {target: flags.looked_after, fn: bool}
"""
SCHOLARPACK_TESTS = """tests:
- name: a pupil
  given: {Pupil UPN: b801200005001, Family Name: Testsurname, Given Name: Zoe, Birth Date: '2012-03-04', Sex: F}
  expect: {upn: B801200005001, surname: Testsurname, forename: Zoe, dob: '2012-03-04', sex: F}
"""


def onboarded(tmp_path: Path, extra: dict[str, str] | None = None) -> Path:
    root = tmp_path / "mappings"
    shutil.copytree(MAPPINGS_DIR, root)
    (root / "mis-in" / "scholarpack-pupils.yaml").write_text(SCHOLARPACK)
    (root / "mis-in" / "scholarpack-pupils.tests.yaml").write_text(SCHOLARPACK_TESTS)
    for name, text in (extra or {}).items():
        (root / "mis-in" / name).write_text(text)
    return root


def scholarpack_file(tmp_path: Path, rows: list[str]) -> Path:
    return write(tmp_path, "scholarpack.csv", ["Pupil ID;Pupil UPN;Family Name;Given Name;Birth Date;Sex;School URN;"
                                               "Looked After", *rows], encoding="cp1252")


def test_onboarding_a_new_layout_is_one_yaml_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = onboarded(tmp_path)
    assert main(["mappings", "lint", str(root)]) == 0
    assert main(["mappings", "test", str(root)]) == 0
    capsys.readouterr()
    path = scholarpack_file(tmp_path, [
        f"P1;{upn(30)};Testsurname;Zoë;2012-03-04;F;900003;N",  # ë in Windows-1252: not UTF-8
        f"P2;{upn(31)};Testsurname;Ævar;04/03/2012;Male;;Y",
    ])
    export = CsvReader(mappings=load_mappings(root)).read(path, school_urn="900003")
    assert export.format == "csv:scholarpack" and export.quarantined == []
    assert [(lr.forename, lr.sex, lr.flags.looked_after, lr.school_urn) for lr in export.learners] == [
        ("Zoë", "F", False, "900003"), ("Ævar", "M", True, "900003")]
    assert export.source_ids == ["P1", "P2"]
    # the shipped mappings do not know the layout
    assert "matches no CSV layout" in refused(path).reason


def test_a_school_urn_column_is_checked_against_the_landing_folder(tmp_path: Path) -> None:
    ms = load_mappings(onboarded(tmp_path))
    other = scholarpack_file(tmp_path, [f"P1;{upn(30)};Testsurname;Ann;2012-03-04;F;900004;N"])
    with pytest.raises(CsvRefused) as exc:
        CsvReader(mappings=ms).read(other, school_urn="900003")
    assert "another school's export" in exc.value.reason and exc.value.format == "csv:scholarpack"
    # without a landing school: the file's own URN, and two URNs refuse it
    mixed = scholarpack_file(tmp_path, [f"P1;{upn(30)};Testsurname;Ann;2012-03-04;F;;N",
                                        f"P2;{upn(31)};Testsurname;Bea;2012-03-04;F;900004;N",
                                        f"P3;{upn(32)};Testsurname;Cat;2012-03-04;F;12345;N"])
    export = CsvReader(mappings=ms).read(mixed)
    assert export.school_urn == "900004" and [lr.school_urn for lr in export.learners] == ["900004", "900004"]
    assert reasons(export) == {"row#4": "School URN is not a 6-digit URN (row#4)"}
    two = scholarpack_file(tmp_path, [f"P1;{upn(30)};Testsurname;Ann;2012-03-04;F;900004;N",
                                      f"P2;{upn(31)};Testsurname;Bea;2012-03-04;F;900005;N"])
    with pytest.raises(CsvRefused) as exc:
        CsvReader(mappings=ms).read(two)
    assert "more than one school URN (row#2 and row#3)" in exc.value.reason


def test_a_layout_can_be_named_instead_of_detected(tmp_path: Path) -> None:
    path = write(tmp_path, "c.csv", ["UPN,Surname,Forename,Sex,DOB", f"{upn(40)},Testsurname,Ann,F,04/03/2012"])
    assert CsvReader().read(path, layout="census").format == "csv:census"
    e = refused(path, layout="sims")
    assert e.reason.startswith("the header row lacks columns the sims layout needs: Adno") and e.format == "csv:sims"


def test_an_unknown_layout_name_is_a_configuration_error(tmp_path: Path) -> None:
    path = write(tmp_path, "c.csv", ["UPN,Surname,Forename,Sex,DOB", f"{upn(40)},Testsurname,Ann,F,04/03/2012"])
    with pytest.raises(ConfigurationError, match="no CSV layout named 'nope'"):
        CsvReader().read(path, layout="nope")
    with pytest.raises(ValueError, match="6-digit URN"):
        CsvReader().read(path, school_urn="12")


def test_mis_check_reads_csv_layouts_with_the_cli_contract(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    sims = write(tmp_path, "sims.csv", [*LAYOUT_FILES["sims"], f"001003,{wrong_letter(upn(12))},Testsurname,Cyril,,M,"
                                        "01/01/2012,Year 9,9AB,,No,"])
    junk = tmp_path / "junk.csv"
    junk.write_bytes(b"PK\x03\x04\x00\x00")
    unknown = write(tmp_path, "unknown.csv", ["Name,Birthday", "Secretname,01/01/2012"])
    assert main(["mis", "check", str(sims), str(junk), str(unknown), "--json"]) == 1
    files = {f["path"]: f for f in json.loads(capsys.readouterr().out)["files"]}
    ok = files[str(sims)]
    assert set(ok) == {"path", "status", "reason", "format", "version", "pupils", "quarantined"}
    assert (ok["status"], ok["format"], ok["version"], ok["pupils"]) == ("accepted", "csv:sims", None, 2)
    assert ok["quarantined"] == [{"record": "row#4", "reason": "UPN check letter is wrong (row#4)"}]
    assert files[str(junk)]["status"] == "rejected" and files[str(junk)]["format"] == "csv"
    bad = files[str(unknown)]
    assert bad["status"] == "rejected" and "matches no CSV layout" in bad["reason"]
    assert "Secretname" not in bad["reason"]
    assert main(["mis", "check", str(sims)]) == 0
    assert "accepted" in capsys.readouterr().out


# Which layout -------------------------------------------------------------------------------------------------


def test_a_header_matching_no_layout_is_refused_naming_layouts_not_cells(tmp_path: Path) -> None:
    # no header row at all: the first line is a pupil's
    path = write(tmp_path, "nohead.csv", [f"{upn(50)},Secretname,Hiddenforename,F,04/03/2012"])
    e = refused(path)
    assert "matches no CSV layout" in e.reason and "census lacks UPN" in e.reason and "sims lacks" in e.reason
    for value in (upn(50), "Secretname", "Hiddenforename", "04/03/2012"):
        assert value not in e.reason
    assert e.format == "csv"


def test_two_equally_specific_layouts_refuse_the_file_as_ambiguous(tmp_path: Path) -> None:
    def layout(name: str, extra: str) -> str:
        return (f"mapping: {name}\nkind: columns\ninput: csv\noutput: canonical learner\n"
                f"layout: {{name: {name}, detect: [UPN, Surname, Forename, DOB, {extra}], key: upn, "
                "qualifier: full}\ncolumns:\n  UPN: upn\n  Surname: surname\n  Forename: forename\n"
                "  DOB: {target: dob, fn: date_dmy}\n  Sex: {target: sex, table: ctf-sex}\n")

    root = onboarded(tmp_path, {"dup-a.yaml": layout("dup-a", "Sex"), "dup-b.yaml": layout("dup-b", "NCyearActual")})
    path = write(tmp_path, "c.csv", [CENSUS_HEADER, f"999,1001,{upn(1)},Testsurname,Ann,,F,04/03/2012,9,C,0,ENG,N"])
    with pytest.raises(CsvRefused) as exc:
        CsvReader(mappings=load_mappings(root)).read(path)
    assert "more than one CSV layout equally well (dup-a, dup-b)" in exc.value.reason
    # the more specific layout wins over census (4 detect headings) when only one of them fits
    (root / "mis-in" / "dup-b.yaml").unlink()
    assert CsvReader(mappings=load_mappings(root)).read(path).format == "csv:dup-a"


# Whole-file refusals -----------------------------------------------------------------------------------------


def test_truncated_file_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "cut.csv"
    p.write_bytes(f'UPN,Surname,Forename,Sex,DOB\r\n{upn(1)},Testsurname,Ann,F,04/03/2012\r\n'
                  f'{upn(2)},"Tests'.encode())
    e = refused(p)
    assert e.reason == "file is truncated: it ends inside a quoted value (the row starting on line 3)"
    assert e.format == "csv:census"


def test_binary_files_are_refused(tmp_path: Path) -> None:
    for name, data, expect in [
        ("empty.csv", b"", "file is empty"),
        ("blank.csv", b"\xef\xbb\xbf \r\n", "file is empty"),
        ("book.xlsx", b"PK\x03\x04\x14\x00\x06\x00" + b"\x00" * 50, "ZIP archive"),
        ("old.xls", b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\x00" * 50, "Excel 97-2003"),
        ("nul.csv", b"UPN,Surname\x00,Forename\n", "NUL bytes"),
        ("utf16.csv", "UPN,Surname\n".encode("utf-16"), "UTF-16"),
    ]:
        p = tmp_path / name
        p.write_bytes(data)
        assert expect in refused(p).reason, name
    later = tmp_path / "later.csv"  # a NUL past the first 64 KiB, found while streaming
    rows = [f"{upn(i)},Testsurname,Ann,F,04/03/2012" for i in range(1, 2001)]
    later.write_bytes("\n".join(["UPN,Surname,Forename,Sex,DOB", *rows, "x,\x00,y"]).encode())
    assert refused(later).reason == "file has NUL bytes (line 2002): it is a binary file, not CSV text"


def test_utf8_with_bom_and_non_utf8_bytes(tmp_path: Path) -> None:
    lines = ["UPN,Surname,Forename,Sex,DOB", f"{upn(1)},Testsurnamé,Zoë,F,04/03/2012"]
    export = CsvReader().read(write(tmp_path, "bom.csv", lines, bom=True))
    assert export.format == "csv:census" and export.learners[0].forename == "Zoë"
    assert export.learners[0].surname == "Testsurnamé"
    e = refused(write(tmp_path, "ansi.csv", lines, encoding="cp1252"))
    assert e.reason.startswith("file has bytes that are not UTF-8 text") and "encoding: cp1252" in e.reason
    assert "Zo" not in e.reason


def test_header_only_exports(tmp_path: Path) -> None:
    full = write(tmp_path, "full.csv", ["UPN,Surname,Forename,Sex,DOB", ",,,,"])
    assert "no learner rows" in refused(full).reason  # an empty whole roll would mark everyone as left
    partial = write(tmp_path, "partial.csv", ["Surname,Forename,Middle name(s),Date of birth,Sex,UPN"])
    export = CsvReader().read(partial)
    assert export.format == "csv:mtc" and export.learners == [] and export.records == 0


def test_rows_with_more_cells_than_the_header(tmp_path: Path) -> None:
    header = "UPN,Surname,Forename,Sex,DOB"
    ok = [f"{upn(i)},Testsurname,Ann,F,04/03/2012" for i in range(1, 4)]
    one = write(tmp_path, "one.csv", [header, *ok, f"{upn(9)},Testsurname, Jr,Ann,F,04/03/2012",
                                      f"{upn(8)},Testsurname,Bea,F,04/03/2012,,"])  # trailing empty cells: fine
    export = CsvReader().read(one)
    assert len(export.learners) == 4
    assert reasons(export) == {"row#5": "the row has more cells than the header row has columns (a value may hold "
                                         "an unquoted delimiter) (row#5)"}
    most = write(tmp_path, "most.csv", [header, ok[0], *(f"{upn(i)},A,B,C,F,04/03/2012" for i in range(10, 13))])
    assert "3 of 4 rows have more cells than the header row" in refused(most).reason


def test_a_header_naming_a_column_twice_or_a_badly_quoted_value(tmp_path: Path) -> None:
    twice = write(tmp_path, "twice.csv", ["UPN,Surname,Forename,Sex,DOB,surname", f"{upn(1)},A,B,F,04/03/2012,C"])
    assert refused(twice).reason == "the header row names the column Surname twice"
    bad = write(tmp_path, "bad.csv", ["UPN,Surname,Forename,Sex,DOB", f'{upn(1)},"Test"x,Ann,F,04/03/2012'])
    assert refused(bad).reason == "file is not well-formed CSV: a quote is out of place (line 2)"


def test_row_numbers_are_file_lines_even_with_quoted_line_breaks(tmp_path: Path) -> None:
    path = write(tmp_path, "multi.csv", [
        "UPN,Surname,Forename,Sex,DOB",
        f'{upn(1)},"Testsurname\r\nsecond line",Ann,F,04/03/2012',
        "",
        f"{wrong_letter(upn(2))},Testsurname,Bea,F,04/03/2012",
    ])
    export = CsvReader().read(path)
    assert len(export.learners) == 1 and export.records == 2
    assert [q.record for q in export.quarantined] == ["row#5"]


def test_a_stream_is_read_from_its_start() -> None:
    data = f"UPN,Surname,Forename,Sex,DOB\n{upn(1)},Testsurname,Ann,F,04/03/2012\n".encode()
    stream = io.BytesIO(data)
    stream.seek(10)
    export = CsvReader().read(stream, school_urn="900001")
    assert [lr.upn for lr in export.learners] == [upn(1)] and not stream.closed


# FE: keyed by ULN ----------------------------------------------------------------------------------------------


def test_fe_layout_keys_learners_by_uln(tmp_path: Path) -> None:
    bad_check = uln(3)[:9] + str((int(uln(3)[9]) + 1) % 10)
    path = write(tmp_path, "fe.csv", [
        "Student Ref,ULN,UPN,Surname,Forenames,Date of Birth,Sex,NHS Number",
        f"S1,{uln(0)},,Testsurname,Ann,04/03/2006,F,",  # no UPN: a college learner
        f"S2,{uln(1)},{wrong_letter(upn(60))},Testsurname,Bea,04/03/2006,F,9990000017",  # UPN and NHS no. dropped
        f"S3,,{upn(61)},Testsurname,Cat,04/03/2006,F,",  # no ULN
        f"S4,{bad_check},,Testsurname,Dee,04/03/2006,F,",  # ULN check digit wrong
        "S5,12345,,Testsurname,Eve,04/03/2006,F,",  # not a ULN
        f"S6,{uln(0)},,Testsurname,Fay,04/03/2006,F,",  # the same ULN as S1
        f"S7,{uln(2)},{upn(62)},Testsurname,Gus,2006-03-04,m,9990000018",
    ])
    export = CsvReader().read(path, school_urn="100001")
    assert export.format == "csv:fe-college"
    assert [(lr.forename, lr.uln, lr.upn, lr.nhs_number) for lr in export.learners] == [
        ("Ann", uln(0), "", None), ("Bea", uln(1), "", None), ("Gus", uln(2), upn(62), "9990000018")]
    assert export.source_ids == ["S1", "S2", "S7"]
    assert reasons(export) == {
        "row#4": "ULN is missing (row#4)",
        "row#5": "ULN check digit is wrong (row#5)",
        "row#6": "ULN is not a ULN (10 digits, the first not 0) (row#6)",
        "row#7": "duplicate ULN: the same ULN as row#2 (row#7)",
    }
    assert {(w.record, w.field) for w in export.warnings} == {("row#3", "UPN"), ("row#3", "NHS Number")}
    assert_value_free(export, [uln(0), uln(1), bad_check, wrong_letter(upn(60)), "9990000017"])


# Lint: the layout block is checked when the file loads -------------------------------------------------------

BASE = """mapping: lay
kind: columns
input: csv
output: canonical learner
layout:
  name: lay
  detect: [UPN, Surname]
  key: upn
  qualifier: full
columns:
  UPN: upn
  Surname: surname
  Forename: forename
  DOB: {target: dob, fn: date_dmy}
  Sex: sex
"""


def lint_error(tmp_path: Path, text: str, name: str = "lay.yaml") -> MappingFileError:
    root = tmp_path / "m"
    if root.exists():
        shutil.rmtree(root)
    root.mkdir()
    (root / name).write_text(text)
    with pytest.raises(MappingFileError) as exc:
        load_mappings(root)
    return exc.value


@pytest.mark.parametrize(("change", "line", "message"), [
    (("  qualifier: full\n", "  qualifier: full\n  sauce: tomato\n"), 10, "unknown key 'sauce' in layout"),
    (("key: upn", "key: nhs"), 8, "key must be one of upn, uln"),
    (("qualifier: full", "qualifier: some"), 9, "qualifier must be full"),
    (("detect: [UPN, Surname]", "detect: []"), 7, "detect lists the header columns"),
    (("detect: [UPN, Surname]", "detect: [UPN, upn]"), 7, "detect names the column 'upn' twice"),
    (("  qualifier: full\n", "  qualifier: full\n  delimiter: ':'\n"), 10, "delimiter must be one of"),
    (("  qualifier: full\n", "  qualifier: full\n  encoding: latin-1\n"), 10, "encoding must be one of"),
    (("name: lay\n  detect", "name: Lay Out\n  detect"), 6, "layout name is lower-case"),
    (("  Sex: sex\n", "  Sex: sex\n  House: house\n"), 16, "target 'house' is not a learner field"),
    (("  Sex: sex\n", ""), 6, "this layout's columns must fill sex"),
    (("  Sex: sex\n", "  Sex: {target: sex, fallback: [surname]}\n"), 15, "the heading 'surname' is already read"),
    (("kind: columns", "kind: template\ntemplate: {a: 1}"), 6, "layout: describes a CSV export"),
])
def test_layout_mistakes_are_refused_with_file_and_line(tmp_path: Path, change: tuple[str, str], line: int,
                                                        message: str) -> None:
    old, new = change
    assert old in BASE
    text = BASE.replace(old, new)
    if "kind: template" in text:
        text = text[: text.index("columns:")]
    e = lint_error(tmp_path, text)
    assert e.path.endswith("lay.yaml") and message in e.message and e.line == line, (e.line, e.message)


def test_two_layouts_with_one_name_or_the_same_detect_headings(tmp_path: Path) -> None:
    root = tmp_path / "m"
    root.mkdir()
    (root / "a.yaml").write_text(BASE)
    (root / "b.yaml").write_text(BASE.replace("mapping: lay", "mapping: other"))
    with pytest.raises(MappingFileError) as exc:
        load_mappings(root)
    assert "layout 'lay' is also defined in" in exc.value.message
    (root / "b.yaml").write_text(BASE.replace("mapping: lay", "mapping: other").replace("name: lay", "name: b")
                                 .replace("[UPN, Surname]", "[surname, upn]"))
    with pytest.raises(MappingFileError) as exc:
        load_mappings(root)
    assert "detects on the same headings as layout 'lay'" in exc.value.message and exc.value.line == 6


def test_the_schema_describes_the_layout_block() -> None:
    schema = json.loads((MAPPINGS_DIR / "schema" / "mapping-file.schema.json").read_text())
    import yaml

    good = yaml.safe_load(BASE)
    jsonschema.validate(good, schema)
    for bad in ({**good, "layout": {**good["layout"], "sauce": 1}}, {**good, "layout": {"name": "x"}},
                {**good, "layout": {**good["layout"], "key": "nhs"}}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
