"""OAuth 2.0 for the FHIR client (connectors/fhir/auth.py) against the real ``oidc-provider`` peer.

The authorization server is always the real one (peers/oidc-provider, started by
connectors/fhir/oidc_peer.py). The resource side is a tiny stdlib HTTP server on 127.0.0.1 that
checks each bearer token with the provider's own introspection endpoint, so "the token was
accepted" means the provider says it is active, and a 401 happens for a real reason (the token was
revoked at the provider). A small stdlib gateway in front of the provider stands in for an API
gateway that answers 503 for a while.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from connectors.fhir.auth import (
    ClientCredentialsAuth,
    FhirAuthError,
    FhirAuthUnavailableError,
    PrivateKeyJwtAuth,
    auth_from_config,
    public_jwk,
)
from connectors.fhir.client import FhirClient
from connectors.fhir.errors import FhirPermanentError, FhirTransientError
from connectors.fhir.oidc_peer import OidcProviderPeer

BASIC_ID = "trust-basic"
BASIC_SECRET = "basic-secret-0123456789-abcdefghij"
RS_ID = "trust-jwt-rs512"
RS_KID = "schoolslink-2025-01"
EC_ID = "trust-jwt-es384"
EC_KID = "schoolslink-ec-1"
SCOPE = "system/*.read system/*.write"


def _pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@pytest.fixture(scope="module")
def keys() -> dict[str, bytes]:
    return {
        "rs": _pem(rsa.generate_private_key(public_exponent=65537, key_size=2048)),
        "ec": _pem(ec.generate_private_key(ec.SECP384R1())),
        "other_rs": _pem(rsa.generate_private_key(public_exponent=65537, key_size=2048)),
    }


@pytest.fixture(scope="module")
def clients(keys: dict[str, bytes]) -> list[dict[str, Any]]:
    return [
        {"client_id": BASIC_ID, "client_secret": BASIC_SECRET, "token_endpoint_auth_method": "client_secret_basic"},
        {
            "client_id": RS_ID,
            "token_endpoint_auth_method": "private_key_jwt",
            "jwks": {"keys": [public_jwk(keys["rs"], RS_KID, "RS512")]},
        },
        {
            "client_id": EC_ID,
            "token_endpoint_auth_method": "private_key_jwt",
            "jwks": {"keys": [public_jwk(keys["ec"], EC_KID, "ES384")]},
        },
    ]


@pytest.fixture(scope="module")
def idp(clients: list[dict[str, Any]], tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcProviderPeer]:
    log_path = tmp_path_factory.mktemp("oidc-peer") / "oidc-provider.log"
    with OidcProviderPeer(clients, token_ttl=300, log_path=log_path) as peer:
        yield peer


def introspect(idp: OidcProviderPeer, token: str) -> dict[str, Any]:
    return idp.introspect(token, BASIC_ID, BASIC_SECRET)


def jwt_parts(jwt: str) -> tuple[dict[str, Any], dict[str, Any]]:
    def dec(part: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
        return data

    header, payload, _sig = jwt.split(".")
    return dec(header), dec(payload)


# -- a resource server that believes only the provider ----------------------------------------


class ResourceServer:
    """GET /Patient/<id> answers a Patient if the bearer token is active at the provider, else 401.
    GET /always-401/... always answers 401. Records every token it was shown, in order."""

    def __init__(self, idp: OidcProviderPeer) -> None:
        self.idp = idp
        self.tokens: list[str | None] = []
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # no request logs
                pass

            def _send(self, status: int, body: dict[str, Any], extra: dict[str, str] | None = None) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                header = self.headers.get("Authorization") or ""
                token = header[len("Bearer ") :] if header.startswith("Bearer ") else None
                with outer._lock:
                    outer.tokens.append(token)
                unauthorised = (
                    401,
                    {"resourceType": "OperationOutcome"},
                    {"WWW-Authenticate": 'Bearer error="invalid_token"'},
                )
                if token is None or self.path.startswith("/always-401"):
                    self._send(*unauthorised)
                    return
                info = outer.idp.introspect(token, BASIC_ID, BASIC_SECRET)
                if not info.get("active"):
                    self._send(*unauthorised)
                    return
                rid = self.path.rsplit("/", 1)[-1]
                self._send(200, {"resourceType": "Patient", "id": rid, "meta": {"tag": [{"code": info["client_id"]}]}})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, args=(0.05,), name="resource-server", daemon=True
        )

    def __enter__(self) -> ResourceServer:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def fhir(idp: OidcProviderPeer) -> Iterator[ResourceServer]:
    with ResourceServer(idp) as server:
        yield server


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def basic_auth(idp: OidcProviderPeer, **kw: Any) -> ClientCredentialsAuth:
    return ClientCredentialsAuth(idp.token_url, BASIC_ID, BASIC_SECRET, SCOPE, **kw)


def rs_auth(idp: OidcProviderPeer, keys: dict[str, bytes], **kw: Any) -> PrivateKeyJwtAuth:
    return PrivateKeyJwtAuth(idp.token_url, RS_ID, keys["rs"], RS_KID, "RS512", SCOPE, **kw)


# -- getting a token, each way -----------------------------------------------------------------


def test_private_key_jwt_rs512_gets_an_active_token(idp: OidcProviderPeer, keys: dict[str, bytes]) -> None:
    with rs_auth(idp, keys) as auth:
        token = auth.access_token()
        info = introspect(idp, token)
        assert info["active"] is True
        assert info["client_id"] == RS_ID
        assert info["aud"] == "urn:schoolslink:fhir"
        assert set(info["scope"].split()) == set(SCOPE.split())
        assert info["exp"] - info["iat"] == 300

        # The assertion is the NHS England signed-JWT shape.
        first, second = auth.client_assertion(), auth.client_assertion()
        header, claims = jwt_parts(first)
        assert header == {"alg": "RS512", "typ": "JWT", "kid": RS_KID}
        assert claims["iss"] == claims["sub"] == RS_ID
        assert claims["aud"] == idp.token_url
        assert 0 < claims["exp"] - claims["iat"] <= 300
        assert abs(claims["iat"] - time.time()) < 5
        assert jwt_parts(second)[1]["jti"] != claims["jti"]


def test_private_key_jwt_es384_gets_an_active_token(idp: OidcProviderPeer, keys: dict[str, bytes]) -> None:
    with PrivateKeyJwtAuth(idp.token_url, EC_ID, keys["ec"], EC_KID, "ES384", ["system/*.read"]) as auth:
        header, _claims = jwt_parts(auth.client_assertion())
        assert header["alg"] == "ES384"
        info = introspect(idp, auth.access_token())
        assert info["active"] is True
        assert info["client_id"] == EC_ID
        assert info["scope"] == "system/*.read"


def test_client_secret_basic_gets_an_active_token(idp: OidcProviderPeer) -> None:
    with basic_auth(idp) as auth:
        info = introspect(idp, auth.access_token())
        assert info["active"] is True
        assert info["client_id"] == BASIC_ID


# -- the cache ---------------------------------------------------------------------------------


def test_token_is_reused_across_requests_and_by_the_fhir_client(
    idp: OidcProviderPeer, keys: dict[str, bytes], fhir: ResourceServer
) -> None:
    auth = rs_auth(idp, keys)
    with FhirClient(fhir.base_url, auth=auth) as client:
        for i in range(5):
            patient = client.read("Patient", f"p{i}")
            assert patient["id"] == f"p{i}"
            assert patient["meta"]["tag"][0]["code"] == RS_ID  # the provider said whose token it was
    assert auth.token_requests == 1
    assert len(fhir.tokens) == 5 and len(set(fhir.tokens)) == 1
    auth.close()


def test_token_is_refetched_shortly_before_it_expires(idp: OidcProviderPeer, keys: dict[str, bytes]) -> None:
    clock = FakeClock()
    with rs_auth(idp, keys, clock=clock) as auth:
        first = auth.access_token()
        # expires_in 300: skew is min(30 s, 10 %) = 30 s, so it is reused until 270 s have passed.
        clock.now += 269.9
        assert auth.access_token() == first
        assert auth.token_requests == 1
        clock.now += 0.2
        second = auth.access_token()
        assert second != first
        assert auth.token_requests == 2
        assert introspect(idp, second)["active"] is True


def test_with_a_two_second_ttl_the_expired_token_is_replaced(clients: list[dict[str, Any]], tmp_path: Path) -> None:
    with OidcProviderPeer(clients, token_ttl=2, log_path=tmp_path / "oidc.log") as short:
        with ClientCredentialsAuth(short.token_url, BASIC_ID, BASIC_SECRET) as auth:
            started = time.monotonic()
            first = auth.access_token()
            assert short.introspect(first, BASIC_ID, BASIC_SECRET)["active"] is True
            assert auth.access_token() == first  # skew for a 2 s token is 0.2 s: still fresh
            time.sleep(max(0.0, 2.1 - (time.monotonic() - started)))
            assert short.introspect(first, BASIC_ID, BASIC_SECRET)["active"] is False  # really expired
            second = auth.access_token()
            assert second != first
            assert auth.token_requests == 2
            assert short.introspect(second, BASIC_ID, BASIC_SECRET)["active"] is True


def test_threads_sharing_an_auth_make_one_token_request(idp: OidcProviderPeer, fhir: ResourceServer) -> None:
    with basic_auth(idp) as auth, httpx.Client(base_url=fhir.base_url, auth=auth) as http:
        with ThreadPoolExecutor(max_workers=8) as pool:
            statuses = list(pool.map(lambda i: http.get(f"/Patient/t{i}").status_code, range(16)))
    assert statuses == [200] * 16
    assert auth.token_requests == 1


def test_async_client_uses_the_same_cache(idp: OidcProviderPeer, fhir: ResourceServer) -> None:
    auth = basic_auth(idp)

    async def run() -> list[int]:
        async with httpx.AsyncClient(base_url=fhir.base_url, auth=auth) as http:
            return [(await http.get(f"/Patient/a{i}")).status_code for i in range(3)]

    assert asyncio.run(run()) == [200, 200, 200]
    assert auth.token_requests == 1
    auth.close()


# -- 401 from the resource server ----------------------------------------------------------------


def test_a_401_drops_the_token_and_retries_once_with_a_new_one(idp: OidcProviderPeer, fhir: ResourceServer) -> None:
    with basic_auth(idp) as auth, httpx.Client(base_url=fhir.base_url, auth=auth) as http:
        assert http.get("/Patient/a").status_code == 200
        first = fhir.tokens[-1]
        assert first is not None
        idp.revoke(first, BASIC_ID, BASIC_SECRET)  # the provider now calls it inactive, before its expiry

        response = http.get("/Patient/b")
        assert response.status_code == 200
        assert auth.token_requests == 2
        assert fhir.tokens[1:] == [first, fhir.tokens[-1]]
        assert fhir.tokens[-1] != first

        # A server that refuses every token: one retry with one new token, then the 401 comes back.
        fhir.tokens.clear()
        response = http.get("/always-401/x")
        assert response.status_code == 401
        assert len(fhir.tokens) == 2
        assert auth.token_requests == 3


# -- refusals and what their messages (never) contain --------------------------------------------


def _recording_assertions(auth: PrivateKeyJwtAuth) -> list[str]:
    sent: list[str] = []
    original = auth.client_assertion

    def record() -> str:
        sent.append(original())
        return sent[-1]

    auth.client_assertion = record  # type: ignore[method-assign]
    return sent


@pytest.mark.parametrize("case", ["wrong_key", "unknown_kid", "wrong_alg_for_registration"])
def test_a_bad_assertion_is_refused_as_invalid_client_without_leaking_it(
    idp: OidcProviderPeer, keys: dict[str, bytes], caplog: pytest.LogCaptureFixture, case: str
) -> None:
    caplog.set_level(logging.DEBUG)
    if case == "wrong_key":
        auth = PrivateKeyJwtAuth(idp.token_url, RS_ID, keys["other_rs"], RS_KID, "RS512")
    elif case == "unknown_kid":
        auth = PrivateKeyJwtAuth(idp.token_url, RS_ID, keys["rs"], "no-such-kid", "RS512")
    else:  # the registered key is RS512 (jwk alg); sign RS256 with the same key
        auth = PrivateKeyJwtAuth(idp.token_url, RS_ID, keys["rs"], RS_KID, "RS256")
    sent = _recording_assertions(auth)
    with auth, pytest.raises(FhirAuthError) as caught:
        auth.access_token()
    err = caught.value
    assert isinstance(err, FhirPermanentError)
    assert err.status == 401
    assert err.error == "invalid_client"
    assert "invalid_client" in str(err)
    assert len(sent) == 1  # refused at once, not retried
    assertion = sent[0]
    signature = assertion.rsplit(".", 1)[-1]
    for text in (str(err), repr(err), caplog.text, idp.log_path.read_text()):
        assert assertion not in text
        assert signature not in text


def test_a_wrong_secret_is_refused_without_leaking_it(idp: OidcProviderPeer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    secret = "not-the-secret-9f8e7d6c5b4a"
    with ClientCredentialsAuth(idp.token_url, BASIC_ID, secret) as auth, pytest.raises(FhirAuthError) as caught:
        auth.access_token()
    err = caught.value
    assert err.error == "invalid_client" and err.status == 401
    basic = base64.b64encode(f"{BASIC_ID}:{secret}".encode()).decode()
    for text in (str(err), repr(err), caplog.text, repr(auth), idp.log_path.read_text()):
        assert secret not in text
        assert basic not in text


def test_an_invalid_client_stops_the_fhir_client_at_once(idp: OidcProviderPeer, fhir: ResourceServer) -> None:
    auth = ClientCredentialsAuth(idp.token_url, BASIC_ID, "wrong-secret-wrong-secret")
    with FhirClient(fhir.base_url, auth=auth, sleep=lambda _s: None) as client, pytest.raises(FhirAuthError):
        client.read("Patient", "x")
    assert fhir.tokens == []
    assert auth.token_requests == 1
    auth.close()


# -- transient failures of the token endpoint -----------------------------------------------------


class FlakyGateway:
    """An API gateway in front of the real provider's token endpoint: answers 503 to the first
    ``failures`` requests, then forwards requests to the provider unchanged."""

    def __init__(self, upstream: str, failures: int) -> None:
        self.calls = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                outer.calls += 1
                if outer.calls <= failures:
                    data = b'{"error":"temporarily_unavailable","error_description":"try again"}'
                    self.send_response(503)
                    self.send_header("Retry-After", "0")
                else:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                    upstream_response = httpx.post(upstream, content=body, headers=headers)
                    data = upstream_response.content
                    self.send_response(upstream_response.status_code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/token"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_503s_from_the_token_endpoint_are_retried_with_back_off(idp: OidcProviderPeer, keys: dict[str, bytes]) -> None:
    gateway = FlakyGateway(idp.token_url, failures=2)
    sleeps: list[float] = []
    try:
        # aud must be what the provider calls its token endpoint, not the gateway's URL.
        auth = PrivateKeyJwtAuth(
            gateway.url, RS_ID, keys["rs"], RS_KID, audience=idp.token_url, sleep=sleeps.append, max_retries=3
        )
        with auth:
            token = auth.access_token()
        assert introspect(idp, token)["active"] is True
        assert gateway.calls == 3 and auth.token_requests == 3
        assert len(sleeps) == 2
    finally:
        gateway.close()

    gateway = FlakyGateway(idp.token_url, failures=10)
    try:
        with ClientCredentialsAuth(gateway.url, BASIC_ID, BASIC_SECRET, sleep=lambda _s: None, max_retries=2) as basic:
            with pytest.raises(FhirAuthUnavailableError) as caught:
                basic.access_token()
        assert isinstance(caught.value, FhirTransientError)
        assert caught.value.status == 503 and caught.value.error == "temporarily_unavailable"
        assert "temporarily_unavailable: try again" in str(caught.value)
        assert gateway.calls == 3
    finally:
        gateway.close()


def test_an_unreachable_token_endpoint_is_transient() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed when the block ends: nothing listens there
    sleeps: list[float] = []
    with ClientCredentialsAuth(f"http://127.0.0.1:{port}/token", "c", "s", sleep=sleeps.append) as auth:
        with pytest.raises(FhirAuthUnavailableError, match="connection failed"):
            auth.access_token()
    assert len(sleeps) == 3 and auth.token_requests == 4


# -- what is refused before any network -----------------------------------------------------------


@pytest.mark.parametrize("verify", [False, None])
def test_tls_verification_cannot_be_switched_off(verify: Any, keys: dict[str, bytes]) -> None:
    with pytest.raises(ValueError, match="TLS verification cannot be turned off"):
        ClientCredentialsAuth("https://auth.example.test/token", "c", "s", verify=verify)
    with pytest.raises(ValueError, match="TLS verification cannot be turned off"):
        PrivateKeyJwtAuth("https://auth.example.test/token", "c", keys["rs"], "k", verify=verify)


def test_an_ssl_context_that_does_not_verify_is_refused() -> None:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with pytest.raises(ValueError, match="does not verify"):
        ClientCredentialsAuth("https://auth.example.test/token", "c", "s", verify=ctx)
    ClientCredentialsAuth("https://auth.example.test/token", "c", "s", verify=ssl.create_default_context()).close()


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("http://auth.example.nhs.uk/oauth2/token", False),
        ("http://10.0.0.5/token", False),
        ("ftp://127.0.0.1/token", False),
        ("https://user:pw@auth.example.test/token", False),
        ("https://auth.example.nhs.uk/oauth2/token", True),
        ("http://127.0.0.1:9/token", True),
        ("http://[::1]:9/token", True),
        ("http://localhost:9/token", True),
    ],
)
def test_plain_http_token_urls_only_on_loopback(url: str, ok: bool) -> None:
    if ok:
        ClientCredentialsAuth(url, "c", "s").close()
    else:
        with pytest.raises(ValueError, match="token_url"):
            ClientCredentialsAuth(url, "c", "s")


def test_a_bearer_token_is_never_sent_over_plain_http_off_loopback(idp: OidcProviderPeer) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200)

    with basic_auth(idp) as auth, httpx.Client(auth=auth, transport=httpx.MockTransport(handler)) as http:
        with pytest.raises(FhirAuthError, match="plain http"):
            http.get("http://fhir.trust.example/Patient/1")
        assert seen == [] and auth.token_requests == 0
        assert http.get("https://fhir.trust.example/Patient/1").status_code == 200
        assert seen[0].headers["Authorization"].startswith("Bearer ")


def test_a_key_that_does_not_suit_the_alg_is_refused(keys: dict[str, bytes]) -> None:
    with pytest.raises(ValueError, match="needs an EC private key"):
        PrivateKeyJwtAuth("https://a.example.test/token", "c", keys["rs"], "k", "ES384")
    with pytest.raises(ValueError, match="needs an RSA private key"):
        PrivateKeyJwtAuth("https://a.example.test/token", "c", keys["ec"], "k", "RS512")
    with pytest.raises(ValueError, match="curve P-256"):
        PrivateKeyJwtAuth("https://a.example.test/token", "c", keys["ec"], "k", "ES256")
    with pytest.raises(ValueError, match="alg must be one of"):
        PrivateKeyJwtAuth("https://a.example.test/token", "c", keys["rs"], "k", "HS256")


# -- auth_from_config ------------------------------------------------------------------------------


def test_auth_from_config_builds_working_auths(idp: OidcProviderPeer, keys: dict[str, bytes], tmp_path: Path) -> None:
    assert auth_from_config({}) is None
    assert auth_from_config({"auth": "none", "bundle_size": 500}) is None

    basic = auth_from_config(
        {"auth": "client_credentials", "token_url": idp.token_url, "client_id": BASIC_ID, "client_secret": BASIC_SECRET}
    )
    assert isinstance(basic, ClientCredentialsAuth)
    assert introspect(idp, basic.access_token())["active"] is True
    basic.close()

    key_file = tmp_path / "key.pem"
    key_file.write_bytes(keys["rs"])
    from_file = auth_from_config(
        {
            "auth": "private_key_jwt",
            "token_url": idp.token_url,
            "client_id": RS_ID,
            "private_key_path": str(key_file),
            "kid": RS_KID,
            "scope": ["system/*.read"],
        }
    )
    assert isinstance(from_file, PrivateKeyJwtAuth) and from_file.alg == "RS512"
    assert introspect(idp, from_file.access_token())["scope"] == "system/*.read"
    from_file.close()

    one_line_pem = keys["ec"].decode().replace("\n", "\\n")  # as pasted into a one-line extras field
    from_text = auth_from_config(
        {
            "auth": "private_key_jwt",
            "token_url": idp.token_url,
            "client_id": EC_ID,
            "private_key": one_line_pem,
            "kid": EC_KID,
            "alg": "ES384",
        }
    )
    assert isinstance(from_text, PrivateKeyJwtAuth)
    assert introspect(idp, from_text.access_token())["client_id"] == EC_ID
    from_text.close()


@pytest.mark.parametrize(
    ("cfg", "names"),
    [
        ({"auth": "client_credentials", "token_url": "https://a.test/t", "client_id": "c"}, "client_secret"),
        ({"auth": "client_credentials", "client_id": "c", "client_secret": "SECRET-VALUE-1"}, "token_url"),
        (
            {"auth": "client_credentials", "token_url": "https://a.test/t", "client_secret": "SECRET-VALUE-1"},
            "client_id",
        ),
        ({"auth": "private_key_jwt", "token_url": "https://a.test/t", "client_id": "c", "kid": "k"}, "private_key"),
        (
            {
                "auth": "private_key_jwt",
                "token_url": "https://a.test/t",
                "client_id": "c",
                "private_key": "SECRET-VALUE-1",
            },
            "private_key",
        ),
        ({"auth": "basic-SECRET-VALUE-1"}, "auth must be one of"),
        ({"token_url": "https://a.test/t", "client_secret": "SECRET-VALUE-1"}, "auth is missing"),
        (
            {
                "auth": "client_credentials",
                "token_url": "https://a.test/t",
                "client_id": "c",
                "client_secret": "SECRET-VALUE-1",
                "ca_bundle": "/nonexistent/SECRET-VALUE-1.pem",
            },
            "ca_bundle",
        ),
        (
            {
                "auth": "client_credentials",
                "token_url": "http://auth.example.test/t",
                "client_id": "c",
                "client_secret": "SECRET-VALUE-1",
            },
            "token_url",
        ),
    ],
)
def test_auth_from_config_names_the_bad_key_not_its_value(cfg: dict[str, Any], names: str) -> None:
    with pytest.raises(ValueError) as caught:
        auth_from_config(cfg)
    assert names in str(caught.value)
    assert "SECRET-VALUE-1" not in str(caught.value)


def test_auth_from_config_private_key_jwt_needs_kid(keys: dict[str, bytes]) -> None:
    cfg = {
        "auth": "private_key_jwt",
        "token_url": "https://a.test/t",
        "client_id": "c",
        "private_key": keys["rs"].decode(),
    }
    with pytest.raises(ValueError, match="kid is required"):
        auth_from_config(cfg)


def test_jwks_command_prints_only_public_keys(keys: dict[str, bytes], tmp_path: Path) -> None:
    import subprocess
    import sys

    (tmp_path / "rs.pem").write_bytes(keys["rs"])
    (tmp_path / "ec.pem").write_bytes(keys["ec"])
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "connectors.fhir.auth",
            "jwks",
            f"{tmp_path}/rs.pem:{RS_KID}",
            f"{tmp_path}/ec.pem:{EC_KID}:ES384",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    printed = json.loads(done.stdout)
    assert printed == {"keys": [public_jwk(keys["rs"], RS_KID, "RS512"), public_jwk(keys["ec"], EC_KID, "ES384")]}
    for jwk in printed["keys"]:
        assert not {"d", "p", "q", "dp", "dq", "qi"} & set(jwk)  # no private parameters
