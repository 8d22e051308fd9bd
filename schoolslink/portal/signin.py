"""Signing in and out: a local account's password then TOTP code, or the OpenID provider; sign-out.

Each sign-in runs in a `login` row (its own cookie, SameSite=Lax so the provider's redirect back carries it);
a successful sign-in ends it and makes a new `session` row and cookie (SameSite=Strict). Every step is a POST
with the login row's CSRF token, except the OIDC start (a link) and the provider's redirect back, which is
bound to this browser's login row by its state (and the ID token by its nonce).

After the provider's redirect the portal answers with a page that moves on to the start page itself (a meta
refresh, no script) rather than a redirect: a browser does not send a SameSite=Strict cookie on a redirect
chain another site started, and the new session cookie is Strict.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy import Connection
from starlette.concurrency import run_in_threadpool

from schoolslink.portal import accounts, sessions
from schoolslink.portal.accounts import AccountError, SignIn
from schoolslink.portal.audit import event
from schoolslink.portal.oidc import OidcError
from schoolslink.portal.web import (
    clear_cookie,
    csrf_refused,
    not_found,
    portal,
    render,
    same_origin,
    set_cookie,
    visitor,
)

router = APIRouter()

BAD_SIGN_IN = "The email address or password is not right (too many wrong tries in a row lock an account for a while)"
BAD_CODE = "The code is not right: enter the 6-digit code your authenticator app shows now"


def _login_row(request: Request, conn: Connection) -> tuple[str | None, sessions.Session | None]:
    p = portal(request)
    token = request.cookies.get(p.cfg.login_cookie)
    return token, sessions.find(conn, token, sessions.LOGIN, p.now(), p.cfg).session


def _new_login(request: Request, conn: Connection, pending: dict[str, Any] | None = None
               ) -> tuple[str, sessions.Session]:
    p = portal(request)
    sessions.purge(conn, p.now() - timedelta(days=1))  # rows long ended or expired: nothing to keep them for
    return sessions.create(conn, sessions.LOGIN, p.now(), p.cfg.login_window, pending=pending)


def _sign_in_page(request: Request, login: sessions.Session, *, status: int = 200, error: str | None = None,
                  email: str = "", ended: bool = False, locked: bool = False) -> HTMLResponse:
    p = portal(request)
    return render(request, "sign_in.html.j2", status=status, csrf=login.csrf_token, error=error, email=email,
                  ended=ended, locked=locked, oidc_label=p.cfg.oidc.label if p.cfg.oidc else None)


@router.get("/sign-in")
def sign_in_form(request: Request, ended: str = "") -> Response:
    p = portal(request)
    with p.engine.begin() as conn:
        if visitor(request, conn).viewer is not None:
            return RedirectResponse("/", status_code=303)
        token, login = _login_row(request, conn)
        if login is None:
            token, login = _new_login(request, conn)
        response: Response = _sign_in_page(request, login, ended=ended == "1")
    set_cookie(request, response, p.cfg.login_cookie, token or "", lax=True)
    return response


@router.post("/sign-in")
async def sign_in(request: Request) -> Response:
    form = await request.form()
    return await run_in_threadpool(_sign_in, request, form)  # password hashing and the database: off the loop


def _sign_in(request: Request, form: Any) -> Response:
    p = portal(request)
    email, password = str(form.get("email") or "").strip(), str(form.get("password") or "")
    with p.engine.begin() as conn:
        _token, login = _login_row(request, conn)
        if login is None or not same_origin(request) or not login.csrf_ok(str(form.get("csrf_token") or "")):
            event(conn, p.now(), "csrf_refused", detail="sign-in form without a valid CSRF token")
            return csrf_refused(request)
        if not email or not password:
            return _sign_in_page(request, login, error="Enter your email address and password", email=email)
        attempt = accounts.check_password_sign_in(conn, email, password, p.now(), lockout_after=p.cfg.lockout_after,
                                                  lockout=p.cfg.lockout)
        uid = attempt.user.user_id if attempt.user else None
        if attempt.outcome is not SignIn.OK or attempt.user is None:
            locked = attempt.outcome in (SignIn.LOCKED, SignIn.LOCKED_QUIET)
            event(conn, p.now(), "sign_in_locked" if locked else "sign_in_failed", user_id=uid, detail="password step")
            return _sign_in_page(request, login, error=None if attempt.outcome is SignIn.LOCKED else BAD_SIGN_IN,
                                 email=email, locked=attempt.outcome is SignIn.LOCKED)
        sessions.end(conn, login.session_hash, p.now())  # a new row for the next step: nothing carried over
        token, _ = _new_login(request, conn, {"user": uid})
    response = RedirectResponse("/sign-in/code", status_code=303)
    set_cookie(request, response, p.cfg.login_cookie, token, lax=True)
    return response


@router.get("/sign-in/code")
def code_form(request: Request) -> Response:
    p = portal(request)
    with p.engine.begin() as conn:
        _token, login = _login_row(request, conn)
        if login is None or not login.pending.get("user"):
            return RedirectResponse("/sign-in", status_code=303)
        return render(request, "code.html.j2", csrf=login.csrf_token, error=None)


def _start_session(request: Request, conn: Connection, login: sessions.Session, user: accounts.PortalUser,
                   organisations: tuple[str, ...], how: str) -> str:
    p = portal(request)
    now = p.now()
    sessions.end(conn, login.session_hash, now)
    token, _ = sessions.create(conn, sessions.SESSION, now, p.cfg.max_age, user_id=user.user_id, role=user.role,
                               organisations=organisations)
    event(conn, now, "sign_in", user_id=user.user_id, detail=how)
    return token


@router.post("/sign-in/code")
async def code(request: Request) -> Response:
    form = await request.form()
    return await run_in_threadpool(_code, request, form)  # password hashing and the database: off the loop


def _code(request: Request, form: Any) -> Response:
    p = portal(request)
    with p.engine.begin() as conn:
        _token, login = _login_row(request, conn)
        if login is None or not same_origin(request) or not login.csrf_ok(str(form.get("csrf_token") or "")):
            event(conn, p.now(), "csrf_refused", detail="code form without a valid CSRF token")
            return csrf_refused(request)
        uid = str(login.pending.get("user") or "")
        if not uid:
            return RedirectResponse("/sign-in", status_code=303)
        attempt = accounts.check_code_sign_in(conn, uid, str(form.get("code") or ""), p.now(),
                                              lockout_after=p.cfg.lockout_after, lockout=p.cfg.lockout)
        if attempt.outcome is SignIn.LOCKED:
            event(conn, p.now(), "sign_in_locked", user_id=uid, detail="code step")
            sessions.end(conn, login.session_hash, p.now())
            token, fresh = _new_login(request, conn)
            locked = _sign_in_page(request, fresh, locked=True)
            set_cookie(request, locked, p.cfg.login_cookie, token, lax=True)
            return locked
        if attempt.outcome is not SignIn.OK or attempt.user is None:
            event(conn, p.now(), "sign_in_failed", user_id=uid, detail="code step")
            return render(request, "code.html.j2", csrf=login.csrf_token, error=BAD_CODE)
        token = _start_session(request, conn, login, attempt.user, attempt.user.organisations, "password and code")
    response = RedirectResponse("/", status_code=303)
    set_cookie(request, response, p.cfg.session_cookie, token)
    clear_cookie(request, response, p.cfg.login_cookie, lax=True)
    return response


def _redirect_uri(request: Request) -> str:
    base = portal(request).cfg.base_url
    return f"{base}/oidc/callback" if base else str(request.url_for("oidc_callback"))


@router.get("/sign-in/oidc")
def oidc_start(request: Request) -> Response:
    p = portal(request)
    if p.oidc is None:
        return not_found(request)
    try:
        started = p.oidc.begin(_redirect_uri(request))
    except OidcError as exc:
        return render(request, "sign_in_problem.html.j2", status=502, problem=str(exc))
    with p.engine.begin() as conn:
        _old, login = _login_row(request, conn)
        if login is not None:
            sessions.end(conn, login.session_hash, p.now())
        token, _ = _new_login(request, conn, {"oidc": started.pending})
    response = RedirectResponse(started.url, status_code=303)
    set_cookie(request, response, p.cfg.login_cookie, token, lax=True)
    return response


@router.get("/oidc/callback", name="oidc_callback")
def oidc_callback(request: Request, code: str = "", state: str = "", error: str = "", iss: str | None = None
                  ) -> Response:
    p = portal(request)
    if p.oidc is None:
        return not_found(request)
    with p.engine.begin() as conn:
        _token, login = _login_row(request, conn)
        pending = (login.pending.get("oidc") if login is not None else None) or {}
        if login is None or not pending:
            event(conn, p.now(), "sign_in_failed", detail="OIDC: no sign-in under way in this browser")
            return render(request, "sign_in_problem.html.j2", status=400,
                          problem="This sign-in was not started in this browser, or took too long. Start again.")
        sessions.end(conn, login.session_hash, p.now())  # one use
        try:
            if error:
                raise OidcError("the provider did not sign you in")
            who = p.oidc.finish(pending, code, state, iss)
            user = accounts.oidc_account(conn, issuer=who.issuer, subject=who.subject, email=who.email,
                                         role=who.role, schools=who.schools, trusts=who.trusts, now=p.now())
        except (OidcError, AccountError) as exc:
            event(conn, p.now(), "sign_in_failed", detail=f"OIDC: {exc}")
            return render(request, "sign_in_problem.html.j2", status=400, problem=str(exc))
        token = _start_session(request, conn, login, user, user.organisations, "OIDC")
    response = render(request, "signed_in.html.j2")
    set_cookie(request, response, p.cfg.session_cookie, token)
    clear_cookie(request, response, p.cfg.login_cookie, lax=True)
    return response


@router.post("/sign-out")
async def sign_out(request: Request) -> Response:
    p = portal(request)
    form = await request.form()
    with p.engine.begin() as conn:
        visit = visitor(request, conn)
        if visit.viewer is None:
            return RedirectResponse("/signed-out", status_code=303)
        if not same_origin(request) or not visit.viewer.session.csrf_ok(str(form.get("csrf_token") or "")):
            event(conn, p.now(), "csrf_refused", user_id=visit.viewer.user.user_id, detail="sign-out")
            return csrf_refused(request, visit.viewer)
        sessions.end(conn, visit.viewer.session.session_hash, p.now())
        event(conn, p.now(), "sign_out", user_id=visit.viewer.user.user_id)
    response = RedirectResponse("/signed-out", status_code=303)
    clear_cookie(request, response, p.cfg.session_cookie)
    return response


@router.get("/signed-out")
def signed_out(request: Request) -> Response:
    return render(request, "signed_out.html.j2")
