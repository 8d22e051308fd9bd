"""Event to run: a school's export landing -> the asset-triggered mis_ingest run queued and started, real Airflow.

    .venv/bin/python -m benchmarks.events [--drops 5] [--json]

The stack of schoolslink/airflow_services.py: api-server, scheduler, dag-processor and triggerer as separate
processes (LocalExecutor, parallelism 4, SQLite metadata database), Redis pub/sub at 127.0.0.1:6379 on a channel
prefix of this run's own, `schoolslink landing watch` running, and the sweep off (`SCHOOLSLINK_SWEEP=off`), so a run
can only come from an event. --drops synthetic schools' CTF exports (20 pupils each) are dropped one after another:
each is one rename into its school's drop folder, made once the previous run has finished and the trigger is
subscribed again. Per drop: drop -> run queued (the run's `queued_at`) and drop -> run started (its `start_date`),
Airflow's timestamps against the wall clock read just before the rename (one machine, one clock), and the run's own
time; reported as p50 and max.

Baseline, in the same run: a sweep-only deployment (events off) takes a file in at the next cron sweep of mis_ingest.
A file lands at a random moment, so it waits on average half the sweep interval. The cron is read from the DAG
itself: dags/mis_ingest.py loaded with events off in a child process, its timetable's expression and timezone; the
mean wait is sum(gap^2) / (2 * sum(gap)) over that cron's sweeps in the next 28 days in its timezone, which is half
the interval when the sweeps are evenly spaced (hourly ones are), and the worst wait is the longest gap. The event
figures are also given as ratios: the sweep's mean wait over the event path's p50 and max drop -> run started.

About 3 minutes with the defaults on 2 cores: about a minute to start the stack, then about 25 s a drop (the run
itself). Exit status 1 if a run was not asset-triggered or did not succeed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import date
from functools import partial
from importlib.metadata import version
from itertools import pairwise
from pathlib import Path
from typing import Any

from schoolslink.airflow_runner import airflow_env
from schoolslink.airflow_services import (
    DEFAULT_REDIS_URL,
    drop,
    finished,
    make_exports,
    stamp,
    start_stack,
    wait_for,
)

DAG_ID = "mis_ingest"
PUPILS_PER_SCHOOL = 20
AS_OF = date(2026, 11, 26)
PARALLELISM = 4
WINDOW_DAYS = 28
RUN_TIMEOUT = 300.0


# -- the baseline: the sweep a sweep-only deployment waits for ------------------------------------------------------


def sweep_child(dag_id: str) -> None:
    """In a child process with Airflow's environment and events off: load the DAG file as the dag-processor does,
    read its cron, and print the sweeps' spacing over the next WINDOW_DAYS as JSON."""
    from datetime import datetime, timedelta
    from zoneinfo import ZoneInfo

    from croniter import croniter

    from schoolslink.airflow_runner import _load_dag

    dag = _load_dag(dag_id)  # the DAG file loaded as the dag-processor does
    timetable: Any = dag.timetable  # with events off: CronTriggerTimetable(expression, timezone)
    cron = getattr(timetable, "expression", None)
    if not cron:
        raise RuntimeError(f"{dag_id}'s schedule with events off is {type(timetable).__name__}, not a cron sweep")
    tz = getattr(timetable.timezone, "name", str(timetable.timezone))
    start = datetime.now(ZoneInfo(tz))
    it = croniter(cron, start)
    fires: list[float] = []
    while not fires or fires[-1] < (start + timedelta(days=WINDOW_DAYS)).timestamp():
        fires.append(it.get_next(datetime).timestamp())
    gaps = [b - a for a, b in pairwise(fires)]
    print(json.dumps({
        "dag_id": dag_id, "cron": cron, "timezone": tz, "window_days": WINDOW_DAYS, "sweeps": len(fires),
        "interval_s": round(sum(gaps) / len(gaps), 1),
        "mean_wait_s": round(sum(g * g for g in gaps) / (2 * sum(gaps)), 1),
        "max_wait_s": round(max(gaps), 1),
    }))


def sweep_baseline(dag_id: str, home: Path) -> dict[str, Any]:
    env = airflow_env(home) | {"SCHOOLSLINK_EVENTS": "none", "SCHOOLSLINK_SWEEP": "on"}
    done = subprocess.run([sys.executable, "-m", "benchmarks.events", "--sweep-of", dag_id], env=env,
                          capture_output=True, text=True, check=False, cwd=Path(__file__).parents[1])
    if done.returncode != 0:
        raise RuntimeError(f"reading {dag_id}'s cron failed: {done.stderr[-2000:]}")
    out: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    out["how"] = ("a sweep-only deployment takes a file in at the next cron sweep: on average half the sweep "
                  "interval (sum(gap^2) / (2 * sum(gap)) over the cron's sweeps), at worst the longest gap")
    return out


# -- the event path ----------------------------------------------------------------------------------------------------


def _figures(values: list[float]) -> dict[str, float]:
    return {"p50": round(statistics.median(values), 3), "max": round(max(values), 3), "min": round(min(values), 3)}


def run(drops: int) -> dict[str, Any]:
    t_all = time.perf_counter()
    out: dict[str, Any] = {
        "dag_id": DAG_ID, "drops": drops, "pupils_per_school": PUPILS_PER_SCHOOL, "cpus": os.cpu_count(),
        "airflow": version("apache-airflow"), "executor": "LocalExecutor", "parallelism": PARALLELISM,
        "metadata_db": "sqlite", "events": "redis+pubsub (127.0.0.1:6379)", "sweep": "off",
        "trigger_poll_s": float(os.environ.get("SCHOOLSLINK_EVENTS_POLL_SECONDS", "").strip() or 0.5),
    }
    per: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="sl-bench-events-") as tmp:
        root = Path(tmp)
        out["sweep_baseline"] = sweep_baseline(DAG_ID, root / "sweep-home")
        exports = make_exports(root / "staging", schools=drops, pupils=drops * PUPILS_PER_SCHOOL, seed=29,
                               as_of=AS_OF)
        t0 = time.perf_counter()
        with start_stack(root / "home", schools=exports, redis_url=DEFAULT_REDIS_URL,
                         prefix=f"slbench-{uuid.uuid4().hex[:10]}", sweep=False, chunks=1,
                         parallelism=PARALLELISM) as stack:
            out["stack_start_s"] = round(time.perf_counter() - t0, 1)
            for i, export in enumerate(exports[urn] for urn in sorted(exports)):
                t_sub = time.perf_counter()  # the trigger fires once, then the triggerer starts it again
                wait_for(lambda: stack.landing_subscribers() >= 1, 60, "the trigger to subscribe again", stack)
                resubscribe_wait = time.perf_counter() - t_sub
                known = {r["dag_run_id"] for r in stack.runs(DAG_ID)}
                dropped = drop(stack, export)
                dag_run = wait_for(partial(finished, stack, known, DAG_ID), RUN_TIMEOUT,
                                   f"the {DAG_ID} run after drop {i + 1}", stack)
                per.append({
                    "drop": i + 1, "run_type": dag_run["run_type"], "state": dag_run["state"],
                    "drop_to_queued_s": round(stamp(dag_run["queued_at"]) - dropped, 3),
                    "drop_to_started_s": round(stamp(dag_run["start_date"]) - dropped, 3),
                    "run_s": round(stamp(dag_run["end_date"]) - stamp(dag_run["start_date"]), 1),
                    "waited_for_subscription_s": round(resubscribe_wait, 2),
                })
            t_stop = time.perf_counter()
        out["stack_stop_s"] = round(time.perf_counter() - t_stop, 1)
    out["per_drop"] = per
    out["all_asset_triggered_and_succeeded"] = all(
        (d["run_type"], d["state"]) == ("asset_triggered", "success") for d in per)
    out["drop_to_queued_s"] = _figures([d["drop_to_queued_s"] for d in per])
    out["drop_to_started_s"] = started = _figures([d["drop_to_started_s"] for d in per])
    base = out["sweep_baseline"]
    out["x_sweep_mean_wait_over_p50_started"] = round(base["mean_wait_s"] / started["p50"])
    out["x_sweep_mean_wait_over_max_started"] = round(base["mean_wait_s"] / started["max"])
    out["x_sweep_max_wait_over_max_started"] = round(base["max_wait_s"] / started["max"])
    out["wall_s"] = round(time.perf_counter() - t_all, 1)
    return out


class _Stopped(Exception):
    """SIGTERM or SIGINT: unwind, so that the stack's services are stopped."""


def _stop_on_signals() -> None:
    stopping = False

    def handler(_signum: int, _frame: Any) -> None:
        nonlocal stopping
        if not stopping:  # once: a second signal must not interrupt the stopping of the services
            stopping = True
            raise _Stopped

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--drops", type=int, default=5, help="files dropped one after another (default 5)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--sweep-of", help=argparse.SUPPRESS)  # the child that reads a DAG's cron
    args = p.parse_args(argv)
    if args.sweep_of:
        sweep_child(args.sweep_of)
        return 0
    if args.drops < 1:
        p.error("--drops must be at least 1")
    _stop_on_signals()
    try:
        out = run(args.drops)
    except (RuntimeError, TimeoutError, _Stopped) as exc:
        print(f"benchmarks.events: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    ok = out["all_asset_triggered_and_succeeded"]
    if args.json:
        print(json.dumps(out))
        return 0 if ok else 1
    b = out["sweep_baseline"]
    q, s = out["drop_to_queued_s"], out["drop_to_started_s"]
    print(f"Event -> run, {DAG_ID} (Airflow {out['airflow']}, {out['executor']}, parallelism {out['parallelism']}, "
          f"SQLite metadata; Redis pub/sub, trigger poll {out['trigger_poll_s']} s; sweep off; {out['cpus']} CPUs)")
    print(f"  {'drop':>4}  {'-> queued':>9}  {'-> started':>10}  {'run':>7}  run type")
    for d in out["per_drop"]:
        print(f"  {d['drop']:>4}  {d['drop_to_queued_s']:>7.2f} s  {d['drop_to_started_s']:>8.2f} s  "
              f"{d['run_s']:>5.1f} s  {d['run_type']} ({d['state']})")
    print(f"  {'p50':>4}  {q['p50']:>7.2f} s  {s['p50']:>8.2f} s")
    print(f"  {'max':>4}  {q['max']:>7.2f} s  {s['max']:>8.2f} s")
    print(f"  baseline, same run: a sweep-only deployment waits for the next sweep of {DAG_ID} (`{b['cron']}` "
          f"{b['timezone']}, read from the DAG: every {b['interval_s']:.0f} s): on average half the interval, "
          f"{b['mean_wait_s']:.0f} s; at worst {b['max_wait_s']:.0f} s")
    print(f"  ratio: the sweep's mean wait is x{out['x_sweep_mean_wait_over_p50_started']:,} the p50 and "
          f"x{out['x_sweep_mean_wait_over_max_started']:,} the max drop -> started; its worst wait "
          f"x{out['x_sweep_max_wait_over_max_started']:,} the max")
    print(f"  stack start {out['stack_start_s']} s, stop {out['stack_stop_s']} s; wall {out['wall_s']} s "
          f"({out['drops']} drops, {out['pupils_per_school']} pupils a school)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
