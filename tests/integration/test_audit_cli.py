"""`schoolslink audit verify` and `audit purge` as an auditor runs them: exit codes, one JSON document, the entry
named; retention erases the values kept beside the ledger and the ledger still verifies."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update

from schoolslink.cli import main
from schoolslink.model import Direction, Disclosure


def _disclosure(i: int) -> Disclosure:
    return Disclosure(run_id="run-1", dag_id="mis_ingest", direction=Direction.SCHOOL_TO_TRUST, recipient="ODS:R9X",
                      subject_key=f"lrn-{i:04d}", data_items=("attendance_percent",), agreement_id="demo-partnership",
                      agreement_version="1.0", consent_id=f"consent-{i}", mapping_version="m1",
                      content_hash=f"{i:064x}", values={"attendance_percent": f"9{i}.5"})


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, object]]:
    code = main([*argv, "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_verify_names_the_changed_entry_and_purge_keeps_it_verifiable(
    sl_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from schoolslink import ledger
    from schoolslink.store.db import migrate
    from schoolslink.store.schema import ledger as ledger_table
    from schoolslink.store.schema import ledger_values

    eng = migrate()
    at = datetime(2026, 1, 5, 2, 0, tzinfo=UTC)
    with eng.begin() as conn:
        ledger.append(conn, [_disclosure(i) for i in range(5)], at)
    with eng.begin() as conn:
        ledger.checkpoint(conn, "run-1")
    code, doc = _cli(capsys, "audit", "verify")
    assert code == 0 and doc["ok"] is True and doc["entries"] == 5 and doc["checkpoints_checked"] == 1

    # Retention: the values are past the agreement's 90 days by now; erasing them leaves the ledger verifiable.
    code, doc = _cli(capsys, "audit", "purge")
    assert code == 0 and doc["values_erased"] == 5
    with eng.connect() as conn:
        assert conn.execute(select(ledger_values.c.value).where(ledger_values.c.value.is_not(None))).all() == []
    assert _cli(capsys, "audit", "verify")[0] == 0

    # Someone edits who received entry 3.
    with eng.begin() as conn:
        seq = conn.execute(select(ledger_table.c.seq).order_by(ledger_table.c.seq).offset(2).limit(1)).scalar_one()
        conn.execute(update(ledger_table).where(ledger_table.c.seq == seq).values(recipient="ODS:RXX"))
    code, doc = _cli(capsys, "audit", "verify")
    assert code == 1 and doc["ok"] is False
    assert doc["problem"] == "changed" and doc["first_bad_seq"] == seq
    assert f"{seq}" in str(doc["message"])


def test_purge_keeps_values_inside_their_retention(sl_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from schoolslink import ledger
    from schoolslink.store.db import migrate

    eng = migrate()
    with eng.begin() as conn:
        ledger.append(conn, [_disclosure(1)], datetime.now(UTC) - timedelta(days=1))
    code, doc = _cli(capsys, "audit", "purge")
    assert code == 0 and doc["values_erased"] == 0 and doc["values_kept"] == 1
