"""Feed delivery to a folder target, the configuration's validation, and the refusal of a feed that does not
match its manifest. Also the synthetic feed (same shape as schoolslink/feeds.py writes) the other delivery
tests use."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from datetime import date
from pathlib import Path

import pytest
from sqlalchemy import select

from schoolslink.errors import ConfigurationError

DAY = date(2026, 9, 2)
# Fake pupils: the delivery tests assert none of this reaches an email or a log.
PUPILS = [
    {"upn": "A820200107001", "surname": "Quillfeather", "forename": "Amelie", "status": "Waiting for assessment"},
    {"upn": "B820200107002", "surname": "Marchbanks", "forename": "Tobiah", "status": "Accepted"},
    {"upn": "C820200107003", "surname": "Ollerenshaw", "forename": "Priya", "status": "Not accepted"},
]


def write_feed(feeds_root: Path, urn: str, day: date = DAY, *, extra: dict[str, bytes] | None = None,
               pupils: list[dict[str, str]] | None = None) -> Path:
    """A published feed folder for one school, manifest and all, in the shape feeds._stage_feed writes."""
    pupils = PUPILS if pupils is None else pupils
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["upn", "surname", "forename", "status"], lineterminator="\r\n")
    w.writeheader()
    w.writerows(pupils)
    files = {"feed.csv": buf.getvalue().encode(),
             "feed.json": json.dumps({"school_urn": urn, "date": day.isoformat(), "rows": pupils}).encode()}
    files.update(extra or {})
    folder = feeds_root / urn / day.isoformat()
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    manifest = {"school_urn": urn, "date": day.isoformat(), "run_id": "r1", "rows": len(pupils),
                "mapping_version": "school-feed-row@1",
                "files": {n: {"sha256": hashlib.sha256(d).hexdigest(), "bytes": len(d)} for n, d in files.items()}}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return folder


def quarantined(source_prefix: str) -> list[dict[str, str]]:
    from schoolslink.pipeline.common import store
    from schoolslink.store.schema import quarantine

    with store().connect() as conn:
        return [dict(r) for r in conn.execute(select(quarantine)).mappings()
                if r["source"].startswith(source_prefix)]


@pytest.fixture()
def feed_home(sl_home: Path) -> Path:
    """A SCHOOLSLINK_HOME with a migrated SQLite state store (for the quarantine table)."""
    from schoolslink.store.db import migrate

    migrate()
    return sl_home


def _config(home: Path, text: str) -> Path:
    p = home / "config" / "feed-delivery.yaml"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


def test_without_config_deliver_does_nothing(feed_home: Path) -> None:
    from schoolslink.pipeline.feed_delivery import deliver

    assert deliver("r1", DAY) == {"feed_delivery_configured": 0}


def test_folder_delivery_is_atomic_idempotent_and_refuses_a_tampered_feed(feed_home: Path, tmp_path: Path) -> None:
    from schoolslink.pipeline.feed_delivery import deliver
    from schoolslink.settings import feeds_dir

    share_a, share_b = tmp_path / "share-a", tmp_path / "share-b"
    share_a.mkdir()
    share_b.mkdir()
    _config(feed_home, f"""
retry: {{attempts: 2, wait_seconds: 0}}
schools:
  "100001": {{folder: {{path: {share_a}}}}}
  "100002": {{folder: {{path: {share_b}}}}}
  "100003": {{folder: {{path: {tmp_path / 'not-mounted'}}}}}
  "100004": {{folder: {{path: {share_a}}}}}
""")
    write_feed(feeds_dir(), "100001", extra={"feed.html": b"<p>feed</p>", "changes/changes.csv": b"upn\r\n"})
    tampered = write_feed(feeds_dir(), "100002")
    (tampered / "feed.csv").write_bytes((tampered / "feed.csv").read_bytes().replace(b"Accepted", b"Acceptex"))
    write_feed(feeds_dir(), "100003")
    # 100004 has no feed tonight

    counts = deliver("r1", DAY)
    assert counts["feed_delivery_configured"] == 4
    assert counts["feed_delivered"] == 1
    assert counts["feed_delivery_failed"] == 2
    assert counts["feed_delivery_no_feed"] == 1
    got = share_a / DAY.isoformat()
    src = feeds_dir() / "100001" / DAY.isoformat()
    assert sorted(str(p.relative_to(got)) for p in got.rglob("*") if p.is_file()) == [
        "changes/changes.csv", "feed.csv", "feed.html", "feed.json", "manifest.json"]
    for p in got.rglob("*"):
        if p.is_file():
            assert p.read_bytes() == (src / p.relative_to(got)).read_bytes()
    assert [p.name for p in share_a.iterdir()] == [DAY.isoformat()]  # no .partial / .old left behind
    assert list(share_b.iterdir()) == []  # the tampered feed never left
    reasons = {r["source"]: r["reason"] for r in quarantined("feed-delivery:")}
    assert "does not match its SHA-256" in reasons["feed-delivery:100002"]
    assert "does not exist (is the share mounted?)" in reasons["feed-delivery:100003"]
    assert not (tmp_path / "not-mounted").exists()
    for reason in reasons.values():
        assert not any(p["surname"] in reason or p["upn"] in reason for p in PUPILS)

    # Re-running the night with a changed feed replaces it whole; the stale file from the first run is gone.
    write_feed(feeds_dir(), "100001", pupils=PUPILS[:1])
    (src / "feed.html").unlink()
    (src / "changes" / "changes.csv").unlink()
    assert deliver("r1", DAY)["feed_delivered"] == 1
    assert sorted(p.name for p in got.iterdir()) == ["feed.csv", "feed.json", "manifest.json"]
    assert json.loads((got / "manifest.json").read_text())["rows"] == 1
    assert [p.name for p in share_a.iterdir()] == [DAY.isoformat()]


def test_a_missing_listed_file_or_unsafe_name_is_refused(feed_home: Path, tmp_path: Path) -> None:
    from schoolslink.pipeline.feed_delivery import FeedRefused, read_feed

    folder = write_feed(tmp_path / "feeds", "100001")
    (folder / "feed.json").unlink()
    with pytest.raises(FeedRefused, match=r"feed\.json, listed in the manifest, is missing"):
        read_feed(folder, "100001", DAY)
    with pytest.raises(FeedRefused, match="another school or night"):
        read_feed(write_feed(tmp_path / "feeds", "100002"), "100009", DAY)
    bad = write_feed(tmp_path / "feeds", "100003")
    m = json.loads((bad / "manifest.json").read_text())
    m["files"]["../../etc/passwd"] = {"sha256": "0" * 64}
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(FeedRefused, match="unsafe file name"):
        read_feed(bad, "100003", DAY)
    # A list-shaped manifest (the feed's format may grow) is read the same way.
    ok = write_feed(tmp_path / "feeds", "100004")
    m = json.loads((ok / "manifest.json").read_text())
    m["files"] = [{"name": n, **v} for n, v in m["files"].items()]
    (ok / "manifest.json").write_text(json.dumps(m))
    assert [n for n, _ in read_feed(ok, "100004", DAY).files] == ["feed.csv", "feed.json", "manifest.json"]


@pytest.mark.parametrize(("text", "message"), [
    ('schools: {"100001": {}}', "school 100001: needs exactly one target"),
    ('schools: {"100001": {folder: {path: a}, s3: {bucket: b}}}', "school 100001: needs exactly one target"),
    ('schools: {"100001": {folder: {path: relative}}}', "school 100001, folder.path: must be an absolute path"),
    ('schools: {"100001": {s3: {bucket: b, profile: p, sse: none}}}', "school 100001, s3.sse"),
    ('schools: {"100001": {s3: {bucket: b, sse: AES256}}}', "school 100001, s3: needs exactly one credentials"),
    ('schools: {"100001": {s3: {bucket: b, profile: p, sse: "aws:kms"}}}', "school 100001, s3: 'kms_key_id'"),
    ('schools: {"100001": {s3: {bucket: b, profile: p, secret_access_key: hunter2}}}',
     "school 100001, s3: unknown key(s) 'secret_access_key'"),
    ('schools: {"100001": {sftp: {host: h, username: u, private_key: /k}}}',
     "school 100001, sftp: needs exactly one of 'known_hosts'"),
    ('schools: {"100001": {sftp: {host: h, username: u, private_key: /k, host_key_fingerprint: abc}}}',
     "school 100001, sftp.host_key_fingerprint"),
    ('schools: {"100001": {sftp: {host: h, port: 99999, username: u, private_key: /k, known_hosts: /kh}}}',
     "school 100001, sftp: 'port'"),
    ('schools: {"100001": {folder: {path: /x}, notify_email: [a@b.c]}}', "school 100001.notify_email: needs"),
    ('schools: {"1234": {folder: {path: /x}}}', "school 1234: a URN is six digits"),
])
def test_config_errors_name_school_and_key_never_secrets(tmp_path: Path, text: str, message: str) -> None:
    from schoolslink.pipeline.feed_delivery import load_config

    p = tmp_path / "d.yaml"
    p.write_text(text)
    with pytest.raises(ConfigurationError) as err:
        load_config(p)
    assert message in str(err.value)
    assert "hunter2" not in str(err.value)


def test_env_points_at_the_config(feed_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from schoolslink.pipeline.feed_delivery import load_config

    monkeypatch.setenv("SCHOOLSLINK_FEED_DELIVERY", str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigurationError, match="does not exist"):
        load_config()
    p = tmp_path / "d.yaml"
    p.write_text(f'schools: {{"100001": {{folder: {{path: {tmp_path}}}}}}}')
    monkeypatch.setenv("SCHOOLSLINK_FEED_DELIVERY", str(p))
    cfg = load_config()
    assert cfg is not None and [s.urn for s in cfg.schools] == ["100001"]
