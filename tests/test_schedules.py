"""The nightly feed runs at 02:00 Europe/London every night, across both clock changes (DST-safe), and the
monthly summary on the 1st at 06:00 London time; computed by Airflow's own timetables from the DAG files."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

REPO = Path(__file__).resolve().parents[1]

RUNS = r"""
import json, sys
from datetime import datetime, timezone
from airflow.dag_processing.dagbag import DagBag
from airflow.serialization.decoders import decode_timetable
from airflow.serialization.encoders import encode_timetable
from airflow.timetables.base import TimeRestriction
bag = DagBag(dag_folder=sys.argv[1])
out = {}
for dag_id, start, n in (("school_feeds", "2026-10-22", 8), ("school_feeds", "2027-03-25", 8),
                         ("partnership_summary", "2026-09-15", 9)):
    tt = decode_timetable(encode_timetable(bag.dags[dag_id].timetable))  # the scheduler's own timetable
    earliest = datetime.fromisoformat(start).replace(tzinfo=timezone.utc)
    last, runs = None, []
    for _ in range(n):
        info = tt.next_dagrun_info(last_automated_data_interval=last,
                                   restriction=TimeRestriction(earliest=earliest, latest=None, catchup=True))
        runs.append(info.run_after.isoformat())
        last = info.data_interval
    out.setdefault(dag_id, []).extend(runs)
print(json.dumps(out))
"""


def _london(stamps: list[str]) -> list[datetime]:
    return [datetime.fromisoformat(s).astimezone(ZoneInfo("Europe/London")) for s in stamps]


def test_nightly_feed_is_at_two_in_the_morning_london_time_through_both_clock_changes(tmp_path: Path) -> None:
    env = {"AIRFLOW_HOME": str(tmp_path), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
           "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{tmp_path / 'a.db'}",
           "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"), "PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin",
           "SCHOOLSLINK_HOME": str(tmp_path / "sl")}
    res = subprocess.run([sys.executable, "-c", RUNS, str(REPO / "dags")], env=env, capture_output=True, text=True,
                         check=False, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    feeds = _london(out["school_feeds"])
    # 16 nights around 25 Oct 2026 (BST -> GMT) and 28 Mar 2027 (GMT -> BST): one run a night, always 02:00 local.
    assert [(t.hour, t.minute) for t in feeds] == [(2, 0)] * 16
    days = [t.date() for t in feeds]
    assert len(set(days)) == 16
    assert {t.utcoffset().total_seconds() / 3600 for t in feeds} == {0.0, 1.0}  # both sides of each change
    summaries = _london(out["partnership_summary"])
    assert all((t.day, t.hour) == (1, 6) for t in summaries)
    assert [t.month for t in summaries] == [10, 11, 12, 1, 2, 3, 4, 5, 6]
