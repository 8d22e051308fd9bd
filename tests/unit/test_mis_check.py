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
