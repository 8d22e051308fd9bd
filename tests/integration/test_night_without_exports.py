"""A night on which no school sent an export still runs mis_ingest's deliver stage through Airflow.

The per-school tasks are mapped over no chunks and skipped; delivery must still run, because retractions that
are due and withdrawal notices must not wait for some school's next export. The run is recorded as usual.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from schoolslink.airflow_runner import airflow_env, ensure_metadata_db

pytestmark = pytest.mark.slow


def test_deliver_runs_when_no_school_sent_anything(tmp_path: Path) -> None:
    env = airflow_env(tmp_path / "home")
    env["SCHOOLSLINK_KEY"] = "night-without-exports"
    ensure_metadata_db(env)
    res = subprocess.run([sys.executable, "-m", "schoolslink.airflow_runner", "mis_ingest"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout.strip().splitlines()[-1])["state"] == "success"
    with sqlite3.connect(tmp_path / "home" / "airflow" / "airflow.db") as af:
        states = dict(af.execute("select task_id, state from task_instance where dag_id = 'mis_ingest'").fetchall())
    assert states == {"pull": "success", "plan": "success", "parse_validate": "skipped", "govern_map": "skipped",
                      "deliver": "success"}
    with sqlite3.connect(tmp_path / "home" / "state.db") as db:
        [(summary,)] = db.execute("select summary from runs where dag_id = 'mis_ingest'").fetchall()
    assert json.loads(summary)["wonde_schools"] == 0
