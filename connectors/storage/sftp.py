"""Putting a school's feed on its SFTP server: host key always checked, whole feed or nothing visible.

A school's endpoint usually chroots our account into its own tree, so every path here is relative to
where the server puts us (`remote_dir`, default `feeds`); an absolute one is used as given. A night's feed
is uploaded into `<remote_dir>/.<date>.partial/`, each file read back and hashed, and only then renamed to
`<remote_dir>/<date>/` with OpenSSH's `posix-rename@openssh.com` (atomic on the server's filesystem). A
school that polls `<remote_dir>/` never sees a half-written night. A same-night re-run moves the old
`<date>/` aside (`.<date>.old`), renames the new one in and removes the old, so it replaces cleanly.

The server's host key is always verified, against an OpenSSH `known_hosts` file or a pinned SHA-256
fingerprint (`SHA256:...`, as `ssh-keygen -lf` prints it). An unknown or changed key is refused with
`HostKeyRefused` before any credential is offered: there is no accept-on-first-use. Authentication is by
private key only.

Errors are `SftpDeliveryError` with `transient` set when trying again may help (a refused or dropped
connection, a timeout); messages carry host, port and paths, never key material.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import posixpath
import socket
import stat
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import paramiko

MANIFEST: Final = "manifest.json"


class SftpDeliveryError(Exception):
    """A feed could not be put on an SFTP server; `transient` says whether trying again may help."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class HostKeyRefused(SftpDeliveryError):
    """The server's host key is unknown or is not the one configured: we never connect on."""


@dataclass(frozen=True)
class SftpTarget:
    """One school's SFTP endpoint. Exactly one of `known_hosts` and `host_key_fingerprint` must be set."""

    host: str
    username: str
    private_key: Path
    port: int = 22
    known_hosts: Path | None = None
    host_key_fingerprint: str | None = None
    remote_dir: str = "feeds"
    passphrase: str | None = field(default=None, repr=False)
    timeout: float = 20.0


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's SHA-256 fingerprint of a public key (`SHA256:` + unpadded base64), as ssh-keygen -l prints."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode("ascii").rstrip("=")


def _verify_host_key(target: SftpTarget, key: paramiko.PKey) -> None:
    where = f"{target.host}:{target.port}"
    if target.host_key_fingerprint:
        want = target.host_key_fingerprint.strip()
        want = want if want.startswith("SHA256:") else "SHA256:" + want
        if not hmac.compare_digest(want.rstrip("="), fingerprint(key)):
            raise HostKeyRefused(f"host key of {where} ({fingerprint(key)}) is not the configured fingerprint")
        return
    if target.known_hosts is None:
        raise HostKeyRefused(f"no known_hosts or host_key_fingerprint for {where}: host key cannot be checked")
    try:
        known = paramiko.HostKeys(str(target.known_hosts))
    except (OSError, paramiko.SSHException) as exc:
        raise HostKeyRefused(f"cannot read known_hosts for {where}: {type(exc).__name__}") from None
    name = target.host if target.port == 22 else f"[{target.host}]:{target.port}"
    entry = known.lookup(name)
    if entry is None:
        raise HostKeyRefused(f"{where} is not in known_hosts ({fingerprint(key)}): refused")
    if entry.get(key.get_name()) != key:
        raise HostKeyRefused(f"host key of {where} ({fingerprint(key)}) does not match known_hosts: refused")


def _load_key(target: SftpTarget) -> paramiko.PKey:
    try:
        return paramiko.PKey.from_path(target.private_key, password=target.passphrase or None)
    except (OSError, paramiko.SSHException, ValueError) as exc:
        raise SftpDeliveryError(f"cannot load the private key for {target.username}@{target.host}: "
                                f"{type(exc).__name__}") from None


@contextmanager
def connect(target: SftpTarget) -> Iterator[paramiko.SFTPClient]:
    """An SFTP session after the host key is verified and our key accepted; closed on exit."""
    pkey = _load_key(target)
    where = f"{target.host}:{target.port}"
    try:
        sock = socket.create_connection((target.host, target.port), timeout=target.timeout)
    except OSError as exc:
        raise SftpDeliveryError(f"cannot connect to {where}: {type(exc).__name__}", transient=True) from None
    transport = paramiko.Transport(sock)
    try:
        try:
            transport.start_client(timeout=target.timeout)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise SftpDeliveryError(f"SSH handshake with {where} failed: {type(exc).__name__}",
                                    transient=True) from None
        _verify_host_key(target, transport.get_remote_server_key())
        try:
            transport.auth_publickey(target.username, pkey)
        except paramiko.AuthenticationException:
            raise SftpDeliveryError(f"{where} refused the key for {target.username}") from None
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise SftpDeliveryError(f"authentication with {where} failed: {type(exc).__name__}",
                                    transient=True) from None
        sftp = paramiko.SFTPClient.from_transport(transport)
        if sftp is None:
            raise SftpDeliveryError(f"{where} opened no SFTP session", transient=True)
        channel = sftp.get_channel()
        if channel is not None:
            channel.settimeout(target.timeout)
        try:
            yield sftp
        finally:
            sftp.close()
    finally:
        transport.close()


def _exists(sftp: paramiko.SFTPClient, path: str) -> bool:
    try:
        sftp.lstat(path)
    except FileNotFoundError:
        return False
    return True


def _remove_tree(sftp: paramiko.SFTPClient, path: str) -> None:
    """rm -r over SFTP (the protocol has no recursive delete); symlinks are removed, never followed."""
    for entry in sftp.listdir_attr(path):
        child = posixpath.join(path, entry.filename)
        if entry.st_mode is not None and stat.S_ISDIR(entry.st_mode):
            _remove_tree(sftp, child)
        else:
            sftp.remove(child)
    sftp.rmdir(path)


def _safe(name: str) -> str:
    parts = name.split("/")
    if not name or name.startswith("/") or "\\" in name or any(p in ("", ".", "..") for p in parts):
        raise SftpDeliveryError(f"refusing an unsafe file name in the feed: {name!r}")
    return name


def _mkdirs(sftp: paramiko.SFTPClient, path: str) -> None:
    """mkdir -p, for a remote_dir of several levels or files in sub-folders."""
    cur = "/" if path.startswith("/") else ""
    for part in [p for p in path.split("/") if p]:
        cur = posixpath.join(cur, part) if cur else part
        if not _exists(sftp, cur):
            sftp.mkdir(cur)


def stage(sftp: paramiko.SFTPClient, remote_dir: str, feed_date: str, files: Sequence[tuple[str, bytes]]) -> str:
    """Upload every file into `<remote_dir>/.<date>.partial/` (manifest last) and check each by reading it
    back; returns that folder. Nothing a school polls for is visible yet."""
    partial = posixpath.join(remote_dir, f".{feed_date}.partial")
    if _exists(sftp, partial):
        _remove_tree(sftp, partial)  # left over by an interrupted run
    _mkdirs(sftp, partial)
    ordered = [f for f in files if f[0] != MANIFEST] + [f for f in files if f[0] == MANIFEST]
    for name, data in ordered:
        path = posixpath.join(partial, _safe(name))
        if "/" in name:
            _mkdirs(sftp, posixpath.dirname(path))
        with sftp.open(path, "wb") as fh:
            fh.set_pipelined(True)
            fh.write(data)
        with sftp.open(path, "rb") as fh:
            fh.prefetch()
            back = fh.read()
        if hashlib.sha256(back).digest() != hashlib.sha256(data).digest():
            raise SftpDeliveryError(f"{path} does not read back as the bytes sent", transient=True)
    return partial


def publish(sftp: paramiko.SFTPClient, remote_dir: str, feed_date: str) -> str:
    """Rename the staged folder to `<remote_dir>/<date>/` (posix-rename), replacing a same-night feed."""
    partial = posixpath.join(remote_dir, f".{feed_date}.partial")
    final = posixpath.join(remote_dir, feed_date)
    if _exists(sftp, final):
        old = posixpath.join(remote_dir, f".{feed_date}.old")
        if _exists(sftp, old):
            _remove_tree(sftp, old)
        sftp.posix_rename(final, old)
        sftp.posix_rename(partial, final)
        _remove_tree(sftp, old)
    else:
        sftp.posix_rename(partial, final)
    return final


def put_feed(target: SftpTarget, feed_date: str, files: Sequence[tuple[str, bytes]]) -> str:
    """Deliver one night's feed: connect (host key checked), stage, read back, publish. Returns the path."""
    with connect(target) as sftp:
        try:
            _mkdirs(sftp, target.remote_dir)
            stage(sftp, target.remote_dir, feed_date, files)
            return publish(sftp, target.remote_dir, feed_date)
        except SftpDeliveryError:
            raise
        except PermissionError:
            raise SftpDeliveryError(f"{target.host}:{target.port} refused a write under "
                                    f"{target.remote_dir!r}: permission denied") from None
        except (OSError, paramiko.SSHException, EOFError) as exc:
            raise SftpDeliveryError(f"SFTP to {target.host}:{target.port} failed under {target.remote_dir!r}: "
                                    f"{type(exc).__name__}",
                                    transient=isinstance(exc, TimeoutError | EOFError | ConnectionError
                                                         | paramiko.SSHException)) from None
