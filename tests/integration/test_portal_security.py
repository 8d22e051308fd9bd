"""Security tests of the school portal that fail on a hole: real HTTP requests (httpx) to the portal running as its
own process over the feeds the pipeline built (tests/integration/test_portal_fixtures.py).

Each refusal is checked for what matters: no page of pupil data comes back (no surname or UPN of the school's
pupils in the answer), the status says refused, and nothing changed on the server.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pyotp
import pytest
from sqlalchemy import select, update

from tests.integration import test_portal_fixtures as fx
from tests.integration.test_feed_email import _cert as self_signed_certificate  # for 127.0.0.1
from tests.integration.test_portal_fixtures import (
    MONTH,
    NIGHTS,
    Seeded,
    User,
    add_user,
    cli,
    pupil_url,
    running_portal,
    totp_code,
)

NIGHT = NIGHTS[1].isoformat()
seeded = fx.seeded  # the module fixture: feeds the pipeline built for two schools


@pytest.fixture(scope="module")
def portal(seeded: Seeded, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    add_user(seeded, "dsl.a@a.example.sch.uk", "dsl", "900001")
    add_user(seeded, "dsl.b@b.example.sch.uk", "dsl", "900002")
    add_user(seeded, "admin.a@a.example.sch.uk", "school_admin", "900001")
    add_user(seeded, "locked.a@a.example.sch.uk", "smhl", "900001")
    add_user(seeded, "replay.a@a.example.sch.uk", "smhl", "900001")
    with running_portal(seeded, tmp_path_factory.mktemp("portal-log") / "portal.log",
                        SCHOOLSLINK_PORTAL_LOCKOUT_AFTER="5") as server:
        yield server


def _csrf(html: str) -> str:
    m = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert m, "the page has no CSRF token"
    return m.group(1)


@contextmanager
def sign_in(base: str, user: User, code: str | None = None) -> Iterator[httpx.Client]:
    """A client signed in as `user` through the real forms (password, then the TOTP code)."""
    with httpx.Client(base_url=base) as c:
        r = c.post("/sign-in", data={"email": user.email, "password": user.password,
                                     "csrf_token": _csrf(c.get("/sign-in").text)})
        assert r.status_code == 303 and r.headers["location"] == "/sign-in/code", r.text[-500:]
        r = c.post("/sign-in/code", data={"code": code or totp_code(user),
                                          "csrf_token": _csrf(c.get("/sign-in/code").text)})
        assert r.status_code == 303 and r.headers["location"] == "/", r.text[-500:]
        yield c


def _no_pupils(r: httpx.Response, seeded: Seeded, *urns: str) -> None:
    body = r.text.upper()
    for urn in urns or fx.SCHOOLS:
        assert not [s for s in seeded.surnames(urn) | seeded.upns(urn) if s in body], f"pupil data of {urn}"


def _protected(base: str, seeded: Seeded) -> list[str]:
    row = seeded.rows["900001"][0]
    return [f"{base}/", f"{base}/schools/900001", f"{base}/schools/900001/feeds",
            f"{base}/schools/900001/feeds/{NIGHT}", pupil_url(base, "900001", row),
            f"{base}/schools/900001/feeds/{NIGHT}/files/feed.csv",
            f"{base}/schools/900001/feeds/{NIGHT}/files/feed.json",
            f"{base}/schools/900001/summaries/{MONTH}", f"{base}/trusts/R9X/summaries/{MONTH}",
            f"{base}/admin/users"]


def _events(seeded: Seeded, **filters: str) -> list[dict[str, Any]]:
    args = [a for k, v in filters.items() for a in (f"--{k}", v)]
    events: list[dict[str, Any]] = json.loads(cli(seeded, "portal", "events", *args, "--json").stdout)["events"]
    return events


def test_without_a_session_every_page_is_refused(seeded: Seeded, portal: Any) -> None:
    with httpx.Client() as c:
        for url in _protected(portal.base_url, seeded):
            r = c.get(url)
            assert r.status_code == 303 and r.headers["location"] == "/sign-in", url
            _no_pupils(r, seeded)


def test_another_schools_pupils_feeds_and_files_are_404_and_logged(seeded: Seeded, portal: Any) -> None:
    base = portal.base_url
    a, b = seeded.users["dsl.a@a.example.sch.uk"], seeded.users["dsl.b@b.example.sch.uk"]
    theirs = seeded.rows["900002"]
    with sign_in(base, a) as c:
        assert c.get(f"/schools/900001/feeds/{NIGHT}").status_code == 200
        urls = [pupil_url(base, "900002", row) for row in theirs]  # B's pupils, B's school
        urls += [pupil_url(base, "900001", row) for row in theirs]  # B's pupils' ids under A's school (IDOR)
        urls += [f"{base}/schools/900002/feeds/{NIGHT}/files/{n}" for n in ("feed.csv", "feed.json", "changes.csv")]
        urls += [f"{base}/schools/900002/feeds/{NIGHT}", f"{base}/schools/900002/feeds",
                 f"{base}/schools/900002/summaries/{MONTH}", f"{base}/schools/900001/feeds/{NIGHT}/pupils/"
                 + "por-" + "0" * 32, f"{base}/schools/900001/feeds/{NIGHT}/files/..%2Fmanifest.json",
                 f"{base}/schools/900001/feeds/{NIGHT}/files/manifest.json",
                 f"{base}/schools/900003/feeds/{NIGHT}"]  # a school that does not exist: the same answer
        before = len(_events(seeded, user=a.user_id, event="refused"))
        for url in urls:
            r = c.get(url)
            assert r.status_code == 404, url
            assert "Page not found" in r.text
            _no_pupils(r, seeded, "900002")
        refused = _events(seeded, user=a.user_id, event="refused")[before:]
        assert len(refused) >= len(urls) - 1  # every one logged (a path that is no route at all is not)
        assert {e["organisation"] for e in refused} >= {"900002", "900001"}
        logged = json.dumps(refused)
        assert not any(row["upn"] in logged or row["surname"] in logged for row in theirs)
        assert "por-" not in logged  # never the pupil id asked for
    with sign_in(base, b) as c:  # B still sees B's own
        assert c.get(pupil_url(base, "900002", theirs[0])).status_code == 200


def test_a_school_admin_sees_no_pupil_data(seeded: Seeded, portal: Any) -> None:
    base, admin = portal.base_url, seeded.users["admin.a@a.example.sch.uk"]
    with sign_in(base, admin) as c:
        r = c.get("/", follow_redirects=True)
        assert r.url.path == "/admin/users" and "Portal users" in r.text
        for url in _protected(base, seeded)[1:-1]:
            r = c.get(url)
            assert r.status_code == 404, url
            _no_pupils(r, seeded)


def test_a_school_admin_cannot_make_itself_a_pupil_seeing_account(seeded: Seeded, portal: Any) -> None:
    """An admin who could add a DSL and read its first password and TOTP set-up off the page could sign in as it:
    without an identity provider, a DSL or SMHL is added only by the operator."""
    base, admin = portal.base_url, seeded.users["admin.a@a.example.sch.uk"]
    with sign_in(base, admin) as c:
        for role in ("dsl", "smhl"):
            token = _csrf(c.get("/admin/users").text)
            r = c.post("/admin/users", data={"email": f"puppet.{role}@a.example.sch.uk", "role": role,
                                             "school": "900001", "csrf_token": token})
            assert r.status_code == 400 and "so their account is added by the portal" in r.text
            assert "otpauth://" not in r.text and "secret=" not in r.text
        token = _csrf(c.get("/admin/users").text)
        r = c.post("/admin/users", data={"email": "second.admin@a.example.sch.uk", "role": "school_admin",
                                         "school": "900001", "csrf_token": token})
        assert r.status_code == 200 and "otpauth://totp/" in r.text  # an admin sees no pupil data either
    listed = {u["email"]: u for u in json.loads(cli(seeded, "portal", "user", "list", "--json").stdout)["users"]}
    assert "puppet.dsl@a.example.sch.uk" not in listed and "puppet.smhl@a.example.sch.uk" not in listed
    assert listed["second.admin@a.example.sch.uk"]["role"] == "school_admin"


def test_a_post_without_the_csrf_token_is_refused(seeded: Seeded, portal: Any) -> None:
    base, admin = portal.base_url, seeded.users["admin.a@a.example.sch.uk"]
    with sign_in(base, admin) as c:
        token = _csrf(c.get("/admin/users").text)
        new = {"email": "csrf.victim@a.example.sch.uk", "role": "dsl", "school": "900001"}
        for data, headers in (
            (new, {}),  # no token
            ({**new, "csrf_token": "x" * 43}, {}),  # a wrong one
            ({**new, "csrf_token": token}, {"origin": "https://evil.example"}),  # the right one, from another site
            ({**new, "csrf_token": token}, {"sec-fetch-site": "cross-site"}),
        ):
            r = c.post("/admin/users", data=data, headers=headers)
            assert r.status_code == 403 and "The form could not be sent" in r.text
        listed = json.loads(cli(seeded, "portal", "user", "list", "--json").stdout)["users"]
        assert "csrf.victim@a.example.sch.uk" not in {u["email"] for u in listed}
        victim = seeded.users["dsl.a@a.example.sch.uk"]
        r = c.post(f"/admin/users/{victim.user_id}/disable", data={})
        assert r.status_code == 403
        r = c.post("/sign-out", data={})
        assert r.status_code == 403
        assert c.get("/admin/users").status_code == 200  # still signed in: the sign-out was refused
        r = c.post("/sign-out", data={"csrf_token": token})
        assert r.status_code == 303 and r.headers["location"] == "/signed-out"
    with httpx.Client(base_url=base) as c:  # the sign-in form too (login CSRF)
        c.get("/sign-in")
        r = c.post("/sign-in", data={"email": admin.email, "password": admin.password})
        assert r.status_code == 403
    assert _events(seeded, event="csrf_refused")


def test_a_tampered_or_foreign_session_cookie_is_refused(seeded: Seeded, portal: Any) -> None:
    base, cfg_cookie = portal.base_url, "sl_session"
    with sign_in(base, seeded.users["dsl.a@a.example.sch.uk"]) as c:
        good = c.cookies[cfg_cookie]
        feed = f"/schools/900001/feeds/{NIGHT}"
        assert c.get(feed).status_code == 200
        flipped = good[:-1] + ("A" if good[-1] != "A" else "B")
        login_token = httpx.get(f"{base}/sign-in").cookies["sl_login"]  # a real token, of the other kind
        for value in (flipped, good[:-4], good + "x", "", "x" * 300, login_token):
            with httpx.Client(base_url=base, cookies={cfg_cookie: value}) as other:
                r = other.get(feed)
                assert r.status_code == 303 and r.headers["location"].startswith("/sign-in"), value[:6]
                _no_pupils(r, seeded)
        assert c.get(feed).status_code == 200  # the real one still works


@pytest.mark.parametrize("how", ["absolute", "idle", "signed out", "disabled"])
def test_an_expired_or_ended_session_cookie_is_refused(seeded: Seeded, portal: Any, how: str) -> None:
    from schoolslink.portal.sessions import token_hash
    from schoolslink.store.db import engine
    from schoolslink.store.schema import portal_sessions, portal_users

    base = portal.base_url
    user = add_user(seeded, f"expiry.{how.replace(' ', '-')}@a.example.sch.uk", "dsl", "900001")
    feed = f"/schools/900001/feeds/{NIGHT}"
    with sign_in(base, user) as c:
        assert c.get(feed).status_code == 200
        cookie = c.cookies["sl_session"]
        t = portal_sessions.c
        with engine().begin() as conn:
            row = t.session_hash == token_hash(cookie)
            if how == "absolute":
                conn.execute(update(portal_sessions).where(row).values(expires_at=t.created_at))
            elif how == "idle":  # untouched since 16 minutes before it began (the portal allows 15)
                began = conn.execute(select(t.created_at).where(row)).scalar_one()
                conn.execute(update(portal_sessions).where(row).values(last_seen_at=began - dt.timedelta(minutes=16)))
            elif how == "disabled":
                conn.execute(update(portal_users).where(portal_users.c.user_id == user.user_id).values(disabled=True))
        if how == "signed out":
            r = c.post("/sign-out", data={"csrf_token": _csrf(c.get("/schools/900001/feeds").text)})
            assert r.status_code == 303
        with httpx.Client(base_url=base, cookies={"sl_session": cookie}) as replay:
            r = replay.get(feed)
            assert r.status_code == 303 and r.headers["location"].startswith("/sign-in")
            _no_pupils(r, seeded)
            if how != "signed out":
                assert r.headers["location"] == "/sign-in?ended=1"
                assert "Your session has ended" in replay.get(r.headers["location"]).text
        with engine().connect() as conn:
            ended = conn.execute(select(t.ended_at).where(t.session_hash == token_hash(cookie))).scalar_one()
        assert ended is not None  # ended on the server, not only forgotten by the browser


def test_security_headers(seeded: Seeded, portal: Any) -> None:
    base = portal.base_url
    with sign_in(base, seeded.users["dsl.a@a.example.sch.uk"]) as c:
        pages = [c.get(pupil_url(base, "900001", seeded.rows["900001"][0])), c.get(f"/schools/900001/feeds/{NIGHT}"),
                 c.get(f"/schools/900001/feeds/{NIGHT}/files/feed.json"), c.get("/sign-in"), c.get("/nowhere")]
        assert [r.status_code for r in pages] == [200, 200, 200, 303, 404]
        for r in pages:
            csp = r.headers["content-security-policy"]
            assert "unsafe-inline" not in csp and "unsafe-eval" not in csp and "script-src" not in csp
            directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
            assert directives["default-src"] == "'none'" and directives["frame-ancestors"] == "'none'"
            assert directives["style-src"] == "'self'" and directives["form-action"] == "'self'"
            assert r.headers["x-frame-options"] == "DENY" and r.headers["x-content-type-options"] == "nosniff"
            assert r.headers["referrer-policy"] == "same-origin"
            assert r.headers["cache-control"] == "no-store"  # pupil pages and files never sit in a cache
            assert "strict-transport-security" not in r.headers  # plain HTTP: no HSTS
            assert "server" not in r.headers
        css = c.get("/static/portal.css")
        assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
        assert "max-age" in css.headers["cache-control"]
        cookie = pages[0].request.headers["cookie"]
        assert cookie.startswith("sl_session=")


def test_over_tls_hsts_and_host_prefixed_secure_cookies(seeded: Seeded, portal: Any, tmp_path: Path) -> None:
    import ssl

    cert, key = self_signed_certificate(tmp_path)
    user = seeded.users["dsl.b@b.example.sch.uk"]
    with running_portal(seeded, tmp_path / "tls.log", tls=(cert, key)) as server:
        assert server.base_url.startswith("https://")
        ctx = ssl.create_default_context(cafile=str(cert))
        with httpx.Client(base_url=server.base_url, verify=ctx) as c:
            r = c.get("/sign-in")
            assert r.headers["strict-transport-security"].startswith("max-age=31536000")
            set_cookie = r.headers["set-cookie"]
            assert set_cookie.startswith("__Host-sl_login=") and "Secure" in set_cookie and "HttpOnly" in set_cookie
            assert "Path=/" in set_cookie and "Domain" not in set_cookie and "samesite=lax" in set_cookie.lower()
            r = c.post("/sign-in", data={"email": user.email, "password": user.password,
                                         "csrf_token": _csrf(r.text)})
            assert r.status_code == 303
            r = c.post("/sign-in/code", data={"code": totp_code(user),
                                              "csrf_token": _csrf(c.get("/sign-in/code").text)})
            session = next(v for k, v in r.headers.multi_items() if k == "set-cookie" and "__Host-sl_session" in v)
            assert "Secure" in session and "HttpOnly" in session and "samesite=strict" in session.lower()
            assert c.get(f"/schools/900002/feeds/{NIGHT}").status_code == 200
        with httpx.Client(base_url=server.base_url.replace("https", "http"), timeout=5) as plain:
            with pytest.raises(httpx.HTTPError):
                plain.get("/sign-in")  # TLS only


def test_failed_sign_ins_lock_the_account(seeded: Seeded, portal: Any) -> None:
    base, user = portal.base_url, seeded.users["locked.a@a.example.sch.uk"]
    with httpx.Client(base_url=base) as c:
        wrong = "The email address or password is not right"
        for _ in range(4):
            r = c.post("/sign-in", data={"email": user.email, "password": "not-the-password!",
                                         "csrf_token": _csrf(c.get("/sign-in").text)})
            assert r.status_code == 200 and wrong in r.text and "This account is locked" not in r.text
        unknown = c.post("/sign-in", data={"email": "nobody@a.example.sch.uk", "password": "not-the-password!",
                                           "csrf_token": _csrf(c.get("/sign-in").text)})
        assert wrong in unknown.text  # an unknown address is told the same: no hint which accounts exist
        r = c.post("/sign-in", data={"email": user.email, "password": "still-not-it!!",
                                     "csrf_token": _csrf(c.get("/sign-in").text)})  # the fifth failure: it locks
        assert wrong in r.text and "This account is locked" not in r.text  # but says only what any failure says
        r = c.post("/sign-in", data={"email": user.email, "password": "not-the-password!",
                                     "csrf_token": _csrf(c.get("/sign-in").text)})  # locked, and a wrong password
        assert wrong in r.text and "This account is locked" not in r.text
        for _ in range(6):  # an unknown address, tried as often, answers just the same: nobody learns who has one
            unknown = c.post("/sign-in", data={"email": "nobody@a.example.sch.uk", "password": "not-the-password!",
                                               "csrf_token": _csrf(c.get("/sign-in").text)})
            assert unknown.status_code == 200 and wrong in unknown.text and "locked for now" not in unknown.text
        r = c.post("/sign-in", data={"email": user.email, "password": user.password,
                                     "csrf_token": _csrf(c.get("/sign-in").text)})  # the right password: still locked
        assert r.status_code == 200 and "This account is locked for now" in r.text  # told once it is shown
        assert "sl_session" not in c.cookies
    kinds = [e["event"] for e in _events(seeded, user=user.user_id)]
    assert kinds.count("sign_in_failed") == 4 and kinds.count("sign_in_locked") == 3 and "sign_in" not in kinds


def test_a_value_that_is_not_ascii_is_refused_not_a_server_error(seeded: Seeded, portal: Any) -> None:
    base, user = portal.base_url, seeded.users["replay.a@a.example.sch.uk"]
    with httpx.Client(base_url=base) as c:
        c.get("/sign-in")
        r = c.post("/sign-in", data={"email": user.email, "password": user.password, "csrf_token": "é" * 43})
        assert r.status_code == 403
        r = c.post("/sign-in", data={"email": user.email, "password": user.password,
                                     "csrf_token": _csrf(c.get("/sign-in").text)})
        assert r.status_code == 303
        r = c.post("/sign-in/code", data={"code": "éééééé", "csrf_token": _csrf(c.get("/sign-in/code").text)})
        assert r.status_code == 200 and "The code is not right" in r.text


def test_a_totp_code_is_accepted_once(seeded: Seeded, portal: Any) -> None:
    base, user = portal.base_url, seeded.users["replay.a@a.example.sch.uk"]
    code = pyotp.TOTP(user.totp_secret or "").now()
    with sign_in(base, user, code):
        pass
    with httpx.Client(base_url=base) as c:
        r = c.post("/sign-in", data={"email": user.email, "password": user.password,
                                     "csrf_token": _csrf(c.get("/sign-in").text)})
        assert r.status_code == 303
        r = c.post("/sign-in/code", data={"code": code, "csrf_token": _csrf(c.get("/sign-in/code").text)})
        assert r.status_code == 200 and "The code is not right" in r.text and "sl_session" not in c.cookies


def test_signing_in_makes_a_new_session_token(seeded: Seeded, portal: Any) -> None:
    """No session fixation: the token the browser had before signing in never becomes a session."""
    base, user = portal.base_url, seeded.users["dsl.b@b.example.sch.uk"]
    with httpx.Client(base_url=base) as c:
        planted = c.get("/sign-in").cookies["sl_login"]
        c.post("/sign-in", data={"email": user.email, "password": user.password,
                                 "csrf_token": _csrf(c.get("/sign-in").text)})
        after_password = c.cookies["sl_login"]
        r = c.post("/sign-in/code", data={"code": totp_code(user),
                                          "csrf_token": _csrf(c.get("/sign-in/code").text)})
        assert r.status_code == 303
        session = c.cookies["sl_session"]
        assert len({planted, after_password, session}) == 3
    for old in (planted, after_password):
        with httpx.Client(base_url=base, cookies={"sl_session": old}) as other:
            assert other.get(f"/schools/900002/feeds/{NIGHT}").status_code == 303
