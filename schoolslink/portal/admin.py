"""A school admin's pages: the portal's users at their schools; add one, disable one. No pupil data anywhere here;
every change is in `portal_events`.

An admin never holds the credentials of an account that sees pupil data: a DSL or SMHL they add signs in through
the organisation's identity provider (OIDC: the account is `auth=oidc`, matched by email at first sign-in), and
without one configured they cannot add such an account at all (the portal's operator adds it with `schoolslink
portal user add` and hands the credentials over). Otherwise an admin could add a DSL, read its first password and
TOTP set-up off the page, and sign in as it. A school admin they add is a local account, shown its one-time
password and TOTP set-up once: it sees no pupil data either."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response
from sqlalchemy import Connection
from starlette.concurrency import run_in_threadpool

from schoolslink.portal import accounts, sessions
from schoolslink.portal.accounts import PUPIL_ROLES, SCHOOL_ROLES, AccountError
from schoolslink.portal.audit import event
from schoolslink.portal.web import Viewer, csrf_refused, portal, refused, render, same_origin, to_sign_in, visitor

router = APIRouter()


def _admin(request: Request, conn: Connection) -> Viewer | Response:
    visit = visitor(request, conn)
    v = visit.viewer
    if v is None:
        return to_sign_in(request, visit)
    if v.user.role != "school_admin":
        return refused(request, conn, v, None, f"user admin: the role {v.user.role} does not manage users")
    return v


def _page(request: Request, conn: Connection, v: Viewer, *, status: int = 200, errors: dict[str, str] | None = None,
          form: dict[str, str] | None = None) -> Response:
    users = [u for u in accounts.list_users(conn, v.organisations) if u.role in SCHOOL_ROLES]
    oidc = portal(request).cfg.oidc
    return render(request, "admin_users.html.j2", status=status, viewer=v, users=users, errors=errors or {},
                  form=form or {}, roles=[(r, accounts.ROLES[r]) for r in sorted(SCHOOL_ROLES)],
                  provider=oidc.label if oidc is not None else None)


@router.get("/admin/users")
def users(request: Request) -> Response:
    p = portal(request)
    with p.engine.begin() as conn:
        v = _admin(request, conn)
        return v if not isinstance(v, Viewer) else _page(request, conn, v)


@router.post("/admin/users")
async def add_user(request: Request) -> Response:
    form = {k: str(v) for k, v in (await request.form()).items()}
    return await run_in_threadpool(_add_user, request, form)  # password hashing and the database: off the loop


def _add_user(request: Request, form: dict[str, str]) -> Response:
    p = portal(request)
    with p.engine.begin() as conn:
        v = _admin(request, conn)
        if not isinstance(v, Viewer):
            return v
        if not same_origin(request) or not v.session.csrf_ok(form.get("csrf_token")):
            event(conn, p.now(), "csrf_refused", user_id=v.user.user_id, detail="add user")
            return csrf_refused(request, v)
        school, role = form.get("school", ""), form.get("role", "")
        errors: dict[str, str] = {}
        if school not in v.organisations:
            errors["school"] = "Choose one of your schools"
        if role not in SCHOOL_ROLES:
            errors["role"] = "Choose a role"
        elif role in PUPIL_ROLES and p.cfg.oidc is None:
            errors["role"] = (f"A {accounts.ROLES[role].lower()} sees pupils' data, so their account is added by the "
                              "portal's operator, who gives them their sign-in details: ask them")
        auth = "oidc" if role in PUPIL_ROLES else "local"
        if not errors:
            try:
                with conn.begin_nested():
                    made = accounts.add(conn, email=form.get("email", ""), role=role, organisations=[school],
                                        now=p.now(), created_by=v.user.user_id, auth=auth)
            except AccountError as exc:
                field, _, message = str(exc).partition(": ")
                errors[field if field in ("email", "role", "school") else "email"] = message.capitalize()
        if errors:
            return _page(request, conn, v, status=400, errors=errors, form=form)
        event(conn, p.now(), "user_added", user_id=v.user.user_id, organisation=school,
              detail=f"{made.user.user_id} as {role} ({auth})")
        return render(request, "admin_added.html.j2", viewer=v, made=made,
                      provider=p.cfg.oidc.label if p.cfg.oidc is not None else None)


@router.post("/admin/users/{user_id}/disable")
async def disable_user(request: Request, user_id: str) -> Response:
    p = portal(request)
    form = await request.form()
    with p.engine.begin() as conn:
        v = _admin(request, conn)
        if not isinstance(v, Viewer):
            return v
        if not same_origin(request) or not v.session.csrf_ok(str(form.get("csrf_token") or "")):
            event(conn, p.now(), "csrf_refused", user_id=v.user.user_id, detail="disable user")
            return csrf_refused(request, v)
        target = accounts.get(conn, user_id)
        if target is None or target.user_id == v.user.user_id or target.role not in SCHOOL_ROLES \
                or not set(target.organisations) <= set(v.organisations):
            return refused(request, conn, v, None, "disable user: not a user this admin manages")
        accounts.set_disabled(conn, user_id)
        sessions.end_all_for(conn, user_id, p.now())
        event(conn, p.now(), "user_disabled", user_id=v.user.user_id, detail=user_id)
    return RedirectResponse("/admin/users", status_code=303)
