"""`schoolslink mis check`: what a data manager sees before anything is sent (DESIGN.md CLI contract)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from schoolslink.cli import main
from tests.paths import CORPORA

BOMB = ('<?xml version="1.0"?><!DOCTYPE CTfile [<!ENTITY a "aaaa"><!ENTITY b "&a;&a;&a;&a;">]>'
        "<CTfile><Header>&b;</Header></CTfile>")


def test_mis_check_json_reports_accepted_rejected_and_quarantined(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCHOOLSLINK_KEY", "mis-check")
    from schoolslink.synth import synthesise

    synthesise(tmp_path / "home", schools=1, pupils=30, seed=2)
    ctf = next((tmp_path / "home" / "landing" / "mis").rglob("*.xml"))
    bomb = tmp_path / "bomb.xml"
    bomb.write_text(BOMB)
    census = CORPORA / "mis" / "dfe-mtc-gpl3" / "pupil-census-data.csv"
    assert main(["mis", "check", str(ctf), str(bomb), str(census), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    by_path = {f["path"]: f for f in doc["files"]}
    good = by_path[str(ctf)]
    assert good["status"] == "accepted" and good["format"] == "ctf" and good["version"].startswith("2")
    assert good["pupils"] == 30 and good["quarantined"] == []
    refused = by_path[str(bomb)]
    assert refused["status"] == "rejected" and "entity" in refused["reason"] and "aaaa" not in refused["reason"]
    if census.exists():
        c = by_path[str(census)]
        assert c["status"] == "accepted" and c["pupils"] + len(c["quarantined"]) == 79
        assert all(q["record"].startswith("row#") for q in c["quarantined"])
    assert set(good) == {"path", "status", "reason", "format", "version", "pupils", "quarantined"}


def test_mis_check_exit_zero_when_nothing_is_rejected(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCHOOLSLINK_KEY", "mis-check")
    from schoolslink.synth import synthesise

    synthesise(tmp_path / "home", schools=1, pupils=10, seed=2)
    ctf = next((tmp_path / "home" / "landing" / "mis").rglob("*.xml"))
    assert main(["mis", "check", str(ctf)]) == 0
    assert "accepted" in capsys.readouterr().out


def test_mis_check_reads_sealed_files_and_wonde_pulls(sl_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from connectors.storage.landing import LandingZone
    from schoolslink.identifiers import make_upn

    zone = LandingZone()
    refused = zone.move_aside(zone.land_bytes("mis", "900001", "xml", BOMB.encode()), "entity attack")
    student = {"id": "A1", "legal_surname": "TESTER", "legal_forename": "Ada", "gender": "F",
               "date_of_birth": {"date": "2012-03-04 00:00:00.000000"},
               "extended_details": {"data": {"upn": make_upn(999, 1001, 1), "in_lea_care": False}}}
    pull = {"format": "wonde", "version": "v1.0", "school_urn": "900001", "school_id": "A1930499544",
            "pulled_at": "2026-11-25T02:00:00+00:00", "updated_after": None, "qualifier": "full",
            "students": [student, {**student, "id": "A2"}], "leavers": [], "deletions": []}
    wonde = zone.land_bytes("mis", "900001", "json", json.dumps(pull).encode()).path
    assert main(["mis", "check", str(refused), str(wonde), "--json"]) == 1
    by_path = {f["path"]: f for f in json.loads(capsys.readouterr().out)["files"]}
    bad, good = by_path[str(refused)], by_path[str(wonde)]
    assert bad["status"] == "rejected" and bad["format"] == "ctf" and "entity" in bad["reason"]
    assert good["status"] == "accepted" and good["format"] == "wonde" and good["pupils"] == 1
    assert good["quarantined"][0]["record"] == "student#2" and "duplicate UPN" in good["quarantined"][0]["reason"]


def test_mis_check_names_a_damaged_sealed_file(sl_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from connectors.storage.landing import LandingZone

    landed = LandingZone().land_bytes("mis", "900001", "xml", b"<CTfile/>" * 10_000)
    raw = bytearray(landed.path.read_bytes())
    raw[-3] ^= 1
    landed.path.write_bytes(bytes(raw))
    assert main(["mis", "check", str(landed.path), "--json"]) == 1
    [f] = json.loads(capsys.readouterr().out)["files"]
    assert f["status"] == "rejected" and "authentication failed" in f["reason"]
