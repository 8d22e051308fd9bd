"""Bad input through the pipeline stages (no Airflow needed: the core runs on its own).

One school's export is an entity attack, another is truncated, a third lands in the wrong school's
folder: each is refused whole with a reason and moved aside, nothing from it is applied, and every
other school goes on.
"""

from __future__ import annotations

from datetime import date
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select

from schoolslink.pipeline import ingest
from schoolslink.store.schema import learners, quarantine
from schoolslink.synth import synthesise

DAY = date(2026, 11, 26)
BOMB = """<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>
<CTfile><Header><CTFversion>25.0</CTFversion></Header><CTFpupilData>&lol3;</CTFpupilData></CTfile>
"""


def test_bad_files_are_refused_whole_and_the_rest_go_on(sl_home: Path, store: Engine) -> None:
    synthesise(sl_home, schools=5, pupils=500, seed=3, as_of=DAY)
    mis = sl_home / "landing" / "mis"
    urns = sorted(p.name for p in mis.iterdir())
    bomb_file = next((mis / urns[0]).glob("*.xml"))
    bomb_file.write_text(BOMB)
    truncated = next((mis / urns[1]).glob("*.xml"))
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    # A school's file dropped into another school's folder.
    wrong = next((mis / urns[2]).glob("*.xml"))
    wrong.write_bytes(next((mis / urns[3]).glob("*.xml")).read_bytes())

    [chunk] = ingest.plan("run-bad", 1)
    part = ingest.parse_validate("run-bad", chunk, DAY)
    assert part["files"] == 5 and part["refused_files"] == 3
    assert part["accepted"] == 200  # the two good schools, 100 pupils each
    for f in (bomb_file, truncated, wrong):
        assert not f.exists()  # sealed on intake, the plain drop removed
        [aside] = (sl_home / "landing" / "refused" / f.parent.name).glob("*.sealed")
        assert aside.read_bytes().startswith(b"SLSEAL1")  # moved aside still sealed, with its reason beside it
        assert aside.with_name(aside.name + ".reason.txt").read_text().strip()
    assert not list((sl_home / "landing").rglob("*.xml"))  # no export rests in plain

    with store.connect() as conn:
        reasons = [r for (r,) in conn.execute(select(quarantine.c.reason).where(quarantine.c.run_id == "run-bad"))]
    text = " | ".join(reasons)
    assert "DTD" in text or "entit" in text
    assert "truncated" in text.lower()
    assert "landed in the folder of school" in text
    assert "lol" not in text  # nothing from the file's content in the reason

    out = ingest.govern_map("run-bad", part, DAY)
    assert out["learners"] == 200
    with store.connect() as conn:
        q = select(learners.c.school_urn, func.count()).group_by(learners.c.school_urn)
        by_school = dict(conn.execute(q).all())
    assert set(by_school) == {urns[3], urns[4]}


def test_a_row_removed_from_the_consent_register_stops_counting(sl_home: Path, store: Engine) -> None:
    from schoolslink.store.schema import consents

    synthesise(sl_home, schools=1, pupils=200, seed=5, as_of=DAY)
    reg = next((sl_home / "landing" / "consent").glob("*.csv"))
    lines = reg.read_text().splitlines(keepends=True)
    assert len(lines) > 2
    [chunk] = ingest.plan("run-a", 1)
    assert not reg.exists()  # sealed on intake
    ingest.govern_map("run-a", ingest.parse_validate("run-a", chunk, DAY), DAY)
    reg.write_text("".join(lines[:-1]))  # the school sends its register again, its last record deleted
    [chunk] = ingest.plan("run-b", 1)
    out = ingest.govern_map("run-b", ingest.parse_validate("run-b", chunk, DAY), DAY)
    assert out["consent_records_dropped"] == 1
    with store.connect() as conn:
        n = conn.execute(select(func.count()).select_from(consents).where(consents.c.source == "school")).scalar()
    assert n == len(lines) - 2


def test_a_name_read_from_an_export_is_hidden_if_a_log_line_ever_carries_it(
    sl_home: Path, store: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    import json
    import logging

    from schoolslink import logfilter

    synthesise(sl_home, schools=1, pupils=50, seed=4, as_of=DAY)
    case = json.loads((sl_home / "synth-manifest.json").read_text())["cases"][0]
    logfilter.forget_names()
    [chunk] = ingest.plan("run-names", 1)
    ingest.parse_validate("run-names", chunk, DAY)  # registers the roll's names with the log filter
    logfilter.install()
    with caplog.at_level(logging.INFO, logger="schoolslink.test"):
        logging.getLogger("schoolslink.test").info("a careless line about %s %s", case["forename"], case["surname"])
    assert "a careless line about <name:" in caplog.text
    assert case["surname"] not in caplog.text and case["forename"] not in caplog.text
    logfilter.forget_names()
