"""Feed delivery over SFTP against real OpenSSH on 127.0.0.1: chrooted per-school accounts, key-only auth.

The fixture starts `/usr/sbin/sshd -D -e -f <config>` on a free loopback port with a throwaway ed25519 host
key, `Subsystem sftp internal-sftp`, and two real OS accounts (`useradd --no-create-home --shell
/usr/sbin/nologin sl-sftp-<n>`, removed with `userdel` afterwards), each chrooted (`Match User ...
ChrootDirectory ...; ForceCommand internal-sftp`) into a root-owned 0755 directory with a `feeds/` folder the
school's account owns. sshd refuses a chroot any of whose path components is writable by others, so the tree
lives under /srv (root-owned 0755), not under /tmp (1777).

Needs root (to add users and run sshd); skipped, saying why, where that is not possible.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import paramiko
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from connectors.storage.sftp import SftpTarget
from tests.integration.test_feed_delivery_folder import DAY, quarantined, write_feed

SSHD = Path("/usr/sbin/sshd")


@dataclass(frozen=True)
class Account:
    user: str
    key: Path  # the school's private key (OpenSSH format)
    chroot: Path


@dataclass(frozen=True)
class SftpPeer:
    port: int
    base: Path
    known_hosts: Path
    host_fingerprint: str
    accounts: dict[str, Account]  # by school URN


def _ed25519(private: Path) -> str:
    """Write an ed25519 private key (OpenSSH format, 0600); return its public line."""
    k = ed25519.Ed25519PrivateKey.generate()
    private.write_bytes(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                        serialization.NoEncryption()))
    private.chmod(0o600)
    return k.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_banner(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited ({proc.returncode}): {log.read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                if s.recv(64).startswith(b"SSH-2.0-"):
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"sshd did not answer on 127.0.0.1:{port}: {log.read_text()[-2000:]}")


@pytest.fixture(scope="module")
def sftp_peer() -> Iterator[SftpPeer]:
    if os.geteuid() != 0:
        pytest.skip("the SFTP peer needs root: it adds OS accounts (useradd) and runs sshd with chroots")
    for tool in (SSHD, Path("/usr/sbin/useradd"), Path("/usr/sbin/userdel")):
        if not tool.exists():
            pytest.skip(f"{tool} is not installed")
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
    base = Path(tempfile.mkdtemp(prefix="sl-sftp-", dir="/srv" if Path("/srv").is_dir() else "/opt"))
    base.chmod(0o755)
    users: list[str] = []
    proc: subprocess.Popen[bytes] | None = None
    try:
        host_key = base / "ssh_host_ed25519_key"
        host_pub = _ed25519(host_key)
        (base / "keys").mkdir(mode=0o755)
        (base / "chroot").mkdir(mode=0o755)
        (base / "client").mkdir(mode=0o700)
        run = uuid.uuid4().hex[:6]
        accounts: dict[str, Account] = {}
        for i, urn in enumerate(("100001", "100002")):
            user = f"sl-sftp-{run}{i}"
            res = subprocess.run(["/usr/sbin/useradd", "--no-create-home", "--shell", "/usr/sbin/nologin",
                                  "--password", "*", user], capture_output=True, text=True, check=False)
            if res.returncode != 0:
                pytest.skip(f"cannot create OS user {user}: useradd exit {res.returncode}: {res.stderr.strip()}")
            users.append(user)
            pw = pwd.getpwnam(user)
            key = base / "client" / f"{urn}_ed25519"
            (base / "keys" / user).write_text(_ed25519(key) + "\n")
            (base / "keys" / user).chmod(0o644)
            chroot = base / "chroot" / user
            chroot.mkdir(mode=0o755)  # root-owned, not writable by the account: sshd insists
            (chroot / "feeds").mkdir(mode=0o755)
            os.chown(chroot / "feeds", pw.pw_uid, pw.pw_gid)
            accounts[urn] = Account(user, key, chroot)
        port = _free_port()
        matches = "".join(f"Match User {a.user}\n  ChrootDirectory {a.chroot}\n  ForceCommand internal-sftp\n"
                          "  AllowTcpForwarding no\n  X11Forwarding no\n" for a in accounts.values())
        cfg = base / "sshd_config"
        cfg.write_text(
            f"Port {port}\nListenAddress 127.0.0.1\nHostKey {host_key}\nPidFile {base / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {base / 'keys'}/%u\nPubkeyAuthentication yes\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nUsePAM no\nPermitRootLogin no\n"
            f"AllowUsers {' '.join(users)}\nSubsystem sftp internal-sftp\nLogLevel VERBOSE\n{matches}")
        check = subprocess.run([str(SSHD), "-t", "-f", str(cfg)], capture_output=True, text=True, check=False)
        if check.returncode != 0:
            raise RuntimeError(f"sshd -t refused the config: {check.stderr.strip()}")
        log = base / "sshd.log"
        with open(log, "wb") as fh:
            proc = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(cfg)], stdout=fh, stderr=subprocess.STDOUT)
        _wait_for_banner(port, proc, log)
        known = base / "client" / "known_hosts"
        known.write_text(f"[127.0.0.1]:{port} {host_pub}\n")
        from connectors.storage.sftp import fingerprint

        fp = fingerprint(paramiko.Ed25519Key.from_private_key_file(str(host_key)))
        yield SftpPeer(port, base, known, fp, accounts)
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for user in users:
            subprocess.run(["/usr/sbin/userdel", user], capture_output=True, check=False)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture()
def feed_home(sl_home: Path) -> Path:
    from schoolslink.store.db import migrate

    migrate()
    return sl_home


def _target(peer: SftpPeer, urn: str, *, user_of: str | None = None, known_hosts: Path | None = None,
            fingerprint: str | None = None) -> SftpTarget:
    acct = peer.accounts[urn]
    user = peer.accounts[user_of].user if user_of else acct.user
    return SftpTarget(host="127.0.0.1", port=peer.port, username=user, private_key=acct.key,
                      known_hosts=None if fingerprint else (known_hosts or peer.known_hosts),
                      host_key_fingerprint=fingerprint, timeout=10)


def test_delivery_through_the_stage_with_isolation_and_a_bad_host_key(sftp_peer: SftpPeer, feed_home: Path,
                                                                      tmp_path: Path) -> None:
    from schoolslink.pipeline.feed_delivery import deliver
    from schoolslink.settings import feeds_dir

    p = sftp_peer
    a, b = p.accounts["100001"], p.accounts["100002"]
    wrong = tmp_path / "wrong_known_hosts"
    other = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    wrong.write_text(f"[127.0.0.1]:{p.port} {other}\n")
    cfg = feed_home / "config" / "feed-delivery.yaml"
    cfg.parent.mkdir(parents=True)
    common = f"host: 127.0.0.1, port: {p.port}, remote_dir: feeds"
    cfg.write_text(f"""
retry: {{attempts: 3, wait_seconds: 0}}
schools:
  "100001": {{sftp: {{{common}, username: {a.user}, private_key: {a.key}, known_hosts: {p.known_hosts}}}}}
  "100002": {{sftp: {{{common}, username: {b.user}, private_key: {b.key},
                      host_key_fingerprint: "{p.host_fingerprint}"}}}}
  "100003": {{sftp: {{{common}, username: {a.user}, private_key: {a.key}, known_hosts: {wrong}}}}}
""")
    for urn in ("100001", "100002", "100003"):
        write_feed(feeds_dir(), urn, extra={"feed.html": b"<p>tonight</p>"})
    counts = deliver("r-sftp", DAY)
    assert counts["feed_delivered"] == 2 and counts["feed_delivery_failed"] == 1, counts
    for acct, urn in ((a, "100001"), (b, "100002")):
        got = acct.chroot / "feeds" / DAY.isoformat()
        src = feeds_dir() / urn / DAY.isoformat()
        assert sorted(x.name for x in got.iterdir()) == ["feed.csv", "feed.html", "feed.json", "manifest.json"]
        for f in got.iterdir():
            assert hashlib.sha256(f.read_bytes()).digest() == hashlib.sha256((src / f.name).read_bytes()).digest()
        assert [x.name for x in (acct.chroot / "feeds").iterdir()] == [DAY.isoformat()]  # no .partial left
        assert pwd.getpwuid(got.stat().st_uid).pw_name == acct.user
    [row] = quarantined("feed-delivery:")
    assert row["source"] == "feed-delivery:100003"
    assert "does not match known_hosts: refused" in row["reason"]


def test_feed_is_visible_only_after_the_rename_and_a_rerun_replaces_it(sftp_peer: SftpPeer, feed_home: Path) -> None:
    from connectors.storage import sftp
    from schoolslink.pipeline.feed_delivery import read_feed
    from schoolslink.settings import feeds_dir

    p = sftp_peer
    a = p.accounts["100001"]
    day = date(2026, 9, 4)
    feed = read_feed(write_feed(feeds_dir(), "100001", day), "100001", day)
    final, partial = a.chroot / "feeds" / day.isoformat(), a.chroot / "feeds" / f".{day.isoformat()}.partial"
    with sftp.connect(_target(p, "100001")) as s:
        sftp.stage(s, "feeds", day.isoformat(), feed.files)
        assert not final.exists()  # staged, every file in place, yet nothing a school polls for
        assert sorted(x.name for x in partial.iterdir()) == ["feed.csv", "feed.json", "manifest.json"]
        assert day.isoformat() not in s.listdir("feeds")
        sftp.publish(s, "feeds", day.isoformat())
        assert not partial.exists()
        assert sorted(x.name for x in final.iterdir()) == ["feed.csv", "feed.json", "manifest.json"]
    # A same-night re-run with a different feed replaces the folder whole.
    feed2 = read_feed(write_feed(feeds_dir(), "100001", day, pupils=[], extra={"changes.csv": b"upn\r\n"}),
                      "100001", day)
    sftp.put_feed(_target(p, "100001"), day.isoformat(), feed2.files)
    assert sorted(x.name for x in final.iterdir()) == ["changes.csv", "feed.csv", "feed.json", "manifest.json"]
    assert (final / "manifest.json").read_bytes() == dict(feed2.files)["manifest.json"]
    assert sorted(x.name for x in final.parent.iterdir() if x.name.startswith(f".{day.isoformat()}")) == []


def test_a_school_sees_and_writes_only_its_own_tree(sftp_peer: SftpPeer, feed_home: Path) -> None:
    from connectors.storage import sftp

    p = sftp_peer
    a, b = p.accounts["100001"], p.accounts["100002"]
    (b.chroot / "feeds" / "b-only.txt").write_text("school B's")
    before = sorted(x.name for x in (b.chroot / "feeds").iterdir())
    with sftp.connect(_target(p, "100001")) as s:
        assert s.listdir("/") == ["feeds"]  # the chroot: only its own tree
        assert s.listdir("..") == ["feeds"]
        assert "b-only.txt" not in s.listdir("/feeds")
        for path in (f"{b.chroot}/feeds/x.csv", f"/../../{b.chroot.name}/feeds/x.csv", f"{b.chroot}/feeds/b-only.txt"):
            with pytest.raises(OSError):
                s.open(path, "wb").close()
            with pytest.raises(OSError):
                s.stat(path)
        with pytest.raises(PermissionError):
            s.open("/not-in-feeds.csv", "wb").close()  # the chroot root is root's, not the school's
    assert sorted(x.name for x in (b.chroot / "feeds").iterdir()) == before
    assert not (a.chroot / "not-in-feeds.csv").exists()
    # School A's key does not open school B's account.
    with pytest.raises(sftp.SftpDeliveryError, match="refused the key"):
        with sftp.connect(_target(p, "100001", user_of="100002")):
            pass


def test_a_wrong_or_unknown_host_key_is_refused(sftp_peer: SftpPeer, tmp_path: Path) -> None:
    from connectors.storage import sftp

    p = sftp_peer
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    with pytest.raises(sftp.HostKeyRefused, match="not in known_hosts"):
        with sftp.connect(_target(p, "100001", known_hosts=empty)):
            pass
    other = tmp_path / "other_known_hosts"
    key = paramiko.Ed25519Key.from_private_key_file(str(p.accounts["100002"].key))  # any other ed25519 key
    other.write_text(f"[127.0.0.1]:{p.port} ssh-ed25519 {key.get_base64()}\n")
    with pytest.raises(sftp.HostKeyRefused, match="does not match known_hosts"):
        with sftp.connect(_target(p, "100001", known_hosts=other)):
            pass
    with pytest.raises(sftp.HostKeyRefused, match="not the configured fingerprint"):
        with sftp.connect(_target(p, "100001", fingerprint="SHA256:" + "A" * 43)):
            pass
    with sftp.connect(_target(p, "100001", fingerprint=p.host_fingerprint)) as s:
        assert "feeds" in s.listdir(".")


def test_a_transient_failure_is_retried_then_recorded(feed_home: Path, tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """Nothing listening: a refused connection is transient, so it is tried `attempts` times, then recorded."""
    from schoolslink.pipeline.feed_delivery import deliver
    from schoolslink.settings import feeds_dir

    key, known = tmp_path / "k", tmp_path / "known_hosts"
    _ed25519(key)
    known.write_text("")
    cfg = feed_home / "config" / "feed-delivery.yaml"
    cfg.parent.mkdir(parents=True)
    cfg.write_text(f"""
retry: {{attempts: 3, wait_seconds: 0}}
schools:
  "100001": {{sftp: {{host: 127.0.0.1, port: {_free_port()}, username: u, private_key: {key},
                      known_hosts: {known}, timeout: 2}}}}
""")
    write_feed(feeds_dir(), "100001")
    with caplog.at_level("WARNING"):
        counts = deliver("r-retry", DAY)
    assert counts["feed_delivery_failed"] == 1
    assert sum("trying again" in r.getMessage() for r in caplog.records) == 2
    [row] = quarantined("feed-delivery:")
    assert "cannot connect to 127.0.0.1" in row["reason"]
