"""What every portal page shares: the portal's state, who is signed in, rendering, cookies, CSRF and refusals.

Refusals: a page, pupil or file the signed-in user may not see answers 404, exactly like one that does not
exist (so ids and school numbers cannot be probed), and is recorded in `portal_events` as `refused`. Without a
live session a page answers 303 to the sign-in page (which says so when a session ended).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import ChainableUndefined, ChoiceLoader, Environment, FileSystemLoader, PackageLoader, select_autoescape
from sqlalchemy import Connection, Engine

from schoolslink import feed_render
from schoolslink.portal import accounts, sessions
from schoolslink.portal.accounts import PUPIL_ROLES, PortalUser
from schoolslink.portal.audit import event
from schoolslink.portal.config import PortalConfig
from schoolslink.portal.oidc import OidcClient

TEMPLATES = Path(__file__).resolve().parent / "templates"
_DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def _env() -> Environment:
    env = Environment(
        loader=ChoiceLoader([FileSystemLoader(str(TEMPLATES)), PackageLoader("nhsuk_frontend_jinja")]),
        autoescape=select_autoescape(default=True, default_for_string=True),
        undefined=ChainableUndefined, trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.do"],
    )
    env.filters["long_date"] = feed_render.long_date
    env.filters["linked_emails"] = feed_render.linked_emails
    env.filters["services"] = feed_render.split_services
    env.globals["ROLES"] = accounts.ROLES
    return env


@dataclass
class Portal:
    """The running portal's state (app.state.portal)."""

    cfg: PortalConfig
    engine: Engine
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    env: Environment = field(default_factory=_env)
    oidc: OidcClient | None = None

    def now(self) -> datetime:
        return self.clock().astimezone(UTC)


def portal(request: Request) -> Portal:
    p: Portal = request.app.state.portal
    return p


@dataclass(frozen=True, slots=True)
class Viewer:
    """The signed-in user and their session; `organisations` as they signed in (OIDC: the organisation claim;
    local: the account's, read afresh each request)."""

    user: PortalUser
    session: sessions.Session
    organisations: tuple[str, ...]

    @property
    def sees_pupils(self) -> bool:
        return self.user.role in PUPIL_ROLES

    def has(self, organisation: str) -> bool:
        return organisation in self.organisations


@dataclass(frozen=True, slots=True)
class Visitor:
    viewer: Viewer | None
    ended: bool = False  # the cookie named a session that has ended (expired, signed out, account disabled)


def visitor(request: Request, conn: Connection) -> Visitor:
    p = portal(request)
    now = p.now()
    found = sessions.find(conn, request.cookies.get(p.cfg.session_cookie), sessions.SESSION, now, p.cfg)
    s = found.session
    if s is None or s.user_id is None:
        if found.expired:
            event(conn, now, "session_ended", user_id=found.user_id,
                  detail="a request with a session past its expiry, or signed out")
        return Visitor(None, ended=found.expired)
    user = accounts.get(conn, s.user_id)
    if user is None or user.disabled:
        sessions.end(conn, s.session_hash, now)
        event(conn, now, "session_ended", user_id=s.user_id, detail="the account is disabled")
        return Visitor(None, ended=True)
    orgs = user.organisations if user.auth == "local" else s.organisations
    return Visitor(Viewer(user, s, orgs))


def render(request: Request, template: str, *, status: int = 200, viewer: Viewer | None = None,
           **context: Any) -> HTMLResponse:
    page = portal(request).env.get_template(template).render(viewer=viewer, request_path=request.url.path,
                                                               **context)
    body = "\n".join(line.rstrip() for line in page.splitlines() if line.strip()) + "\n"
    return HTMLResponse(body, status_code=status)


def set_cookie(request: Request, response: Response, name: str, token: str, *, lax: bool = False) -> None:
    p = portal(request)
    response.set_cookie(name, token, path="/", secure=p.cfg.secure, httponly=True,
                        samesite="lax" if lax else "strict")


def clear_cookie(request: Request, response: Response, name: str, *, lax: bool = False) -> None:
    p = portal(request)
    response.delete_cookie(name, path="/", secure=p.cfg.secure, httponly=True, samesite="lax" if lax else "strict")


def to_sign_in(request: Request, visit: Visitor) -> RedirectResponse:
    response = RedirectResponse("/sign-in?ended=1" if visit.ended else "/sign-in", status_code=303)
    if visit.ended:
        clear_cookie(request, response, portal(request).cfg.session_cookie)
    return response


def not_found(request: Request, viewer: Viewer | None = None) -> HTMLResponse:
    return render(request, "not_found.html.j2", status=404, viewer=viewer)


def refused(request: Request, conn: Connection, viewer: Viewer, organisation: str | None, detail: str
            ) -> HTMLResponse:
    """404, recorded as a refused request (the organisation the address named, never a pupil id)."""
    org = organisation if organisation and re.fullmatch(r"[A-Za-z0-9]{3,10}", organisation) else None
    event(conn, portal(request).now(), "refused", user_id=viewer.user.user_id, organisation=org, detail=detail)
    return not_found(request, viewer)


def parse_day(text: str) -> date | None:
    if not _DAY.match(text):
        return None
    try:
        return date.fromisoformat(text)
    except ValueError:
        return None


def same_origin(request: Request) -> bool:
    """A POST that a browser says came from another site is refused whatever it carries (defence in depth beside
    the CSRF token): `Sec-Fetch-Site` other than same-origin, or an `Origin` that is not this site. `Origin: null`
    (a privacy setting can send it) passes only when the browser also says same-origin."""
    fetch_site = request.headers.get("sec-fetch-site")
    if fetch_site not in (None, "same-origin"):
        return False
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        return origin is None or fetch_site == "same-origin"
    want = portal(request).cfg.base_url or str(request.base_url).rstrip("/")
    o, w = urlsplit(origin), urlsplit(want)
    return (o.scheme, o.netloc) == (w.scheme, w.netloc)


def csrf_refused(request: Request, viewer: Viewer | None = None) -> HTMLResponse:
    return render(request, "csrf.html.j2", status=403, viewer=viewer)
