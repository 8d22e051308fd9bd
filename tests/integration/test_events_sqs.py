"""Events over SQS against moto's server mode on 127.0.0.1: our publisher sends; the amazon provider's `sqs`
MessageQueueTrigger (what the AssetWatcher runs, awaited in-process here) receives; and what S3 itself sends to SQS
when an object is created in the landing bucket (moto's own S3 -> SQS notification) is read as a `landing` event.

The trigger needs `aiobotocore` (the amazon provider's async client): without it that one test is skipped with
the reason (docs/events.md, "SQS").
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import requests

from connectors.events import publisher_from_env, read_message

REGION = "eu-west-2"


@dataclass
class Moto:
    endpoint: str
    sqs: Any
    s3: Any
    queues: dict[str, str]


@pytest.fixture(scope="module")
def moto() -> Iterator[Moto]:
    import boto3
    from moto.server import ThreadedMotoServer

    previous = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"})
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    requests.post(f"{endpoint}/moto-api/reset-auth", data=b"inf", timeout=10).raise_for_status()  # no IAM checks
    kw = {"endpoint_url": endpoint, "region_name": REGION}
    sqs, s3 = boto3.client("sqs", **kw), boto3.client("s3", **kw)
    run = uuid.uuid4().hex[:8]
    queues = {t: sqs.create_queue(QueueName=f"sl-{t}-{run}")["QueueUrl"] for t in ("landing", "fhir")}
    try:
        yield Moto(endpoint, sqs, s3, queues)
    finally:
        requests.post(f"{endpoint}/moto-api/reset", timeout=10)
        server.stop()
        for k, v in previous.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def events_env(m: Moto) -> dict[str, str]:
    return {"SCHOOLSLINK_EVENTS": "sqs://", "SCHOOLSLINK_EVENTS_ENDPOINT": m.endpoint,
            "SCHOOLSLINK_EVENTS_REGION": REGION, "SCHOOLSLINK_EVENTS_QUEUE_LANDING": m.queues["landing"],
            "SCHOOLSLINK_EVENTS_QUEUE_FHIR": m.queues["fhir"]}


def drain(m: Moto, topic: str, want: int) -> list[str]:
    """Receive (and delete) until `want` bodies arrived; long polls, so no fixed sleeps."""
    bodies: list[str] = []
    for _ in range(20):
        got = m.sqs.receive_message(QueueUrl=m.queues[topic], MaxNumberOfMessages=10, WaitTimeSeconds=2)
        for msg in got.get("Messages", []):
            bodies.append(msg["Body"])
            m.sqs.delete_message(QueueUrl=m.queues[topic], ReceiptHandle=msg["ReceiptHandle"])
        if len(bodies) >= want:
            return bodies
    raise AssertionError(f"expected {want} message(s) on {topic}, got {len(bodies)}")


def test_the_sqs_publisher_sends_each_topic_to_its_queue(moto: Moto) -> None:
    publisher = publisher_from_env(events_env(moto))
    publisher.publish("landing", {"kind": "mis", "school_urn": "100001", "sha256": "cd" * 32, "size": 10})
    publisher.publish("fhir", {"trust_ods": "R9X", "key": "fhir-notifications/R9X/a.json.sealed", "events": 1})
    publisher.publish("hl7v2", {"count": 3, "max_id": 9})  # no queue for this topic: counted, not raised
    publisher.close(timeout=30)
    assert publisher.stats == {"published": 2, "failed": 1, "refused": 0, "dropped": 0}
    [landing] = drain(moto, "landing", 1)
    assert read_message(landing) == [{"topic": "landing", "data": {"kind": "mis", "school_urn": "100001",
                                                                   "sha256": "cd" * 32, "size": 10}}]
    [fhir] = drain(moto, "fhir", 1)
    assert read_message(fhir)[0]["data"]["trust_ods"] == "R9X"


def test_an_sqs_outage_never_raises() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    publisher = publisher_from_env({"SCHOOLSLINK_EVENTS": "sqs://", "SCHOOLSLINK_EVENTS_ENDPOINT": closed,
                                    "SCHOOLSLINK_EVENTS_REGION": REGION,
                                    "SCHOOLSLINK_EVENTS_QUEUE_LANDING": f"{closed}/123456789012/none"})
    publisher.publish("landing", {"kind": "mis", "school_urn": "100001"})
    publisher.close(timeout=60)
    assert publisher.stats["failed"] == 1


def _s3_to_sqs(moto: Moto, bucket: str) -> None:
    """The set-up docs/events.md describes: the landing bucket notifies the landing queue on ObjectCreated."""
    arn = moto.sqs.get_queue_attributes(QueueUrl=moto.queues["landing"], AttributeNames=["QueueArn"])[
        "Attributes"]["QueueArn"]
    moto.s3.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": REGION})
    moto.s3.put_bucket_notification_configuration(Bucket=bucket, NotificationConfiguration={"QueueConfigurations": [
        {"Id": "landing", "QueueArn": arn, "Events": ["s3:ObjectCreated:*"],
         "Filter": {"Key": {"FilterRules": [{"Name": "prefix", "Value": "mis/"}]}}}]})


def test_what_s3_sends_on_object_created_is_a_landing_event(moto: Moto) -> None:
    bucket = f"sl-landing-{uuid.uuid4().hex[:8]}"
    _s3_to_sqs(moto, bucket)
    moto.s3.put_object(Bucket=bucket, Key="mis/100001/ctf export.xml", Body=b"<CTfile/>")
    moto.s3.put_object(Bucket=bucket, Key="elsewhere/x.txt", Body=b"x")  # outside the filter: no message
    events = []
    for body in drain(moto, "landing", 1):
        doc = json.loads(body)
        assert "Records" in doc or doc.get("Event") == "s3:TestEvent"  # S3's own shape, not ours
        events += read_message(body)
    [ev] = events
    assert ev["topic"] == "landing"
    assert ev["data"]["bucket"] == bucket and ev["data"]["key"] == "mis/100001/ctf export.xml"
    assert ev["data"]["size"] == len(b"<CTfile/>")


@pytest.mark.skipif(importlib.util.find_spec("aiobotocore") is None,
                    reason="the amazon provider's SqsSensorTrigger needs aiobotocore, which is not installed "
                           "(it pins botocore<1.43.118; this environment has a newer botocore)")
def test_the_sqs_message_queue_trigger_receives_ours_and_s3s(moto: Moto, monkeypatch: pytest.MonkeyPatch) -> None:
    from schoolslink.schedules import event_trigger

    for k, v in events_env(moto).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AIRFLOW_CONN_SCHOOLSLINK_EVENTS", json.dumps({
        "conn_type": "aws", "login": "testing", "password": "testing",
        "extra": {"region_name": REGION, "endpoint_url": moto.endpoint}}))
    trigger = event_trigger("landing")
    assert trigger.serialize()[1]["sqs_queue"] == moto.queues["landing"]
    publisher = publisher_from_env()
    publisher.publish("landing", {"kind": "mis", "school_urn": "100002", "sha256": "ef" * 32, "size": 3})
    publisher.close(timeout=30)
    bucket = f"sl-landing-{uuid.uuid4().hex[:8]}"
    _s3_to_sqs(moto, bucket)
    moto.s3.put_object(Bucket=bucket, Key="mis/100003/ctf.xml", Body=b"<CTfile/>")

    async def events() -> list[dict[str, Any]]:
        seen: list[dict[str, Any]] = []
        while len([e for e in seen if e["topic"] == "landing"]) < 2:
            async for event in trigger.run():  # one TriggerEvent per batch, as the triggerer sees it
                assert event.payload["status"] == "success"
                for msg in event.payload["message_batch"]:
                    seen += read_message(msg["Body"])
                break
        return seen

    seen = asyncio.run(asyncio.wait_for(events(), timeout=120))
    schools = sorted(e["data"].get("school_urn") or e["data"]["key"] for e in seen)
    assert schools == ["100002", "mis/100003/ctf.xml"]
