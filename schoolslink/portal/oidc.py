"""Sign-in through an OpenID provider (DfE Sign-in style): the authorization code flow with PKCE (S256).

1. `begin`: a random state, nonce and PKCE verifier (kept server-side with the browser's sign-in row) and the
   provider's authorization URL (from its discovery document).
2. The provider sends the browser back with `code` and `state`; the state must be the one kept (and `iss`, when
   sent, this issuer: RFC 9207).
3. `finish`: the code is exchanged at the token endpoint (client_secret_basic, with the verifier); the ID token is
   verified: signature by a key in the provider's JWKS (asymmetric algorithms only), issuer, audience (and `azp`
   when several), expiry and issue time (60 s leeway), and the nonce kept. Missing organisation claims are read
   from the userinfo endpoint, whose `sub` must be the ID token's.
4. The organisation claim (`organisation`, DfE Sign-in's shape `{"id": ..., "name": ..., "urn": "100001"}`, a list
   of them, or either as JSON text) gives the schools (`urn`) or trusts (`ods`); the role claim (configured name)
   gives the role, else the account set up locally does (schoolslink.portal.accounts.oidc_account).

Nothing from a token is logged; errors name the step and the check that failed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import httpx
import jwt

from schoolslink.portal.config import OidcSettings

ALLOWED_ALGS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
LEEWAY = 60
_ROLE_ALIASES = {
    "dsl": "dsl", "designated safeguarding lead": "dsl", "designated_safeguarding_lead": "dsl",
    "smhl": "smhl", "senior mental health lead": "smhl", "senior_mental_health_lead": "smhl",
    "school_admin": "school_admin", "school admin": "school_admin", "schooladmin": "school_admin",
    "link_worker": "link_worker", "link worker": "link_worker", "trust link worker": "link_worker",
}


class OidcError(Exception):
    """The sign-in through the provider failed; the message names the step (never a token or a claim's value)."""


def pkce_pair() -> tuple[str, str]:
    """(verifier, S256 challenge), RFC 7636."""
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


def organisations_from_claim(value: Any) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(school URNs, trust ODS codes) named by an organisation claim in DfE Sign-in's shape (an object with `urn`,
    or `ods` for a trust; a list of them; either as JSON text; or a bare URN)."""
    if isinstance(value, str):
        text = value.strip()
        if text[:1] in "[{":
            try:
                value = json.loads(text)
            except ValueError:
                raise OidcError("the organisation claim is not valid JSON") from None
        else:
            value = {"urn": text} if text.isdigit() else {}
    items = value if isinstance(value, list) else [value]
    urns: set[str] = set()
    ods: set[str] = set()
    for org in items:
        if not isinstance(org, dict):
            continue
        urn = org.get("urn") or org.get("URN")
        if urn not in (None, ""):
            urns.add(str(urn).strip())
        code = org.get("ods") or org.get("odsCode") or org.get("ods_code")
        if code not in (None, ""):
            ods.add(str(code).strip().upper())
    return tuple(sorted(urns)), tuple(sorted(ods))


def role_from_claim(value: Any) -> str | None:
    """The portal role a role claim names (a string or a list of them), None if it names none."""
    values = value if isinstance(value, list) else [value]
    roles = {_ROLE_ALIASES.get(str(v).strip().lower()) for v in values if v not in (None, "")} - {None}
    if len(roles) > 1:
        raise OidcError("the role claim names more than one portal role: ask for one role per account")
    return next((r for r in roles if r is not None), None)


@dataclass(frozen=True, slots=True)
class Started:
    url: str
    pending: dict[str, str]  # kept server-side with the sign-in: state, nonce, verifier, redirect_uri


@dataclass(frozen=True, slots=True)
class Identity:
    issuer: str
    subject: str
    email: str | None
    role: str | None
    schools: tuple[str, ...]
    trusts: tuple[str, ...]


class OidcClient:
    """One provider: its discovery document and JWKS are fetched on first use and cached (the JWKS again once
    when a token names an unknown key)."""

    def __init__(self, settings: OidcSettings, http: httpx.Client | None = None) -> None:
        self.settings = settings
        self._http = http or httpx.Client(timeout=10.0, follow_redirects=False)
        self._meta: dict[str, Any] | None = None
        self._jwks: jwt.PyJWKSet | None = None
        self._jwks_at = 0.0

    def close(self) -> None:
        self._http.close()

    def _get_json(self, url: str, what: str, **kw: Any) -> dict[str, Any]:
        try:
            r = self._http.get(url, **kw)
        except httpx.HTTPError as exc:
            raise OidcError(f"the provider's {what} could not be reached ({type(exc).__name__})") from None
        if r.status_code != 200:
            raise OidcError(f"the provider's {what} answered HTTP {r.status_code}")
        try:
            doc = r.json()
        except ValueError:
            raise OidcError(f"the provider's {what} is not JSON") from None
        if not isinstance(doc, dict):
            raise OidcError(f"the provider's {what} is not a JSON object")
        return doc

    def metadata(self) -> dict[str, Any]:
        if self._meta is None:
            meta = self._get_json(f"{self.settings.issuer}/.well-known/openid-configuration", "discovery document")
            if str(meta.get("issuer", "")).rstrip("/") != self.settings.issuer:
                raise OidcError("the discovery document names another issuer")
            for key in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
                if not meta.get(key):
                    raise OidcError(f"the discovery document has no {key}")
            self._meta = meta
        return self._meta

    def begin(self, redirect_uri: str) -> Started:
        meta = self.metadata()
        verifier, challenge = pkce_pair()
        state, nonce = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
        query = urlencode({"response_type": "code", "client_id": self.settings.client_id,
                           "redirect_uri": redirect_uri, "scope": self.settings.scopes, "state": state,
                           "nonce": nonce, "code_challenge": challenge, "code_challenge_method": "S256"})
        sep = "&" if "?" in str(meta["authorization_endpoint"]) else "?"
        return Started(f"{meta['authorization_endpoint']}{sep}{query}",
                       {"state": state, "nonce": nonce, "verifier": verifier, "redirect_uri": redirect_uri})

    def _load_jwks(self) -> jwt.PyJWKSet:
        doc = self._get_json(str(self.metadata()["jwks_uri"]), "key set (JWKS)")
        try:
            self._jwks = jwt.PyJWKSet.from_dict(doc)
        except jwt.PyJWTError:
            raise OidcError("the provider's key set (JWKS) has no usable key") from None
        self._jwks_at = time.monotonic()
        return self._jwks

    def _key(self, kid: str | None) -> jwt.PyJWK:
        """The provider's key `kid` (the only key, when the token names none); the key set is fetched again once
        for an unknown kid (keys rotate), at most every 10 seconds."""
        jwks = self._jwks or self._load_jwks()
        for again in (False, True):
            if again:
                if time.monotonic() - self._jwks_at < 10:
                    break
                jwks = self._load_jwks()
            found = [k for k in jwks.keys if kid is None or k.key_id == kid]
            if len(found) == 1:
                return found[0]
        raise OidcError("the ID token is signed with a key the provider does not publish")

    def verify_id_token(self, token: str, nonce: str) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise OidcError("the ID token is not a signed JWT") from None
        alg = header.get("alg")
        if alg not in ALLOWED_ALGS:
            raise OidcError("the ID token's signing algorithm is not accepted")
        key = self._key(header.get("kid"))
        try:
            claims: dict[str, Any] = jwt.decode(
                token, key=key, algorithms=[alg], audience=self.settings.client_id, issuer=self.settings.issuer,
                leeway=LEEWAY, options={"require": ["iss", "aud", "exp", "iat", "sub"]})
        except jwt.InvalidSignatureError:
            raise OidcError("the ID token's signature does not verify") from None
        except jwt.ExpiredSignatureError:
            raise OidcError("the ID token has expired") from None
        except jwt.InvalidAudienceError:
            raise OidcError("the ID token is for another client (audience)") from None
        except jwt.InvalidIssuerError:
            raise OidcError("the ID token is from another issuer") from None
        except jwt.PyJWTError as exc:
            raise OidcError(f"the ID token is not valid ({type(exc).__name__})") from None
        if not hmac.compare_digest(str(claims.get("nonce", "")).encode(), nonce.encode()):
            raise OidcError("the ID token's nonce is not the one this sign-in sent (a replayed token?)")
        aud = claims.get("aud")
        if isinstance(aud, list) and len(aud) > 1 and claims.get("azp") != self.settings.client_id:
            raise OidcError("the ID token has several audiences and its azp is not this client")
        return claims

    def finish(self, pending: dict[str, Any], code: str, state: str, iss: str | None = None) -> Identity:
        """The identity from the provider's answer (`iss`: RFC 9207's issuer parameter, when the provider sends it)."""
        if not pending.get("state") or not hmac.compare_digest(str(pending["state"]).encode(), (state or "").encode()):
            raise OidcError("the provider's answer is not for the sign-in this browser started (state)")
        if iss is not None and iss.rstrip("/") != self.settings.issuer:
            raise OidcError("the answer names another issuer (iss): a mix-up between providers?")
        meta = self.metadata()
        try:
            r = self._http.post(str(meta["token_endpoint"]),
                                auth=(self.settings.client_id, self.settings.client_secret),
                                data={"grant_type": "authorization_code", "code": code,
                                      "redirect_uri": pending["redirect_uri"], "code_verifier": pending["verifier"]})
        except httpx.HTTPError as exc:
            raise OidcError(f"the provider's token endpoint could not be reached ({type(exc).__name__})") from None
        if r.status_code != 200:
            raise OidcError(f"the provider refused the code (token endpoint HTTP {r.status_code})")
        try:
            tokens = r.json()
        except ValueError:
            raise OidcError("the token endpoint's answer is not JSON") from None
        if not isinstance(tokens, dict) or not isinstance(tokens.get("id_token"), str):
            raise OidcError("the token endpoint gave no ID token")
        claims = self.verify_id_token(tokens["id_token"], str(pending["nonce"]))
        org_claim, role_claim = self.settings.organisation_claim, self.settings.role_claim
        if org_claim not in claims and isinstance(tokens.get("access_token"), str) and meta.get("userinfo_endpoint"):
            info = self._get_json(str(meta["userinfo_endpoint"]), "userinfo endpoint",
                                  headers={"Authorization": f"Bearer {tokens['access_token']}"})
            if info.get("sub") != claims["sub"]:
                raise OidcError("the userinfo endpoint answered for another user")
            claims = {**{k: v for k, v in info.items() if k in (org_claim, role_claim, "email", "email_verified")},
                      **claims}
        schools, trusts = organisations_from_claim(claims.get(org_claim))
        # an address the provider says it has not verified names nobody: it never finds an account made for it
        email = claims.get("email") if claims.get("email_verified") not in (False, "false") else None
        return Identity(self.settings.issuer, str(claims["sub"]), str(email) if email else None,
                        role_from_claim(claims.get(role_claim)), schools, trusts)
