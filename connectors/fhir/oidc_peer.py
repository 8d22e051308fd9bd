"""Start and stop the test/demo OAuth 2.0 authorization server peer (``peers/oidc-provider``: the
OpenID-certified ``oidc-provider`` npm package on 127.0.0.1), standing in for a trust's (or NHS
England's) token endpoint.

    clients = [
        {"client_id": "trust-a", "client_secret": "...", "token_endpoint_auth_method": "client_secret_basic"},
        {"client_id": "trust-b", "token_endpoint_auth_method": "private_key_jwt", "jwks": {"keys": [jwk]}},
    ]
    with OidcProviderPeer(clients, token_ttl=300) as idp:
        auth = ClientCredentialsAuth(idp.token_url, "trust-a", "...")

Clients use oidc-provider's (RFC 7591) metadata names; ``grant_types`` defaults to
``["client_credentials"]``. Tokens are opaque, for one resource (``resource``, default
``urn:schoolslink:fhir``) with scopes ``resource_scope``, and live ``token_ttl`` seconds.
:meth:`OidcProviderPeer.introspect` and :meth:`OidcProviderPeer.revoke` call the provider's own
endpoints, so a test (or a stand-in resource server) can check or kill a token for real.

State is in memory; each start is empty. The server exits when stopped, and also when the Python
process that started it dies (it watches its stdin pipe). The clients file (it holds secrets) is
written 0600 to a private temp folder and deleted on stop.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import queue
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final, NoReturn

import httpx

__all__ = ["OIDC_PEER_DIR", "OIDC_SERVER_SCRIPT", "OidcPeerError", "OidcProviderPeer", "ensure_oidc_npm_packages"]

REPO_ROOT: Final = Path(__file__).resolve().parents[2]
OIDC_PEER_DIR: Final = REPO_ROOT / "peers" / "oidc-provider"
OIDC_SERVER_SCRIPT: Final = OIDC_PEER_DIR / "server.mjs"
DEFAULT_RESOURCE: Final = "urn:schoolslink:fhir"
DEFAULT_RESOURCE_SCOPE: Final = "system/*.read system/*.write"
_READY_PREFIX: Final = "LISTENING "


class OidcPeerError(RuntimeError):
    """The OAuth peer could not be installed or started."""


def _node_executable() -> str:
    node = os.environ.get("SCHOOLSLINK_NODE") or shutil.which("node")
    if not node:
        raise OidcPeerError("node not found on PATH (Node 20.18+ is needed for the OAuth peer)")
    return node


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "<no log>"
    return "\n".join(text.splitlines()[-lines:]) or "<empty>"


def ensure_oidc_npm_packages(peer_dir: Path = OIDC_PEER_DIR, timeout: float = 600.0) -> None:
    """Run ``npm ci --no-audit --no-fund`` in the peer's folder if its node_modules is missing.

    Serialised with a lock file so parallel test workers do not install over each other.
    """
    marker = peer_dir / "node_modules" / "oidc-provider" / "package.json"
    if marker.exists():
        return
    npm = shutil.which("npm")
    if not npm:
        raise OidcPeerError(f"{peer_dir / 'node_modules'} is missing and npm is not on PATH")
    lock_path = Path(tempfile.gettempdir()) / "schoolslink-oidc-provider-npm.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if marker.exists():  # another process installed while we waited
                return
            try:
                done = subprocess.run(
                    [npm, "ci", "--no-audit", "--no-fund"],
                    cwd=peer_dir,
                    capture_output=True,
                    text=True,
                    timeout=timeout,
                    check=False,
                )
            except subprocess.TimeoutExpired as exc:
                raise OidcPeerError(f"npm ci in {peer_dir} timed out after {timeout:.0f}s") from exc
            if done.returncode != 0:
                tail = "\n".join((done.stdout + done.stderr).splitlines()[-30:])
                raise OidcPeerError(f"npm ci in {peer_dir} failed ({done.returncode}):\n{tail}")
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class OidcProviderPeer:
    """The Node OAuth 2.0 peer as a context manager.

    ``clients``: client metadata dicts, registered at start (the provider has no dynamic
    registration here). ``token_ttl``: access token lifetime in seconds (a test can use 2 to see
    real expiry). ``port`` 0 picks a free port. The server's stderr goes to ``log_path`` (default: a
    new temp file, kept after stop for post-mortems); it never holds request parameters.
    ``install`` runs :func:`ensure_oidc_npm_packages` first.
    """

    def __init__(
        self,
        clients: Sequence[Mapping[str, Any]],
        token_ttl: int = 300,
        port: int = 0,
        log_path: str | os.PathLike[str] | None = None,
        *,
        resource: str = DEFAULT_RESOURCE,
        resource_scope: str = DEFAULT_RESOURCE_SCOPE,
        max_assertion_lifetime: int = 300,
        startup_timeout: float = 30.0,
        install: bool = True,
        env: Mapping[str, str] | None = None,
    ) -> None:
        if token_ttl < 1:
            raise ValueError("token_ttl must be at least 1 second")
        self.clients = [dict(c) for c in clients]
        self.token_ttl = token_ttl
        self.requested_port = port
        self.resource = resource
        self.resource_scope = resource_scope
        self.max_assertion_lifetime = max_assertion_lifetime
        if log_path is None:
            fd, name = tempfile.mkstemp(prefix="schoolslink-oidc-provider-", suffix=".log")
            os.close(fd)
            log_path = name
        self.log_path = Path(log_path)
        self.startup_timeout = startup_timeout
        self.install = install
        self._extra_env = dict(env or {})
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._port: int | None = None
        self._clients_dir: tempfile.TemporaryDirectory[str] | None = None

    # -- properties -----------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise OidcPeerError("the OAuth peer is not running")
        return self._port

    @property
    def issuer(self) -> str:
        """``http://127.0.0.1:PORT`` (no trailing slash)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def token_url(self) -> str:
        return f"{self.issuer}/token"

    @property
    def introspection_url(self) -> str:
        return f"{self.issuer}/token/introspection"

    @property
    def revocation_url(self) -> str:
        return f"{self.issuer}/token/revocation"

    @property
    def discovery_url(self) -> str:
        return f"{self.issuer}/.well-known/openid-configuration"

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise OidcPeerError("the OAuth peer is not running")
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- calls to the provider's own endpoints (for tests and stand-in resource servers) ---

    def introspect(self, token: str, client_id: str, client_secret: str) -> dict[str, Any]:
        """RFC 7662 introspection of ``token``, authenticating as a client_secret_basic client.
        Returns the provider's JSON (``{"active": true, "client_id", "scope", "aud", "exp", ...}``
        or ``{"active": false}``)."""
        response = httpx.post(
            self.introspection_url,
            data={"token": token, "token_type_hint": "access_token"},
            auth=(client_id, client_secret),
            timeout=10.0,
        )
        response.raise_for_status()
        body = response.json()
        if not isinstance(body, dict):
            raise OidcPeerError("introspection answered with something other than a JSON object")
        return body

    def revoke(self, token: str, client_id: str, client_secret: str) -> None:
        """RFC 7009 revocation of ``token`` (which must belong to ``client_id``)."""
        response = httpx.post(
            self.revocation_url,
            data={"token": token, "token_type_hint": "access_token"},
            auth=(client_id, client_secret),
            timeout=10.0,
        )
        response.raise_for_status()

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> OidcProviderPeer:
        if self._proc is not None:
            raise OidcPeerError("the OAuth peer is already started")
        if self.install:
            ensure_oidc_npm_packages()
        self._clients_dir = tempfile.TemporaryDirectory(prefix="schoolslink-oidc-clients-")
        clients_file = Path(self._clients_dir.name) / "clients.json"
        fd = os.open(clients_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(self.clients, fh)
        env = dict(os.environ)
        env.update(self._extra_env)
        env.update(
            {
                "OIDC_TOKEN_TTL": str(self.token_ttl),
                "OIDC_RESOURCE": self.resource,
                "OIDC_RESOURCE_SCOPE": self.resource_scope,
                "OIDC_MAX_ASSERTION_LIFETIME": str(self.max_assertion_lifetime),
            }
        )
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # closed in stop()
        self._proc = subprocess.Popen(
            [
                _node_executable(),
                str(OIDC_SERVER_SCRIPT),
                str(self.requested_port),
                "--exit-on-stdin-close",
                "--clients",
                str(clients_file),
            ],
            cwd=OIDC_PEER_DIR,
            env=env,
            stdin=subprocess.PIPE,  # the server exits when this pipe closes (i.e. when we die)
            stdout=subprocess.PIPE,
            stderr=self._log,
        )
        lines: queue.Queue[str | None] = queue.Queue()
        assert self._proc.stdout is not None
        threading.Thread(
            target=self._pump_stdout, args=(self._proc.stdout, lines), name="oidc-peer-stdout", daemon=True
        ).start()

        deadline = time.monotonic() + self.startup_timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._fail(f"did not report LISTENING within {self.startup_timeout:.0f}s")
            try:
                line = lines.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                if self._proc.poll() is not None:
                    self._fail(f"exited with status {self._proc.returncode} during start-up")
                continue
            if line is None:
                self._proc.wait(timeout=5)
                self._fail(f"exited with status {self._proc.returncode} during start-up")
            if line.startswith(_READY_PREFIX):
                self._port = int(line[len(_READY_PREFIX) :].strip())
                return self

    @staticmethod
    def _pump_stdout(stream: IO[bytes], lines: queue.Queue[str | None]) -> None:
        # Keeps draining after start-up so the server can never block on a full pipe.
        for raw in stream:
            lines.put(raw.decode("utf-8", errors="replace"))
        lines.put(None)

    def _fail(self, why: str) -> NoReturn:
        self.stop()
        script = OIDC_SERVER_SCRIPT.relative_to(REPO_ROOT)
        raise OidcPeerError(f"OAuth peer ({script}) {why}; log {self.log_path}:\n{_tail(self.log_path)}")

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate the server (SIGTERM, then SIGKILL after ``timeout``). Idempotent."""
        proc, self._proc = self._proc, None
        self._port = None
        if proc is not None:
            if proc.stdin is not None:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=timeout)
            if proc.stdout is not None:
                with contextlib.suppress(OSError):
                    proc.stdout.close()
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._clients_dir is not None:
            self._clients_dir.cleanup()
            self._clients_dir = None

    def __enter__(self) -> OidcProviderPeer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:  # never the clients: they hold secrets
        state = f"port={self._port} pid={self._proc.pid}" if self._proc is not None else "stopped"
        return f"OidcProviderPeer({state}, {len(self.clients)} client(s))"
