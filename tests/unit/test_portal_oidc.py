"""The portal's OIDC client: the organisation and role claims in their shapes, and every ID token check (signature
by the provider's published key, issuer, audience, azp, expiry, nonce, algorithm), against a provider served by
httpx's MockTransport (discovery, JWKS and token endpoint) with keys made here."""

from __future__ import annotations

import base64
import hashlib
import json
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from schoolslink.errors import ConfigurationError
from schoolslink.portal.config import OidcSettings
from schoolslink.portal.oidc import OidcClient, OidcError, organisations_from_claim, pkce_pair, role_from_claim

ISSUER = "https://signin.example.education.gov.uk"
CLIENT = "schoolslink-portal"
KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _jwk(key: Any, kid: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    return {**doc, "kid": kid, "use": "sig", "alg": "RS256"}


class Provider:
    """Discovery, JWKS and a token endpoint that answers with whatever ID token the test set."""

    def __init__(self) -> None:
        self.jwks = {"keys": [_jwk(KEY, "k1")]}
        self.id_token = ""
        self.token_requests: list[dict[str, list[str]]] = []

    def handle(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/.well-known/openid-configuration":
            return httpx.Response(200, json={"issuer": ISSUER, "authorization_endpoint": f"{ISSUER}/auth",
                                             "token_endpoint": f"{ISSUER}/token", "jwks_uri": f"{ISSUER}/jwks"})
        if path == "/jwks":
            return httpx.Response(200, json=self.jwks)
        if path == "/token":
            self.token_requests.append(parse_qs(request.content.decode()))
            assert request.headers["authorization"].startswith("Basic ")
            return httpx.Response(200, json={"id_token": self.id_token, "access_token": "at", "token_type": "Bearer"})
        return httpx.Response(404)


@pytest.fixture()
def provider() -> Provider:
    return Provider()


@pytest.fixture()
def client(provider: Provider) -> OidcClient:
    settings = OidcSettings(issuer=ISSUER, client_id=CLIENT, client_secret="s", scopes="openid email organisation")
    return OidcClient(settings, httpx.Client(transport=httpx.MockTransport(provider.handle)))


def _token(nonce: str | None = "n-1", *, key: Any = KEY, kid: str = "k1", alg: str = "RS256", **over: Any) -> str:
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": CLIENT, "sub": "user-1", "iat": now, "exp": now + 300, "nonce": nonce,
              "email": "dsl@school.example.sch.uk", "organisation": {"id": "X", "urn": "900001"},
              "schoolslink_role": "dsl", **over}
    claims = {k: v for k, v in claims.items() if v is not None}
    return jwt.encode(claims, key, algorithm=alg, headers={"kid": kid})


def test_pkce_pair_is_s256() -> None:
    verifier, challenge = pkce_pair()
    assert 43 <= len(verifier) <= 128
    expect = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    assert challenge == expect


@pytest.mark.parametrize(("claim", "schools", "trusts"), [
    ({"id": "X", "name": "A school", "urn": "900001", "category": {"id": "001"}}, ("900001",), ()),
    ({"id": "X", "urn": 900001}, ("900001",), ()),
    ([{"urn": "900002"}, {"urn": "900001"}], ("900001", "900002"), ()),
    (json.dumps({"id": "X", "urn": "900003"}), ("900003",), ()),
    (json.dumps([{"urn": "900003"}, {"ods": "r9x"}]), ("900003",), ("R9X",)),
    ({"id": "X", "odsCode": "R9X"}, (), ("R9X",)),
    ("900004", ("900004",), ()),
    (None, (), ()),
    ({"id": "X", "name": "no URN"}, (), ()),
])
def test_organisation_claim_shapes(claim: Any, schools: tuple[str, ...], trusts: tuple[str, ...]) -> None:
    assert organisations_from_claim(claim) == (schools, trusts)


def test_a_broken_organisation_claim_is_refused() -> None:
    with pytest.raises(OidcError, match="not valid JSON"):
        organisations_from_claim('{"urn": ')


@pytest.mark.parametrize(("claim", "role"), [
    ("dsl", "dsl"), ("DSL", "dsl"), ("Designated Safeguarding Lead", "dsl"), (["smhl"], "smhl"),
    ("school admin", "school_admin"), ("link_worker", "link_worker"), (None, None), ("teacher", None), ([], None),
])
def test_role_claim(claim: Any, role: str | None) -> None:
    assert role_from_claim(claim) == role


def test_two_roles_in_one_claim_are_refused() -> None:
    with pytest.raises(OidcError, match="more than one"):
        role_from_claim(["dsl", "school_admin"])


def test_begin_asks_for_the_code_with_pkce_state_and_nonce(client: OidcClient) -> None:
    started = client.begin("https://portal.example/oidc/callback")
    q = {k: v[0] for k, v in parse_qs(urlsplit(started.url).query).items()}
    assert started.url.startswith(f"{ISSUER}/auth?")
    assert q["response_type"] == "code" and q["client_id"] == CLIENT and q["code_challenge_method"] == "S256"
    assert q["state"] == started.pending["state"] and q["nonce"] == started.pending["nonce"]
    assert q["scope"] == "openid email organisation" and q["redirect_uri"] == "https://portal.example/oidc/callback"
    expect = base64.urlsafe_b64encode(hashlib.sha256(started.pending["verifier"].encode()).digest()).rstrip(b"=")
    assert q["code_challenge"] == expect.decode()


def test_finish_gives_the_identity(client: OidcClient, provider: Provider) -> None:
    started = client.begin("https://portal.example/oidc/callback")
    provider.id_token = _token(started.pending["nonce"])
    who = client.finish(started.pending, "the-code", started.pending["state"])
    assert (who.issuer, who.subject, who.email, who.role) == (ISSUER, "user-1", "dsl@school.example.sch.uk", "dsl")
    assert who.schools == ("900001",) and who.trusts == ()
    [sent] = provider.token_requests
    assert sent["grant_type"] == ["authorization_code"] and sent["code"] == ["the-code"]
    assert sent["code_verifier"] == [started.pending["verifier"]]


@pytest.mark.parametrize("verified", [False, "false"])
def test_an_address_the_provider_has_not_verified_is_not_used(client: OidcClient, provider: Provider,
                                                              verified: object) -> None:
    """Accounts made beforehand are found by email: an address the provider says it has not verified must not
    find one (anyone could claim it)."""
    started = client.begin("https://portal.example/oidc/callback")
    provider.id_token = _token(started.pending["nonce"], email_verified=verified)
    who = client.finish(started.pending, "the-code", started.pending["state"])
    assert who.email is None and who.subject == "user-1"
    started = client.begin("https://portal.example/oidc/callback")
    provider.id_token = _token(started.pending["nonce"], email_verified=True)
    assert client.finish(started.pending, "the-code", started.pending["state"]).email == "dsl@school.example.sch.uk"


def test_finish_refuses_another_browsers_state_or_another_issuer(client: OidcClient, provider: Provider) -> None:
    started = client.begin("https://portal.example/oidc/callback")
    provider.id_token = _token(started.pending["nonce"])
    with pytest.raises(OidcError, match="state"):
        client.finish(started.pending, "the-code", "someone-elses-state")
    with pytest.raises(OidcError, match="another issuer"):
        client.finish(started.pending, "the-code", started.pending["state"], "https://evil.example")
    assert provider.token_requests == []  # the code was never spent


@pytest.mark.parametrize(("token", "why"), [
    (lambda: _token("another-nonce"), "nonce"),
    (lambda: _token(nonce=None), "nonce"),
    (lambda: _token(aud="another-client"), "audience"),
    (lambda: _token(iss="https://evil.example"), "issuer"),
    (lambda: _token(exp=int(time.time()) - 3600, iat=int(time.time()) - 7200), "expired"),
    (lambda: _token(key=OTHER_KEY), "signature"),
    (lambda: _token(key=OTHER_KEY, kid="k9"), "does not publish"),
    (lambda: _token(aud=[CLIENT, "another"], azp="another"), "azp"),
    (lambda: _token(sub=None), "not valid"),
    (lambda: jwt.encode({"iss": ISSUER, "aud": CLIENT, "sub": "u", "nonce": "n-1", "iat": int(time.time()),
                         "exp": int(time.time()) + 60}, "a-shared-secret-guessed-by-an-attacker", algorithm="HS256"),
     "algorithm"),
    (lambda: jwt.encode({"iss": ISSUER, "aud": CLIENT, "sub": "u", "nonce": "n-1"}, "",
                        algorithm="none"), "algorithm"),
    (lambda: "not.a.jwt", "not a signed JWT"),
])
def test_every_id_token_check(client: OidcClient, token: Any, why: str) -> None:
    with pytest.raises(OidcError, match=why):
        client.verify_id_token(token(), "n-1")


def test_an_ec_key_and_a_rotated_key_are_found(client: OidcClient, provider: Provider) -> None:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    assert client.verify_id_token(_token(), "n-1")["sub"] == "user-1"  # JWKS fetched and cached
    jwk: dict[str, Any] = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(ec_key.public_key()))
    provider.jwks = {"keys": [{**jwk, "kid": "k2", "use": "sig", "alg": "ES256"}, _jwk(KEY, "k1")]}
    client._jwks_at -= 60  # the cached key set is old enough to fetch again for an unknown kid
    assert client.verify_id_token(_token(key=ec_key, kid="k2", alg="ES256"), "n-1")["sub"] == "user-1"


def test_settings_refuse_plain_http_off_the_machine() -> None:
    with pytest.raises(ConfigurationError, match="https"):
        OidcSettings(issuer="http://signin.example.org", client_id=CLIENT, client_secret="s")
    assert OidcSettings(issuer="http://127.0.0.1:9000", client_id=CLIENT, client_secret="s").issuer
    with pytest.raises(ConfigurationError, match="openid"):
        OidcSettings(issuer=ISSUER, client_id=CLIENT, client_secret="s", scopes="email")
