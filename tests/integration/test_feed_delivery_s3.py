"""Feed delivery to S3 against moto in SERVER mode on 127.0.0.1, with IAM enforcement on.

moto checks signatures and IAM policies once `INITIAL_NO_AUTH_ACTION_COUNT` requests have been served
(moto/core/authorization.py: `request_count >= settings.INITIAL_NO_AUTH_ACTION_COUNT`). The setting is read
from the environment when moto is imported, so the fixture sets it before importing moto; because the
server runs in this process and another test may have imported moto first, the fixture also sets it through
moto's own `/moto-api/reset-auth` endpoint (which also zeroes the request count). While the count lasts the
test acts as admin: buckets, one IAM user per school with an inline policy on its own bucket only, access
keys, a KMS key. It then resets the count to 0, so every later request must be signed by a real user's key
and be allowed by that user's policy.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_feed_delivery_folder import DAY, quarantined, write_feed
from tests.moto_iam import moto_with_iam

REGION = "eu-west-2"


def school_policy(bucket: str) -> dict[str, Any]:
    """The policy docs/feed-delivery.md tells a trust to give a school's delivery user."""
    return {"Version": "2012-10-17", "Statement": [
        {"Sid": "ListOwnBucket", "Effect": "Allow", "Action": ["s3:ListBucket"], "Resource": f"arn:aws:s3:::{bucket}"},
        {"Sid": "ReadWriteOwnObjects", "Effect": "Allow", "Action": ["s3:PutObject", "s3:GetObject"],
         "Resource": f"arn:aws:s3:::{bucket}/*"},
    ]}


@pytest.fixture(scope="module")
def moto_iam() -> Iterator[dict[str, Any]]:
    """moto's server on 127.0.0.1 with IAM enforced after set-up; yields endpoint, buckets, keys per school."""
    with moto_with_iam(REGION) as moto:
        run = uuid.uuid4().hex[:8]
        schools: dict[str, dict[str, str]] = {}
        for urn in ("100001", "100002"):
            bucket = f"sl-feeds-{urn}-{run}"
            moto.s3.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": REGION})
            key, secret = moto.user(f"sl-feed-{urn}-{run}", school_policy(bucket))
            schools[urn] = {"bucket": bucket, "key": key, "secret": secret}
        kms_key = moto.kms.create_key(Description="school feeds")["KeyMetadata"]["KeyId"]
        moto.enforce()
        yield {"endpoint": moto.endpoint, "schools": schools, "kms_key": kms_key}


def school_client(env: dict[str, Any], urn: str) -> Any:
    from connectors.storage.s3 import S3Credentials, client

    s = env["schools"][urn]
    return client(S3Credentials(access_key_id=s["key"], secret_access_key=s["secret"]), region=REGION,
                  endpoint_url=env["endpoint"])


def _conn_env(monkeypatch: pytest.MonkeyPatch, conn_id: str, env: dict[str, Any], urn: str) -> None:
    s = env["schools"][urn]
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps({
        "conn_type": "aws", "login": s["key"], "password": s["secret"], "extra": {"region_name": REGION}}))


def _code(exc: Exception) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code"))


def test_each_school_reaches_only_its_own_bucket(moto_iam: dict[str, Any], feed_home: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from botocore.exceptions import ClientError

    from schoolslink.pipeline.feed_delivery import deliver
    from schoolslink.settings import feeds_dir

    env = moto_iam
    a, b = env["schools"]["100001"], env["schools"]["100002"]
    _conn_env(monkeypatch, "sl_s3_100001", env, "100001")
    _conn_env(monkeypatch, "sl_s3_100002", env, "100002")
    # 100003 is misconfigured: it points at school 100002's bucket with school 100001's credentials.
    _conn_env(monkeypatch, "sl_s3_100003", env, "100001")
    cfg = feed_home / "config" / "feed-delivery.yaml"
    cfg.parent.mkdir(parents=True)
    cfg.write_text(f"""
retry: {{attempts: 2, wait_seconds: 0}}
schools:
  "100001": {{s3: {{bucket: {a['bucket']}, prefix: schoolslink/feeds, endpoint_url: "{env['endpoint']}",
                    aws_conn_id: sl_s3_100001, sse: AES256}}}}
  "100002": {{s3: {{bucket: {b['bucket']}, prefix: in, endpoint_url: "{env['endpoint']}", region: {REGION},
                    aws_conn_id: sl_s3_100002, sse: "aws:kms", kms_key_id: {env['kms_key']}}}}}
  "100003": {{s3: {{bucket: {b['bucket']}, prefix: stolen, endpoint_url: "{env['endpoint']}",
                    aws_conn_id: sl_s3_100003}}}}
""")
    for urn in ("100001", "100002", "100003"):
        write_feed(feeds_dir(), urn, extra={"feed.html": b"<p>tonight</p>"})

    counts = deliver("r-s3", DAY)
    assert counts["feed_delivered"] == 2 and counts["feed_delivery_failed"] == 1, counts
    reasons = {r["source"]: r["reason"] for r in quarantined("feed-delivery:")}
    assert list(reasons) == ["feed-delivery:100003"]
    assert "AccessDenied" in reasons["feed-delivery:100003"]
    assert a["secret"] not in reasons["feed-delivery:100003"]

    s3a, s3b = school_client(env, "100001"), school_client(env, "100002")
    # Enforcement is on: a key IAM does not know (the set-up's admin) is refused outright.
    import boto3
    stranger = boto3.client("s3", endpoint_url=env["endpoint"], region_name=REGION, aws_access_key_id="admin",
                            aws_secret_access_key="admin")
    with pytest.raises(ClientError) as err:
        stranger.list_objects_v2(Bucket=a["bucket"])
    assert _code(err.value) == "InvalidAccessKeyId"
    # Each school reads its own feed: every manifest-listed file, byte for byte, encrypted as configured.
    for s3, bucket, prefix, sse in ((s3a, a["bucket"], "schoolslink/feeds", "AES256"),
                                    (s3b, b["bucket"], "in", "aws:kms")):
        keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"])
        folder = f"{prefix}/{DAY.isoformat()}"
        assert keys == [f"{folder}/{n}" for n in ("feed.csv", "feed.html", "feed.json", "manifest.json")]
        manifest = json.loads(s3.get_object(Bucket=bucket, Key=f"{folder}/manifest.json")["Body"].read())
        for name, meta in manifest["files"].items():
            body = s3.get_object(Bucket=bucket, Key=f"{folder}/{name}")["Body"].read()
            assert hashlib.sha256(body).hexdigest() == meta["sha256"]
        for key in keys:
            head = s3.head_object(Bucket=bucket, Key=key)
            assert head["ServerSideEncryption"] == sse, key
            if sse == "aws:kms":
                assert env["kms_key"] in head["SSEKMSKeyId"]

    # School A's credentials: get, put and list on school B's bucket are all denied.
    b_key = f"in/{DAY.isoformat()}/feed.csv"
    with pytest.raises(ClientError) as err:
        s3a.get_object(Bucket=b["bucket"], Key=b_key)
    assert _code(err.value) == "AccessDenied"
    with pytest.raises(ClientError) as err:
        s3a.put_object(Bucket=b["bucket"], Key=b_key, Body=b"overwritten", ServerSideEncryption="AES256")
    assert _code(err.value) == "AccessDenied"
    with pytest.raises(ClientError) as err:
        s3a.list_objects_v2(Bucket=b["bucket"])
    assert _code(err.value) == "AccessDenied"
    with pytest.raises(ClientError) as err:
        s3b.list_objects_v2(Bucket=a["bucket"])
    assert _code(err.value) == "AccessDenied"
    assert not s3b.list_objects_v2(Bucket=b["bucket"], Prefix="stolen/").get("Contents")
    assert s3b.get_object(Bucket=b["bucket"], Key=b_key)["Body"].read() != b"overwritten"


def test_manifest_goes_last_and_a_rerun_replaces_cleanly(moto_iam: dict[str, Any], feed_home: Path) -> None:
    from connectors.storage.s3 import S3DeliveryError, put_feed
    from schoolslink.pipeline.feed_delivery import read_feed
    from schoolslink.settings import feeds_dir

    env = moto_iam
    bucket = env["schools"]["100001"]["bucket"]
    s3 = school_client(env, "100001")
    day = date(2026, 9, 3)
    feed = read_feed(write_feed(feeds_dir(), "100001", day), "100001", day)
    written = put_feed(s3, bucket, f"rerun/{day}", feed.files, sse="AES256")
    assert written[-1] == f"rerun/{day}/manifest.json"  # the commit point is written after every data file
    first = s3.get_object(Bucket=bucket, Key=written[-1])["Body"].read()
    # The same night again, unchanged: idempotent, the manifest untouched.
    assert put_feed(s3, bucket, f"rerun/{day}", feed.files, sse="AES256") == written
    assert s3.get_object(Bucket=bucket, Key=written[-1])["Body"].read() == first
    # The same night again with a different feed: the new bytes and the new manifest agree.
    feed2 = read_feed(write_feed(feeds_dir(), "100001", day, pupils=[]), "100001", day)
    put_feed(s3, bucket, f"rerun/{day}", feed2.files, sse="AES256")
    m = json.loads(s3.get_object(Bucket=bucket, Key=written[-1])["Body"].read())
    assert m["rows"] == 0
    for name, meta in m["files"].items():
        body = s3.get_object(Bucket=bucket, Key=f"rerun/{day}/{name}")["Body"].read()
        assert hashlib.sha256(body).hexdigest() == meta["sha256"]
    # A put that cannot be encrypted as asked is never attempted in plain.
    with pytest.raises(S3DeliveryError, match="aws:kms needs a KMS key id"):
        put_feed(s3, bucket, "x", feed.files, sse="aws:kms")


@pytest.fixture()
def feed_home(sl_home: Path) -> Path:
    from schoolslink.store.db import migrate

    migrate()
    return sl_home
