"""Event-driven triggering through the REAL Airflow services: scheduler, dag-processor, triggerer and api-server,
each its own process (so the triggerer can be killed), LocalExecutor on a SQLite metadata database, the repo's
dags/ folder, Redis pub/sub on 127.0.0.1, and the landing watcher (`schoolslink landing watch`) running.

a. Events on and the sweep off (`SCHOOLSLINK_SWEEP=off`): a school's export dropped into the landing zone starts a
   mis_ingest run whose run type is `asset_triggered`, and it succeeds. The drop-to-run-start latency is printed.
b. The triggerer killed (`kill -9`): a file dropped now publishes an event nobody hears. The sweep picks it up: a
   sweep is the same DAG run on its schedule, and here it is started by hand through the REST API (a `manual`
   run does exactly what a `scheduled` one does). The file is processed once: one sealed copy, its pupils once in
   the state store, no learner events; and when the triggerer is back, nothing replays the lost event.

Other DAGs are paused at creation (only mis_ingest is unpaused), so nothing else competes for the two cores.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx
import psutil
import pytest
import redis
from sqlalchemy import create_engine, func, select

from connectors.storage.sealed import read_header
from schoolslink.airflow_runner import airflow_env, ensure_metadata_db
from schoolslink.store.schema import learner_events, learners
from tests.integration.test_events_redis import REDIS_URL, _redis_up

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not _redis_up(), reason="no Redis at 127.0.0.1:6379")]
T = TypeVar("T")
RUN_DATE = date(2026, 11, 26)


def wait_for(check: Callable[[], T | None], timeout: float, what: str, stack: Stack | None = None) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}" + (stack.tails() if stack else ""))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Stack:
    home: Path
    env: dict[str, str]
    api: str
    prefix: str
    logs: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, name: str, *args: str) -> None:
        log = (self.logs / f"{name}.log").open("ab")
        self.procs[name] = subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()

    def start_airflow(self, name: str, *args: str) -> None:
        self.start(name, str(Path(sys.executable).with_name("airflow")), name, *args)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal a service and everything it started (task workers run in sessions of their own)."""
        proc = self.procs.pop(name)
        try:
            tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            tree = []
        for p in tree:
            try:
                p.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        _gone, alive = psutil.wait_procs(tree, timeout=20)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=10)
        proc.wait(timeout=10)

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.kill(name, signal.SIGTERM)

    def tails(self) -> str:
        out = []
        for f in sorted(self.logs.glob("*.log")):
            lines = f.read_text(errors="replace").splitlines()[-15:]
            out.append(f"\n--- {f.name} ---\n" + "\n".join(lines))
        return "".join(out)

    def get(self, path: str, **params: Any) -> Any:
        r = httpx.get(f"{self.api}{path}", params=params, timeout=30)
        r.raise_for_status()
        return r.json()

    def runs(self) -> list[dict[str, Any]]:
        return list(self.get("/api/v2/dags/mis_ingest/dagRuns", order_by="run_after", limit=100)["dag_runs"])

    def landing_subscribers(self) -> int:
        return int(redis.Redis.from_url(REDIS_URL).pubsub_numsub(f"{self.prefix}.landing")[0][1])


def _healthy(stack: Stack) -> bool:
    try:
        h = stack.get("/api/v2/monitor/health")
    except httpx.HTTPError:
        return False
    return all(h.get(k, {}).get("status") == "healthy" for k in ("metadatabase", "scheduler", "triggerer",
                                                                  "dag_processor"))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, exports: dict[str, Path]) -> Iterator[Stack]:
    home = tmp_path_factory.mktemp("events") / "home"
    for urn in exports:  # each school's drop folder exists, as it does in a deployment (an SFTP chroot, a share)
        (home / "landing" / "mis" / urn).mkdir(parents=True)
    env = airflow_env(home)
    api_port = _free_port()
    prefix = f"sltest-{uuid.uuid4().hex[:10]}"
    env.update({
        "SCHOOLSLINK_KEY": "event-driven-test-key",
        "SCHOOLSLINK_CHUNKS": "1",
        "SCHOOLSLINK_EVENTS": REDIS_URL,
        "SCHOOLSLINK_EVENTS_PREFIX": prefix,
        "SCHOOLSLINK_SWEEP": "off",
        "AIRFLOW_CONN_SCHOOLSLINK_EVENTS": "redis://127.0.0.1:6379",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": "4",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{api_port}/execution/",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
        "AIRFLOW__API_AUTH__JWT_SECRET": uuid.uuid4().hex,
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{api_port}",
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(_free_port()),
        "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(_free_port()),
        "AIRFLOW__TRIGGERER__JOB_HEARTBEAT_SEC": "2",
        "AIRFLOW__TRIGGERER__TRIGGERER_HEALTH_CHECK_THRESHOLD": "8",
        "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
    })
    logs = home / "service-logs"
    logs.mkdir(parents=True)
    ensure_metadata_db(env)
    s = Stack(home, env, f"http://127.0.0.1:{api_port}", prefix, logs)
    try:
        s.start_airflow("api-server", "--host", "127.0.0.1", "--port", str(api_port))
        s.start_airflow("scheduler")
        s.start_airflow("dag-processor")
        s.start_airflow("triggerer")
        s.start("watcher", sys.executable, "-m", "schoolslink.events_cli", "landing", "watch")
        wait_for(lambda: _healthy(s), 180, "the Airflow services to report healthy", s)
        wait_for(lambda: _dag_known(s), 120, "the dag-processor to parse mis_ingest", s)
        httpx.patch(f"{s.api}/api/v2/dags/mis_ingest", json={"is_paused": False}, timeout=30).raise_for_status()
        wait_for(lambda: s.landing_subscribers() >= 1, 120, "the triggerer to subscribe to the landing channel", s)
        wait_for(lambda: "WATCHING" in (logs / "watcher.log").read_text(), 60, "the landing watcher", s)
        yield s
    finally:
        s.stop_all()


def _dag_known(s: Stack) -> bool:
    try:
        return bool(s.get("/api/v2/dags/mis_ingest")["dag_id"])
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two schools' CTF exports, made outside the landing zone (dropping one is a move into place)."""
    from schoolslink.synth import synthesise

    staging = tmp_path_factory.mktemp("staging")
    synthesise(staging, schools=2, pupils=40, seed=11, as_of=RUN_DATE)
    return {p.parent.name: p for p in sorted((staging / "landing" / "mis").glob("*/*.xml"))}


def pupils_in(export: Path) -> int:
    return export.read_text(encoding="utf-8").count("<Pupil>")


def drop(stack: Stack, export: Path) -> float:
    at = time.time()
    export.rename(stack.home / "landing" / "mis" / export.parent.name / export.name)
    return at


def finished(stack: Stack, known: set[str]) -> dict[str, Any] | None:
    for run in stack.runs():
        if run["dag_run_id"] not in known and run["state"] in ("success", "failed"):
            return run
    return None


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


def _stamp(s: str) -> float:
    return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


def test_a_dropped_file_starts_an_asset_triggered_run(stack: Stack, exports: dict[str, Path]) -> None:
    import hashlib

    urn, export = sorted(exports.items())[0]
    expected, sha, size = pupils_in(export), hashlib.sha256(export.read_bytes()).hexdigest(), export.stat().st_size
    known = {r["dag_run_id"] for r in stack.runs()}
    dropped = drop(stack, export)
    run = wait_for(lambda: finished(stack, known), 240, "a mis_ingest run after the drop", stack)
    assert run["run_type"] == "asset_triggered", run
    assert run["state"] == "success", stack.tails()
    print(f"\nevent-driven latency: drop -> run queued {_stamp(run['queued_at']) - dropped:.2f}s, "
          f"drop -> run started {_stamp(run['start_date']) - dropped:.2f}s "
          f"(run took {_stamp(run['end_date']) - _stamp(run['start_date']):.1f}s)")

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
    stack.start_airflow("triggerer")
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
