"""Event-driven triggering through the REAL Airflow services: scheduler, dag-processor, triggerer and api-server,
each its own process (so the triggerer can be killed), LocalExecutor on a SQLite metadata database, the repo's
dags/ folder, Redis pub/sub on 127.0.0.1, and the landing watcher (`schoolslink landing watch`) running.

a. Events on and the sweep off (`SCHOOLSLINK_SWEEP=off`): a school's export dropped into the landing zone starts a
   mis_ingest run whose run type is `asset_triggered`, and it succeeds. The drop-to-run-start latency is printed.
b. The triggerer killed (`kill -9`): a file dropped now publishes an event nobody hears. The sweep picks it up: a
   sweep is the same DAG run on its schedule, and here it is started by hand through the REST API (a `manual`
   run does exactly what a `scheduled` one does). The file is processed once: one sealed copy, its pupils once in
   the state store, no learner events; and when the triggerer is back, nothing replays the lost event.

Other DAGs are paused at creation (only mis_ingest is unpaused), so nothing else competes for the two cores. The
stack, the drops and the waiting come from schoolslink/airflow_services.py (benchmarks/events.py uses them too).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from sqlalchemy import create_engine, func, select

from connectors.storage.sealed import read_header
from schoolslink.airflow_services import Stack, drop, finished, make_exports, stamp, start_stack, wait_for
from schoolslink.store.schema import learner_events, learners
from tests.integration.test_events_redis import REDIS_URL, _redis_up

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not _redis_up(), reason="no Redis at 127.0.0.1:6379")]
RUN_DATE = date(2026, 11, 26)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, exports: dict[str, Path]) -> Iterator[Stack]:
    """The stack of schoolslink/airflow_services.py with events on and the sweep off, on its own channel prefix;
    each school's drop folder exists, as it does in a deployment (an SFTP chroot, a share)."""
    home = tmp_path_factory.mktemp("events") / "home"
    with start_stack(home, schools=exports, redis_url=REDIS_URL, prefix=f"sltest-{uuid.uuid4().hex[:10]}",
                     sweep=False, key="event-driven-test-key", chunks=1) as s:
        yield s


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two schools' CTF exports, made outside the landing zone (dropping one is a move into place)."""
    return make_exports(tmp_path_factory.mktemp("staging"), schools=2, pupils=40, seed=11, as_of=RUN_DATE)


def pupils_in(export: Path) -> int:
    return export.read_text(encoding="utf-8").count("<Pupil>")


def store_counts(stack: Stack, urn: str) -> tuple[int, int]:
    """(the school's pupils in the state store, learner events about them)."""
    eng = create_engine(f"sqlite:///{stack.home / 'state.db'}")
    try:
        with eng.connect() as conn:
            n = conn.execute(select(func.count()).select_from(learners).where(learners.c.school_urn == urn)).scalar()
            keys = select(learners.c.learner_key).where(learners.c.school_urn == urn)
            ev = conn.execute(select(func.count()).select_from(learner_events)
                              .where(learner_events.c.learner_key.in_(keys))).scalar()
    finally:
        eng.dispose()
    return int(n or 0), int(ev or 0)


def sealed_copies(stack: Stack, urn: str) -> list[dict[str, Any]]:
    folder = stack.home / "landing" / "mis" / urn
    assert not [p for p in folder.iterdir() if not p.name.endswith(".sealed")], "a plain drop was left"
    return [read_header(p) for p in sorted(folder.glob("*.sealed"))]


def test_a_dropped_file_starts_an_asset_triggered_run(stack: Stack, exports: dict[str, Path]) -> None:
    import hashlib

    urn, export = sorted(exports.items())[0]
    expected, sha, size = pupils_in(export), hashlib.sha256(export.read_bytes()).hexdigest(), export.stat().st_size
    known = {r["dag_run_id"] for r in stack.runs()}
    dropped = drop(stack, export)
    run = wait_for(lambda: finished(stack, known), 240, "a mis_ingest run after the drop", stack)
    assert run["run_type"] == "asset_triggered", run
    assert run["state"] == "success", stack.tails()
    print(f"\nevent-driven latency: drop -> run queued {stamp(run['queued_at']) - dropped:.2f}s, "
          f"drop -> run started {stamp(run['start_date']) - dropped:.2f}s "
          f"(run took {stamp(run['end_date']) - stamp(run['start_date']):.1f}s)")

    assert store_counts(stack, urn) == (expected, 0)
    [header] = sealed_copies(stack, urn)
    assert header["sha256"] == sha
    # What the Airflow metadata database keeps of the event: ids and counts, nothing about a pupil.
    events = stack.get("/api/v2/assets/events", limit=50)["asset_events"]
    payloads = [json.loads(e["extra"]["payload"]["data"]) for e in events if e["extra"].get("from_trigger")]
    ours = [p["data"] for p in payloads if p["topic"] == "landing" and p["data"].get("sha256") == sha]
    assert ours == [{"kind": "mis", "school_urn": urn, "sha256": sha, "size": size}]


def test_a_lost_event_is_swept_up_once(stack: Stack, exports: dict[str, Path]) -> None:
    import hashlib

    urn, export = sorted(exports.items())[1]
    expected, sha = pupils_in(export), hashlib.sha256(export.read_bytes()).hexdigest()
    stack.kill("triggerer")  # kill -9, the triggerer and its trigger runner
    wait_for(lambda: stack.landing_subscribers() == 0, 60, "the dead triggerer's subscription to go")
    watcher_log = stack.logs / "watcher.log"
    drop(stack, export)
    wait_for(lambda: f"school {urn}" in watcher_log.read_text(), 60, "the watcher to publish the drop", stack)
    assert stack.runs() and all(r["state"] in ("success", "failed") for r in stack.runs())  # nothing started

    # The sweep: the same DAG, run on its schedule; here started through the REST API.
    known = {r["dag_run_id"] for r in stack.runs()}
    httpx.post(f"{stack.api}/api/v2/dags/mis_ingest/dagRuns", json={"logical_date": None},
               timeout=30).raise_for_status()
    run = wait_for(lambda: finished(stack, known), 240, "the sweep run", stack)
    assert (run["run_type"], run["state"]) == ("manual", "success"), stack.tails()
    assert store_counts(stack, urn) == (expected, 0)
    [header] = sealed_copies(stack, urn)  # taken in once
    assert header["sha256"] == sha

    # The triggerer comes back: the lost event is not replayed (pub/sub keeps nothing).
    events_before = stack.get("/api/v2/assets/events", limit=100)["total_entries"]
    stack.start_service("triggerer")
    wait_for(lambda: stack.landing_subscribers() >= 1, 120, "the restarted triggerer to subscribe", stack)
    # A marker event proves the restarted triggerer is live; it must be the only event since the restart.
    known = {r["dag_run_id"] for r in stack.runs()}
    marker = redis.Redis.from_url(REDIS_URL)
    marker.publish(f"{stack.prefix}.landing", json.dumps({"v": 1, "topic": "landing", "at": "", "data": {
        "kind": "marker"}}))
    run = wait_for(lambda: finished(stack, known), 240, "the marker's run", stack)
    assert (run["run_type"], run["state"]) == ("asset_triggered", "success"), stack.tails()
    events = stack.get("/api/v2/assets/events", limit=100)
    assert events["total_entries"] == events_before + 1
    # The marker's run read the landing zone again (every run does) and changed nothing for that file.
    assert store_counts(stack, urn) == (expected, 0)
    assert len(sealed_copies(stack, urn)) == 1
    assert [r["run_type"] for r in stack.runs()] == ["asset_triggered", "manual", "asset_triggered"]
