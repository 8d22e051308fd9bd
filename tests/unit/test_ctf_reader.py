"""CTF XML reader (connectors.mis.ctf): hand-made files in the docs/formats.md shape."""

from __future__ import annotations

import time
from datetime import date, datetime
from pathlib import Path

import pytest

from connectors.mis.ctf import (
    ACCEPTED_CTF_VERSIONS,
    CtfHeader,
    CtfReader,
    CtfWarning,
    Quarantined,
    configured_ctf_versions,
)
from connectors.mis.errors import CtfRefused, FileRefused, MisInputError
from schoolslink.identifiers import make_upn
from schoolslink.model import Learner

UPN1 = "B801200005001"
UPN2 = "R674123101121"
UPN3 = "R201100018042"
UPN4 = "P207000016049"
TEMP_UPN = "T20110001804V"

# The only identifying values the hand-made pupils carry: no reason or warning may contain any of them.
PRIVATE = [UPN1, UPN2, UPN3, UPN4, TEMP_UPN, "SMITH", "Alex", "2012-03-04", "9990000018", "AB1 2CD"]


def header(version: str = "25.0", qualifier: str = "full", urn: str = "900001", extra: str = "") -> str:
    return f"""  <Header>
    <DocumentName>Common Transfer File</DocumentName>
    <CTFversion>{version}</CTFversion>
    <DateTime>2026-11-25T18:00:00</DateTime>
    <DocumentQualifier>{qualifier}</DocumentQualifier>
    <SupplierID>SIMS</SupplierID>
    <SourceSchool>
      <LEA>999</LEA><Estab>1001</Estab><URN>{urn}</URN>
      <SchoolName>Synthetic Academy 1</SchoolName><AcademicYear>2026</AcademicYear>
    </SourceSchool>
    <DestSchool><LEA>998</LEA><Estab>2002</Estab></DestSchool>{extra}
  </Header>
"""


def pupil(
    upn: str = UPN1,
    *,
    surname: str = "SMITH",
    forename: str = "Alex",
    dob: str = "2012-03-04",
    sex: str = "<Sex>M</Sex>",
    nhs: str = "9990000018",
    former: str = "",
    extra: str = "",
    sen: str = "<SEN><StartDate>2024-09-01</StartDate><SENprovision>K</SENprovision></SEN>",
    attendance: str = """<YearData><Year>2026</Year><SessionsPossible>300</SessionsPossible>
          <SessionsAuthorised>10</SessionsAuthorised><SessionsUnauthorised>5</SessionsUnauthorised>
          <AttendanceSessions>285</AttendanceSessions></YearData>""",
    exclusions: str = "<Exclusion><Category>FIXD</Category><StartDate>2026-02-01</StartDate></Exclusion>",
    looked_after: str = "<LookedAfter><InCare>false</InCare></LookedAfter>",
) -> str:
    nhs_el = f"<NHSnumber>{nhs}</NHSnumber>" if nhs else ""
    return f"""    <Pupil>
      <UPN>{upn}</UPN>
      <UniqueLearnerNumber>1000102504</UniqueLearnerNumber>
      <Surname>{surname}</Surname><Forename>{forename}</Forename><MiddleNames>J</MiddleNames>
      <PreferredSurname>SMITH</PreferredSurname><PreferredForename>Al</PreferredForename>
      {former}
      <DOB>{dob}</DOB>
      {sex}
      <BasicDetails>
        <NCyearActual>9</NCyearActual>
        <Ethnicity>WBRI</Ethnicity>
        <EnrolStatus>C</EnrolStatus>
        <FSMeligible>true</FSMeligible>
        {nhs_el}
      </BasicDetails>
      {looked_after}
      <SENhistory>{sen}</SENhistory>
      <Address>
        <BS7666Address><PAON>12</PAON><Street>Any Street</Street><Town>Anytown</Town>
          <Postcode>ab1  2cd</Postcode></BS7666Address>
      </Address>
      <Contacts>
        <Contact><Order>2</Order><Surname>SMITH</Surname><Forename>Sam</Forename>
          <Relationship>CAR</Relationship><Responsibility>false</Responsibility>
        </Contact>
        <Contact><Order>1</Order><Surname>SMITH</Surname><Forename>Pat</Forename>
          <Relationship>PAR</Relationship><Responsibility>true</Responsibility>
          <Phones><Phone><TelephoneType>H</TelephoneType><PhoneNo>01234 567890</PhoneNo></Phone></Phones>
        </Contact>
      </Contacts>
      <Attendance>
        {attendance}
      </Attendance>
      <Exclusions>{exclusions}</Exclusions>
      {extra}
    </Pupil>
"""


def ctf(*pupils: str, head: str | None = None, prolog: str = '<?xml version="1.0" encoding="UTF-8"?>\n') -> str:
    return (
        f"{prolog}<CTfile>\n{header() if head is None else head}  <CTFpupilData>\n"
        + "".join(pupils)
        + "  </CTFpupilData>\n</CTfile>\n"
    )


def write(tmp_path: Path, text: str | bytes, name: str = "ctf.xml") -> Path:
    path = tmp_path / name
    if isinstance(text, str):
        path.write_text(text, encoding="utf-8")
    else:
        path.write_bytes(text)
    return path


def refused(path: Path, reader: CtfReader | None = None) -> CtfRefused:
    with pytest.raises(CtfRefused) as info:
        (reader or CtfReader()).read(path)
    return info.value


def assert_private(messages: list[str]) -> None:
    for message in messages:
        for value in PRIVATE:
            assert value not in message, f"{value!r} leaked into {message!r}"


# Accepted files ---------------------------------------------------------------------------------------------


def test_valid_ctf25_full_file(tmp_path: Path) -> None:
    result = CtfReader().read(write(tmp_path, ctf(pupil(), pupil(UPN2, forename="Bo", sex="<Sex>F</Sex>"))))

    assert result.header == CtfHeader(
        version="25.0",
        qualifier="full",
        source_lea="999",
        source_estab="1001",
        source_urn="900001",
        school_name="Synthetic Academy 1",
        dest_lea="998",
        dest_estab="2002",
        datetime=datetime(2026, 11, 25, 18, 0, 0),
        supplier_id="SIMS",
    )
    assert result.header.major_version == "25"
    assert result.quarantined == [] and result.warnings == []
    assert [lr.upn for lr in result.learners] == [UPN1, UPN2]
    first = result.learners[0]
    assert first == Learner(
        upn=UPN1,
        school_urn="900001",
        surname="SMITH",
        forename="Alex",
        dob=date(2012, 3, 4),
        sex="M",
        former_upns=[],
        uln="1000102504",
        middle_names="J",
        preferred_surname="SMITH",
        preferred_forename="Al",
        postcode="AB1 2CD",
        address_lines=["12 Any Street", "Anytown"],
        nhs_number="9990000018",
        nhs_number_status=None,
        year_group="9",
        enrol_status="C",
        sen_provision="K",
        ethnicity="WBRI",
        fsm_eligible=True,
        attendance_sessions_possible=300,
        attendance_sessions_attended=285,
        attendance_sessions_authorised_absence=10,
        attendance_sessions_unauthorised_absence=5,
        exclusions_fixed_count=1,
        exclusions_permanent=False,
        leaving_date=None,
        contacts=[
            {
                "order": 1,
                "title": "",
                "surname": "SMITH",
                "forename": "Pat",
                "relationship": "PAR",
                "responsibility": True,
                "phones": [{"type": "H", "number": "01234 567890"}],
                "email": "",
            },
            {
                "order": 2,
                "title": "",
                "surname": "SMITH",
                "forename": "Sam",
                "relationship": "CAR",
                "responsibility": False,
                "phones": [],
                "email": "",
            },
        ],
    )
    assert not first.flags.sensitive
    assert result.learners[1].sex == "F"


def test_ctf24_with_gender(tmp_path: Path) -> None:
    text = ctf(pupil(sex="<Gender>F</Gender>"), pupil(UPN2, sex="<Gender>m</Gender>"), head=header(version="24.2"))
    result = CtfReader().read(write(tmp_path, text))
    assert result.header.version == "24.2"
    assert [lr.sex for lr in result.learners] == ["F", "M"]
    assert result.warnings == []


def test_ctf25_with_gender_is_read_and_warned_once(tmp_path: Path) -> None:
    result = CtfReader().read(
        write(tmp_path, ctf(pupil(sex="<Gender>F</Gender>"), pupil(UPN2, sex="<Gender>M</Gender>")))
    )
    assert [lr.sex for lr in result.learners] == ["F", "M"]
    assert [(w.record, w.field) for w in result.warnings] == [("header", "Gender")]


def test_partial_qualifier(tmp_path: Path) -> None:
    result = CtfReader().read(write(tmp_path, ctf(pupil(), head=header(qualifier="Partial"))))
    assert result.header.qualifier == "partial"
    assert len(result.learners) == 1


def test_unknown_and_comment_elements_are_ignored(tmp_path: Path) -> None:
    extra = "<!-- a note --><SchoolHistory><School><LeavingDate>not a date</LeavingDate></School></SchoolHistory>"
    result = CtfReader().read(write(tmp_path, ctf(pupil(extra=extra))))
    assert len(result.learners) == 1 and result.learners[0].leaving_date is None


def test_nested_header_and_pupil_elements_are_not_records(tmp_path: Path) -> None:
    extra = "<Notes><Header>x</Header><Pupil><UPN>A801200005001</UPN></Pupil></Notes>"
    result = CtfReader().read(write(tmp_path, ctf(pupil(extra=extra), pupil(UPN2))))
    assert [lr.upn for lr in result.learners] == [UPN1, UPN2]
    assert result.quarantined == []


def test_sex_wins_over_gender(tmp_path: Path) -> None:
    text = ctf(pupil(sex="<Sex>F</Sex><Gender>M</Gender>"), head=header(version="24.0"))
    assert [lr.sex for lr in CtfReader().read(write(tmp_path, text)).learners] == ["F"]


def test_iter_learners_streams_header_then_items(tmp_path: Path) -> None:
    path = write(tmp_path, ctf(pupil(), pupil("A801200005001"), pupil(UPN2, nhs="9990000019")))
    items = list(CtfReader().iter_learners(path))
    assert [type(i) for i in items] == [CtfHeader, Learner, Quarantined, CtfWarning, Learner]


def test_empty_pupil_data(tmp_path: Path) -> None:
    result = CtfReader().read(write(tmp_path, ctf()))
    assert result.learners == [] and result.quarantined == []


# Quarantined records ----------------------------------------------------------------------------------------


def test_bad_check_letter_quarantines_that_pupil_only(tmp_path: Path) -> None:
    result = CtfReader().read(write(tmp_path, ctf(pupil(), pupil("A801200005002"), pupil(UPN3))))
    assert [lr.upn for lr in result.learners] == [UPN1, UPN3]
    assert result.quarantined == [Quarantined("pupil#2", "UPN", "UPN check letter is wrong (pupil #2)")]


def test_malformed_and_missing_upn(tmp_path: Path) -> None:
    result = CtfReader().read(write(tmp_path, ctf(pupil("12345"), pupil(""))))
    assert [q.reason for q in result.quarantined] == [
        "UPN is not a UPN (13 characters: a check letter, 11 digits, a digit or letter) (pupil #1)",
        "UPN is missing (pupil #2)",
    ]


def test_duplicate_upn_quarantines_the_later_ones(tmp_path: Path) -> None:
    path = write(tmp_path, ctf(pupil(), pupil(UPN2), pupil(UPN1, forename="Other"), pupil(UPN1)))
    result = CtfReader().read(path)
    assert [lr.upn for lr in result.learners] == [UPN1, UPN2]
    assert result.learners[0].forename == "Alex"
    assert [(q.record, q.field, q.reason) for q in result.quarantined] == [
        ("pupil#3", "UPN", "duplicate UPN in file: the same UPN as pupil #1, which is kept (pupil #3)"),
        ("pupil#4", "UPN", "duplicate UPN in file: the same UPN as pupil #1, which is kept (pupil #4)"),
    ]


@pytest.mark.parametrize(
    ("dob", "reason"),
    [
        ("04/03/2012", "DOB is not a date (expected YYYY-MM-DD) (pupil #1)"),
        ("2012-02-30", "DOB is not a date (expected YYYY-MM-DD) (pupil #1)"),
        ("20120304", "DOB is not a date (expected YYYY-MM-DD) (pupil #1)"),
        ("", "DOB is missing (pupil #1)"),
        ("2027-01-01", "DOB is after the date the file was made (pupil #1)"),
    ],
)
def test_bad_dob(tmp_path: Path, dob: str, reason: str) -> None:
    result = CtfReader().read(write(tmp_path, ctf(pupil(dob=dob), pupil(UPN2))))
    assert result.quarantined == [Quarantined("pupil#1", "DOB", reason)]
    assert [lr.upn for lr in result.learners] == [UPN2]


@pytest.mark.parametrize(
    ("sex", "field", "reason"),
    [
        ("<Sex>X</Sex>", "Sex", "Sex is not one of M, F or U (pupil #1)"),
        ("<Sex>Male</Sex>", "Sex", "Sex is not one of M, F or U (pupil #1)"),
        ("<Gender>2</Gender>", "Gender", "Gender is not one of M, F or U (pupil #1)"),
        ("", "Sex", "Sex is missing (pupil #1)"),
    ],
)
def test_unknown_sex_code(tmp_path: Path, sex: str, field: str, reason: str) -> None:
    result = CtfReader().read(write(tmp_path, ctf(pupil(sex=sex))))
    assert result.learners == []
    assert result.quarantined == [Quarantined("pupil#1", field, reason)]


@pytest.mark.parametrize(("code", "sex"), [("U", "U"), ("O", "U"), ("f", "F"), (" M ", "M")])
def test_tolerated_sex_codes(tmp_path: Path, code: str, sex: str) -> None:
    result = CtfReader().read(write(tmp_path, ctf(pupil(sex=f"<Sex>{code}</Sex>"))))
    assert [lr.sex for lr in result.learners] == [sex]


def test_several_problems_in_one_reason(tmp_path: Path) -> None:
    result = CtfReader().read(write(tmp_path, ctf(pupil("A801200005001", surname="", dob="x", sex="<Sex>Q</Sex>"))))
    assert result.quarantined == [
        Quarantined(
            "pupil#1",
            "UPN",
            "UPN check letter is wrong; Surname is missing; DOB is not a date (expected YYYY-MM-DD); "
            "Sex is not one of M, F or U (pupil #1)",
        )
    ]


def test_unreadable_care_flags_quarantine(tmp_path: Path) -> None:
    result = CtfReader().read(
        write(
            tmp_path,
            ctf(
                pupil(looked_after="<LookedAfter><InCare>maybe</InCare></LookedAfter>"),
                pupil(UPN2, extra="<AdoptedFromCare>yes please</AdoptedFromCare>"),
                pupil(UPN3, extra="<LeavingDate>July</LeavingDate>"),
            ),
        )
    )
    assert result.learners == []
    assert [(q.field, q.reason) for q in result.quarantined] == [
        ("LookedAfter", "LookedAfter/InCare is not true or false (pupil #1)"),
        ("AdoptedFromCare", "AdoptedFromCare is not true or false (pupil #2)"),
        ("LeavingDate", "LeavingDate is not a date (expected YYYY-MM-DD) (pupil #3)"),
    ]


def test_reasons_and_warnings_carry_no_identifiers(tmp_path: Path) -> None:
    text = ctf(
        pupil("A801200005001"),
        pupil(UPN2, dob="2012-03-44"),
        pupil(UPN2),
        pupil(UPN3, nhs="9990000019", former="<FormerUPN>A801200005001</FormerUPN>"),
    )
    result = CtfReader().read(write(tmp_path, text))
    # pupil #3 repeats pupil #2's UPN: quarantined too, even though #2 was held back for its DOB
    assert [q.record for q in result.quarantined] == ["pupil#1", "pupil#2", "pupil#3"]
    assert len(result.warnings) == 2
    assert_private([q.reason for q in result.quarantined] + [w.message for w in result.warnings])
    assert_private([q.record for q in result.quarantined] + [w.record for w in result.warnings])


# Items kept, with a warning or as stated --------------------------------------------------------------------


def test_bad_nhs_number_is_dropped_with_a_warning(tmp_path: Path) -> None:
    result = CtfReader().read(write(tmp_path, ctf(pupil(nhs="9990000019"), pupil(UPN2, nhs="999 000 0026"))))
    assert [lr.nhs_number for lr in result.learners] == [None, "9990000026"]
    assert result.warnings == [
        CtfWarning("pupil#1", "NHSnumber", "NHS number fails the modulus-11 check; dropped (pupil #1)")
    ]


def test_former_upns_only_as_stated(tmp_path: Path) -> None:
    former = f"<FormerUPN>{TEMP_UPN}</FormerUPN><FormerUPN>A801200005001</FormerUPN><FormerUPN>{UPN4}</FormerUPN>"
    result = CtfReader().read(write(tmp_path, ctf(pupil(former=former), pupil(UPN2))))
    assert result.learners[0].former_upns == [TEMP_UPN, UPN4]
    assert result.learners[1].former_upns == []
    assert result.warnings == [
        CtfWarning("pupil#1", "FormerUPN", "a FormerUPN fails the UPN check; dropped (pupil #1)")
    ]


def test_bad_uln_is_dropped_with_a_warning(tmp_path: Path) -> None:
    text = ctf(pupil()).replace("<UniqueLearnerNumber>1000102504", "<UniqueLearnerNumber>1000102505")
    result = CtfReader().read(write(tmp_path, text))
    assert result.learners[0].uln is None
    assert [w.field for w in result.warnings] == ["UniqueLearnerNumber"]


def test_care_flags(tmp_path: Path) -> None:
    result = CtfReader().read(
        write(
            tmp_path,
            ctf(
                pupil(
                    looked_after="<LookedAfter><InCare>true</InCare><CareAuthority>999</CareAuthority></LookedAfter>"
                ),
                pupil(UPN2, extra="<AdoptedFromCare>true</AdoptedFromCare>"),
                pupil(UPN3, looked_after=""),
            ),
        )
    )
    flags = [(lr.flags.looked_after, lr.flags.adopted) for lr in result.learners]
    assert flags == [(True, False), (False, True), (False, False)]
    assert [lr.flags.sensitive for lr in result.learners] == [True, True, False]


def test_sen_latest_by_start_date(tmp_path: Path) -> None:
    sen = (
        "<SEN><StartDate>2025-09-01</StartDate><SENprovision>E</SENprovision></SEN>"
        "<SEN><StartDate>2021-09-01</StartDate><SENprovision>K</SENprovision></SEN>"
    )
    result = CtfReader().read(
        write(
            tmp_path,
            ctf(
                pupil(sen=sen),
                pupil(UPN2, sen=""),
                pupil(UPN3, sen="<SEN><StartDate>2013-09-01</StartDate><SENprovision>S</SENprovision></SEN>"),
                pupil(UPN4, sen="<SEN><StartDate>2024-09-01</StartDate><SENprovision>Z</SENprovision></SEN>"),
            ),
        )
    )
    assert [lr.sen_provision for lr in result.learners] == ["E", "N", "S", "Z"]
    assert [(w.record, w.field) for w in result.warnings] == [("pupil#4", "SENprovision")]


def test_attendance_sums_the_latest_year(tmp_path: Path) -> None:
    years = """<YearData><Year>2025</Year><SessionsPossible>380</SessionsPossible>
        <AttendanceSessions>370</AttendanceSessions></YearData>
      <YearData><Year>2026</Year><SessionsPossible>100</SessionsPossible><SessionsAuthorised>4</SessionsAuthorised>
        <SessionsUnauthorised>1</SessionsUnauthorised><AttendanceSessions>95</AttendanceSessions></YearData>
      <YearData><Year>2026</Year><SessionsPossible>50</SessionsPossible><SessionsAuthorised>2</SessionsAuthorised>
        <AttendanceSessions>48</AttendanceSessions></YearData>"""
    result = CtfReader().read(
        write(
            tmp_path,
            ctf(
                pupil(attendance=years),
                pupil(UPN2, attendance=""),
                pupil(
                    UPN3, attendance="<YearData><Year>2026</Year><SessionsPossible>lots</SessionsPossible></YearData>"
                ),
            ),
        )
    )
    first, second, third = result.learners
    assert (
        first.attendance_sessions_possible,
        first.attendance_sessions_attended,
        first.attendance_sessions_authorised_absence,
        first.attendance_sessions_unauthorised_absence,
    ) == (150, 143, 6, 1)
    assert second.attendance_sessions_possible is None and second.attendance_sessions_attended is None
    assert third.attendance_sessions_possible is None
    assert [(w.record, w.field) for w in result.warnings] == [("pupil#3", "Attendance")]


def test_exclusions(tmp_path: Path) -> None:
    excl = (
        "<Exclusion><Category>FIXD</Category></Exclusion><Exclusion><Category>SUSP</Category></Exclusion>"
        "<Exclusion><Category>LNCH</Category></Exclusion><Exclusion><Category>PERM</Category></Exclusion>"
    )
    result = CtfReader().read(write(tmp_path, ctf(pupil(exclusions=excl), pupil(UPN2, exclusions=""))))
    assert [(lr.exclusions_fixed_count, lr.exclusions_permanent) for lr in result.learners] == [(2, True), (0, False)]


def test_address_lines_and_leaving_date(tmp_path: Path) -> None:
    lines = "<LeavingDate>2026-07-20</LeavingDate>"
    text = (
        ctf(pupil(extra=lines))
        .replace("<BS7666Address><PAON>12</PAON>", "<BS7666Address><SAON>Flat 3</SAON><PAON>Rose House</PAON>")
        .replace("<Street>Any Street</Street>", "")
    )
    result = CtfReader().read(write(tmp_path, text))
    learner = result.learners[0]
    assert learner.address_lines == ["Flat 3", "Rose House", "Anytown"]
    assert learner.leaving_date == date(2026, 7, 20)


# Configuration ----------------------------------------------------------------------------------------------


def test_versions_default_env_and_argument(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SCHOOLSLINK_CTF_VERSIONS", raising=False)
    assert ACCEPTED_CTF_VERSIONS == ("24", "25")
    assert CtfReader().accepted_versions == ("24", "25")
    monkeypatch.setenv("SCHOOLSLINK_CTF_VERSIONS", " 25, 26.0 ,")
    assert configured_ctf_versions() == ("25", "26")
    assert CtfReader().accepted_versions == ("25", "26")
    assert CtfReader(["19"]).accepted_versions == ("19",)
    monkeypatch.setenv("SCHOOLSLINK_CTF_VERSIONS", "twenty-five")
    with pytest.raises(ValueError, match="SCHOOLSLINK_CTF_VERSIONS"):
        CtfReader()
    with pytest.raises(ValueError):
        CtfReader([])


def test_unconfigured_version_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SCHOOLSLINK_CTF_VERSIONS", raising=False)
    path = write(tmp_path, ctf(pupil(), head=header(version="19.0")))
    err = refused(path)
    assert err.reason == (
        "CTF version 19.0 is not accepted here (accepted: 24, 25); a new version is added in SCHOOLSLINK_CTF_VERSIONS"
    )
    assert len(CtfReader(["19"]).read(path).learners) == 1
    monkeypatch.setenv("SCHOOLSLINK_CTF_VERSIONS", "19")
    assert len(CtfReader().read(path).learners) == 1


# Refused files ----------------------------------------------------------------------------------------------


def test_refusal_hierarchy(tmp_path: Path) -> None:
    err = refused(write(tmp_path, "UPN,Surname\n"))
    assert isinstance(err, FileRefused) and isinstance(err, MisInputError)
    assert str(err) == err.reason
    # A refusal made from a parser error carries no parser message along as its cause or context.
    err = refused(write(tmp_path, ctf(pupil(surname="</Surname>"))))
    assert err.__cause__ is None and err.__suppress_context__


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "file is empty"),
        (b"  \n", "file is empty"),
        (b"LEA,Estab,UPN,Surname\n999,1001,B801200005001,SMITH\n", "file is not XML (it does not start with '<')"),
        (b"PK\x03\x04\x14\x00", "file is not XML (it does not start with '<')"),
        (b"<?xml version='1.0'?>\n", "file is not XML: it ends before its first element"),
        (b"<CTfile><Header></CTfile>", "file is not well-formed XML (line 1)"),
    ],
)
def test_not_xml(tmp_path: Path, content: bytes, reason: str) -> None:
    assert refused(write(tmp_path, content)).reason.startswith(reason)


def test_wrong_root(tmp_path: Path) -> None:
    err = refused(write(tmp_path, "<?xml version='1.0'?><html><body><Pupil/></body></html>"))
    assert err.reason == "root element is <html>, not <CTfile>: this is not a Common Transfer File"
    nested = ctf(pupil()).replace("<CTfile>", "<Export><CTfile>").replace("</CTfile>", "</CTfile></Export>")
    assert "not <CTfile>" in refused(write(tmp_path, nested)).reason


def test_truncated_file(tmp_path: Path) -> None:
    text = ctf(pupil(), pupil(UPN2), pupil(UPN3))
    cut = text.index(f"<UPN>{UPN3}") + 10
    path = write(tmp_path, text[:cut])
    err = refused(path)
    assert err.reason.startswith("file is truncated: it ends before the CTfile element is closed (line ")
    # Streaming: earlier pupils were yielded before the end showed the file is cut short; callers discard.
    got: list[object] = []
    with pytest.raises(CtfRefused):
        for item in CtfReader().iter_learners(path):
            got.append(item)
    assert sum(isinstance(i, Learner) for i in got) == 2


def test_content_after_the_root(tmp_path: Path) -> None:
    err = refused(write(tmp_path, ctf(pupil()) + "<CTfile/>"))
    assert err.reason.startswith("file has content after the end of the CTfile element (line ")


@pytest.mark.parametrize(
    ("head", "reason"),
    [
        ("  <Header><DocumentQualifier>full</DocumentQualifier></Header>\n", "the Header has no CTFversion"),
        (header(version="twenty-five"), "the Header's CTFversion is not a version number"),
        (header(qualifier="some"), "the Header's DocumentQualifier must be 'full' or 'partial'"),
        (header(urn=""), "the Header's SourceSchool has no 6-digit URN"),
        (header(urn="90001X"), "the Header's SourceSchool has no 6-digit URN"),
        ("", "pupil records come before the Header"),
        (header() + header(), "file has more than one Header"),
    ],
)
def test_bad_header(tmp_path: Path, head: str, reason: str) -> None:
    assert refused(write(tmp_path, ctf(pupil(), head=head))).reason.startswith(reason)


def test_no_header_at_all(tmp_path: Path) -> None:
    err = refused(write(tmp_path, "<CTfile><CTFpupilData/></CTfile>"))
    assert err.reason.startswith("file has no Header")


def test_unreadable_header_datetime_is_a_warning(tmp_path: Path) -> None:
    text = ctf(pupil()).replace("2026-11-25T18:00:00", "yesterday")
    result = CtfReader().read(write(tmp_path, text))
    assert result.header.datetime is None
    assert result.warnings == [CtfWarning("header", "DateTime", "the Header's DateTime is not a date-time; ignored")]


# XML attacks ------------------------------------------------------------------------------------------------

DTD_REASON = "file declares a DTD or entities; CTF files never do — refused as a possible XML entity attack"

LAUGHS = (
    '<?xml version="1.0"?>\n<!DOCTYPE CTfile [\n <!ENTITY lol "lol">\n'
    + "".join(
        f' <!ENTITY lol{i} "{("&lol" + str(i - 1) + ";") * 10 if i > 1 else "&lol;" * 10}">\n' for i in range(1, 10)
    )
    + "]>\n"
)


def timed_refusal(path: Path) -> CtfRefused:
    start = time.perf_counter()
    err = refused(path)
    assert time.perf_counter() - start < 1.0
    return err


def test_billion_laughs(tmp_path: Path) -> None:
    text = ctf(pupil(surname="&lol9;"), prolog=LAUGHS)
    err = timed_refusal(write(tmp_path, text))
    assert err.reason == DTD_REASON
    assert "lol" not in err.reason


def test_billion_laughs_in_an_attribute_after_a_long_prolog(tmp_path: Path) -> None:
    # The DOCTYPE sits beyond the 64 KiB pre-scan: libxml2's parse and our DTD check still refuse it.
    padding = "<!--" + "x" * 70_000 + "-->\n"
    text = '<?xml version="1.0"?>\n' + padding + LAUGHS.split("\n", 1)[1] + '<CTfile a="&lol9;"/>\n'
    err = timed_refusal(write(tmp_path, text))
    assert "possible XML entity attack" in err.reason


def test_dtd_after_a_long_comment(tmp_path: Path) -> None:
    padding = "<!--" + "x" * 70_000 + "-->\n"
    text = ctf(pupil(), prolog=f'<?xml version="1.0"?>\n{padding}<!DOCTYPE CTfile [<!ENTITY e "x">]>\n')
    assert timed_refusal(write(tmp_path, text)).reason == DTD_REASON


@pytest.mark.parametrize("where", ["element", "attribute"])
def test_xxe_file_etc_passwd(tmp_path: Path, where: str) -> None:
    prolog = '<?xml version="1.0"?>\n<!DOCTYPE CTfile [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>\n'
    body = pupil(surname="&xxe;") if where == "element" else pupil().replace("<Pupil>", '<Pupil id="&xxe;">')
    path = write(tmp_path, ctf(body, prolog=prolog))
    err = timed_refusal(path)
    assert err.reason == DTD_REASON
    passwd = Path("/etc/passwd").read_text(encoding="utf-8", errors="replace") if Path("/etc/passwd").exists() else ""
    text = f"{err} {err.reason!r} {err.args!r} {err.__cause__!r} {err.__context__!r}"
    assert "root:" not in text and "/bin/" not in text and "passwd" not in text
    for line in passwd.splitlines()[:5]:
        assert line not in text
    # And nothing was yielded from the file either.
    with pytest.raises(CtfRefused):
        items = list(CtfReader().iter_learners(path))
        assert items == []


def test_xxe_parameter_entity_and_external_dtd(tmp_path: Path) -> None:
    prolog = (
        '<?xml version="1.0"?>\n<!DOCTYPE CTfile SYSTEM "http://127.0.0.1:9/evil.dtd" '
        '[<!ENTITY % p SYSTEM "file:///etc/passwd"> %p;]>\n'
    )
    assert timed_refusal(write(tmp_path, ctf(pupil(), prolog=prolog))).reason == DTD_REASON


def test_dtd_only_file(tmp_path: Path) -> None:
    prolog = '<?xml version="1.0"?>\n<!DOCTYPE CTfile SYSTEM "CTF.dtd">\n'
    assert refused(write(tmp_path, ctf(pupil(), prolog=prolog))).reason == DTD_REASON
    assert refused(write(tmp_path, "<!DOCTYPE CTfile><CTfile/>")).reason == DTD_REASON


def test_dtd_in_utf16(tmp_path: Path) -> None:
    text = ctf(pupil(), prolog='<?xml version="1.0" encoding="UTF-16"?>\n<!DOCTYPE CTfile [<!ENTITY e "x">]>\n')
    assert refused(write(tmp_path, text.encode("utf-16"))).reason == DTD_REASON


def test_utf16_file_without_dtd_is_read(tmp_path: Path) -> None:
    text = ctf(pupil(), prolog='<?xml version="1.0" encoding="UTF-16"?>\n')
    assert [lr.upn for lr in CtfReader().read(write(tmp_path, text.encode("utf-16"))).learners] == [UPN1]


@pytest.mark.parametrize("where", ["element", "attribute"])
def test_undefined_entity_reference(tmp_path: Path, where: str) -> None:
    body = pupil(surname="&secret;") if where == "element" else pupil().replace("<Pupil>", '<Pupil a="&secret;">')
    # Several pupils and a small read size are not needed: the reason comes from a scan of the file.
    err = refused(write(tmp_path, ctf(pupil(UPN2), body, pupil(UPN3))))
    assert "secret" not in err.reason
    line = 1 + ctf(pupil(UPN2), body).split("&secret;")[0].count("\n")
    assert err.reason == (
        f"file refers to an XML entity it does not define (line {line}); "
        "CTF files use only &amp; &lt; &gt; &quot; &apos; and character references"
    )


@pytest.mark.parametrize(
    ("surname", "reason"),
    [
        ("A & B", "file is not well-formed XML (line 19)"),
        ("A < B", "file is not well-formed XML (line 19)"),
        ("A &amp; B &#233;", None),
    ],
)
def test_bare_markup_characters(tmp_path: Path, surname: str, reason: str | None) -> None:
    path = write(tmp_path, ctf(pupil(surname=surname)))
    if reason is None:
        assert CtfReader().read(path).learners[0].surname == "A & B é"
    else:
        assert refused(path).reason == reason


def test_undeclared_namespace_prefix(tmp_path: Path) -> None:
    err = refused(write(tmp_path, ctf(pupil(extra="<x:Note>1</x:Note>"))))
    assert err.reason.startswith("file uses an XML namespace prefix it does not declare (line ")


def test_huge_text_node_is_refused(tmp_path: Path) -> None:
    err = refused(write(tmp_path, ctf(pupil(surname="x" * (11 * 1024 * 1024)))))
    assert err.reason.startswith("file exceeds the XML parser's safety limits")


def test_invalid_bytes_message_quotes_nothing(tmp_path: Path) -> None:
    data = ctf(pupil(), pupil(UPN2, surname="JON\xe9S")).encode("utf-8").replace("JON\xe9S".encode(), b"JON\xe9S")
    err = refused(write(tmp_path, data))
    assert err.reason.startswith("file has bytes that are not valid characters in its encoding (line ")
    assert "JON" not in err.reason and "0xE9" not in err.reason


# A larger file (streaming) ----------------------------------------------------------------------------------


def test_many_pupils_stream(tmp_path: Path) -> None:
    n = 3000
    pupils = (pupil(make_upn(999, 1001, i), nhs="") for i in range(n))
    path = write(tmp_path, ctf(*pupils))
    count = 0
    for item in CtfReader().iter_learners(path):
        if isinstance(item, Learner):
            count += 1
    assert count == n


def test_every_truncation_is_refused(tmp_path: Path) -> None:
    data = ctf(pupil()).encode("utf-8")
    root_start = data.index(b"<CTfile>") + len(b"<CTfile>")
    end = data.rindex(b"</CTfile>") + len(b"</CTfile>")
    path = tmp_path / "cut.xml"
    reader = CtfReader()
    wrong = []
    # Every cut through the prolog, the root start tag and the final tags; every 11th byte between (file
    # writes are the slow part here).
    cuts = sorted({*range(1, root_start + 64), *range(root_start + 64, end - 64, 11), *range(end - 64, end)})
    for cut in cuts:
        path.write_bytes(data[:cut])
        try:
            reader.read(path)
            wrong.append((cut, "accepted"))
        except CtfRefused as err:
            if cut >= root_start and not err.reason.startswith("file is truncated"):
                wrong.append((cut, err.reason))
    assert wrong == []
    path.write_bytes(data[:end])
    assert len(reader.read(path).learners) == 1


def test_read_restores_the_garbage_collector(tmp_path: Path) -> None:
    import gc

    assert gc.isenabled()
    CtfReader().read(write(tmp_path, ctf(pupil())))
    assert gc.isenabled()
    with pytest.raises(CtfRefused):
        CtfReader().read(write(tmp_path, ctf(pupil())[:-20]))
    assert gc.isenabled()
    gc.disable()
    try:
        CtfReader().read(write(tmp_path, ctf(pupil())))
        assert not gc.isenabled()
    finally:
        gc.enable()
