"""The CTF reader's two layers: the parser's element values and the declarative ctf-learner mapping."""

from __future__ import annotations

import dataclasses
import shutil
import tracemalloc
from datetime import date
from pathlib import Path

import pytest
from lxml import etree

from connectors.mis.ctf import REPEATED_ELEMENTS, CtfReader, Quarantined, element_values
from schoolslink.errors import ConfigurationError
from schoolslink.identifiers import make_upn
from schoolslink.mapping.engine import MAPPINGS_DIR, load_mappings
from schoolslink.model import Learner
from tests.unit.test_ctf_reader import UPN1, UPN2, ctf, pupil, write

# What the ctf-learner mapping needs, copied alone so a test can change it (and no other file can break it).
NEEDED = ["mis-in/ctf-learner.yaml", "code-tables/ctf-sex-codes.yaml", "code-tables/ctf-sex.yaml",
          "code-tables/ctf-sen-provision.yaml", "code-tables/ctf-ethnicity.yaml"]


def mappings_copy(tmp_path: Path, edit: dict[str, str] | None = None) -> Path:
    """The mapping files in a folder of their own; `edit` replaces text in ctf-learner.yaml (old: new)."""
    root = tmp_path / "mappings"
    for rel in NEEDED:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(MAPPINGS_DIR / rel, root / rel)
    path = root / "mis-in" / "ctf-learner.yaml"
    text = path.read_text()
    for old, new in (edit or {}).items():
        assert old in text, old
        text = text.replace(old, new)
    path.write_text(text)
    return root


def reader(tmp_path: Path, edit: dict[str, str] | None = None) -> CtfReader:
    return CtfReader(mappings=load_mappings(mappings_copy(tmp_path, edit)))


# Layer 1: element values ------------------------------------------------------------------------------------


def test_element_values_is_a_plain_nested_dict() -> None:
    el = etree.fromstring(
        "<Pupil id='7'><UPN> b801200005001 </UPN><Surname/><FormerUPN>A</FormerUPN>"
        "<BasicDetails><Ethnicity>WBRI</Ethnicity></BasicDetails>"
        "<SENhistory><SEN><SENprovision>K</SENprovision></SEN></SENhistory>"
        "<Contacts><Contact><Phones><Phone><PhoneNo>1</PhoneNo></Phone></Phones></Contact></Contacts>"
        "<Notes><Note>x</Note><Note>y</Note></Notes><Attendance>\n  </Attendance></Pupil>",
        etree.XMLParser(remove_blank_text=True),
    )
    assert element_values(el) == {
        "UPN": "b801200005001",  # text as stated, outer white space removed
        "Surname": "",
        "FormerUPN": ["A"],  # a repeatable element is a list even when there is one
        "BasicDetails": {"Ethnicity": "WBRI"},
        "SENhistory": {"SEN": [{"SENprovision": "K"}]},
        "Contacts": {"Contact": [{"Phones": {"Phone": [{"PhoneNo": "1"}]}}]},
        "Notes": {"Note": "y"},  # any other element: the last of the same name wins
        "Attendance": "",
    }
    assert {"FormerUPN", "SEN", "Contact", "Phone", "YearData", "Exclusion"} == REPEATED_ELEMENTS


# Layer 2: the reader's learners are the mapping's output ----------------------------------------------------


def test_the_reader_gives_what_the_mapping_gives(tmp_path: Path) -> None:
    result = CtfReader().read(write(tmp_path, ctf(pupil())))
    learner = result.learners[0]
    root = etree.fromstring(ctf(pupil()).encode(), etree.XMLParser(remove_blank_text=True))
    values = element_values(root.find("CTFpupilData/Pupil"))
    context = {"school_urn": "900001", "ctf_version": "25.0", "ctf_major": "25", "file_date": "2026-11-25"}
    mapped = load_mappings().compile("ctf-learner").run(values, context)
    as_mapped = {f.name: getattr(learner, f.name) for f in dataclasses.fields(Learner)}
    as_mapped["dob"] = learner.dob.isoformat()
    as_mapped["flags"] = {"looked_after": learner.flags.looked_after, "adopted": learner.flags.adopted}
    # The mapping leaves out what is empty; the learner has its defaults there.
    assert {k: v for k, v in as_mapped.items() if k in mapped} == mapped
    assert {k for k in as_mapped if k not in mapped} == {"former_upns", "leaving_date", "nhs_number_status"}


def test_a_mapping_change_needs_no_python(tmp_path: Path) -> None:
    r = reader(tmp_path, {
        "ethnicity: {$fn: text, $args: [{$path: BasicDetails.Ethnicity}]}":
            "ethnicity: {$table: ctf-ethnicity, $of: {$path: BasicDetails.Ethnicity}}",
        "preferred_forename: {$fn: text, $args: [{$path: PreferredForename}]}":
            "preferred_forename: {$path: Forename}",
        # a run variable from the Header, declared under let: as itself
        "  bs7666: {$path": "  ctf_version: {$var: ctf_version}\n  bs7666: {$path",
        "year_group: {$fn: text, $args: [{$path: BasicDetails.NCyearActual}]}": "year_group: {$var: ctf_version}",
    })
    learner = r.read(write(tmp_path, ctf(pupil()))).learners[0]
    assert (learner.ethnicity, learner.preferred_forename, learner.year_group) == ("A", "Alex", "25.0")


def test_a_mapping_error_quarantines_the_record_by_position(tmp_path: Path) -> None:
    r = reader(tmp_path, {"year_group: {$fn: text, $args: [{$path: BasicDetails.NCyearActual}]}":
                          "year_group: {$fn: date_ymd, $args: [{$path: BasicDetails.NCyearActual}]}"})
    result = r.read(write(tmp_path, ctf(pupil(), pupil(UPN2, sex="<Sex>Q</Sex>"))))
    assert result.learners == []
    assert result.quarantined == [
        Quarantined("pupil#1", "mapping",
                    "the ctf-learner mapping could not map it: a date is not a real date in the expected form "
                    "(pupil #1)"),
        # Sex is looked up first: an unknown code is reported as ever, whatever fails after it.
        Quarantined("pupil#2", "Sex", "Sex is not one of M, F or U (pupil #2)"),
    ]


def test_an_unlisted_code_in_another_quarantine_table_holds_the_record_back(tmp_path: Path) -> None:
    r = reader(tmp_path, {"    $fn: upper\n    $args: [{$fn: latest_by,":
                          "    $table: ctf-sen-provision\n    $of: {$fn: latest_by,",
                          "StartDate, SENprovision]}]\n": "StartDate, SENprovision]}\n"})
    sen = "<SEN><StartDate>2024-09-01</StartDate><SENprovision>Z</SENprovision></SEN>"
    result = r.read(write(tmp_path, ctf(pupil(), pupil(UPN2, sen=sen))))
    assert [lr.sen_provision for lr in result.learners] == ["SEN support"]
    assert result.quarantined == [Quarantined(
        "pupil#2", "mapping",
        "the ctf-learner mapping held it back: code table ctf-sen-provision has no entry for the code given "
        "(pupil #2)")]


@pytest.mark.parametrize(("edit", "message"), [
    ({"  exclusions_permanent:": "  shoe_size: {$const: 9}\n  exclusions_permanent:"}, "not Learner fields: shoe_size"),
    ({"    adopted: {$fn": "    fostered: {$const: true}\n    adopted: {$fn"}, "not Learner fields: flags.fostered"),
    ({"  dob: {$fn: date_ymd, $args: [{$path: DOB}]}\n": ""}, "missing: dob"),
])
def test_a_mapping_that_cannot_make_a_learner_is_refused_before_any_file(
        tmp_path: Path, edit: dict[str, str], message: str) -> None:
    r = reader(tmp_path, edit)
    with pytest.raises(ConfigurationError, match=message):
        r.read(write(tmp_path, ctf(pupil())))


def test_a_mapping_that_gives_no_value_for_a_required_field_quarantines(tmp_path: Path) -> None:
    r = reader(tmp_path, {"  dob: {$fn: date_ymd, $args: [{$path: DOB}]}": "  dob: {$path: DateOfBirth}"})
    result = r.read(write(tmp_path, ctf(pupil())))
    assert result.quarantined == [Quarantined("pupil#1", "mapping", "the ctf-learner mapping gave no dob (pupil #1)")]


def test_ctf_files_never_carry_numeric_sex_codes_though_census_exports_may(tmp_path: Path) -> None:
    ms = load_mappings()
    assert ms.tables["ctf-sex"].lookup("2") == "F"  # census-style CSV exports
    result = CtfReader().read(write(tmp_path, ctf(pupil(sex="<Sex>2</Sex>"), pupil(UPN2, sex="<Sex>o</Sex>"))))
    assert result.quarantined == [Quarantined("pupil#1", "Sex", "Sex is not one of M, F or U (pupil #1)")]
    assert [(lr.upn, lr.sex, lr.dob) for lr in result.learners] == [(UPN2, "U", date(2012, 3, 4))]
    assert UPN1 not in result.quarantined[0].reason


# Memory -------------------------------------------------------------------------------------------------------


def _peak_while_streaming(path: Path) -> int:
    tracemalloc.start()
    try:
        for _item in CtfReader().iter_learners(path):
            pass
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_does_not_grow_with_the_file(tmp_path: Path) -> None:
    small = write(tmp_path, ctf(*(pupil(make_upn(999, 1001, i), nhs="") for i in range(500))), "small.xml")
    large = write(tmp_path, ctf(*(pupil(make_upn(999, 1001, i), nhs="") for i in range(4000))), "large.xml")
    CtfReader().read(small)  # load and compile the mapping first
    # Eight times the pupils: only the set of UPNs seen (for the duplicate check) grows, by about 100 bytes a
    # pupil; a pupil's parsed elements and values (several KiB) are all freed as the pass goes on.
    assert _peak_while_streaming(large) - _peak_while_streaming(small) < 3500 * 200
