"""Events without a peer: configuration, what a payload may carry, message reading (ours and S3's), the landing
layouts the watcher counts, FHIR notification shapes and secrets, and the schedules DAGs get."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from connectors.events import (
    DisabledPublisher,
    RedisPublisher,
    SqsPublisher,
    channel,
    check_payload,
    encode,
    events_config,
    hl7v2_stored_hook,
    publisher_from_env,
    read_message,
)
from connectors.events.watcher import drop_of
from connectors.fhir.notify import NotificationRefused, NotifySecrets, read_notification
from schoolslink.errors import ConfigurationError

# Configuration --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", ["", "none", "NONE", "off"])
def test_events_off_gives_the_disabled_publisher(raw: str) -> None:
    assert events_config({"SCHOOLSLINK_EVENTS": raw}).kind == "none"
    assert type(publisher_from_env({"SCHOOLSLINK_EVENTS": raw})) is DisabledPublisher


def test_redis_url_and_channel_prefix() -> None:
    cfg = events_config({"SCHOOLSLINK_EVENTS": "redis://127.0.0.1:6379/3", "SCHOOLSLINK_EVENTS_PREFIX": "t1"})
    assert (cfg.kind, cfg.url, cfg.prefix) == ("redis", "redis://127.0.0.1:6379/3", "t1")
    assert channel("landing") == "schoolslink.landing"
    assert channel("fhir", cfg.prefix) == "t1.fhir"
    p = publisher_from_env({"SCHOOLSLINK_EVENTS": "redis://127.0.0.1:6379/3"})
    assert isinstance(p, RedisPublisher) and p.prefix == "schoolslink"


def test_sqs_queue_per_topic_from_a_template_or_per_topic_variables() -> None:
    cfg = events_config({"SCHOOLSLINK_EVENTS": "sqs://sqs.eu-west-1.amazonaws.com/123456789012/sl-{topic}",
                         "SCHOOLSLINK_EVENTS_QUEUE_FHIR": "https://sqs.eu-west-1.amazonaws.com/123456789012/other"})
    assert cfg.kind == "sqs" and cfg.region == "eu-west-1"
    assert cfg.queues == {"landing": "https://sqs.eu-west-1.amazonaws.com/123456789012/sl-landing",
                          "hl7v2": "https://sqs.eu-west-1.amazonaws.com/123456789012/sl-hl7v2",
                          "fhir": "https://sqs.eu-west-1.amazonaws.com/123456789012/other"}
    local = events_config({"SCHOOLSLINK_EVENTS": "sqs://", "SCHOOLSLINK_EVENTS_ENDPOINT": "http://127.0.0.1:5000",
                           "SCHOOLSLINK_EVENTS_QUEUE_LANDING": "http://127.0.0.1:5000/123456789012/landing",
                           "AWS_DEFAULT_REGION": "eu-west-2"})
    assert local.queues == {"landing": "http://127.0.0.1:5000/123456789012/landing"}
    assert (local.endpoint, local.region) == ("http://127.0.0.1:5000", "eu-west-2")
    assert isinstance(publisher_from_env({"SCHOOLSLINK_EVENTS": "sqs://", "SCHOOLSLINK_EVENTS_QUEUE_FHIR": "x"}),
                      SqsPublisher)


@pytest.mark.parametrize("raw", ["kafka://broker:9092", "sqs://", "http://example.invalid/q"])
def test_a_bad_setting_is_named_and_turns_events_off(raw: str, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ValueError, match="SCHOOLSLINK_EVENTS"):
        events_config({"SCHOOLSLINK_EVENTS": raw})
    assert type(publisher_from_env({"SCHOOLSLINK_EVENTS": raw})) is DisabledPublisher
    assert "events are off" in caplog.text


# What may be published ------------------------------------------------------------------------------------------


def test_ids_and_counts_may_be_published() -> None:
    assert check_payload({"kind": "mis", "school_urn": "100001", "sha256": "ab" * 32, "size": 123_456}) is None
    assert check_payload({"trust_ods": "R9X", "key": "fhir-notifications/R9X/20261126T010203000001Z-0001.json"
                          ".sealed", "type": "event-notification", "events": 2}) is None
    assert check_payload({"count": 3, "max_id": 1041, "ok": True, "none": None}) is None


@pytest.mark.parametrize("payload", [
    {"nhs_number": "9990000018"},  # a valid (test-range) NHS number
    {"max_id": 9990000018},  # the same as a number
    {"who": "Jane Smith"},  # free text (a space)
    {"dob": "2013-05-01"},  # a date of birth
    {"postcode": "SW1A1AA"},
    {"upn": "A123456789012"},
    {"body": "x" * 201},  # a file's contents
    {"nested": {"a": 1}},
    {"Bad-Key": 1},
])
def test_personal_or_bulky_values_are_refused_and_never_sent(payload: dict[str, object],
                                                            caplog: pytest.LogCaptureFixture) -> None:
    assert check_payload(payload) is not None
    p = DisabledPublisher()
    p.publish("landing", payload)
    assert p.stats["refused"] == 1
    for v in payload.values():  # the refusal is logged by key, never by value
        assert str(v) not in caplog.text


def test_unknown_topic_is_refused_not_raised() -> None:
    p = DisabledPublisher()
    p.publish("nope", {"a": 1})
    p.close()
    assert p.stats == {"published": 0, "failed": 0, "refused": 1, "dropped": 0}


def test_the_hl7v2_hook_publishes_counts_only() -> None:
    p = DisabledPublisher()
    hook = hl7v2_stored_hook(p)
    hook(250, 1041)
    hook(1, "9990000018")  # a value that looks like an NHS number is refused, and nothing raises
    assert p.stats["refused"] == 1


# Messages -------------------------------------------------------------------------------------------------------


def test_our_message_reads_back() -> None:
    body = encode("landing", {"kind": "mis", "school_urn": "100001"})
    doc = json.loads(body)
    assert doc["v"] == 1 and doc["topic"] == "landing" and doc["at"].endswith("+00:00")
    assert read_message(body) == [{"topic": "landing", "data": {"kind": "mis", "school_urn": "100001"}}]


def s3_notification(key: str, event: str = "ObjectCreated:Put") -> dict[str, object]:
    """The shape S3 sends to SQS (docs.aws.amazon.com/AmazonS3/latest/userguide/notification-content-structure)."""
    return {"Records": [{
        "eventVersion": "2.1", "eventSource": "aws:s3", "awsRegion": "eu-west-2",
        "eventTime": "2026-11-26T01:02:03.000Z", "eventName": event,
        "userIdentity": {"principalId": "AWS:AIDAEXAMPLE"}, "requestParameters": {"sourceIPAddress": "127.0.0.1"},
        "responseElements": {"x-amz-request-id": "C3D13FE58DE4C810", "x-amz-id-2": "FMyUVURIY8/IgAtTv8xRjskZQpcIZ9K"},
        "s3": {"s3SchemaVersion": "1.0", "configurationId": "landing",
               "bucket": {"name": "sl-landing", "ownerIdentity": {"principalId": "A3NL1KOZZKExample"},
                          "arn": "arn:aws:s3:::sl-landing"},
               "object": {"key": key, "size": 1024, "eTag": "d41d8cd98f00b204e9800998ecf8427e",
                          "sequencer": "0055AED6DCD90281E5"}}}]}


def test_an_s3_object_created_notification_is_a_landing_event() -> None:
    [ev] = read_message(json.dumps(s3_notification("mis/100001/ctf+export%282%29.xml")))
    assert ev == {"topic": "landing", "data": {"bucket": "sl-landing", "key": "mis/100001/ctf export(2).xml",
                                               "size": 1024, "etag": "d41d8cd98f00b204e9800998ecf8427e"}}
    assert read_message(json.dumps(s3_notification("mis/1/x.xml", "ObjectRemoved:Delete"))) == []
    assert read_message({"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": "sl-landing"}) == []


@pytest.mark.parametrize("body", ["not json", "[1, 2]", '{"hello": "world"}', '{"Records": [{"eventSource": "x"}]}'])
def test_other_messages_are_refused_by_reason(body: str) -> None:
    with pytest.raises(ValueError):
        read_message(body)


# The landing layouts the watcher counts -------------------------------------------------------------------------


def test_drops_are_what_intake_takes(tmp_path: Path) -> None:
    root = tmp_path / "landing"
    assert drop_of(root, root / "mis" / "100001" / "ctf.xml") == ("mis", "100001")
    assert drop_of(root, root / "mis" / "100001" / "report.CSV") == ("mis", "100001")
    assert drop_of(root, root / "consent" / "100001.csv") == ("consent", "100001")
    for ignored in ("mis/100001/ctf.xml.part", "mis/100001/20261126T010203000001Z-0001.xml.sealed",
                    "mis/100001/.ctf.xml.Ab12Cd", "mis/ctf.xml", "consent/100001.txt",
                    "consent/100001/20261126T010203000001Z-0001.csv.sealed", "refused/100001/x.xml.sealed",
                    "fhir-notifications/R9X/x.json.sealed", "mesh/in/x.dat", "mis/100001/sub/x.xml"):
        assert drop_of(root, root / ignored) is None, ignored
    assert drop_of(root, tmp_path / "elsewhere.xml") is None


# FHIR notifications ---------------------------------------------------------------------------------------------


def r4b_notification(kind: str = "event-notification", events: int = 1) -> dict[str, object]:
    status = {"resourceType": "SubscriptionStatus", "status": "active", "type": kind,
              "eventsSinceSubscriptionStart": "12", "subscription": {"reference": "Subscription/s1"},
              "topic": "http://example.org/SubscriptionTopic/referral",
              "notificationEvent": [{"eventNumber": str(12 - i)} for i in range(events)]}
    return {"resourceType": "Bundle", "type": "history", "timestamp": "2026-11-26T01:02:03Z",
            "entry": [{"fullUrl": "urn:uuid:1", "resource": status,
                       "request": {"method": "GET", "url": "Subscription/s1/$status"},
                       "response": {"status": "200"}}]}


def test_notification_shapes() -> None:
    assert read_notification(b"") == read_notification(b"  \n")
    assert read_notification(b"").type == "rest-hook-ping"
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": {"resourceType": "Task"}}]}
    assert (read_notification(json.dumps(bundle).encode()).type, read_notification(json.dumps(bundle).encode())
            .events) == ("rest-hook", 1)
    note = read_notification(json.dumps(r4b_notification(events=2)).encode(), "application/fhir+json")
    assert (note.type, note.events) == ("event-notification", 2)
    assert read_notification(json.dumps(r4b_notification("heartbeat", 0)).encode()).type == "heartbeat"
    backport = {"resourceType": "Bundle", "type": "history", "entry": [{"resource": {
        "resourceType": "Parameters", "parameter": [{"name": "type", "valueCode": "handshake"}]}}]}
    assert read_notification(json.dumps(backport).encode()).type == "handshake"


@pytest.mark.parametrize(("body", "problem"), [
    (b"{not json", "not valid JSON"),
    (b"[]", "not a FHIR resource"),
    (b'{"resourceType": "Patient"}', "must be a Bundle"),
    (b'{"resourceType": "Bundle", "type": "history", "entry": []}', "SubscriptionStatus"),
    (b'{"resourceType": "Bundle", "type": "history", "entry": [{"resource": {"resourceType": "Patient"}}]}',
     "SubscriptionStatus"),
    (b'{"resourceType": "Bundle", "entry": {"x": 1}}', "Bundle.entry"),
    (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),  # nested past the parser's recursion limit: 400, not 500
])
def test_malformed_notifications_name_the_problem(body: bytes, problem: str) -> None:
    with pytest.raises(NotificationRefused, match=problem):
        read_notification(body, "application/fhir+json")
    with pytest.raises(NotificationRefused, match="only JSON"):
        read_notification(b"<Bundle/>", "application/fhir+xml")
    bad = r4b_notification("made-up")
    with pytest.raises(NotificationRefused, match="type must be one of"):
        read_notification(json.dumps(bad).encode())


def test_secrets_per_trust_in_constant_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCHOOLSLINK_HOME", str(tmp_path))
    (tmp_path / "config").mkdir()
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "r9y").write_text("file-secret\n")
    (tmp_path / "config" / "fhir-notify.json").write_text(json.dumps(
        {"trusts": {"R9Y": {"secret_file": "secrets/r9y"}, "r9z": {"secret": "inline"}}}))
    keys = NotifySecrets.from_env({"SCHOOLSLINK_FHIR_NOTIFY_SECRET_R9X": "env-secret"})
    assert "secret" not in repr(keys).replace("NotifySecrets", "")
    assert keys.allows("R9X", "Bearer env-secret")
    assert keys.allows("R9Y", "bearer file-secret")
    assert keys.allows("R9Z", "Bearer inline")
    assert not keys.allows("R9X", "Bearer file-secret")  # another trust's secret
    assert not keys.allows("R9X", "env-secret")  # not as a bearer token
    assert not keys.allows("R9X", None)
    assert not keys.allows("R0A", "Bearer ")  # no secret configured
    raw = NotifySecrets.from_env({"SCHOOLSLINK_FHIR_NOTIFY_SECRET_R9X": "s",
                                  "SCHOOLSLINK_FHIR_NOTIFY_HEADER": "X-Hook"})
    assert raw.header == "X-Hook" and raw.allows("R9X", "s") and not raw.allows("R9X", "Bearer s")
    from_file = NotifySecrets.from_env({"SCHOOLSLINK_FHIR_NOTIFY_SECRET_R9W_FILE": str(tmp_path / "secrets" / "r9y")})
    assert from_file.allows("R9W", "Bearer file-secret") and not from_file.allows("FILE", "Bearer file-secret")
    for name in ("SCHOOLSLINK_FHIR_NOTIFY_SECRET_FILE", "SCHOOLSLINK_FHIR_NOTIFY_SECRET_R9 X"):
        with pytest.raises(ConfigurationError, match="name the trust by its ODS code"):  # not a trust called FILE
            NotifySecrets.from_env({name: str(tmp_path / "secrets" / "r9y")})


# Schedules ------------------------------------------------------------------------------------------------------


def test_schedules(monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow.sdk import Asset, AssetOrTimeSchedule, CronTriggerTimetable

    from schoolslink.schedules import event_schedule

    monkeypatch.delenv("SCHOOLSLINK_EVENTS", raising=False)
    monkeypatch.delenv("SCHOOLSLINK_SWEEP", raising=False)
    off = event_schedule("mis_ingest", "15 * * * *", "landing")
    assert isinstance(off, CronTriggerTimetable)

    monkeypatch.setenv("SCHOOLSLINK_EVENTS", "redis://127.0.0.1:6379/0")
    on = event_schedule("mis_ingest", "15 * * * *", "landing")
    assert isinstance(on, AssetOrTimeSchedule) and isinstance(on.timetable, CronTriggerTimetable)
    assert isinstance(on.asset_condition, Asset)
    [watcher] = on.asset_condition.watchers
    classpath, kwargs = watcher.trigger.serialize()
    assert classpath == "airflow.providers.redis.triggers.redis_await_message.AwaitMessageTrigger"
    assert kwargs == {"channels": ["schoolslink.landing"], "redis_conn_id": "schoolslink_events",
                      "poll_interval": 0.5}

    monkeypatch.setenv("SCHOOLSLINK_SWEEP", "off")
    alone = event_schedule("nhs_sync", "*/30 * * * *", "fhir")
    assert isinstance(alone, Asset) and alone.name == "schoolslink_fhir_events"

    monkeypatch.setenv("SCHOOLSLINK_SWEEP", "on")
    monkeypatch.setenv("SCHOOLSLINK_EVENTS", "sqs://sqs.eu-west-2.amazonaws.com/123456789012/sl-{topic}")
    sqs = event_schedule("hl7_ingest", "*/10 * * * *", "hl7v2")
    classpath, kwargs = sqs.asset_condition.watchers[0].trigger.serialize()
    assert classpath == "airflow.providers.amazon.aws.triggers.sqs.SqsSensorTrigger"
    assert kwargs["sqs_queue"] == "https://sqs.eu-west-2.amazonaws.com/123456789012/sl-hl7v2"
    assert kwargs["region_name"] == "eu-west-2" and kwargs["wait_time_seconds"] == 20

    monkeypatch.setenv("SCHOOLSLINK_EVENTS", "kafka://nope")  # a bad setting keeps the sweep
    assert isinstance(event_schedule("mis_ingest", "15 * * * *", "landing"), CronTriggerTimetable)
