"""Start and stop the test/demo MESH peer: NHS England's ``mesh-sandbox`` under uvicorn on 127.0.0.1.

    pki = make_throwaway_pki(tmp / "pki")
    with MeshSandbox(mailboxes=MAILBOXES_JSONL, workflows=OUR_WORKFLOWS, shared_key="...",
                     tls=SandboxTls.mutual(pki)) as mesh:
        MeshConnector(MeshConfig(url=mesh.base_url, ..., ca_bundle=pki.ca_cert, client_cert=pki.client.cert, ...))

mesh-sandbox pins a FastAPI newer than Airflow allows, so it lives in its own virtualenv,
``peers/mesh-sandbox/.venv``, installed from that folder's ``uv.lock`` on first use (:func:`ensure_sandbox_venv`)
and started through ``peers/mesh-sandbox/serve.py`` (which points the sandbox at our mailboxes and
workflows and makes it exit when our stdin pipe closes, i.e. when the Python process that started it dies).

With ``tls``, uvicorn serves HTTPS and, as real MESH does, *requires* a client certificate signed by the CA it
trusts (``--ssl-cert-reqs 2``): a client without one, or with one from another CA, is refused during the TLS
handshake. :func:`make_throwaway_pki` makes such a CA, a server certificate for 127.0.0.1 and a client
certificate (the ``cryptography`` package; nothing leaves the folder it is given).

Messages live in files under ``data_dir`` (``STORE_MODE=file``); each start with a new ``data_dir`` is empty.
The server's log (uvicorn's and the sandbox's own: URLs, message ids, mailbox ids and status codes, never
message bodies) is kept at ``log_path`` after stop for post-mortems.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from connectors.peer_process import PeerProcess, ensure_installed

__all__ = [
    "PEER_DIR",
    "SERVE_SCRIPT",
    "CertPair",
    "MeshSandbox",
    "MeshSandboxError",
    "SandboxTls",
    "ThrowawayPki",
    "ensure_sandbox_venv",
    "install_command",
    "make_throwaway_pki",
]

REPO_ROOT: Final = Path(__file__).resolve().parents[2]
PEER_DIR: Final = REPO_ROOT / "peers" / "mesh-sandbox"
SERVE_SCRIPT: Final = PEER_DIR / "serve.py"
PEER_PYTHON: Final = PEER_DIR / ".venv" / "bin" / "python"
_READY = re.compile(r"Uvicorn running on (https?)://127\.0\.0\.1:(?P<port>\d+)")
_HOST: Final = "127.0.0.1"


class MeshSandboxError(RuntimeError):
    """The MESH peer could not be installed or started."""


# -- install ------------------------------------------------------------------------------------------------


def _uv() -> str:
    for candidate in (os.environ.get("SCHOOLSLINK_UV"), str(REPO_ROOT / ".tools" / "bin" / "uv"), shutil.which("uv")):
        if candidate and Path(candidate).is_file():
            return candidate
    raise MeshSandboxError("uv not found (SCHOOLSLINK_UV, .tools/bin/uv or on PATH): `make install` puts it in .tools")


def _base_python() -> str | None:
    """The interpreter our own virtualenv was made from: the peer's is made from the same, never downloaded."""
    for name in (f"python{sys.version_info.major}.{sys.version_info.minor}", "python3"):
        candidate = Path(sys.base_prefix) / "bin" / name
        if candidate.is_file():
            return str(candidate)
    return None


def install_command() -> list[str]:
    """The command that installs the peer's virtualenv (the Makefile's install target runs the same)."""
    cmd = [_uv(), "sync", "--frozen", "--project", str(PEER_DIR), "--quiet"]
    python = _base_python()
    return [*cmd, "--python", python] if python else cmd


def _installed() -> bool:
    return PEER_PYTHON.exists() and any((PEER_DIR / ".venv").glob("lib/python*/site-packages/mesh_sandbox/api.py"))


def ensure_sandbox_venv(timeout: float = 600.0) -> None:
    """Install ``peers/mesh-sandbox/.venv`` from its lock file if it is missing.

    Serialised with a lock file so parallel test workers do not install over each other.
    """
    ensure_installed(_installed, install_command, REPO_ROOT, "schoolslink-mesh-sandbox-uv.lock", timeout,
                     MeshSandboxError)


# -- certificates -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CertPair:
    """A PEM certificate and its unencrypted PEM private key."""

    cert: Path
    key: Path


@dataclass(frozen=True, slots=True)
class ThrowawayPki:
    """A CA made for one test session, the server certificate it signed (for 127.0.0.1) and a client one."""

    ca_cert: Path
    server: CertPair
    client: CertPair


def make_throwaway_pki(folder: Path, *, client_name: str = "schoolslink-test-client",
                       ca_name: str = "schoolslink throwaway test CA") -> ThrowawayPki:
    """Make a CA, a server certificate for 127.0.0.1 (an IP SAN) and a client certificate in ``folder``.

    EC P-256 keys (fast to make), valid for a day either side of now. For tests and the demo only: the keys
    are written unencrypted.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write(stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None) -> CertPair:
        cert_path = folder / f"{stem}.crt"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path = folder / f"{stem}.key"
        if key is not None:
            fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
        return CertPair(cert_path, key_path)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(name(ca_name))
        .issuer_name(name(ca_name))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(cn: str, usage: x509.ObjectIdentifier, san: x509.GeneralName | None) -> tuple[
            x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        )
        if san is not None:
            builder = builder.add_extension(x509.SubjectAlternativeName([san]), critical=False)
        return builder.sign(ca_key, hashes.SHA256()), key

    ca = write("ca", ca_cert, None)
    ca.key.unlink(missing_ok=True)  # the CA's key is never written: nothing more is ever signed with it
    server_cert, server_key = leaf(_HOST, ExtendedKeyUsageOID.SERVER_AUTH,
                                   x509.IPAddress(ipaddress.ip_address(_HOST)))
    client_cert, client_key = leaf(client_name, ExtendedKeyUsageOID.CLIENT_AUTH, None)
    return ThrowawayPki(ca.cert, write("server", server_cert, server_key), write("client", client_cert, client_key))


@dataclass(frozen=True, slots=True)
class SandboxTls:
    """uvicorn's TLS settings for the peer. ``client_ca`` set: a client certificate it signed is required.

    ``server_ca`` and ``admin_client``: what :class:`MeshSandbox`'s own admin calls (reset, add an event) use
    to verify the server and to present a client certificate.
    """

    cert: Path
    key: Path
    client_ca: Path | None = None
    server_ca: Path | None = None
    admin_client: CertPair | None = None

    @classmethod
    def mutual(cls, pki: ThrowawayPki) -> SandboxTls:
        return cls(pki.server.cert, pki.server.key, client_ca=pki.ca_cert, server_ca=pki.ca_cert,
                   admin_client=pki.client)

    def uvicorn_args(self) -> list[str]:
        args = ["--ssl-certfile", str(self.cert), "--ssl-keyfile", str(self.key)]
        if self.client_ca is not None:
            # 2 = ssl.CERT_REQUIRED: the handshake fails without a certificate signed by client_ca.
            args += ["--ssl-ca-certs", str(self.client_ca), "--ssl-cert-reqs", "2"]
        return args


# -- the server ---------------------------------------------------------------------------------------------


class MeshSandbox(PeerProcess):
    """The mesh-sandbox peer as a context manager.

    ``mailboxes``: a ``mailboxes.jsonl`` in mesh-sandbox's format (mailbox_id, password, ods_code, ...);
    ``workflows``: the workflows it knows (``{"workflow_id", "senders", "receivers"}``; the sandbox uses them
    for endpoint look-up). ``shared_key`` is the MESH environment's shared secret that clients sign their
    authorisation tokens with. ``port`` 0 picks a free port on 127.0.0.1. ``install`` runs
    :func:`ensure_sandbox_venv` first.
    """

    error = MeshSandboxError
    name = "MESH sandbox"
    script = SERVE_SCRIPT
    cwd = PEER_DIR
    log_prefix = "schoolslink-mesh-sandbox-"
    ready_in_log = _READY
    env_drop = ("PYTHONPATH",)  # the peer's own environment only

    def __init__(
        self,
        *,
        mailboxes: str | os.PathLike[str],
        workflows: Sequence[Mapping[str, Any]],
        shared_key: str,
        tls: SandboxTls | None = None,
        data_dir: str | os.PathLike[str] | None = None,
        log_path: str | os.PathLike[str] | None = None,
        port: int = 0,
        startup_timeout: float = 60.0,
        install: bool = True,
        env: Mapping[str, str] | None = None,
    ) -> None:
        if not shared_key:
            raise MeshSandboxError("the sandbox needs a shared key (clients must sign tokens with the same one)")
        self.mailboxes = Path(mailboxes)
        self.workflows = [dict(w) for w in workflows]
        self.shared_key = shared_key
        self.tls = tls
        self.data_dir = Path(data_dir) if data_dir is not None else Path(tempfile.mkdtemp(prefix="schoolslink-mesh-"))
        super().__init__(port=port, log_path=log_path, startup_timeout=startup_timeout, install=install, env=env)
        self._scheme = "https" if tls is not None else "http"

    # -- properties -----------------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """The MESH base URL (the client adds ``/messageexchange/...``), e.g. ``https://127.0.0.1:PORT``."""
        return f"{self._scheme}://{_HOST}:{self.port}"

    @property
    def store_dir(self) -> Path:
        """Where the sandbox keeps messages (``<mailbox>/in/<message id>[/<chunk>]``)."""
        return self.data_dir / "store"

    # -- the sandbox's admin API (not part of MESH: for tests) -----------------------------------------------

    def _admin(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> None:
        import requests

        kwargs: dict[str, Any] = {}
        if self.tls is not None:
            kwargs["verify"] = str(self.tls.server_ca) if self.tls.server_ca is not None else True
            if self.tls.admin_client is not None:
                kwargs["cert"] = (str(self.tls.admin_client.cert), str(self.tls.admin_client.key))
        response = requests.request(method, f"{self.base_url}{path}", json=body, timeout=30, **kwargs)
        if response.status_code >= 400:
            raise MeshSandboxError(f"sandbox admin {method} {path}: HTTP {response.status_code}")

    def mailbox_ids(self) -> list[str]:
        """The mailboxes the sandbox was started with."""
        ids = []
        for line in self.mailboxes.read_text(encoding="utf-8").splitlines():
            if line.strip():
                ids.append(str(json.loads(line)["mailbox_id"]).upper())
        return ids

    def reset(self, *mailbox_ids: str) -> None:
        """Empty these mailboxes' inboxes and outboxes (no ids: every mailbox), for test isolation.

        Per mailbox on purpose: the sandbox's whole-store reset reloads every message from its files.
        """
        for mailbox_id in mailbox_ids or self.mailbox_ids():
            self._admin("DELETE", f"/messageexchange/admin/reset/{mailbox_id}")

    def add_message_event(self, message_id: str, status: str, *, code: str | None = None,
                          description: str | None = None) -> None:
        """Make the sandbox record a status change on a message (say ``error``), as MESH would on a failure."""
        self._admin("POST", f"/messageexchange/admin/message/{message_id}/event",
                    {"status": status, "code": code, "description": description})

    # -- lifecycle ------------------------------------------------------------------------------------------

    def _write_config(self) -> Path:
        config_dir = self.data_dir / "config"
        config_dir.mkdir(parents=True, exist_ok=True)
        try:
            mailboxes = self.mailboxes.read_text(encoding="utf-8")
        except OSError as exc:
            raise MeshSandboxError(f"cannot read the sandbox's mailboxes from {self.mailboxes}: {exc}") from exc
        (config_dir / "mailboxes.jsonl").write_text(mailboxes, encoding="utf-8")
        (config_dir / "workflows.jsonl").write_text(
            "".join(json.dumps(w, separators=(",", ":")) + "\n" for w in self.workflows), encoding="utf-8")
        return config_dir

    def _prepare(self) -> Mapping[str, str]:
        if self.install:
            ensure_sandbox_venv()
        elif not PEER_PYTHON.exists():
            raise MeshSandboxError(f"{PEER_PYTHON} is missing: run {' '.join(install_command())}")
        config_dir = self._write_config()
        self.store_dir.mkdir(parents=True, exist_ok=True)
        return {
            "ENV": "local",
            "STORE_MODE": "file",
            "MAILBOXES_DATA_DIR": str(self.store_dir),
            "SHARED_KEY": self.shared_key,
            "AUTH_MODE": "full",  # check every token's HMAC (neither "none" nor "canned")
            "MESH_SANDBOX_CONFIG_DIR": str(config_dir),
            "PYTHONUNBUFFERED": "1",
        }

    def _command(self) -> list[str]:
        cmd = [str(PEER_PYTHON), str(SERVE_SCRIPT), "mesh_sandbox.api:app", "--host", _HOST,
               "--port", str(self.requested_port), "--log-level", "info", "--no-server-header"]
        return cmd + self.tls.uvicorn_args() if self.tls is not None else cmd
