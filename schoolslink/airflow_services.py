"""The event-driven stack on one machine: the real Airflow services, each its own process, and the landing watcher.

How a developer runs what docs/events.md describes, and what the event-driven integration test and
`benchmarks/events.py` start:

    .venv/bin/python -m schoolslink.airflow_services [--home DIR] [--port 8080] [--sweep on|off]

    exports = make_exports(staging, schools=2, pupils=40, seed=11, as_of=date(2026, 11, 26))
    with start_stack(home, schools=exports, sweep=False) as stack:  # returns once everything is ready
        known = {r["dag_run_id"] for r in stack.runs()}
        dropped = drop(stack, exports["900001"])                     # the time of the drop
        run = wait_for(lambda: finished(stack, known), 240, "the run", stack)
        latency = stamp(run["start_date"]) - dropped

What it starts, each in a session of its own (so one service can be killed alone, with everything it started; a
LocalExecutor task runs under the scheduler), with stdout and stderr in `SCHOOLSLINK_HOME/service-logs/<name>.log`:

- `airflow api-server --host 127.0.0.1 --port P` (one worker: the REST API and the execution API the tasks use);
- `airflow scheduler --skip-serve-logs` (LocalExecutor);
- `airflow dag-processor` (the repo's dags/ folder);
- `airflow triggerer --skip-serve-logs` (runs the AssetWatchers' `MessageQueueTrigger`s);
- `schoolslink landing watch` (as `python -m schoolslink.cli landing watch`): publishes `landing`.

The metadata database is SQLite under `SCHOOLSLINK_HOME/airflow/` (`airflow db migrate` on first use). Events go
through Redis pub/sub (default 127.0.0.1:6379), which must already be running. `start_stack` returns when the API
reports the metadatabase, scheduler, triggerer and dag-processor healthy, the dag-processor has parsed the DAGs to
unpause, those are unpaused, the triggerer is subscribed to the landing channel and the watcher is watching; on
leaving the `with` block (or on an error while starting) every service is stopped with SIGTERM, then SIGKILL for
whatever is still there after 20 s.

Environment each service gets: the caller's, then `schoolslink.airflow_runner.airflow_env(home)` (SCHOOLSLINK_HOME,
AIRFLOW_HOME, the dags folder, the SQLite metadata database, no examples, the pseudonymising log config, PYTHONPATH),
then:

- `SCHOOLSLINK_EVENTS` = the Redis URL, `SCHOOLSLINK_EVENTS_PREFIX` = the channel prefix (default `schoolslink`);
- `SCHOOLSLINK_SWEEP` = `on` (default), or `off`: the event Asset alone, no cron sweep (to measure or prove event
  runs; not for production);
- `AIRFLOW_CONN_<SCHOOLSLINK_EVENTS_CONN_ID>` = the `redis` Connection the triggerer subscribes with (the Redis
  URL's host and port);
- `SCHOOLSLINK_KEY`, `SCHOOLSLINK_CHUNKS`: only when given (else the key file under the home, the DAGs' chunks);
- `AIRFLOW__CORE__EXECUTOR` = `LocalExecutor`, `AIRFLOW__CORE__PARALLELISM` = 4 (small: two cores are enough);
- `AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION` = `True`: only the DAGs named in `unpause` run (default
  mis_ingest), so nothing else competes for the cores;
- `AIRFLOW__CORE__EXECUTION_API_SERVER_URL`, `AIRFLOW__API__BASE_URL` = the api-server on 127.0.0.1:P,
  `AIRFLOW__API__WORKERS` = 1;
- `AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS` = `True`: no sign-in, everyone is admin. For a developer's
  machine only (the API listens on 127.0.0.1 alone); `AIRFLOW__API_AUTH__JWT_SECRET` = random, per start;
- `AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT`, `AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT` = free ports. The log
  servers themselves are not started (they would listen on every interface): the UI reads task logs from the
  local files;
- `AIRFLOW__TRIGGERER__JOB_HEARTBEAT_SEC` = 2, `AIRFLOW__TRIGGERER__TRIGGERER_HEALTH_CHECK_THRESHOLD` = 8: a dead
  triggerer shows within seconds;
- `AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK` = `False` (its HTTP check would listen on every interface).

Each school's drop folder (`landing/mis/<URN>/`) is made before the watcher starts, as it exists in a deployment (an
SFTP chroot, a share): a file moved into an existing folder is published at once, one in a folder that appears with
it only after the watcher's settle time.

Nothing here imports Airflow: the services are processes, reached over the REST API on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date, datetime
from functools import partial
from pathlib import Path
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit

import httpx
import psutil
import redis

from connectors.events import DEFAULT_PREFIX
from schoolslink.airflow_runner import airflow_env, ensure_metadata_db
from schoolslink.schedules import CONN_ID_ENV, DEFAULT_CONN_ID

T = TypeVar("T")

DEFAULT_REDIS_URL: Final = "redis://127.0.0.1:6379/0"
HEALTH_COMPONENTS: Final = ("metadatabase", "scheduler", "triggerer", "dag_processor")
SERVICES: Final = ("api-server", "scheduler", "dag-processor", "triggerer", "watcher")
STOP_GRACE_SECONDS: Final = 20.0


def wait_for(check: Callable[[], T | None], timeout: float, what: str, stack: Stack | None = None, *,
             every: float = 0.25) -> T:
    """Poll `check` every `every` seconds until it returns something true, and return that; TimeoutError after
    `timeout` seconds, naming `what` (and with the end of each service's log when `stack` is given)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(every)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}" + (stack.tails() if stack else ""))


def free_port() -> int:
    """A TCP port free on 127.0.0.1 just now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_up(url: str = DEFAULT_REDIS_URL) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=2).ping())
    except redis.RedisError:
        return False


def redis_connection_uri(url: str) -> str:
    """The Airflow `redis` Connection URI for a Redis URL: its host and port (and credentials); a database other
    than 0 in the extra (pub/sub channels are the same in every database anyway)."""
    parts = urlsplit(url)
    if parts.scheme != "redis" or not parts.hostname:
        raise ValueError("the events Redis URL must be redis://HOST:PORT/DB")
    db = parts.path.strip("/")
    return f"redis://{parts.netloc}" + (f"?db={int(db)}" if db and int(db) != 0 else "")


@dataclass
class Stack:
    """The running services: their processes by name, the environment they share, and the REST API's base URL."""

    home: Path
    env: dict[str, str]
    api: str
    prefix: str
    logs: Path
    redis_url: str = DEFAULT_REDIS_URL
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    # -- the processes -----------------------------------------------------------------------------------------

    def start(self, name: str, *args: str) -> None:
        """Start `args` as service `name` in a session of its own, its output appended to `logs/<name>.log`."""
        if name in self.procs:
            raise ValueError(f"{name} is already running")
        with (self.logs / f"{name}.log").open("ab") as log:
            self.procs[name] = subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, start_new_session=True)

    def start_airflow(self, name: str, *args: str) -> None:
        """`airflow <name> <args>` from this interpreter's environment, as service `name`."""
        self.start(name, str(Path(sys.executable).with_name("airflow")), name, *args)

    def start_service(self, name: str) -> None:
        """Start one of `SERVICES` the way `start_stack` does (to bring one back after `kill`)."""
        if name == "api-server":
            self.start_airflow(name, "--host", "127.0.0.1", "--port", str(urlsplit(self.api).port))
        elif name in ("scheduler", "triggerer"):
            self.start_airflow(name, "--skip-serve-logs")
        elif name == "dag-processor":
            self.start_airflow(name)
        elif name == "watcher":
            self.start(name, sys.executable, "-m", "schoolslink.cli", "landing", "watch")
        else:
            raise ValueError(f"unknown service {name!r}: one of {', '.join(SERVICES)}")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal a service and everything it started (task workers run in sessions of their own), and wait for
        them; SIGKILL for any still there after 20 s."""
        self._stop({name: self.procs.pop(name)}, sig)

    def stop_all(self) -> None:
        """SIGTERM to every service and everything each started, all at once; SIGKILL for any left after 20 s."""
        procs, self.procs = self.procs, {}
        self._stop(procs, signal.SIGTERM)

    @staticmethod
    def _stop(procs: Mapping[str, subprocess.Popen[bytes]], sig: int) -> None:
        tree: list[psutil.Process] = []
        for proc in procs.values():
            try:
                root = psutil.Process(proc.pid)
                tree += [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
        for p in tree:
            try:
                p.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        _gone, alive = psutil.wait_procs(tree, timeout=STOP_GRACE_SECONDS)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=10)
        for proc in procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    def tails(self, lines: int = 15) -> str:
        """The last lines of each service's log (for an error message)."""
        out = []
        for f in sorted(self.logs.glob("*.log")):
            tail = f.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"\n--- {f.name} ---\n" + "\n".join(tail))
        return "".join(out)

    # -- the REST API and Redis ----------------------------------------------------------------------------------

    def get(self, path: str, **params: Any) -> Any:
        r = httpx.get(f"{self.api}{path}", params=params, timeout=30)
        r.raise_for_status()
        return r.json()

    def runs(self, dag_id: str = "mis_ingest") -> list[dict[str, Any]]:
        """The DAG's runs, oldest first (at most 100)."""
        return list(self.get(f"/api/v2/dags/{dag_id}/dagRuns", order_by="run_after", limit=100)["dag_runs"])

    def unpause(self, dag_id: str) -> None:
        httpx.patch(f"{self.api}/api/v2/dags/{dag_id}", json={"is_paused": False}, timeout=30).raise_for_status()

    def healthy(self) -> bool:
        """The API answers and reports the metadatabase, scheduler, triggerer and dag-processor healthy."""
        try:
            h = self.get("/api/v2/monitor/health")
        except httpx.HTTPError:
            return False
        return all(h.get(k, {}).get("status") == "healthy" for k in HEALTH_COMPONENTS)

    def dag_known(self, dag_id: str = "mis_ingest") -> bool:
        """The dag-processor has parsed `dag_id` (the API knows it)."""
        try:
            return bool(self.get(f"/api/v2/dags/{dag_id}")["dag_id"])
        except httpx.HTTPError:
            return False

    def subscribers(self, topic: str = "landing") -> int:
        """How many clients (the triggerer's trigger) are subscribed to the topic's Redis channel."""
        client = redis.Redis.from_url(self.redis_url)
        try:
            return int(client.pubsub_numsub(f"{self.prefix}.{topic}")[0][1])
        finally:
            client.close()

    def landing_subscribers(self) -> int:
        return self.subscribers("landing")

    def watching(self) -> bool:
        """The landing watcher has started watching (it prints WATCHING)."""
        log = self.logs / "watcher.log"
        return log.exists() and "WATCHING" in log.read_text(errors="replace")


@contextmanager
def start_stack(home: Path, *, schools: Iterable[str] = (), redis_url: str = DEFAULT_REDIS_URL,
                prefix: str = DEFAULT_PREFIX, sweep: bool = True, key: str | None = None, chunks: int | None = None,
                parallelism: int = 4, api_port: int | None = None, unpause: Iterable[str] = ("mis_ingest",),
                start_timeout: float = 180.0) -> Iterator[Stack]:
    """Start the stack under SCHOOLSLINK_HOME `home` (see the module docstring), wait until it is ready, yield it,
    and stop every service on the way out."""
    if not redis_up(redis_url):
        raise RuntimeError("no Redis answers at the events URL: start redis-server on 127.0.0.1:6379 first")
    home = Path(home).resolve()
    for urn in schools:
        (home / "landing" / "mis" / urn).mkdir(parents=True, exist_ok=True)
    env = airflow_env(home)
    port = api_port or free_port()
    conn_id = env.get(CONN_ID_ENV, "").strip() or DEFAULT_CONN_ID
    env.update({
        "SCHOOLSLINK_EVENTS": redis_url,
        "SCHOOLSLINK_EVENTS_PREFIX": prefix,
        "SCHOOLSLINK_SWEEP": "on" if sweep else "off",
        f"AIRFLOW_CONN_{conn_id.upper()}": redis_connection_uri(redis_url),
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": str(parallelism),
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
        "AIRFLOW__API_AUTH__JWT_SECRET": uuid.uuid4().hex,
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}",
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
        "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
        "AIRFLOW__TRIGGERER__JOB_HEARTBEAT_SEC": "2",
        "AIRFLOW__TRIGGERER__TRIGGERER_HEALTH_CHECK_THRESHOLD": "8",
        "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
    })
    if key is not None:
        env["SCHOOLSLINK_KEY"] = key
    if chunks is not None:
        env["SCHOOLSLINK_CHUNKS"] = str(chunks)
    logs = home / "service-logs"
    logs.mkdir(parents=True, exist_ok=True)
    ensure_metadata_db(env)
    s = Stack(home, env, f"http://127.0.0.1:{port}", prefix, logs, redis_url)
    try:
        for name in SERVICES:
            s.start_service(name)
        wait_for(s.healthy, start_timeout, "the Airflow services to report healthy", s)
        for dag_id in unpause:
            wait_for(partial(s.dag_known, dag_id), 120, f"the dag-processor to parse {dag_id}", s)
            s.unpause(dag_id)
        wait_for(lambda: s.landing_subscribers() >= 1, 120, "the triggerer to subscribe to the landing channel", s)
        wait_for(s.watching, 60, "the landing watcher", s)
        yield s
    finally:
        s.stop_all()


# -- drops and runs ----------------------------------------------------------------------------------------------


def make_exports(staging: Path, *, schools: int, pupils: int, seed: int, as_of: date) -> dict[str, Path]:
    """Synthetic CTF exports, one per school, made under `staging` (outside the landing zone, so that dropping one is
    a move into place): {school URN: its export}."""
    from schoolslink.synth import synthesise

    synthesise(staging, schools=schools, pupils=pupils, seed=seed, as_of=as_of)
    return {p.parent.name: p for p in sorted((staging / "landing" / "mis").glob("*/*.xml"))}


def drop(stack: Stack, export: Path) -> float:
    """Move a school's export into its drop folder (one rename, as an SFTP upload's final rename is); the wall-clock
    time just before, for latencies against Airflow's timestamps."""
    at = time.time()
    export.rename(stack.home / "landing" / "mis" / export.parent.name / export.name)
    return at


def finished(stack: Stack, known: set[str], dag_id: str = "mis_ingest") -> dict[str, Any] | None:
    """The first run of `dag_id` not in `known` that has finished (success or failed), or None."""
    for run in stack.runs(dag_id):
        if run["dag_run_id"] not in known and run["state"] in ("success", "failed"):
            return run
    return None


def stamp(value: str) -> float:
    """An Airflow API timestamp (ISO 8601, `Z` or an offset) as seconds since the epoch."""
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


# -- python -m schoolslink.airflow_services ------------------------------------------------------------------------


class _Stopped(Exception):
    """SIGTERM or SIGINT: leave the stack's `with` block, which stops every service."""


def main(argv: list[str] | None = None) -> int:
    env_events = os.environ.get("SCHOOLSLINK_EVENTS", "").strip()
    p = argparse.ArgumentParser(prog="python -m schoolslink.airflow_services",
                                description="Run the event-driven Airflow stack locally until Ctrl-C.")
    p.add_argument("--home", type=Path, default=Path(os.environ.get("SCHOOLSLINK_HOME", ".schoolslink")),
                   help="SCHOOLSLINK_HOME (default $SCHOOLSLINK_HOME, else ./.schoolslink)")
    p.add_argument("--port", type=int, default=8080, help="the api-server's port on 127.0.0.1 (default 8080)")
    p.add_argument("--redis", default=env_events if env_events.startswith("redis://") else DEFAULT_REDIS_URL,
                   help=f"the events Redis URL (default $SCHOOLSLINK_EVENTS if redis://, else {DEFAULT_REDIS_URL})")
    p.add_argument("--prefix", default=os.environ.get("SCHOOLSLINK_EVENTS_PREFIX", "").strip() or DEFAULT_PREFIX,
                   help=f"the Redis channel prefix (default {DEFAULT_PREFIX})")
    p.add_argument("--sweep", choices=("on", "off"), default="on", help="keep the cron sweeps (default on)")
    p.add_argument("--unpause", default="mis_ingest", help="comma-separated DAGs to unpause (default mis_ingest)")
    args = p.parse_args(argv)
    if not args.redis.startswith("redis://"):
        p.error("--redis must be a redis:// URL")

    stopping = False

    def on_signal(_signum: int, _frame: Any) -> None:
        nonlocal stopping
        if not stopping:  # the first one stops the stack; later ones must not interrupt the stopping
            stopping = True
            raise _Stopped

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        with start_stack(args.home, redis_url=args.redis, prefix=args.prefix, sweep=args.sweep == "on",
                         api_port=args.port, unpause=[d for d in args.unpause.split(",") if d]) as stack:
            print(f"Airflow at {stack.api} (no sign-in); service logs in {stack.logs}; "
                  f"drop files under {stack.home / 'landing'}. Ctrl-C stops everything.", flush=True)
            while True:
                time.sleep(2)
                dead = [n for n, proc in stack.procs.items() if proc.poll() is not None]
                if dead:
                    stopping = True
                    print(f"{', '.join(dead)} stopped by itself (see service-logs/); stopping the rest",
                          file=sys.stderr)
                    return 1
    except _Stopped:
        return 0
    except (RuntimeError, TimeoutError, ValueError) as exc:
        print(f"the stack did not start: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
