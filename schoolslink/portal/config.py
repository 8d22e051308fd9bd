"""The portal's settings, from the command line and the environment (docs/portal.md, "Settings").

| variable | meaning | default |
|---|---|---|
| `SCHOOLSLINK_PORTAL_SECURE` | `1`: TLS (or behind a TLS proxy): `__Host-` Secure cookies, HSTS | with a certificate |
| `SCHOOLSLINK_PORTAL_IDLE_MINUTES` | a session ends after this long without a request | 15 |
| `SCHOOLSLINK_PORTAL_MAX_HOURS` | ... and this long after sign-in, whatever | 8 |
| `SCHOOLSLINK_PORTAL_LOCKOUT_AFTER` | failed sign-ins in a row (password or code) that lock an account | 5 |
| `SCHOOLSLINK_PORTAL_LOCKOUT_MINUTES` | how long it stays locked | 15 |
| `SCHOOLSLINK_PORTAL_OIDC_ISSUER` | the OpenID provider (DfE Sign-in); unset: local accounts only | |
| `SCHOOLSLINK_PORTAL_OIDC_CLIENT_ID`, `..._CLIENT_SECRET` | the portal's client (the secret: as keys are read) | |
| `SCHOOLSLINK_PORTAL_OIDC_SCOPES` | scopes asked for | `openid email organisation` |
| `SCHOOLSLINK_PORTAL_OIDC_ORG_CLAIM` | the claim naming the user's organisation(s) | `organisation` |
| `SCHOOLSLINK_PORTAL_OIDC_ROLE_CLAIM` | the claim giving the role (else the local account's) | `schoolslink_role` |
| `SCHOOLSLINK_PORTAL_OIDC_LABEL` | the provider's name on the sign-in page | `DfE Sign-in` |
| `SCHOOLSLINK_PORTAL_BASE_URL` | the portal's public address (OIDC redirect URI, behind a proxy) | the request's |
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from urllib.parse import urlsplit

from schoolslink.errors import ConfigurationError
from schoolslink.keys import setting

_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigurationError(f"{name} must be a whole number (it is {raw!r})") from None
    if value < 1:
        raise ConfigurationError(f"{name} must be at least 1")
    return value


@dataclass(frozen=True, slots=True)
class OidcSettings:
    issuer: str
    client_id: str
    client_secret: str
    scopes: str = "openid email organisation"
    organisation_claim: str = "organisation"
    role_claim: str = "schoolslink_role"
    label: str = "DfE Sign-in"

    def __post_init__(self) -> None:
        parts = urlsplit(self.issuer)
        if parts.scheme != "https" and not (parts.scheme == "http" and parts.hostname in _LOOPBACK):
            raise ConfigurationError("SCHOOLSLINK_PORTAL_OIDC_ISSUER must be an https:// address (plain http only "
                                     "for a provider on this machine's loopback, in tests)")
        if not self.client_id:
            raise ConfigurationError("SCHOOLSLINK_PORTAL_OIDC_CLIENT_ID is required with an OIDC issuer")
        if "openid" not in self.scopes.split():
            raise ConfigurationError("SCHOOLSLINK_PORTAL_OIDC_SCOPES must include openid")

    @classmethod
    def from_env(cls) -> OidcSettings | None:
        issuer = os.environ.get("SCHOOLSLINK_PORTAL_OIDC_ISSUER", "").strip().rstrip("/")
        if not issuer:
            return None
        optional = {field: os.environ.get(f"SCHOOLSLINK_PORTAL_OIDC_{name}", "").strip()
                    for field, name in (("scopes", "SCOPES"), ("organisation_claim", "ORG_CLAIM"),
                                        ("role_claim", "ROLE_CLAIM"), ("label", "LABEL"))}
        return cls(issuer=issuer, client_id=os.environ.get("SCHOOLSLINK_PORTAL_OIDC_CLIENT_ID", "").strip(),
                   client_secret=setting("SCHOOLSLINK_PORTAL_OIDC_CLIENT_SECRET"),
                   **{k: v for k, v in optional.items() if v})


@dataclass(frozen=True, slots=True)
class PortalConfig:
    secure: bool = False  # TLS: Secure __Host- cookies and HSTS
    idle: timedelta = timedelta(minutes=15)
    max_age: timedelta = timedelta(hours=8)
    login_window: timedelta = timedelta(minutes=15)  # how long a sign-in may take (password, code, OIDC round trip)
    lockout_after: int = 5
    lockout: timedelta = timedelta(minutes=15)
    oidc: OidcSettings | None = None
    base_url: str | None = None

    @classmethod
    def from_env(cls, *, tls: bool = False) -> PortalConfig:
        secure = tls or os.environ.get("SCHOOLSLINK_PORTAL_SECURE", "").strip() in ("1", "true", "yes")
        return cls(
            secure=secure,
            idle=timedelta(minutes=_int("SCHOOLSLINK_PORTAL_IDLE_MINUTES", 15)),
            max_age=timedelta(hours=_int("SCHOOLSLINK_PORTAL_MAX_HOURS", 8)),
            lockout_after=_int("SCHOOLSLINK_PORTAL_LOCKOUT_AFTER", 5),
            lockout=timedelta(minutes=_int("SCHOOLSLINK_PORTAL_LOCKOUT_MINUTES", 15)),
            oidc=OidcSettings.from_env(),
            base_url=os.environ.get("SCHOOLSLINK_PORTAL_BASE_URL", "").strip().rstrip("/") or None,
        )

    @property
    def session_cookie(self) -> str:
        """The signed-in session: SameSite=Strict (never sent on a request another site starts)."""
        return "__Host-sl_session" if self.secure else "sl_session"

    @property
    def login_cookie(self) -> str:
        """A sign-in under way: SameSite=Lax, so the OIDC provider's redirect back (a cross-site top-level GET)
        carries it; it opens no page, only the sign-in steps."""
        return "__Host-sl_login" if self.secure else "sl_login"
