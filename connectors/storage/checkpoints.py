"""External stores for the ledger's Merkle checkpoints: somewhere the state store's own credentials cannot rewrite.

A checkpoint is a small JSON document, `{"tree_size", "root", "run_id", "created_at"}`: the RFC 6962 tree head
over the first `tree_size` ledger entries when a DAG run finished. It never holds pupil data (no subject, no
item, no value): only a count, a hash, an Airflow run id and a time. Each is written once, under the name
`<tree_size:012d>-<run_id>.json` (run id characters outside `[A-Za-z0-9._-]` become `_`; the document holds
the run id as it is).

Two stores:

- `S3ObjectLockStore`: a bucket created with Object Lock enabled (which also turns on versioning). Each
  checkpoint is put under `<prefix>/checkpoints/` with `ObjectLockMode` COMPLIANCE (or GOVERNANCE) and
  `ObjectLockRetainUntilDate` = now + the ledger's retention, so no one (COMPLIANCE: not even the account's root
  user) can delete or change that version until then. The pipeline's credentials should allow only
  `s3:PutObject`, `s3:GetObject`, `s3:GetObjectVersion`, `s3:ListBucket` and `s3:ListBucketVersions` on the
  bucket (docs/audit-ledger.md). A put to an existing name makes a *second version*; reading returns every
  version of every checkpoint, and the ledger's verify reports a name with more than one differing version (or
  a delete marker) as tampering.
- `FolderStore`: a local folder, for development and the demo. Files are created exclusively (never
  overwritten by this code), but anyone with write access to the folder (and any root user) can change or
  remove them: it gives no protection against a privileged insider. Use S3 Object Lock in production.

Configuration (`from_config`): `SCHOOLSLINK_CHECKPOINTS` = `s3://bucket/prefix` (credentials from the usual
boto3 chain: environment, profile, instance role; `SCHOOLSLINK_CHECKPOINTS_ENDPOINT` for MinIO or moto) or a
folder path; default `<SCHOOLSLINK_HOME>/checkpoints`.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final, Protocol

SUBFOLDER: Final = "checkpoints"
LOCK_MODES: Final = ("COMPLIANCE", "GOVERNANCE")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


class CheckpointStoreError(Exception):
    """The checkpoint store could not be written or read (message: store, name and error code; never secrets)."""


@dataclass(frozen=True, slots=True)
class CheckpointVersion:
    """One stored version of a checkpoint object. `body` None: a delete marker (the object was deleted)."""

    version_id: str
    body: bytes | None
    last_modified: datetime | None = None


def checkpoint_name(tree_size: int, run_id: str) -> str:
    return f"{tree_size:012d}-{_UNSAFE.sub('_', run_id)[:200]}.json"


def checkpoint_body(tree_size: int, root: str, run_id: str, created_at: datetime) -> bytes:
    """The document stored for a checkpoint: tree size, root hash, run id and time, and nothing else."""
    doc = {"tree_size": tree_size, "root": root, "run_id": run_id, "created_at": created_at.isoformat()}
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


class CheckpointStore(Protocol):
    """Where checkpoints go: write once; read back every version of every checkpoint."""

    @property
    def description(self) -> str: ...

    def put(self, name: str, body: bytes, retain_until: datetime) -> None: ...

    def read_all(self) -> dict[str, list[CheckpointVersion]]:
        """name -> its versions, oldest first."""
        ...


class FolderStore:
    """Checkpoints as files in a local folder. Development and demo only: no protection against a root user."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    @property
    def description(self) -> str:
        return f"folder {self.folder}"

    def put(self, name: str, body: bytes, retain_until: datetime) -> None:
        del retain_until  # a folder cannot hold a file for a time: see the module's note
        self.folder.mkdir(parents=True, exist_ok=True)
        target = self.folder / name
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, target)  # fails if the name exists: a checkpoint is never overwritten here
            except FileExistsError:
                if target.read_bytes() != body:
                    raise CheckpointStoreError(f"{self.description}: {name} exists with other contents") from None
        finally:
            os.unlink(tmp)

    def read_all(self) -> dict[str, list[CheckpointVersion]]:
        if not self.folder.is_dir():
            return {}
        out: dict[str, list[CheckpointVersion]] = {}
        for p in sorted(self.folder.glob("*.json")):
            if p.name.startswith(".tmp-"):
                continue
            out[p.name] = [CheckpointVersion("file", p.read_bytes(), None)]
        return out


class S3ObjectLockStore:
    """Checkpoints as S3 objects under Object Lock, one locked version each (see the module's note)."""

    def __init__(self, client: Any, bucket: str, prefix: str = "", mode: str = "COMPLIANCE") -> None:
        if mode not in LOCK_MODES:
            raise ValueError(f"object lock mode must be one of {', '.join(LOCK_MODES)}")
        self.client = client
        self.bucket = bucket
        self.prefix = "/".join(p for p in (prefix.strip("/"), SUBFOLDER) if p) + "/"
        self.mode = mode

    @property
    def description(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def _fail(self, what: str, exc: Exception) -> CheckpointStoreError:
        code = getattr(exc, "response", {}).get("Error", {}).get("Code") or type(exc).__name__
        return CheckpointStoreError(f"{self.description}: {what} failed ({code})")

    def put(self, name: str, body: bytes, retain_until: datetime) -> None:
        try:
            self.client.put_object(
                Bucket=self.bucket, Key=self.prefix + name, Body=body, ContentType="application/json",
                ObjectLockMode=self.mode, ObjectLockRetainUntilDate=retain_until,
                ChecksumAlgorithm="SHA256",  # Object Lock puts need a checksum (or Content-MD5)
            )
        except Exception as exc:  # noqa: BLE001 - botocore raises several families; the caller needs one
            raise self._fail(f"put {name}", exc) from None

    def read_all(self) -> dict[str, list[CheckpointVersion]]:
        found: dict[str, list[tuple[datetime | None, CheckpointVersion]]] = {}
        try:
            pages = self.client.get_paginator("list_object_versions").paginate(Bucket=self.bucket,
                                                                              Prefix=self.prefix)
            for page in pages:
                for v in page.get("Versions", []):
                    name = str(v["Key"])[len(self.prefix):]
                    obj = self.client.get_object(Bucket=self.bucket, Key=v["Key"], VersionId=v["VersionId"])
                    body = obj["Body"].read()
                    found.setdefault(name, []).append(
                        (v.get("LastModified"), CheckpointVersion(str(v["VersionId"]), body, v.get("LastModified"))))
                for m in page.get("DeleteMarkers", []):
                    name = str(m["Key"])[len(self.prefix):]
                    found.setdefault(name, []).append(
                        (m.get("LastModified"), CheckpointVersion(str(m["VersionId"]), None, m.get("LastModified"))))
        except Exception as exc:  # noqa: BLE001
            raise self._fail("reading checkpoints", exc) from None
        out: dict[str, list[CheckpointVersion]] = {}
        for name, vs in found.items():
            # oldest first (S3 lists newest first; times have a resolution of a second, so keep the listing
            # order, reversed, among equal times)
            ordered = list(reversed(vs))
            ordered.sort(key=lambda t: t[0].timestamp() if t[0] is not None else 0.0)
            out[name] = [v for _, v in ordered]
        return out


def from_config(value: str | None, *, default_folder: Path, endpoint_url: str | None = None,
                mode: str | None = None, env: Mapping[str, str] | None = None) -> CheckpointStore:
    """The store `SCHOOLSLINK_CHECKPOINTS` names: `s3://bucket/prefix`, or a folder (default `default_folder`)."""
    env = os.environ if env is None else env
    value = (value or "").strip()
    if value.startswith("s3://"):
        import boto3
        from botocore.config import Config

        bucket, _, prefix = value.removeprefix("s3://").partition("/")
        if not bucket:
            raise ValueError("SCHOOLSLINK_CHECKPOINTS: s3:// needs a bucket name")
        cfg = Config(connect_timeout=30, read_timeout=30, retries={"max_attempts": 3, "mode": "standard"},
                     s3={"addressing_style": "path"} if endpoint_url else None)
        client = boto3.session.Session().client("s3", endpoint_url=endpoint_url or None, config=cfg)
        return S3ObjectLockStore(client, bucket, prefix,
                                 mode or env.get("SCHOOLSLINK_CHECKPOINTS_LOCK_MODE", "COMPLIANCE"))
    return FolderStore(Path(value).expanduser().resolve() if value else default_folder)
