"""Events: a short message that something arrived, so the DAG that handles it starts now instead of at its sweep.

    publisher = publisher_from_env()
    publisher.publish("landing", {"kind": "mis", "school_urn": "100001", "sha256": "9f2c..."})
    publisher.close()

Topics (`TOPICS`): `landing` (a file landed in the landing zone), `hl7v2` (HL7v2 messages stored by the MLLP
listener), `fhir` (a FHIR subscription notification stored). Where they go is `SCHOOLSLINK_EVENTS`
(docs/events.md has the whole table):

- unset, empty or `none`: nothing, a disabled publisher (the cron sweeps alone run the DAGs);
- `redis://HOST:PORT/DB`: Redis `PUBLISH` on channel `<prefix>.<topic>` (`SCHOOLSLINK_EVENTS_PREFIX`, default
  `schoolslink`);
- `sqs://`: SQS `SendMessage` to each topic's queue URL, from `SCHOOLSLINK_EVENTS_QUEUE_<TOPIC>`;
- `sqs://sqs.eu-west-2.amazonaws.com/123456789012/schoolslink-{topic}` (or the same with `https://`): SQS, one
  queue per topic, `{topic}` replaced (a `SCHOOLSLINK_EVENTS_QUEUE_<TOPIC>` still wins).

For SQS, `SCHOOLSLINK_EVENTS_ENDPOINT` overrides the endpoint (moto on loopback in tests) and
`SCHOOLSLINK_EVENTS_REGION` the region (default: the queue host's, else `AWS_DEFAULT_REGION`, else eu-west-2);
credentials are boto3's usual chain.

A payload carries ids and counts only, never personal data or file contents: keys are snake_case, values are
numbers, booleans, None or short id-like text (no spaces; nothing `schoolslink.logfilter` would pseudonymise). A
payload that breaks this is refused (logged by topic and key name only, counted). Publishing never raises and
never blocks the caller: messages go through a bounded queue to a sender thread; a send that fails (Redis or SQS
down) is logged without the payload and counted (`stats`), and the scheduled sweep covers what it would have
started. `close()` sends what is queued (a few seconds at most) and stops the thread.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Literal

__all__ = ["TOPICS", "DisabledPublisher", "EventsConfig", "Publisher", "RedisPublisher", "SqsPublisher",
           "channel", "events_config", "hl7v2_stored_hook", "publisher_from_env", "read_message"]

log = logging.getLogger(__name__)

TOPICS: Final = ("landing", "hl7v2", "fhir")
ENV: Final = "SCHOOLSLINK_EVENTS"
PREFIX_ENV: Final = "SCHOOLSLINK_EVENTS_PREFIX"
ENDPOINT_ENV: Final = "SCHOOLSLINK_EVENTS_ENDPOINT"
REGION_ENV: Final = "SCHOOLSLINK_EVENTS_REGION"
QUEUE_ENV: Final = "SCHOOLSLINK_EVENTS_QUEUE_{}"
DEFAULT_PREFIX: Final = "schoolslink"
_QUEUE_SIZE: Final = 1000
_KEY: Final = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
_TEXT: Final = re.compile(r"^[A-Za-z0-9_.:/+=@-]{0,200}$")
_SQS_HOST: Final = re.compile(r"^sqs\.([a-z0-9-]+)\.amazonaws\.com(\.cn)?$")


# Configuration ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EventsConfig:
    """What `SCHOOLSLINK_EVENTS` (and its companions) say: read by the publishers and by schoolslink/schedules.py."""

    kind: Literal["none", "redis", "sqs"]
    url: str = ""  # redis: the server URL
    prefix: str = DEFAULT_PREFIX  # redis: channels are <prefix>.<topic>
    queues: Mapping[str, str] = field(default_factory=dict)  # sqs: topic -> queue URL
    endpoint: str | None = None
    region: str | None = None


def channel(topic: str, prefix: str = DEFAULT_PREFIX) -> str:
    """The Redis channel of a topic: `schoolslink.landing`."""
    return f"{prefix}.{topic}"


def events_config(env: Mapping[str, str] | None = None) -> EventsConfig:
    """The event configuration in `env` (default: the process environment). ValueError names a bad setting."""
    env = os.environ if env is None else env
    raw = env.get(ENV, "").strip()
    if raw.lower() in ("", "none", "off"):
        return EventsConfig("none")
    prefix = env.get(PREFIX_ENV, "").strip() or DEFAULT_PREFIX
    if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,100}", prefix):
        raise ValueError(f"{PREFIX_ENV} must be letters, digits, '_', '.', ':' or '-'")
    if raw.startswith(("redis://", "rediss://", "unix://")):
        return EventsConfig("redis", url=raw, prefix=prefix)
    if raw.startswith(("sqs://", "https://sqs.")):
        template = "https://" + raw[len("sqs://"):] if raw.startswith("sqs://") else raw
        queues = {}
        for t in TOPICS:
            url = env.get(QUEUE_ENV.format(t.upper()), "").strip()
            if not url and "{topic}" in template:
                url = template.replace("{topic}", t)
            if url:
                queues[t] = url
        if not queues:
            raise ValueError(f"{ENV}={raw.split('?')[0]!r} names no queue: put {{topic}} in the queue URL or set "
                             f"{QUEUE_ENV.format('<TOPIC>')} for each topic")
        region = env.get(REGION_ENV, "").strip() or _region_of(queues.values()) or env.get(
            "AWS_DEFAULT_REGION", "").strip() or env.get("AWS_REGION", "").strip() or "eu-west-2"
        return EventsConfig("sqs", queues=queues, endpoint=env.get(ENDPOINT_ENV, "").strip() or None, region=region)
    raise ValueError(f"{ENV} must be none, a redis:// URL, sqs:// or an SQS queue URL (https://sqs.<region>...)")


def _region_of(urls: Any) -> str | None:
    from urllib.parse import urlsplit

    for url in urls:
        m = _SQS_HOST.match(urlsplit(url).hostname or "")
        if m:
            return m.group(1)
    return None


# Messages --------------------------------------------------------------------------------------------------------


def check_payload(payload: Mapping[str, Any]) -> str | None:
    """Why `payload` may not be published (None: it may). Names the key, never the value."""
    from schoolslink.logfilter import pseudonymise

    if len(payload) > 20:
        return "more than 20 keys"
    for k, v in payload.items():
        if not isinstance(k, str) or not _KEY.match(k):
            return "a key that is not snake_case"
        if v is None or isinstance(v, bool | float):
            continue
        if isinstance(v, int):
            v = str(v)
        if not isinstance(v, str):
            return f"key {k}: only numbers, booleans, None and short id-like text may be published"
        if not _TEXT.match(v):
            return f"key {k}: text must be an id (letters, digits, _ . : / + = @ -; no spaces; 200 at most)"
        if pseudonymise(v) != v:
            return f"key {k}: looks like a personal identifier"
    return None


def encode(topic: str, payload: Mapping[str, Any], at: datetime | None = None) -> str:
    """The message body: `{"v": 1, "topic": ..., "at": ..., "data": {...}}` (JSON)."""
    at = at or datetime.now(UTC)
    return json.dumps({"v": 1, "topic": topic, "at": at.isoformat(timespec="milliseconds"), "data": dict(payload)},
                      separators=(",", ":"), sort_keys=True)


def read_message(body: str | bytes | Mapping[str, Any]) -> list[dict[str, Any]]:
    """What a received message says, as a list of `{"topic", "data"}`: ours, or an S3 event notification.

    An S3 `ObjectCreated:*` record becomes a `landing` event `{"bucket", "key", "size", "etag"}` (the key
    URL-decoded as S3 sends it); S3's `s3:TestEvent` and other event names give nothing. Anything else is
    ValueError (what was wrong, never the body).
    """
    from urllib.parse import unquote_plus

    doc: Any = body
    if isinstance(body, bytes | str):
        try:
            doc = json.loads(body)
        except ValueError:
            raise ValueError("the message is not JSON") from None
    if not isinstance(doc, Mapping):
        raise ValueError("the message is not a JSON object")
    if doc.get("v") == 1 and doc.get("topic") in TOPICS and isinstance(doc.get("data"), Mapping):
        return [{"topic": doc["topic"], "data": dict(doc["data"])}]
    if doc.get("Event") == "s3:TestEvent":
        return []
    records = doc.get("Records")
    if isinstance(records, list):
        out = []
        for r in records:
            if not isinstance(r, Mapping) or r.get("eventSource") != "aws:s3":
                raise ValueError("an S3 notification record without eventSource aws:s3")
            if not str(r.get("eventName", "")).startswith("ObjectCreated:"):
                continue
            s3 = r.get("s3") or {}
            obj, bucket = s3.get("object") or {}, s3.get("bucket") or {}
            if not obj.get("key") or not bucket.get("name"):
                raise ValueError("an S3 ObjectCreated record without s3.bucket.name or s3.object.key")
            out.append({"topic": "landing", "data": {"bucket": bucket["name"], "key": unquote_plus(obj["key"]),
                                                     "size": obj.get("size"), "etag": obj.get("eTag")}})
        return out
    raise ValueError("neither a schoolslink event nor an S3 event notification")


# Publishers ------------------------------------------------------------------------------------------------------


class Publisher:
    """Publishes events from a sender thread; never raises into the caller. Subclasses provide `_send`."""

    name = "events"

    def __init__(self) -> None:
        self.stats: dict[str, int] = {"published": 0, "failed": 0, "refused": 0, "dropped": 0}
        self._queue: queue.Queue[tuple[str, str] | None] = queue.Queue(_QUEUE_SIZE)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._failing = False
        self._closed = False

    def publish(self, topic: str, payload: Mapping[str, Any]) -> None:
        """Queue an event for `topic`. Never raises; a refusal or a full queue is logged and counted."""
        try:
            why = f"unknown topic {topic!r}" if topic not in TOPICS else check_payload(payload)
            if why is not None:
                self._count("refused")
                log.error("event on %s not published: payload refused (%s)", topic, why)
                return
            if self._closed:
                self._count("dropped")
                return
            self._start()
            self._queue.put_nowait((topic, encode(topic, payload)))
        except queue.Full:
            self._count("dropped")
            log.warning("event on %s dropped: the send queue is full (the sweep will cover it)", topic)
        except Exception as exc:  # noqa: BLE001 - publishing must never break the caller
            self._count("failed")
            log.warning("event on %s not published: %s", topic, type(exc).__name__)

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything queued has been sent or has failed (True), or `timeout` passes (False)."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if time.monotonic() > deadline or self._thread is None or not self._thread.is_alive():
                return False
            time.sleep(0.01)
        return True

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued (for up to `timeout` seconds), then stop the sender thread. Never raises."""
        self._closed = True
        if self._thread is not None:
            self.flush(timeout)
            try:
                self._queue.put_nowait(None)
            except queue.Full:
                pass
            self._thread.join(timeout=max(0.1, timeout))
            self._thread = None
        try:
            self._close_client()
        except Exception:  # noqa: BLE001 - closing must never raise
            log.debug("closing the %s client failed", self.name)

    def _start(self) -> None:
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    t = threading.Thread(target=self._run, name=f"{self.name}-publisher", daemon=True)
                    t.start()
                    self._thread = t

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                topic, body = item
                try:
                    self._send(topic, body)
                except Exception as exc:  # noqa: BLE001 - any failure to send: counted, logged, swept later
                    self._count("failed")
                    if not self._failing:
                        log.warning("event on %s not published (%s: %s); later failures are logged at DEBUG "
                                    "until a send succeeds, and the scheduled sweep covers them",
                                    topic, self.name, type(exc).__name__)
                    else:
                        log.debug("event on %s not published (%s: %s)", topic, self.name, type(exc).__name__)
                    self._failing = True
                else:
                    self._count("published")
                    if self._failing:
                        log.info("events are being published again (%s)", self.name)
                    self._failing = False
            finally:
                self._queue.task_done()

    def _count(self, what: str) -> None:
        with self._lock:
            self.stats[what] += 1

    def _send(self, topic: str, body: str) -> None:
        raise NotImplementedError

    def _close_client(self) -> None:
        return None


class DisabledPublisher(Publisher):
    """`SCHOOLSLINK_EVENTS` unset or `none`: publishes nothing (payloads are still checked)."""

    name = "disabled"

    def publish(self, topic: str, payload: Mapping[str, Any]) -> None:
        why = f"unknown topic {topic!r}" if topic not in TOPICS else check_payload(payload)
        if why is not None:
            self._count("refused")
            log.error("event on %s not published: payload refused (%s)", topic, why)


class RedisPublisher(Publisher):
    """Redis PUBLISH on `<prefix>.<topic>`; short socket timeouts, so an outage costs the sender thread little."""

    name = "redis"

    def __init__(self, url: str, prefix: str = DEFAULT_PREFIX, timeout: float = 2.0) -> None:
        super().__init__()
        self.url, self.prefix, self.timeout = url, prefix, timeout
        self._client: Any = None

    def _send(self, topic: str, body: str) -> None:
        if self._client is None:
            import redis

            self._client = redis.Redis.from_url(self.url, socket_connect_timeout=self.timeout,
                                                socket_timeout=self.timeout)
        self._client.publish(channel(topic, self.prefix), body)

    def _close_client(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


class SqsPublisher(Publisher):
    """SQS SendMessage to each topic's queue (boto3's credential chain; `endpoint` for moto)."""

    name = "sqs"

    def __init__(self, queues: Mapping[str, str], region: str | None = None, endpoint: str | None = None) -> None:
        super().__init__()
        self.queues, self.region, self.endpoint = dict(queues), region, endpoint
        self._client: Any = None

    def _send(self, topic: str, body: str) -> None:
        url = self.queues.get(topic)
        if url is None:
            raise LookupError(f"no SQS queue for topic {topic}")
        if self._client is None:
            import boto3
            from botocore.config import Config

            self._client = boto3.client("sqs", region_name=self.region, endpoint_url=self.endpoint,
                                        config=Config(connect_timeout=3, read_timeout=5,
                                                      retries={"max_attempts": 2}))
        self._client.send_message(QueueUrl=url, MessageBody=body)

    def _close_client(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def publisher_from_env(env: Mapping[str, str] | None = None) -> Publisher:
    """The publisher `SCHOOLSLINK_EVENTS` names. A bad setting is logged and gives the disabled publisher (the
    sweeps still run everything), so a service never fails to start over it."""
    try:
        cfg = events_config(env)
    except ValueError as exc:
        log.error("events are off: %s", exc)
        return DisabledPublisher()
    if cfg.kind == "redis":
        return RedisPublisher(cfg.url, cfg.prefix)
    if cfg.kind == "sqs":
        return SqsPublisher(cfg.queues, cfg.region, cfg.endpoint)
    return DisabledPublisher()


def hl7v2_stored_hook(publisher: Publisher) -> Callable[[int, Any], None]:
    """The MLLP listener's `on_stored(count, max_id)`: publishes `hl7v2` with how many messages were stored and
    the greatest stored id (never a message or anything from one). Never raises."""

    def on_stored(count: int, max_id: Any) -> None:
        publisher.publish("hl7v2", {"count": count, "max_id": max_id})

    return on_stored
