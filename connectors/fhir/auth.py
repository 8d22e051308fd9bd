"""OAuth 2.0 client authentication for a trust's FHIR endpoint, as ``httpx.Auth`` objects.

Two ways a system (not a person) gets an access token with the ``client_credentials`` grant:

* :class:`ClientCredentialsAuth`: a client id and shared secret, sent as HTTP Basic
  (``client_secret_basic``, RFC 6749 section 2.3.1). What many trusts' gateways issue.
* :class:`PrivateKeyJwtAuth`: a JWT client assertion signed with our private key
  (``private_key_jwt``, RFC 7523 / OpenID Connect Core section 9), as NHS England's "signed JWT"
  application-restricted APIs require: ``iss`` = ``sub`` = client id, ``aud`` = the token URL, a
  random ``jti``, ``exp`` at most 5 minutes ahead, ``kid`` and ``alg`` (RS512 by default) in the
  header. No secret is shared: the trust holds only our public key (a JWKS), so there is nothing
  on their side to leak, and we rotate by publishing a new ``kid``.

Both put ``Authorization: Bearer <token>`` on each FHIR request and keep the token in a per-object
cache until shortly before it expires (``expires_in`` minus a skew of 30 s or 10 % of the lifetime,
whichever is smaller), so a night's thousands of FHIR calls cost one token request. A 401 from the
FHIR server drops the cached token and retries the request once with a fresh one (a token can be
revoked or the server restarted before ``expires_in`` runs out). One lock serialises token fetches,
so threads sharing an auth object make one token request, not one each.

Token requests go through a separate ``httpx.Client`` of this module's own (never the FHIR
client's: that one may carry other headers, base URLs, event hooks or a test transport), with the
same TLS verification. TLS verification cannot be switched off here: ``verify`` is ``True``, a CA
bundle path or an ``ssl.SSLContext``. Plain ``http://`` is accepted only for loopback hosts (the
local test peers), both for the token URL and for where a bearer token is sent.

Errors: a refusal by the token endpoint (400/401/403, ``invalid_client``, a malformed answer)
raises :class:`FhirAuthError`, a :class:`~connectors.fhir.errors.FhirPermanentError`; 429, 5xx,
timeouts and connection failures are retried with back-off, then raise
:class:`FhirAuthUnavailableError`, a :class:`~connectors.fhir.errors.FhirTransientError`. Messages
carry the OAuth ``error`` and ``error_description``, the token URL (without query) and the client
id; never the client secret, the client assertion, the private key or any token: these end up in
task logs, and a leaked assertion or token is a working credential until it expires.

:func:`auth_from_config` builds one of these from an Airflow Connection's extras.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import logging
import math
import os
import random
import secrets
import ssl
import threading
import time
from collections.abc import AsyncGenerator, Callable, Generator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Self, TypeAlias, TypedDict, Unpack
from urllib.parse import quote, urlsplit

import httpx
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from connectors.fhir.errors import FhirError, FhirPermanentError, FhirTransientError
from connectors.fhir.tls import tls_verify as _ssl_verify
from connectors.retry_after import retry_after_seconds

__all__ = [
    "CLIENT_ASSERTION_TYPE",
    "SUPPORTED_ALGS",
    "ClientCredentialsAuth",
    "FhirAuthError",
    "FhirAuthUnavailableError",
    "PrivateKeyJwtAuth",
    "VerifyArg",
    "auth_from_config",
    "public_jwk",
]

VerifyArg: TypeAlias = bool | str | os.PathLike[str] | ssl.SSLContext
"""What ``verify`` may be: ``True`` (the default CA store), a CA bundle file or directory, or an
``ssl.SSLContext``. ``False`` is in the type only so that passing it is refused at run time with a
clear message rather than by a type checker that may not be running."""

CLIENT_ASSERTION_TYPE: Final = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
SUPPORTED_ALGS: Final = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512")
ASSERTION_LIFETIME_S: Final = 270
"""``exp - iat`` of our client assertions: under NHS England's 5-minute ceiling with a margin for
our clock running ahead of theirs."""
MAX_SKEW_S: Final = 30.0
SKEW_FRACTION: Final = 0.1
DEFAULT_TOKEN_TTL_S: Final = 300.0
"""Assumed lifetime when a token response omits ``expires_in`` (it is only RECOMMENDED)."""
RETRY_AFTER_CAP_S: Final = 60.0
DESCRIPTION_LIMIT: Final = 300
_LOOPBACK_NAMES: Final = frozenset({"localhost", "localhost.localdomain"})
_HASHES: Final[Mapping[str, Callable[[], hashes.HashAlgorithm]]] = {
    "256": hashes.SHA256,
    "384": hashes.SHA384,
    "512": hashes.SHA512,
}
_EC_CURVES: Final[Mapping[str, tuple[str, int]]] = {
    # alg -> (curve name as cryptography names it, bytes per coordinate)
    "ES256": ("secp256r1", 32),
    "ES384": ("secp384r1", 48),
    "ES512": ("secp521r1", 66),
}
_JWK_CRV: Final = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}
_MIN_RSA_BITS: Final = 2048

log = logging.getLogger(__name__)


# -- errors -------------------------------------------------------------------------------------


class _OAuthErrorFields(FhirError):
    """``error`` and ``error_description``: the OAuth error fields when the server gave them."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        error: str | None = None,
        error_description: str | None = None,
    ) -> None:
        super().__init__(message, status=status)
        self.error = error
        self.error_description = error_description


class FhirAuthError(_OAuthErrorFields, FhirPermanentError):
    """The token endpoint refused us (``invalid_client``, ``unauthorized_client``, ``invalid_scope``
    ...) or answered with something that is not a usable token. Retrying will not help until the
    configuration (or the trust's registration of our client) changes.

    ``error`` and ``error_description`` are the OAuth error fields when the server gave them.
    """


class FhirAuthUnavailableError(_OAuthErrorFields, FhirTransientError):
    """The token endpoint could not be reached, or kept answering 429/5xx after our retries: the
    task may be retried later."""


# -- checks shared by both auth kinds -----------------------------------------------------------


def _is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_token_url(token_url: str) -> str:
    """The token URL must be https, or http on a loopback host (test peers); no credentials or
    fragment in it. Returns it unchanged."""
    if not isinstance(token_url, str) or not token_url.strip():
        raise ValueError("token_url must be a non-empty URL")
    parts = urlsplit(token_url.strip())
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError("token_url must be an absolute https:// URL")
    if parts.username is not None or parts.password is not None:
        raise ValueError("token_url must not contain credentials (user:password@)")
    if parts.fragment:
        raise ValueError("token_url must not contain a fragment (#...)")
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        raise ValueError(
            f"token_url uses plain http:// to a non-loopback host ({parts.hostname}); client credentials and "
            "tokens must only travel over https:// (http:// is allowed for 127.0.0.1, ::1 and localhost only)"
        )
    return token_url.strip()


def _url_for_message(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


@dataclass(frozen=True, slots=True)
class _Token:
    value: str
    refresh_at: float  # on the auth's clock: fetch a new one from here on
    expires_in: float


# -- the shared machinery -----------------------------------------------------------------------


class _TokenOptions(TypedDict, total=False):
    """The keyword options both auth kinds take (defaults: :class:`_OAuth2ClientCredentialsBase`)."""

    verify: VerifyArg
    timeout: float
    max_retries: int
    backoff_base: float
    backoff_max: float
    clock: Callable[[], float]
    sleep: Callable[[float], None]


class _OAuth2ClientCredentialsBase(httpx.Auth):
    """``client_credentials`` grant with a cached token; subclasses say how the client
    authenticates to the token endpoint (:meth:`_client_auth`).

    ``clock`` (monotonic seconds) and ``sleep`` are injectable so tests can step past a token's
    expiry, or through back-off, without waiting.
    """

    def __init__(
        self,
        token_url: str,
        client_id: str,
        scope: str | Sequence[str] | None = None,
        *,
        verify: VerifyArg = True,
        timeout: float = 30.0,
        max_retries: int = 3,
        backoff_base: float = 0.5,
        backoff_max: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.token_url = _check_token_url(token_url)
        if not isinstance(client_id, str) or not client_id.strip():
            raise ValueError("client_id must be a non-empty string")
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        if timeout <= 0:
            raise ValueError("timeout must be > 0")
        self.client_id = client_id.strip()
        self.scope = _scope_string(scope)
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self._clock = clock
        self._sleep = sleep
        self._verify = _ssl_verify(verify)
        self._token_http = httpx.Client(
            verify=self._verify,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            follow_redirects=False,  # a redirect would re-send our credentials elsewhere
            headers={"Accept": "application/json", "User-Agent": "schoolslink-fhir-auth"},
        )
        self._lock = threading.Lock()
        self._token: _Token | None = None
        self.token_requests = 0
        """How many token requests this object has sent (each attempt counts): for metrics and tests."""

    # -- what subclasses provide ----------------------------------------------------------------

    def _client_auth(self) -> tuple[dict[str, str], dict[str, str], tuple[str, ...]]:
        """Extra form fields and headers that authenticate us, plus the credential strings that
        must never appear in a message (for redaction)."""
        raise NotImplementedError

    # -- lifecycle ------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the token endpoint's connection pool."""
        self._token_http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def __repr__(self) -> str:  # no secrets in reprs either: they land in logs via %r
        return f"{type(self).__name__}(token_url={_url_for_message(self.token_url)!r}, client_id={self.client_id!r})"

    # -- the token cache ------------------------------------------------------------------------

    def invalidate(self) -> None:
        """Forget the cached token; the next request fetches a new one."""
        with self._lock:
            self._token = None

    def access_token(self) -> str:
        """The current access token (from the cache, or fetched now). For callers that must put
        the token somewhere other than an httpx request (e.g. a test asking for introspection)."""
        return self._current_token().value

    def _current_token(self, stale: _Token | None = None) -> _Token:
        """The cached token if still fresh, else a new one. ``stale`` is a token the resource
        server just refused: it is dropped unless another thread has already replaced it."""
        with self._lock:
            token = self._token
            if token is not None and stale is not None and token.value == stale.value:
                token = self._token = None
            if token is not None and self._clock() < token.refresh_at:
                return token
            token = self._fetch_token()
            self._token = token
            return token

    def _fetch_token(self) -> _Token:
        """POST to the token endpoint, retrying 429/5xx/timeouts/connection failures with
        back-off. Called with the lock held."""
        where = f"token request to {_url_for_message(self.token_url)} for client {self.client_id!r}"
        attempt = 0
        while True:
            form, headers, sensitive = self._client_auth()
            form = {"grant_type": "client_credentials", **form}
            if self.scope:
                form["scope"] = self.scope
            retry_after: float | None = None
            error: str | None = None
            description: str | None = None
            status: int | None = None
            self.token_requests += 1
            try:
                response = self._token_http.post(self.token_url, data=form, headers=headers)
            except httpx.TimeoutException as exc:
                failure = f"{where}: timed out ({type(exc).__name__})"
            except httpx.TransportError as exc:
                failure = f"{where}: connection failed ({type(exc).__name__})"
            else:
                status = response.status_code
                if status == 200:
                    return self._parse_token(response, where, sensitive)
                error, description = _oauth_error(response, sensitive)
                summary = _error_summary(status, error, description)
                if status != 429 and status < 500:
                    raise FhirAuthError(
                        f"{where} refused: {summary}", status=status, error=error, error_description=description
                    )
                failure = f"{where} failed: {summary}"
                retry_after = retry_after_seconds(response.headers.get("retry-after"), RETRY_AFTER_CAP_S)
            if attempt >= self.max_retries:
                raise FhirAuthUnavailableError(
                    f"{failure}; gave up after {attempt + 1} attempt(s)",
                    status=status,
                    error=error,
                    error_description=description,
                ) from None
            ceiling = min(self.backoff_max, self.backoff_base * 2.0**attempt)
            delay = ceiling / 2 + random.uniform(0, ceiling / 2)
            if retry_after is not None:
                delay = max(delay, retry_after)
            log.warning("%s; retrying in %.1fs", failure, delay)
            self._sleep(delay)
            attempt += 1

    def _parse_token(self, response: httpx.Response, where: str, sensitive: tuple[str, ...]) -> _Token:
        try:
            body = response.json()
        except ValueError:
            raise FhirAuthError(f"{where}: the token response is not JSON", status=200) from None
        if not isinstance(body, dict):
            raise FhirAuthError(f"{where}: the token response is not a JSON object", status=200)
        value = body.get("access_token")
        if not isinstance(value, str) or not value or any(c in value for c in "\r\n\0 "):
            raise FhirAuthError(f"{where}: the token response has no usable access_token", status=200)
        token_type = body.get("token_type")
        if not isinstance(token_type, str) or token_type.lower() != "bearer":
            # A DPoP- or mTLS-bound token would need proof we do not send; fail clearly now.
            shown = _redact(str(token_type)[:40], (*sensitive, value))
            raise FhirAuthError(f"{where}: token_type {shown!r} is not Bearer", status=200)
        expires_in = _expires_in(body.get("expires_in"))
        if expires_in is None:
            raise FhirAuthError(f"{where}: the token response's expires_in is not a positive number", status=200)
        skew = min(MAX_SKEW_S, expires_in * SKEW_FRACTION)
        log.info("%s: got a token (expires in %.0fs)", where, expires_in)
        return _Token(value=value, refresh_at=self._clock() + expires_in - skew, expires_in=expires_in)

    # -- httpx.Auth -----------------------------------------------------------------------------

    @staticmethod
    def _check_destination(request: httpx.Request) -> None:
        """A bearer token is a working credential: never send one in clear text off this host."""
        if request.url.scheme != "https" and not _is_loopback(request.url.host):
            raise FhirAuthError(
                f"refusing to send a bearer token over plain {request.url.scheme}:// to {request.url.host}; "
                "use https:// (http:// is allowed for loopback hosts only)"
            )

    @staticmethod
    def _authorise(request: httpx.Request, token: _Token) -> None:
        request.headers["Authorization"] = f"Bearer {token.value}"

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        """Not used: fetching a token is I/O, so :meth:`sync_auth_flow` and
        :meth:`async_auth_flow` are overridden instead (as httpx's docs ask)."""
        raise NotImplementedError("use sync_auth_flow or async_auth_flow")
        yield request  # pragma: no cover  (makes this a generator, as httpx.Auth.auth_flow is)

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        """Send with the cached token; on 401 drop it, fetch a new one and resend once."""
        self._check_destination(request)
        request.read()  # the body must be replayable for the one retry
        token = self._current_token()
        self._authorise(request, token)
        response = yield request
        if response.status_code != 401:
            return
        log.info("FHIR server answered 401; fetching a new token and retrying once")
        token = self._current_token(stale=token)
        self._authorise(request, token)
        yield request

    async def async_auth_flow(self, request: httpx.Request) -> AsyncGenerator[httpx.Request, httpx.Response]:
        """As :meth:`sync_auth_flow`, with the (blocking, lock-serialised) token fetch in a worker
        thread so the event loop is not held up."""
        import anyio.to_thread

        self._check_destination(request)
        await request.aread()
        token = await anyio.to_thread.run_sync(self._current_token)
        self._authorise(request, token)
        response = yield request
        if response.status_code != 401:
            return
        token = await anyio.to_thread.run_sync(self._current_token, token)
        self._authorise(request, token)
        yield request


def _scope_string(scope: str | Sequence[str] | None) -> str | None:
    if scope is None:
        return None
    if isinstance(scope, str):
        return " ".join(scope.split()) or None
    parts = [s.strip() for s in scope]
    if not all(parts) or any(" " in p for p in parts):
        raise ValueError("scope entries must be non-empty and contain no spaces")
    return " ".join(parts) or None


def _expires_in(raw: object) -> float | None:
    """Seconds from ``expires_in`` (a number, or a numeric string as some servers send); the
    default lifetime when absent; None when unusable."""
    if raw is None:
        return DEFAULT_TOKEN_TTL_S
    if isinstance(raw, bool) or not isinstance(raw, int | float | str):
        return None
    try:
        value = float(raw)
    except ValueError:
        return None
    if not math.isfinite(value) or value <= 0:
        return None
    return value


def _redact(text: str, sensitive: Sequence[str]) -> str:
    for s in sensitive:
        if s and len(s) >= 4:
            text = text.replace(s, "[redacted]")
    return text


def _oauth_error(response: httpx.Response, sensitive: Sequence[str]) -> tuple[str | None, str | None]:
    """The OAuth ``error`` and ``error_description`` of a failed token response (RFC 6749 5.2),
    printable, truncated and with our credentials cut out should a server echo them."""
    try:
        body = response.json()
    except ValueError:
        return None, None
    if not isinstance(body, dict):
        return None, None
    out: list[str | None] = []
    for key in ("error", "error_description"):
        value = body.get(key)
        if isinstance(value, str) and value:
            cleaned = "".join(c if c.isprintable() else " " for c in value)[:DESCRIPTION_LIMIT]
            out.append(_redact(cleaned, sensitive))
        else:
            out.append(None)
    return out[0], out[1]


def _error_summary(status: int, error: str | None, description: str | None) -> str:
    text = f"HTTP {status}"
    if error:
        text += f" {error}"
    if description:
        text += f": {description}"
    return text


# -- client_secret_basic ------------------------------------------------------------------------


class ClientCredentialsAuth(_OAuth2ClientCredentialsBase):
    """``client_credentials`` with a shared secret sent as HTTP Basic (``client_secret_basic``).

    The id and secret are form-urlencoded before base64, as RFC 6749 2.3.1 says (it matters for
    secrets with ``:``, ``%`` or non-ASCII characters, which httpx's BasicAuth would send raw).
    Keyword options (``verify``, ``timeout``, ``max_retries``, ``backoff_base``, ``backoff_max``,
    ``clock``, ``sleep``) are the same for both auth kinds.
    """

    def __init__(
        self,
        token_url: str,
        client_id: str,
        client_secret: str,
        scope: str | Sequence[str] | None = None,
        **options: Unpack[_TokenOptions],
    ) -> None:
        if not isinstance(client_secret, str) or not client_secret:
            raise ValueError("client_secret must be a non-empty string")
        super().__init__(token_url, client_id, scope, **options)
        self._secret = client_secret

    def _client_auth(self) -> tuple[dict[str, str], dict[str, str], tuple[str, ...]]:
        pair = f"{quote(self.client_id, safe='')}:{quote(self._secret, safe='')}"
        basic = base64.b64encode(pair.encode("utf-8")).decode("ascii")
        return {}, {"Authorization": f"Basic {basic}"}, (self._secret, basic)


# -- private_key_jwt ----------------------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _int_bytes(n: int, length: int | None = None) -> bytes:
    size = length if length is not None else max(1, (n.bit_length() + 7) // 8)
    return n.to_bytes(size, "big")


_SigningKey: TypeAlias = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def _load_signing_key(private_key_pem: bytes | str, alg: str) -> _SigningKey:
    """Load an unencrypted PEM private key and check it suits ``alg`` (RSA >= 2048 bits for
    RS*/PS*, the matching curve for ES*), so a mismatch fails at configuration, not at 2 a.m."""
    if alg not in SUPPORTED_ALGS:
        raise ValueError(f"alg must be one of {', '.join(SUPPORTED_ALGS)}")
    pem = private_key_pem.encode("utf-8") if isinstance(private_key_pem, str) else private_key_pem
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError):
        # Not chained: the cause's text is not needed and we never echo key material.
        raise ValueError("private key is not an unencrypted PEM private key (PKCS#8 or traditional)") from None
    if alg.startswith(("RS", "PS")):
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError(f"alg {alg} needs an RSA private key")
        if key.key_size < _MIN_RSA_BITS:
            raise ValueError(f"RSA key is {key.key_size} bits; at least {_MIN_RSA_BITS} are needed")
        return key
    curve, _ = _EC_CURVES[alg]
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != curve:
        raise ValueError(f"alg {alg} needs an EC private key on curve {_JWK_CRV[curve]}")
    return key


def _sign(key: _SigningKey, alg: str, data: bytes) -> bytes:
    """A JWS signature (RFC 7518 section 3) over ``data``."""
    hash_alg = _HASHES[alg[2:]]()
    if isinstance(key, rsa.RSAPrivateKey):
        if alg.startswith("PS"):
            pss = padding.PSS(mgf=padding.MGF1(hash_alg), salt_length=hash_alg.digest_size)
            return key.sign(data, pss, hash_alg)
        return key.sign(data, padding.PKCS1v15(), hash_alg)
    der = key.sign(data, ec.ECDSA(hash_alg))
    r, s = decode_dss_signature(der)
    size = _EC_CURVES[alg][1]
    return _int_bytes(r, size) + _int_bytes(s, size)  # JWS wants R || S, not DER


def public_jwk(private_key_pem: bytes | str, kid: str, alg: str = "RS512") -> dict[str, str]:
    """The public half of a private key as a JWK (with ``kid``, ``alg``, ``use: sig``), for the
    JWKS a trust (or NHS England's developer portal) registers for our client.
    Wrap as ``{"keys": [jwk, ...]}``; during a rotation list both the old and the new ``kid``."""
    if not kid:
        raise ValueError("kid must be a non-empty string")
    key = _load_signing_key(private_key_pem, alg)
    if isinstance(key, rsa.RSAPrivateKey):
        numbers = key.public_key().public_numbers()
        return {
            "kty": "RSA",
            "n": _b64url(_int_bytes(numbers.n)),
            "e": _b64url(_int_bytes(numbers.e)),
            "kid": kid,
            "alg": alg,
            "use": "sig",
        }
    ec_numbers = key.public_key().public_numbers()
    size = _EC_CURVES[alg][1]
    return {
        "kty": "EC",
        "crv": _JWK_CRV[key.curve.name],
        "x": _b64url(_int_bytes(ec_numbers.x, size)),
        "y": _b64url(_int_bytes(ec_numbers.y, size)),
        "kid": kid,
        "alg": alg,
        "use": "sig",
    }


class PrivateKeyJwtAuth(_OAuth2ClientCredentialsBase):
    """``client_credentials`` authenticated by a signed JWT client assertion (``private_key_jwt``,
    RFC 7523 section 2.2), NHS England's "signed JWT" style.

    Each token request gets a new assertion (a fresh ``jti``: servers refuse a replayed one):
    header ``{"alg", "typ": "JWT", "kid"}``; claims ``iss`` = ``sub`` = ``client_id``, ``aud`` =
    ``audience`` or else ``token_url``, ``jti`` (random), ``iat`` (now), ``exp`` (now + 270 s).
    ``wall_clock`` (epoch seconds) is injectable for tests; the cache uses ``clock``. Other keyword
    options as for :class:`ClientCredentialsAuth`.
    """

    def __init__(
        self,
        token_url: str,
        client_id: str,
        private_key_pem: bytes,
        kid: str,
        alg: str = "RS512",
        scope: str | Sequence[str] | None = None,
        *,
        audience: str | None = None,
        wall_clock: Callable[[], float] = time.time,
        **options: Unpack[_TokenOptions],
    ) -> None:
        if not isinstance(kid, str) or not kid.strip():
            raise ValueError("kid must be a non-empty string (the key id registered with the trust)")
        if audience is not None and not audience.strip():
            raise ValueError("audience must be a non-empty string when given")
        self._key = _load_signing_key(private_key_pem, alg)  # before super(): no client to leak on failure
        super().__init__(token_url, client_id, scope, **options)
        self.kid = kid.strip()
        self.alg = alg
        self.audience = audience.strip() if audience is not None else self.token_url
        self._wall_clock = wall_clock

    def client_assertion(self) -> str:
        """A new signed client assertion (compact JWS). Exposed for tests and diagnostics only;
        treat the result as a credential: never log it."""
        now = int(self._wall_clock())
        header = {"alg": self.alg, "typ": "JWT", "kid": self.kid}
        claims = {
            "iss": self.client_id,
            "sub": self.client_id,
            "aud": self.audience,
            "jti": secrets.token_urlsafe(24),
            "iat": now,
            "exp": now + ASSERTION_LIFETIME_S,
        }
        signing_input = (
            _b64url(json.dumps(header, separators=(",", ":")).encode())
            + "."
            + _b64url(json.dumps(claims, separators=(",", ":")).encode())
        )
        signature = _sign(self._key, self.alg, signing_input.encode("ascii"))
        return f"{signing_input}.{_b64url(signature)}"

    def _client_auth(self) -> tuple[dict[str, str], dict[str, str], tuple[str, ...]]:
        assertion = self.client_assertion()
        form = {
            "client_assertion_type": CLIENT_ASSERTION_TYPE,
            "client_assertion": assertion,
            # RFC 7521 4.2: client_id is optional beside an assertion; sending it helps servers
            # (oidc-provider and NHS England's both accept it) find the client's keys.
            "client_id": self.client_id,
        }
        return form, {}, (assertion, assertion.rsplit(".", 1)[-1])


# -- configuration ------------------------------------------------------------------------------

_AUTH_KINDS: Final = ("none", "client_credentials", "private_key_jwt")
_AUTH_KEYS: Final = (
    "token_url",
    "client_id",
    "client_secret",
    "private_key",
    "private_key_path",
    "kid",
    "alg",
    "scope",
    "audience",
)


def _opt_str(cfg: Mapping[str, Any], key: str) -> str | None:
    value = cfg.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"FHIR auth config: {key} must be a string")
    return value.strip() or None


def _req_str(cfg: Mapping[str, Any], key: str, kind: str) -> str:
    value = _opt_str(cfg, key)
    if value is None:
        raise ValueError(f"FHIR auth config: {key} is required when auth is {kind}")
    return value


def _pem_text(text: str) -> bytes:
    # A PEM pasted into a one-line field (an Airflow Connection's extras, an env var) often
    # arrives with literal "\n" sequences instead of newlines.
    if "\n" not in text and "\\n" in text:
        text = text.replace("\\n", "\n")
    return text.encode("utf-8")


def auth_from_config(cfg: Mapping[str, Any]) -> httpx.Auth | None:
    """Build the FHIR auth an Airflow Connection's extras describe, or None for no auth.

    Keys: ``auth`` (``none`` | ``client_credentials`` | ``private_key_jwt``); ``token_url``;
    ``client_id``; ``client_secret`` (client_credentials); ``private_key`` (PEM text) or
    ``private_key_path`` (a PEM file), ``kid``, ``alg`` (default RS512), ``audience`` (default the
    token URL) for private_key_jwt; ``scope`` (a string or a list) and ``ca_bundle`` (a CA file or
    directory; default the standard CA store) and ``timeout`` (seconds) for both. Other keys are
    ignored (the same extras configure the FHIR client).

    Raises ValueError naming the missing or malformed key, never its value: the message lands in
    task logs and the value may be a secret.
    """
    raw_kind = cfg.get("auth")
    if raw_kind is None:
        present = [k for k in _AUTH_KEYS if cfg.get(k) not in (None, "")]
        if present:
            raise ValueError(
                f"FHIR auth config: auth is missing but {', '.join(present)} is set; set auth to one of "
                f"{', '.join(_AUTH_KINDS)}"
            )
        return None
    if not isinstance(raw_kind, str) or raw_kind.strip().lower() not in _AUTH_KINDS:
        raise ValueError(f"FHIR auth config: auth must be one of {', '.join(_AUTH_KINDS)}")
    kind = raw_kind.strip().lower()
    if kind == "none":
        return None

    token_url = _req_str(cfg, "token_url", kind)
    client_id = _req_str(cfg, "client_id", kind)
    raw_scope = cfg.get("scope")
    if raw_scope is not None and not isinstance(raw_scope, str | list | tuple):
        raise ValueError("FHIR auth config: scope must be a string or a list of strings")
    if isinstance(raw_scope, list | tuple) and not all(isinstance(s, str) for s in raw_scope):
        raise ValueError("FHIR auth config: scope must be a string or a list of strings")
    scope: str | Sequence[str] | None = raw_scope
    ca_bundle = _opt_str(cfg, "ca_bundle")
    if ca_bundle is not None and not Path(ca_bundle).expanduser().exists():
        raise ValueError("FHIR auth config: ca_bundle names a file or folder that does not exist")
    verify: VerifyArg = str(Path(ca_bundle).expanduser()) if ca_bundle is not None else True
    raw_timeout = cfg.get("timeout", 30.0)
    try:
        timeout = float(raw_timeout)
    except (TypeError, ValueError):
        raise ValueError("FHIR auth config: timeout must be a number of seconds") from None
    if not math.isfinite(timeout) or timeout <= 0:
        raise ValueError("FHIR auth config: timeout must be a positive number of seconds")

    if kind == "client_credentials":
        secret = cfg.get("client_secret")
        if not isinstance(secret, str) or not secret:
            raise ValueError("FHIR auth config: client_secret is required when auth is client_credentials")
        return ClientCredentialsAuth(token_url, client_id, secret, scope, verify=verify, timeout=timeout)

    key_text = cfg.get("private_key")
    key_path = _opt_str(cfg, "private_key_path")
    if key_text not in (None, "") and key_path is not None:
        raise ValueError("FHIR auth config: give private_key or private_key_path, not both")
    if key_text not in (None, ""):
        if not isinstance(key_text, str):
            raise ValueError("FHIR auth config: private_key must be PEM text")
        pem = _pem_text(key_text)
    elif key_path is not None:
        try:
            pem = Path(key_path).expanduser().read_bytes()
        except OSError as exc:
            raise ValueError(
                f"FHIR auth config: private_key_path cannot be read ({type(exc).__name__}: {exc.strerror})"
            ) from None
    else:
        raise ValueError("FHIR auth config: private_key or private_key_path is required when auth is private_key_jwt")
    kid = _req_str(cfg, "kid", kind)
    alg = _opt_str(cfg, "alg") or "RS512"
    if alg not in SUPPORTED_ALGS:
        raise ValueError(f"FHIR auth config: alg must be one of {', '.join(SUPPORTED_ALGS)}")
    try:
        _load_signing_key(pem, alg)
    except ValueError as exc:  # the message names the problem (format, key type, size), not the key
        which = "private_key_path" if key_path is not None else "private_key"
        raise ValueError(f"FHIR auth config: {which}: {exc}") from None
    return PrivateKeyJwtAuth(
        token_url,
        client_id,
        pem,
        kid,
        alg,
        scope,
        verify=verify,
        timeout=timeout,
        audience=_opt_str(cfg, "audience"),
    )


# -- JWKS for registration ----------------------------------------------------------------------


def _main(argv: Sequence[str] | None = None) -> int:
    """``python -m connectors.fhir.auth jwks KEY.pem:KID[:ALG] ...``: print the public JWKS to
    register with a trust (several keys during a rotation). Reads private keys, prints only their
    public halves. Exit 0 on success, 1 if a key is refused, 2 on a usage error."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m connectors.fhir.auth", description=_main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    jwks = sub.add_parser("jwks", help="print the public JWKS for one or more private keys")
    jwks.add_argument("keys", nargs="+", metavar="KEY.pem:KID[:ALG]", help="a PEM private key, its kid, its alg")
    args = parser.parse_args(argv)
    out: list[dict[str, str]] = []
    for spec in args.keys:
        path, _, rest = spec.partition(":")
        kid, _, alg = rest.partition(":")
        if not path or not kid:
            parser.error(f"expected KEY.pem:KID[:ALG], got {spec!r}")
        try:
            out.append(public_jwk(Path(path).read_bytes(), kid, alg or "RS512"))
        except (OSError, ValueError) as exc:
            print(f"{path}: {exc}", file=sys.stderr)
            return 1
    print(json.dumps({"keys": out}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
