"""school_feeds' delivery stage: each school that takes files gets tonight's feed in its own place.

Configuration: `SCHOOLSLINK_FEED_DELIVERY` (a file), default `SCHOOLSLINK_HOME/config/feed-delivery.yaml`;
no file, no delivery (`{"feed_delivery_configured": 0}`). docs/feed-delivery.md has examples. In short:

    smtp: {host: relay.example, port: 587, from: feeds@trust.example, starttls: true}   # optional
    retry: {attempts: 3, wait_seconds: 5}                                                # optional
    schools:
      "100001": {name: ..., folder: {path: /mnt/schools/100001}, notify_email: [dsl@school.example]}
      "100002": {s3: {bucket: ..., prefix: schoolslink, region: eu-west-2, aws_conn_id: schoolslink_s3_100002,
                      sse: AES256}}
      "100003": {sftp: {host: ..., port: 22, username: ..., private_key: ..., known_hosts: ...,
                        remote_dir: feeds}}

Each school has exactly one target. Errors name the school and the key, never a secret's value.

What is sent is what the feed's own manifest lists, plus the manifest: the folder is read once, every file
is checked against the manifest's SHA-256 (and size), and only those checked bytes go out; a feed that does
not match its manifest (tampered, half-written, hand-edited) is refused with the reason. Whatever the
target, a school never sees half a feed: the manifest is written last to S3, SFTP and folder feeds are
written beside the final place and renamed in. A re-run of the night replaces the feed cleanly.

One school's failure never stops the others: it is recorded in `quarantine` (source `feed-delivery:<URN>`,
or `feed-email:<URN>` for the notice) with its reason, and counted. Transient failures (a dropped
connection, throttling, a 5xx) are tried again a couple of times first; permanent ones (access denied, a
host key that does not match, a refused feed) are not. The task returns counts only, never pupil data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, Final

import yaml

from connectors.email import EmailError, SmtpSettings, send_feed_ready
from schoolslink import connections
from schoolslink.connections import ConnectionLookup
from schoolslink.errors import ConfigurationError
from schoolslink.pipeline.common import quarantine_rows, store
from schoolslink.settings import feeds_dir, home

log = logging.getLogger(__name__)

CONFIG_ENV: Final = "SCHOOLSLINK_FEED_DELIVERY"
MANIFEST: Final = "manifest.json"
TARGETS: Final = ("folder", "s3", "sftp")

_SCHOOL_KEYS: Final = {"name", "notify_email", *TARGETS}
_TARGET_KEYS: Final = {
    "folder": {"path"},
    "s3": {"bucket", "prefix", "region", "endpoint_url", "aws_conn_id", "profile", "sse", "kms_key_id"},
    "sftp": {"host", "port", "username", "private_key", "passphrase_env", "known_hosts", "host_key_fingerprint",
             "remote_dir", "timeout"},
}
_SMTP_KEYS: Final = {"host", "port", "from", "starttls", "ca_file", "username", "password_env", "timeout"}


class FeedRefused(Exception):
    """The local feed does not match its manifest (or has none): it is not sent, and why is recorded."""


class FeedDeliveryError(Exception):
    """A folder target failed; `transient` says whether trying again may help."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


@dataclass(frozen=True)
class SchoolDelivery:
    """One school's delivery: its target kind and that target's settings (validated), and who to tell."""

    urn: str
    kind: str
    target: Mapping[str, Any] = field(repr=False)
    name: str | None = None
    notify_email: tuple[str, ...] = ()


@dataclass(frozen=True)
class DeliveryConfig:
    """The whole file: schools, the optional relay, and how hard to retry."""

    schools: tuple[SchoolDelivery, ...]
    smtp: SmtpSettings | None = None
    attempts: int = 3
    wait_seconds: float = 2.0


@dataclass(frozen=True)
class VerifiedFeed:
    """A feed folder's files as read once and checked against its manifest: (name, bytes), manifest last."""

    urn: str
    feed_date: str
    files: tuple[tuple[str, bytes], ...] = field(repr=False)
    rows: int | None


# Configuration --------------------------------------------------------------------------------------------


def config_path() -> Path:
    return Path(os.environ.get(CONFIG_ENV) or home() / "config" / "feed-delivery.yaml")


def _need(ok: bool, where: str, msg: str) -> None:
    if not ok:
        raise ConfigurationError(f"feed delivery config, {where}: {msg}")


def _str(d: Mapping[str, Any], key: str, where: str, *, required: bool = True) -> str | None:
    v = d.get(key)
    if v is None:
        _need(not required, where, f"'{key}' is required")
        return None
    _need(isinstance(v, str | int) and not isinstance(v, bool) and str(v).strip() != "", where,
          f"'{key}' must be non-empty text")
    return str(v).strip()


def _port(d: Mapping[str, Any], key: str, where: str, default: int) -> int:
    v = d.get(key, default)
    _need(isinstance(v, int) and not isinstance(v, bool) and 0 < v < 65536, where,
          f"'{key}' must be a port number (1-65535)")
    return int(v)


def _target(urn: str, kind: str, spec: Any) -> dict[str, Any]:
    where = f"school {urn}, {kind}"
    _need(isinstance(spec, dict), where, "must be a mapping of settings")
    unknown = sorted(set(spec) - _TARGET_KEYS[kind])
    _need(not unknown, where, f"unknown key(s) {', '.join(map(repr, unknown))}; known: "
          f"{', '.join(sorted(_TARGET_KEYS[kind]))}")
    out: dict[str, Any] = {}
    if kind == "folder":
        p = _str(spec, "path", where)
        _need(p is not None and Path(p).is_absolute(), f"{where}.path", "must be an absolute path")
        out["path"] = p
    elif kind == "s3":
        out["bucket"] = _str(spec, "bucket", where)
        out["prefix"] = (_str(spec, "prefix", where, required=False) or "").strip("/")
        out["region"] = _str(spec, "region", where, required=False)
        out["endpoint_url"] = _str(spec, "endpoint_url", where, required=False)
        sources = [k for k in ("aws_conn_id", "profile") if spec.get(k)]
        _need(len(sources) == 1, where, "needs exactly one credentials source: 'aws_conn_id' (an Airflow "
              "Connection, or AIRFLOW_CONN_<ID> outside Airflow) or 'profile' (a named AWS profile)")
        out[sources[0]] = _str(spec, sources[0], where)
        sse = spec.get("sse", "AES256")
        _need(sse in ("AES256", "aws:kms"), f"{where}.sse", "must be 'AES256' or 'aws:kms' (encryption is "
              "always on)")
        out["sse"] = sse
        out["kms_key_id"] = _str(spec, "kms_key_id", where, required=sse == "aws:kms")
        _need(sse == "aws:kms" or out["kms_key_id"] is None, f"{where}.kms_key_id", "is only for sse aws:kms")
    else:
        out["host"] = _str(spec, "host", where)
        out["port"] = _port(spec, "port", where, 22)
        out["username"] = _str(spec, "username", where)
        key = _str(spec, "private_key", where)
        _need(key is not None and Path(key).is_absolute(), f"{where}.private_key", "must be an absolute path")
        out["private_key"] = key
        out["passphrase_env"] = _str(spec, "passphrase_env", where, required=False)
        checks = [k for k in ("known_hosts", "host_key_fingerprint") if spec.get(k)]
        _need(len(checks) == 1, where, "needs exactly one of 'known_hosts' (a file) and 'host_key_fingerprint' "
              "(SHA256:...): the host key is always verified")
        out[checks[0]] = _str(spec, checks[0], where)
        if checks[0] == "host_key_fingerprint":
            _need(str(out["host_key_fingerprint"]).startswith("SHA256:"), f"{where}.host_key_fingerprint",
                  "must be a SHA-256 fingerprint as ssh-keygen -lf prints it (SHA256:...)")
        rd = _str(spec, "remote_dir", where, required=False) or "feeds"
        _need(".." not in rd.split("/"), f"{where}.remote_dir", "must not contain '..'")
        out["remote_dir"] = rd.rstrip("/") or "/"
        t = spec.get("timeout", 20)
        _need(isinstance(t, int | float) and not isinstance(t, bool) and t > 0, f"{where}.timeout",
              "must be a number of seconds")
        out["timeout"] = float(t)
    return out


def _school(urn: str, spec: Any) -> SchoolDelivery:
    where = f"school {urn}"
    _need(isinstance(spec, dict), where, "must be a mapping with one target (folder, s3 or sftp)")
    unknown = sorted(set(spec) - _SCHOOL_KEYS)
    _need(not unknown, where, f"unknown key(s) {', '.join(map(repr, unknown))}; known: "
          f"{', '.join(sorted(_SCHOOL_KEYS))}")
    kinds = [k for k in TARGETS if k in spec]
    _need(len(kinds) == 1, where, "needs exactly one target: 'folder', 's3' or 'sftp'")
    emails = spec.get("notify_email") or []
    if isinstance(emails, str):
        emails = [emails]
    _need(isinstance(emails, list) and all(isinstance(e, str) and "@" in e for e in emails),
          f"{where}.notify_email", "must be a list of email addresses")
    return SchoolDelivery(urn=urn, kind=kinds[0], target=_target(urn, kinds[0], spec[kinds[0]]),
                          name=_str(spec, "name", where, required=False), notify_email=tuple(emails))


def _smtp(spec: Any) -> SmtpSettings:
    where = "smtp"
    _need(isinstance(spec, dict), where, "must be a mapping")
    unknown = sorted(set(spec) - _SMTP_KEYS)
    _need(not unknown, where, f"unknown key(s) {', '.join(map(repr, unknown))}; known: {', '.join(sorted(_SMTP_KEYS))}")
    starttls = spec.get("starttls", True)
    _need(isinstance(starttls, bool), f"{where}.starttls", "must be true or false")
    password_env = _str(spec, "password_env", where, required=False)
    password = None
    if password_env:
        password = os.environ.get(password_env)
        _need(password is not None, f"{where}.password_env", f"environment variable {password_env} is not set")
    return SmtpSettings(host=str(_str(spec, "host", where)), port=_port(spec, "port", where, 25),
                        sender=str(_str(spec, "from", where)), starttls=starttls,
                        ca_file=_str(spec, "ca_file", where, required=False),
                        username=_str(spec, "username", where, required=False), password=password,
                        timeout=float(spec.get("timeout", 20)))


def load_config(path: Path | None = None) -> DeliveryConfig | None:
    """The delivery configuration, validated; None when there is no file (delivery is off)."""
    path = path or config_path()
    if not path.exists():
        if os.environ.get(CONFIG_ENV):
            raise ConfigurationError(f"{CONFIG_ENV} points at {path}, which does not exist")
        return None
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigurationError(f"feed delivery config {path}: not valid YAML ({type(exc).__name__})") from None
    _need(isinstance(doc, dict), str(path), "must be a mapping with 'schools'")
    unknown = sorted(set(doc) - {"schools", "smtp", "retry"})
    _need(not unknown, str(path), f"unknown key(s) {', '.join(map(repr, unknown))}; known: retry, schools, smtp")
    schools = doc.get("schools") or {}
    _need(isinstance(schools, dict), "schools", "must map each school URN to its delivery")
    parsed = tuple(_school(str(urn), spec) for urn, spec in sorted(schools.items(), key=lambda kv: str(kv[0])))
    for s in parsed:
        _need(s.urn.isdigit() and len(s.urn) == 6, f"school {s.urn}", "a URN is six digits (quote it in YAML)")
    smtp = _smtp(doc["smtp"]) if doc.get("smtp") is not None else None
    for s in parsed:
        _need(not s.notify_email or smtp is not None, f"school {s.urn}.notify_email",
              "needs an 'smtp' block to send through")
    retry = doc.get("retry") or {}
    _need(isinstance(retry, dict) and set(retry) <= {"attempts", "wait_seconds"}, "retry",
          "takes 'attempts' and 'wait_seconds'")
    attempts, wait = retry.get("attempts", 3), retry.get("wait_seconds", 2)
    _need(isinstance(attempts, int) and not isinstance(attempts, bool) and 1 <= attempts <= 10, "retry.attempts",
          "must be a whole number 1-10")
    _need(isinstance(wait, int | float) and not isinstance(wait, bool) and 0 <= wait <= 300, "retry.wait_seconds",
          "must be 0-300 seconds")
    return DeliveryConfig(schools=parsed, smtp=smtp, attempts=attempts, wait_seconds=float(wait))


# Reading a feed ---------------------------------------------------------------------------------------------


def _listed(manifest: Mapping[str, Any]) -> list[tuple[str, str, int | None]]:
    """(name, sha256, size) for each file the manifest lists: a {name: {sha256, bytes}} mapping (feeds.py)
    or a list of {name|path|file, sha256, bytes} entries, so the feed's shape can grow without us."""
    files = manifest.get("files")
    entries: list[tuple[Any, Any]] = []
    if isinstance(files, dict):
        entries = list(files.items())
    elif isinstance(files, list):
        for e in files:
            if not isinstance(e, dict):
                raise FeedRefused("manifest.json: each entry of 'files' must be an object")
            entries.append((e.get("name") or e.get("path") or e.get("file"), e))
    else:
        raise FeedRefused("manifest.json lists no files")
    out: list[tuple[str, str, int | None]] = []
    for name, meta in entries:
        if not isinstance(name, str) or not isinstance(meta, dict) or not isinstance(meta.get("sha256"), str):
            raise FeedRefused(f"manifest.json: entry {name!r} has no name or no sha256")
        parts = name.split("/")
        if name.startswith("/") or "\\" in name or any(p in ("", ".", "..") for p in parts) or name == MANIFEST:
            raise FeedRefused(f"manifest.json lists an unsafe file name {name!r}")
        size = meta.get("bytes")
        out.append((name, meta["sha256"].lower(), size if isinstance(size, int) else None))
    if not out:
        raise FeedRefused("manifest.json lists no files")
    return out


def read_feed(folder: Path, urn: str, feed_date: date) -> VerifiedFeed:
    """Read a published feed folder once and check every listed file against the manifest."""
    try:
        raw = (folder / MANIFEST).read_bytes()
    except FileNotFoundError:
        raise FeedRefused(f"no {MANIFEST} in the feed for {feed_date.isoformat()}") from None
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise FeedRefused(f"{MANIFEST} is not valid JSON") from None
    if not isinstance(manifest, dict):
        raise FeedRefused(f"{MANIFEST} must be a JSON object")
    if str(manifest.get("school_urn", urn)) != urn or str(manifest.get("date", feed_date.isoformat())) \
            != feed_date.isoformat():
        raise FeedRefused(f"{MANIFEST} is for another school or night")
    files: list[tuple[str, bytes]] = []
    root = folder.resolve()
    for name, sha, size in _listed(manifest):
        path = folder / name
        if path.is_symlink() or not path.resolve().is_relative_to(root):
            raise FeedRefused(f"{name} is a link or outside the feed folder")
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise FeedRefused(f"{name}, listed in the manifest, is missing") from None
        if size is not None and len(data) != size:
            raise FeedRefused(f"{name} is {len(data)} bytes, the manifest says {size}")
        if hashlib.sha256(data).hexdigest() != sha:
            raise FeedRefused(f"{name} does not match its SHA-256 in the manifest")
        files.append((name, data))
    rows = manifest.get("rows")
    return VerifiedFeed(urn, feed_date.isoformat(), (*files, (MANIFEST, raw)),
                        rows if isinstance(rows, int) and not isinstance(rows, bool) else None)


# Targets -------------------------------------------------------------------------------------------------


def _deliver_folder(t: Mapping[str, Any], feed: VerifiedFeed) -> str:
    """Copy into `<path>/.<date>.partial/`, fsync and read back, then rename to `<path>/<date>/`."""
    root = Path(t["path"])
    if not root.is_dir():  # a share that is not mounted: never create it, the copy would land on local disk
        raise FeedDeliveryError(f"folder {root} does not exist (is the share mounted?)")
    partial, final, old = root / f".{feed.feed_date}.partial", root / feed.feed_date, root / f".{feed.feed_date}.old"
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir()
    for name, data in feed.files:
        p = partial / name
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if hashlib.sha256(p.read_bytes()).digest() != hashlib.sha256(data).digest():
            raise FeedDeliveryError(f"{p} does not read back as the bytes written", transient=True)
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(partial, final)
        shutil.rmtree(old)
    else:
        os.replace(partial, final)
    dfd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return str(final)


def _s3_credentials(t: Mapping[str, Any], lookup: ConnectionLookup) -> tuple[Any, str | None, str | None]:
    from connectors.storage.s3 import S3Credentials

    if t.get("profile"):
        return S3Credentials(profile=t["profile"]), t.get("region"), t.get("endpoint_url")
    conn_id = t["aws_conn_id"]
    conn = lookup(conn_id)
    if not conn:
        raise ConfigurationError(f"no Airflow Connection {conn_id!r} (or AIRFLOW_CONN_{conn_id.upper()})")
    extra = conn.get("extra") or {}
    if not conn.get("login") or not conn.get("password"):
        raise ConfigurationError(f"Airflow Connection {conn_id!r} needs the access key id as login and the "
                                 "secret access key as password")
    creds = S3Credentials(access_key_id=conn["login"], secret_access_key=conn["password"],
                          session_token=extra.get("aws_session_token"))
    return creds, t.get("region") or extra.get("region_name"), t.get("endpoint_url") or extra.get("endpoint_url")


def _deliver_s3(t: Mapping[str, Any], feed: VerifiedFeed, lookup: ConnectionLookup) -> str:
    from connectors.storage import s3

    creds, region, endpoint = _s3_credentials(t, lookup)
    client = s3.client(creds, region=region, endpoint_url=endpoint)
    prefix = f"{t['prefix']}/{feed.feed_date}" if t["prefix"] else feed.feed_date
    s3.put_feed(client, t["bucket"], prefix, feed.files, sse=t["sse"], kms_key_id=t.get("kms_key_id"))
    return f"s3://{t['bucket']}/{prefix}/"


def _deliver_sftp(t: Mapping[str, Any], feed: VerifiedFeed) -> str:
    from connectors.storage import sftp

    passphrase = os.environ.get(t["passphrase_env"]) if t.get("passphrase_env") else None
    target = sftp.SftpTarget(host=t["host"], port=t["port"], username=t["username"],
                             private_key=Path(t["private_key"]),
                             known_hosts=Path(t["known_hosts"]) if t.get("known_hosts") else None,
                             host_key_fingerprint=t.get("host_key_fingerprint"), remote_dir=t["remote_dir"],
                             passphrase=passphrase, timeout=t["timeout"])
    final = sftp.put_feed(target, feed.feed_date, feed.files)
    return f"sftp://{t['host']}:{t['port']}/{final.lstrip('/')}/"


def _is_transient(exc: BaseException) -> bool:
    """Worth another try: errors that say so, and plain connection trouble. Never a config or feed refusal."""
    if isinstance(exc, ConfigurationError | FeedRefused):
        return False
    flag = getattr(exc, "transient", None)
    if isinstance(flag, bool):
        return flag
    return isinstance(exc, ConnectionError | TimeoutError)


def _reason(exc: BaseException) -> str:
    """A failure as recorded: the connectors' and our own messages name hosts, keys and codes, never secrets or
    pupil data; anything else is recorded by its type only."""
    from connectors.storage.s3 import S3DeliveryError
    from connectors.storage.sftp import SftpDeliveryError

    if isinstance(exc, ConfigurationError | FeedRefused | FeedDeliveryError | S3DeliveryError | SftpDeliveryError
                  | EmailError):
        return str(exc)
    return f"{type(exc).__name__} (details withheld)"


def _with_retries(fn: Callable[[], str], cfg: DeliveryConfig, what: str) -> str:
    for attempt in range(1, cfg.attempts + 1):
        try:
            return fn()
        except Exception as exc:  # classified: retried if transient, else re-raised for the caller to record
            if attempt >= cfg.attempts or not _is_transient(exc):
                raise
            log.warning("%s: attempt %d failed (%s); trying again", what, attempt, _reason(exc))
            time.sleep(cfg.wait_seconds * attempt)
    raise AssertionError("unreachable")  # pragma: no cover


# The stage -------------------------------------------------------------------------------------------------


def deliver(run_id: str, feed_date: date, lookup: ConnectionLookup | None = None,
            config: DeliveryConfig | None = None) -> dict[str, int]:
    """Deliver tonight's feed of every configured school that has one; counts only (never pupil data).

    `lookup` finds Airflow Connections (default: `schoolslink.connections.lookup`, Airflow's own inside a task,
    the environment's `AIRFLOW_CONN_<ID>` outside)."""
    cfg = config or load_config()
    if cfg is None:
        return {"feed_delivery_configured": 0}
    lookup = lookup or connections.lookup
    counts = {"feed_delivery_configured": len(cfg.schools), "feed_delivered": 0, "feed_delivery_failed": 0,
              "feed_delivery_no_feed": 0, "feed_ready_emails": 0, "feed_ready_email_failed": 0}
    for school in cfg.schools:
        folder = feeds_dir() / school.urn / feed_date.isoformat()
        if not folder.is_dir():
            counts["feed_delivery_no_feed"] += 1  # no feed built tonight (no roll, or no agreement covers it)
            continue
        what = f"feed delivery for school {school.urn} ({school.kind})"

        def attempt(s: SchoolDelivery = school, f: Path = folder) -> str:
            feed = read_feed(f, s.urn, feed_date)  # re-read each try: what goes is what was just checked
            if s.kind == "folder":
                return _deliver_folder(s.target, feed)
            if s.kind == "s3":
                return _deliver_s3(s.target, feed, lookup)
            return _deliver_sftp(s.target, feed)

        try:
            where = _with_retries(attempt, cfg, what)
        except Exception as exc:  # noqa: BLE001 - one school's failure is recorded; the others go on
            reason = _reason(exc)
            log.warning("%s failed: %s", what, reason)
            counts["feed_delivery_failed"] += 1
            with store().begin() as conn:
                quarantine_rows(conn, run_id, f"feed-delivery:{school.urn}",
                                [(None, school.kind, f"feed for {feed_date.isoformat()} not delivered: {reason}")])
            continue
        counts["feed_delivered"] += 1
        log.info("%s: delivered to %s", what, where)
        if school.notify_email and cfg.smtp is not None:
            _notify(cfg, school, run_id, feed_date, where, folder, counts)
    return counts


def _notify(cfg: DeliveryConfig, school: SchoolDelivery, run_id: str, feed_date: date, where: str, folder: Path,
            counts: dict[str, int]) -> None:
    """The feed-ready email; a failure is recorded but does not undo the delivery."""
    assert cfg.smtp is not None
    smtp = cfg.smtp
    try:
        rows = json.loads((folder / MANIFEST).read_bytes()).get("rows")
    except (OSError, ValueError, AttributeError):
        rows = None

    def send() -> str:
        send_feed_ready(smtp, school.notify_email, school_urn=school.urn, school_name=school.name,
                        feed_date=feed_date.isoformat(), where=where,
                        rows=rows if isinstance(rows, int) and not isinstance(rows, bool) else None)
        return "sent"

    try:
        _with_retries(send, cfg, f"feed-ready email for school {school.urn}")
    except Exception as exc:  # noqa: BLE001 - recorded; the feed itself was delivered
        counts["feed_ready_email_failed"] += 1
        with store().begin() as conn:
            quarantine_rows(conn, run_id, f"feed-email:{school.urn}",
                            [(None, "notify_email", f"feed-ready email not sent: {_reason(exc)}")])
        return
    counts["feed_ready_emails"] += 1
