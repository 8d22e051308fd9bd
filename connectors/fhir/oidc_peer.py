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

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import httpx

from connectors.peer_process import PeerProcess, ensure_npm_installed, node_executable

__all__ = ["OIDC_PEER_DIR", "OIDC_SERVER_SCRIPT", "OidcPeerError", "OidcProviderPeer", "ensure_oidc_npm_packages"]

REPO_ROOT: Final = Path(__file__).resolve().parents[2]
OIDC_PEER_DIR: Final = REPO_ROOT / "peers" / "oidc-provider"
OIDC_SERVER_SCRIPT: Final = OIDC_PEER_DIR / "server.mjs"
DEFAULT_RESOURCE: Final = "urn:schoolslink:fhir"
DEFAULT_RESOURCE_SCOPE: Final = "system/*.read system/*.write"


class OidcPeerError(RuntimeError):
    """The OAuth peer could not be installed or started."""


def ensure_oidc_npm_packages(peer_dir: Path = OIDC_PEER_DIR, timeout: float = 600.0) -> None:
    """Run ``npm ci --no-audit --no-fund`` in the peer's folder if its node_modules is missing.

    Serialised with a lock file so parallel test workers do not install over each other.
    """
    ensure_npm_installed(
        peer_dir,
        peer_dir / "node_modules" / "oidc-provider" / "package.json",
        "schoolslink-oidc-provider-npm.lock",
        timeout,
        OidcPeerError,
    )


class OidcProviderPeer(PeerProcess):
    """The Node OAuth 2.0 peer as a context manager.

    ``clients``: client metadata dicts, registered at start (the provider has no dynamic
    registration here). ``token_ttl``: access token lifetime in seconds (a test can use 2 to see
    real expiry). ``port`` 0 picks a free port. The server's stderr goes to ``log_path`` (default: a
    new temp file, kept after stop for post-mortems); it never holds request parameters.
    ``install`` runs :func:`ensure_oidc_npm_packages` first.
    """

    error = OidcPeerError
    name = "OAuth peer"
    script = OIDC_SERVER_SCRIPT
    cwd = OIDC_PEER_DIR
    log_prefix = "schoolslink-oidc-provider-"

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
        self.resource = resource
        self.resource_scope = resource_scope
        self.max_assertion_lifetime = max_assertion_lifetime
        super().__init__(port=port, log_path=log_path, startup_timeout=startup_timeout, install=install, env=env)
        self._clients_dir: tempfile.TemporaryDirectory[str] | None = None

    # -- properties -----------------------------------------------------------------------

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

    def _clients_file(self) -> Path:
        assert self._clients_dir is not None  # made by _prepare()
        return Path(self._clients_dir.name) / "clients.json"

    def _prepare(self) -> Mapping[str, str]:
        if self.install:
            ensure_oidc_npm_packages()
        self._clients_dir = tempfile.TemporaryDirectory(prefix="schoolslink-oidc-clients-")
        fd = os.open(self._clients_file(), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(self.clients, fh)
        return {
            "OIDC_TOKEN_TTL": str(self.token_ttl),
            "OIDC_RESOURCE": self.resource,
            "OIDC_RESOURCE_SCOPE": self.resource_scope,
            "OIDC_MAX_ASSERTION_LIFETIME": str(self.max_assertion_lifetime),
        }

    def _command(self) -> list[str]:
        return [
            node_executable(OidcPeerError, "Node 20.18+ is needed for the OAuth peer"),
            str(OIDC_SERVER_SCRIPT),
            str(self.requested_port),
            "--exit-on-stdin-close",
            "--clients",
            str(self._clients_file()),
        ]

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate the server (SIGTERM, then SIGKILL after ``timeout``) and delete its clients
        file. Idempotent."""
        super().stop(timeout)
        if self._clients_dir is not None:
            self._clients_dir.cleanup()
            self._clients_dir = None

    def __repr__(self) -> str:  # never the clients: they hold secrets
        return f"OidcProviderPeer({self._state()}, {len(self.clients)} client(s))"
