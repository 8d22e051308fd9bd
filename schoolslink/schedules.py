"""How an event-driven DAG is scheduled: an Asset watched for events, or'd with a cron sweep (docs/events.md).

A DAG file passes `schedule=event_schedule("mis_ingest", "15 * * * *", "landing")`. Events give latency, sweeps
give completeness: with events on, the DAG runs when an event arrives on its topic (an `AssetWatcher` whose
common-messaging `MessageQueueTrigger` runs in the triggerer) and also on its cron sweep in Europe/London
(`CronTriggerTimetable`), so a lost event (a triggerer down, a pub/sub message nobody heard) delays work until
the next sweep but never loses it. Both kinds of run do the same work: a run reads whatever the landing zone and
the watermarks say is new, not what the event said.

Read when the DAG file is parsed (so the dag-processor needs them in its environment); nothing here looks up a
connection or touches state:

- `SCHOOLSLINK_EVENTS`: `none` (default: the cron sweep alone), `redis://HOST:PORT/DB` (`redis+pubsub`), or SQS
  (`sqs://` with per-topic queues, or a queue URL with `{topic}`); see connectors/events.
- `SCHOOLSLINK_EVENTS_PREFIX`: Redis channels are `<prefix>.<topic>` (default `schoolslink`).
- `SCHOOLSLINK_EVENTS_QUEUE_<TOPIC>`: SQS, the queue URL of one topic (`LANDING`, `HL7V2`, `FHIR`).
- `SCHOOLSLINK_EVENTS_CONN_ID`: the Airflow Connection the triggerer reaches the queue with (default
  `schoolslink_events`): type `redis` (host, port; `{"db": n}` in extra) or `aws` (region; `endpoint_url` in extra
  for a local endpoint).
- `SCHOOLSLINK_EVENTS_POLL_SECONDS`: how often the Redis trigger polls its subscription, and the SQS trigger's
  pause between its 20 s long polls (default 0.5).
- `SCHOOLSLINK_SWEEP`: `off` gives the Asset alone, no cron sweep (to prove a run was event-triggered); default `on`.

A bad setting does not stop the DAG: it is logged and the DAG keeps its cron sweep.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Final

from connectors.events import TOPICS, channel, events_config

log = logging.getLogger(__name__)

TIMEZONE: Final = "Europe/London"
CONN_ID_ENV: Final = "SCHOOLSLINK_EVENTS_CONN_ID"
POLL_ENV: Final = "SCHOOLSLINK_EVENTS_POLL_SECONDS"
SWEEP_ENV: Final = "SCHOOLSLINK_SWEEP"
DEFAULT_CONN_ID: Final = "schoolslink_events"
SQS_LONG_POLL_SECONDS: Final = 20


def _poll_seconds() -> float:
    raw = os.environ.get(POLL_ENV, "").strip()
    value = float(raw) if raw else 0.5
    if not 0 < value <= 60:
        raise ValueError(f"{POLL_ENV} must be more than 0 and at most 60 seconds")
    return value


def event_trigger(topic: str) -> Any:
    """The `MessageQueueTrigger` that fires on an event of `topic`, or None when events are off."""
    if topic not in TOPICS:
        raise ValueError(f"unknown event topic {topic!r}: one of {', '.join(TOPICS)}")
    cfg = events_config()
    if cfg.kind == "none":
        return None
    from airflow.providers.common.messaging.triggers.msg_queue import MessageQueueTrigger

    conn_id = os.environ.get(CONN_ID_ENV, "").strip() or DEFAULT_CONN_ID
    if cfg.kind == "redis":
        return MessageQueueTrigger(scheme="redis+pubsub", channels=[channel(topic, cfg.prefix)],
                                   redis_conn_id=conn_id, poll_interval=_poll_seconds())
    queue = cfg.queues.get(topic)
    if queue is None:
        return None
    return MessageQueueTrigger(scheme="sqs", sqs_queue=queue, aws_conn_id=conn_id, region_name=cfg.region,
                               wait_time_seconds=SQS_LONG_POLL_SECONDS, waiter_delay=max(1, round(_poll_seconds())),
                               max_messages=10)


def event_asset(topic: str) -> Any:
    """The Asset that events of `topic` update (one per topic, shared by every DAG on it), or None when off."""
    trigger = event_trigger(topic)
    if trigger is None:
        return None
    from airflow.sdk import Asset, AssetWatcher

    return Asset(name=f"schoolslink_{topic}_events", uri=f"schoolslink-events://{topic}",
                 watchers=[AssetWatcher(name=f"schoolslink_{topic}_watcher", trigger=trigger)])


def event_schedule(dag_id: str, cron: str, topic: str) -> Any:
    """The schedule of `dag_id`: its cron sweep (Europe/London) or'd with the Asset events of `topic` update.

    Events off: the sweep alone. `SCHOOLSLINK_SWEEP=off` with events on: the Asset alone.
    """
    from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable

    sweep = CronTriggerTimetable(cron, timezone=TIMEZONE)
    try:
        asset = event_asset(topic)
    except (ValueError, ImportError) as exc:
        log.error("%s: events are off, the cron sweep alone runs it: %s", dag_id, exc)
        return sweep
    if asset is None:
        return sweep
    if os.environ.get(SWEEP_ENV, "on").strip().lower() in ("off", "false", "0", "no"):
        return asset
    return AssetOrTimeSchedule(timetable=sweep, assets=asset)
