"""Putting a school's feed into its own S3 bucket: encrypted at rest, checked end to end, manifest last.

A school that takes files from a bucket reads `<prefix>/<date>/manifest.json` and then the files it lists.
So the manifest is the commit point: every other file is uploaded (and checked) first, and the manifest is
written only when they are all in place. A reader that finds a manifest finds a whole feed.

Every put asks for server-side encryption (`AES256`, or `aws:kms` with a key id): a feed holds pupil data
and never rests in plain, even if a bucket's default encryption is switched off. Every put carries the
file's SHA-256 (`ChecksumSHA256`, which S3 verifies on receipt, refusing a corrupted upload with
`BadDigest`), the response's checksum and encryption are compared with what was asked, and the object is
read back and hashed before the manifest goes (`verify=True`), so a feed is only declared ready when the
bucket demonstrably holds the bytes the manifest describes.

Re-running the same night: if the bucket's manifest is already byte-for-byte the new one, the objects are
checked and any missing or wrong one put again; the manifest is not rewritten. If it differs, the old
manifest is deleted first where the credentials allow it (`s3:DeleteObject`), so a reader never pairs an
old manifest with new files; without that permission the data files are replaced and the manifest last,
and a reader checking SHA-256 against the manifest (as it must) sees a mismatch for that moment and retries.

Errors are `S3DeliveryError`, with `transient` set for what is worth retrying (throttling, 5xx, a dropped
connection); messages carry the bucket, key and S3 error code, never credentials.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, ConnectionError, EndpointConnectionError

MANIFEST: Final = "manifest.json"
SSE_ALGORITHMS: Final = ("AES256", "aws:kms")
_TRANSIENT_CODES: Final = frozenset({
    "SlowDown", "RequestTimeout", "RequestTimeTooSkewed", "Throttling", "ThrottlingException", "InternalError",
    "ServiceUnavailable", "503", "500", "502", "504",
})


class S3DeliveryError(Exception):
    """A feed could not be put into a bucket; `transient` says whether trying again may help."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


@dataclass(frozen=True)
class S3Credentials:
    """Where a school's S3 credentials come from: explicit keys (from an Airflow Connection) or a profile."""

    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    profile: str | None = None


def client(creds: S3Credentials, *, region: str | None, endpoint_url: str | None, timeout: float = 30.0) -> Any:
    """A boto3 S3 client for one school's credentials (one client per school, so no key ever serves two)."""
    if creds.profile:
        session = boto3.session.Session(profile_name=creds.profile, region_name=region)
    else:
        session = boto3.session.Session(aws_access_key_id=creds.access_key_id,
                                        aws_secret_access_key=creds.secret_access_key,
                                        aws_session_token=creds.session_token, region_name=region)
    cfg = Config(connect_timeout=timeout, read_timeout=timeout, retries={"max_attempts": 2, "mode": "standard"},
                 s3={"addressing_style": "path"} if endpoint_url else None)
    return session.client("s3", endpoint_url=endpoint_url, config=cfg)


def _b64_sha256(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode("ascii")


def _code(exc: ClientError) -> str:
    err = exc.response.get("Error", {})
    return str(err.get("Code") or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or "error")


def _wrap(exc: Exception, what: str) -> S3DeliveryError:
    """Our error for a boto failure: the S3 code and what we were doing, never the request's credentials."""
    if isinstance(exc, ClientError):
        code = _code(exc)
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        return S3DeliveryError(f"{what}: {code}", transient=code in _TRANSIENT_CODES or status >= 500)
    if isinstance(exc, EndpointConnectionError | ConnectionError):
        return S3DeliveryError(f"{what}: cannot reach the S3 endpoint ({type(exc).__name__})", transient=True)
    return S3DeliveryError(f"{what}: {type(exc).__name__}", transient=False)


def _sse_args(sse: str, kms_key_id: str | None) -> dict[str, str]:
    if sse not in SSE_ALGORITHMS:
        raise S3DeliveryError(f"server-side encryption must be one of {', '.join(SSE_ALGORITHMS)}")
    if sse == "aws:kms":
        if not kms_key_id:
            raise S3DeliveryError("server-side encryption aws:kms needs a KMS key id")
        return {"ServerSideEncryption": sse, "SSEKMSKeyId": kms_key_id}
    return {"ServerSideEncryption": sse}


def _key(prefix: str, name: str) -> str:
    prefix = prefix.strip("/")
    return f"{prefix}/{name}" if prefix else name


def _put(s3: Any, bucket: str, key: str, data: bytes, sse: Mapping[str, str]) -> None:
    """One encrypted put, its SHA-256 checked by S3 on receipt and echoed back."""
    want = _b64_sha256(data)
    ctype = "application/json" if key.endswith(".json") else "text/csv" if key.endswith(".csv") else (
        "text/html" if key.endswith(".html") else "application/octet-stream")
    try:
        resp = s3.put_object(Bucket=bucket, Key=key, Body=data, ChecksumSHA256=want, ContentType=ctype, **sse)
    except (ClientError, BotoCoreError) as exc:
        raise _wrap(exc, f"put s3://{bucket}/{key}") from None
    if resp.get("ChecksumSHA256") not in (None, want):
        raise S3DeliveryError(f"put s3://{bucket}/{key}: S3 recorded a different SHA-256", transient=True)
    got_sse = resp.get("ServerSideEncryption")
    if got_sse != sse["ServerSideEncryption"]:
        raise S3DeliveryError(f"put s3://{bucket}/{key}: encryption not applied (asked "
                              f"{sse['ServerSideEncryption']}, got {got_sse})")


def _check(s3: Any, bucket: str, key: str, data: bytes, sse: Mapping[str, str]) -> bool:
    """True if the object holds exactly `data`, encrypted as asked (read back and hashed, not trusted)."""
    try:
        resp = s3.get_object(Bucket=bucket, Key=key)
        body = resp["Body"].read()
    except ClientError as exc:
        if _code(exc) in ("NoSuchKey", "404"):
            return False
        raise _wrap(exc, f"get s3://{bucket}/{key}") from None
    except BotoCoreError as exc:
        raise _wrap(exc, f"get s3://{bucket}/{key}") from None
    return bool(hashlib.sha256(body).digest() == hashlib.sha256(data).digest()
                and resp.get("ServerSideEncryption") == sse["ServerSideEncryption"])


def put_feed(s3: Any, bucket: str, prefix: str, files: Sequence[tuple[str, bytes]], *, sse: str = "AES256",
             kms_key_id: str | None = None, verify: bool = True) -> list[str]:
    """Put one night's feed under `prefix` (already `<school prefix>/<date>`): data files, then manifest.json.

    `files` are (relative name, bytes), the manifest among them; returns the keys written, manifest last.
    """
    sse_args = _sse_args(sse, kms_key_id)
    data = [(n, b) for n, b in files if n != MANIFEST]
    manifest = [b for n, b in files if n == MANIFEST]
    if len(manifest) != 1:
        raise S3DeliveryError(f"a feed needs exactly one {MANIFEST}")
    mkey = _key(prefix, MANIFEST)
    try:
        current = s3.get_object(Bucket=bucket, Key=mkey)["Body"].read()
    except ClientError as exc:
        if _code(exc) not in ("NoSuchKey", "404"):
            raise _wrap(exc, f"get s3://{bucket}/{mkey}") from None
        current = None
    except BotoCoreError as exc:
        raise _wrap(exc, f"get s3://{bucket}/{mkey}") from None
    same = current == manifest[0]
    if current is not None and not same:
        try:  # withdraw the old manifest first where allowed: readers then see no feed rather than a mixed one
            s3.delete_object(Bucket=bucket, Key=mkey)
        except ClientError as exc:
            if _code(exc) != "AccessDenied":
                raise _wrap(exc, f"delete s3://{bucket}/{mkey}") from None
    written: list[str] = []
    for name, body in data:
        key = _key(prefix, name)
        if not (same and _check(s3, bucket, key, body, sse_args)):
            _put(s3, bucket, key, body, sse_args)
            if verify and not _check(s3, bucket, key, body, sse_args):
                raise S3DeliveryError(f"s3://{bucket}/{key} does not read back as the bytes sent", transient=True)
        written.append(key)
    if not same:
        _put(s3, bucket, mkey, manifest[0], sse_args)
        if verify and not _check(s3, bucket, mkey, manifest[0], sse_args):
            raise S3DeliveryError(f"s3://{bucket}/{mkey} does not read back as the bytes sent", transient=True)
    written.append(mkey)
    return written
