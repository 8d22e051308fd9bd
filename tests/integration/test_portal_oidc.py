"""Signing in to the school portal through an OpenID provider, DfE Sign-in style, in a real browser: the
`oidc-provider` peer (peers/oidc-provider/server.mjs in portal mode: its development login and consent pages, test
users with an `organisation` claim) and the portal, both on 127.0.0.1, over the feeds the pipeline built.

- A user whose organisation claim names school 900002 signs in (authorization code flow with PKCE; the portal
  checks the ID token's signature, issuer, audience and nonce) and sees that school's pupils only; the other
  school's pages are 404; what they saw is in the ledger under their portal account.
- The claim in its other shapes (JSON text, a list) and the role from a locally made OIDC account also work; a user
  with no role, or a disabled account, is refused with a page that says why (no WCAG 2.2 A/AA violations).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from connectors.fhir.oidc_peer import OidcProviderPeer
from tests.integration import test_portal_fixtures as fx
from tests.integration.test_feed_email import _free_port as free_port
from tests.integration.test_portal_fixtures import (
    NIGHTS,
    Seeded,
    add_user,
    check,
    checks,
    cli,
    flow,
    pupil_url,
    running_portal,
)

NIGHT = NIGHTS[1].isoformat()
SECRET = "portal-client-secret-for-tests-only"
PEER_FONT = "https://fonts.googleapis.com/"  # oidc-provider's development login page asks for it: aborted
seeded = fx.seeded  # the module fixture: feeds the pipeline built for two schools

ACCOUNTS = {
    "dsl-b": {"email": "dsl.b@oidc.example.sch.uk", "email_verified": True, "schoolslink_role": "dsl",
              "organisation": {"id": "5B2F8E9C-0B1D-4B7B-9D8B-2F6C1A1E0001", "name": "Synthetic School 900002",
                               "urn": "900002", "category": {"id": "001", "name": "Establishment"}}},
    "smhl-a": {"email": "smhl.a@oidc.example.sch.uk", "schoolslink_role": "Senior mental health lead",
               "organisation": json.dumps([{"id": "A1", "name": "Synthetic School 900001", "urn": "900001"}])},
    "local-role-a": {"email": "local.role.a@oidc.example.sch.uk", "organisation": {"id": "A2", "urn": "900001"}},
    "no-role-a": {"email": "no.role.a@oidc.example.sch.uk", "organisation": {"id": "A3", "urn": "900001"}},
    "disabled-a": {"email": "disabled.a@oidc.example.sch.uk", "organisation": {"id": "A4", "urn": "900001"}},
}


@pytest.fixture(scope="module")
def oidc(seeded: Seeded, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Any]]:
    tmp = tmp_path_factory.mktemp("oidc")
    (tmp / "accounts.json").write_text(json.dumps(ACCOUNTS))
    add_user(seeded, "local.role.a@oidc.example.sch.uk", "smhl", "900001", auth="oidc")
    add_user(seeded, "admin.a@oidc.example.sch.uk", "school_admin", "900001")
    disabled = add_user(seeded, "disabled.a@oidc.example.sch.uk", "dsl", "900001", auth="oidc")
    cli(seeded, "portal", "user", "disable", disabled.user_id)
    port = free_port()
    client = {"client_id": "schoolslink-portal", "client_secret": SECRET, "grant_types": ["authorization_code"],
              "response_types": ["code"], "redirect_uris": [f"http://127.0.0.1:{port}/oidc/callback"],
              "token_endpoint_auth_method": "client_secret_basic"}
    with OidcProviderPeer([client], env={"OIDC_PORTAL_ACCOUNTS": str(tmp / "accounts.json")},
                          log_path=tmp / "idp.log") as idp, \
            running_portal(seeded, tmp / "portal.log", port=port, SCHOOLSLINK_PORTAL_OIDC_ISSUER=idp.issuer,
                           SCHOOLSLINK_PORTAL_OIDC_CLIENT_ID="schoolslink-portal",
                           SCHOOLSLINK_PORTAL_OIDC_CLIENT_SECRET=SECRET,
                           SCHOOLSLINK_PORTAL_OIDC_SCOPES="openid email organisation schoolslink") as portal:
        yield idp, portal


def _through_the_provider(base: str, login: str, test: str) -> list[dict[str, Any]]:
    """Sign in with the provider: the portal's button, the provider's login and consent pages, back again."""
    return [
        {"goto": f"{base}/sign-in"}, check("sign-in", test),
        {"click": "a:has-text('Sign in with DfE Sign-in')"},
        {"fill": {"input[name=login]": login, "input[name=password]": "any password: the provider's job"}},
        {"click": "button[type=submit]"},  # the provider's login page
        {"click": "button[type=submit]"},  # its consent page
    ]


def test_a_user_whose_organisation_claim_names_one_school_sees_only_that_school(
        seeded: Seeded, oidc: tuple[Any, Any], tmp_path: Path) -> None:
    _idp, portal = oidc
    base, test = portal.base_url, "test_portal_oidc"
    mine, theirs = seeded.rows["900002"], seeded.rows["900001"]
    res = flow([
        *_through_the_provider(base, "dsl-b", test),
        {"wait_url": r"/schools/900002/feeds/\d{4}-\d{2}-\d{2}$"}, check("feed", test),
        {"goto": pupil_url(base, "900002", mine[0])}, check("pupil", test),
        {"cookies": True},
        {"goto": f"{base}/schools/900001/feeds/{NIGHT}"},
        {"goto": pupil_url(base, "900001", theirs[0])},
        {"fetch": f"{base}/schools/900001/feeds/{NIGHT}/files/feed.csv"},
    ], tmp=tmp_path, blocked_ok=PEER_FONT)
    pages = checks(res)
    assert "Sign in with DfE Sign-in" in pages["sign-in"]["text"]
    feed = pages["feed"]["text"]
    assert pages["feed"]["url"] == f"{base}/schools/900002/feeds/{NIGHT}"
    assert "School URN 900002" in feed and "Signed in as dsl.b@oidc.example.sch.uk" in feed
    for row in mine:
        assert f"{row['surname']}, {row['forename']}" in feed
    assert f"{mine[0]['surname']}, {mine[0]['forename']}" in pages["pupil"]["text"]
    cookies = {c["name"]: c for c in next(r for r in res if "cookies" in r)["cookies"]
               if c["domain"] == "127.0.0.1" and c["name"].startswith("sl_")}
    assert set(cookies) == {"sl_session"}  # the sign-in's own cookie is gone
    assert cookies["sl_session"]["httpOnly"] and cookies["sl_session"]["sameSite"] == "Strict"
    assert [r["status"] for r in res[-3:]] == [404, 404, 404]
    for r in res:
        text = (r.get("text", "") + r.get("body", "")).upper()
        assert not [s for s in seeded.surnames("900001") | seeded.upns("900001") if s in text]

    users = json.loads(cli(seeded, "portal", "user", "list", "--json").stdout)["users"]
    account = next(u for u in users if u["email"] == "dsl.b@oidc.example.sch.uk")
    assert account["auth"] == "oidc" and account["role"] == "dsl" and account["organisations"] == ["900002"]
    seen = json.loads(cli(seeded, "audit", "query", "--recipient", f"portal:{account['user_id']}", "--json").stdout)
    assert {"feed_page", "pupil_page"} <= {e["task_id"] for e in seen["entries"]}
    events = json.loads(cli(seeded, "portal", "events", "--user", account["user_id"], "--json").stdout)["events"]
    assert any(e["event"] == "sign_in" and e["detail"] == "OIDC" for e in events)
    assert {e["organisation"] for e in events if e["event"] == "refused"} == {"900001"}


@pytest.mark.parametrize(("login", "lands", "says"), [
    ("smhl-a", "/schools/900001/feeds/", "Senior mental health lead"),  # the claim as JSON text, a role alias
    ("local-role-a", "/schools/900001/feeds/", "Senior mental health lead"),  # the role from the local account
    ("no-role-a", "/oidc/callback", "gives no portal role"),
    ("disabled-a", "/oidc/callback", "is disabled"),
])
def test_claim_shapes_roles_and_refusals(seeded: Seeded, oidc: tuple[Any, Any], tmp_path: Path, login: str,
                                         lands: str, says: str) -> None:
    _idp, portal = oidc
    test = f"test_portal_oidc_{login}"
    steps = _through_the_provider(portal.base_url, login, test)
    if lands.startswith("/schools/"):
        steps += [{"wait_url": lands}, check("landed", test)]
    else:
        steps += [check("landed", test)]
    res = flow(steps, tmp=tmp_path, blocked_ok=PEER_FONT)
    page = checks(res)["landed"]
    assert lands in page["url"] and says in page["text"]
    if lands == "/oidc/callback":
        assert "There is a problem signing you in" in page["text"]
        assert not [s for s in seeded.surnames("900001") if s in page["text"].upper()]


def test_a_dsl_an_admin_adds_signs_in_with_the_provider_and_no_credential_is_shown(seeded: Seeded,
                                                                                  oidc: tuple[Any, Any]) -> None:
    from tests.integration.test_portal_security import _csrf, sign_in

    _, portal = oidc
    with sign_in(portal.base_url, seeded.users["admin.a@oidc.example.sch.uk"]) as c:
        page = c.get("/admin/users").text
        assert "signs in with DfE Sign-in" in page
        r = c.post("/admin/users", data={"email": "new.dsl@oidc.example.sch.uk", "role": "dsl", "school": "900001",
                                         "csrf_token": _csrf(page)})
    assert r.status_code == 200 and "User added: new.dsl@oidc.example.sch.uk" in r.text
    assert "signs in with DfE Sign-in" in r.text
    assert "otpauth://" not in r.text and "First password" not in r.text and "secret=" not in r.text
    listed = {u["email"]: u for u in json.loads(cli(seeded, "portal", "user", "list", "--json").stdout)["users"]}
    assert listed["new.dsl@oidc.example.sch.uk"]["role"] == "dsl"
    assert listed["new.dsl@oidc.example.sch.uk"]["auth"] == "oidc"
