"""The school portal as an ASGI application (FastAPI, server-rendered Jinja2 in NHS.UK frontend style, no
JavaScript): `create_app()`. `schoolslink portal` serves it (schoolslink/portal/server.py); docs/portal.md.

Every response carries the security headers below; every page is `no-store` (pupil data never sits in a cache),
the stylesheets may be cached. HSTS only over TLS (`PortalConfig.secure`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from sqlalchemy import Engine
from starlette.exceptions import HTTPException as StarletteHTTPException

from schoolslink import feed_render
from schoolslink.portal import admin, pages, signin
from schoolslink.portal.config import PortalConfig
from schoolslink.portal.oidc import OidcClient
from schoolslink.portal.web import Portal, not_found, render

STATIC = Path(__file__).resolve().parent / "static"
# The stylesheets a page may link: the portal's own, the feed page's (shared with feed.html), the summary's.
STYLESHEETS = {
    "portal.css": STATIC / "portal.css",
    "school-feed.css": feed_render.TEMPLATES / "school-feed.css",
    "summary.css": feed_render.TEMPLATES / "summary" / "style.css",
}
CSP = ("default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; "
       "base-uri 'none'")
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",  # pupil ids in addresses never leave the site; forms keep their Origin
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=(), usb=()",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}
HSTS = "max-age=31536000; includeSubDomains"


def create_app(cfg: PortalConfig | None = None, *, engine: Engine | None = None,
               oidc: OidcClient | None = None) -> FastAPI:
    cfg = cfg or PortalConfig.from_env()
    if engine is None:
        from schoolslink.store.db import engine as store_engine

        engine = store_engine()
    if oidc is None and cfg.oidc is not None:
        oidc = OidcClient(cfg.oidc)
    app = FastAPI(title="schoolslink portal", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.portal = Portal(cfg=cfg, engine=engine, oidc=oidc)

    @app.middleware("http")
    async def security_headers(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        response = await call_next(request)
        for name, value in HEADERS.items():
            response.headers.setdefault(name, value)
        if request.url.path.startswith("/static/") and response.status_code == 200:
            response.headers["Cache-Control"] = "private, max-age=3600"
        else:
            response.headers["Cache-Control"] = "no-store"
            response.headers["Pragma"] = "no-cache"
        if cfg.secure:
            response.headers["Strict-Transport-Security"] = HSTS
        return response

    @app.get("/static/{name}")
    def stylesheet(request: Request, name: str) -> Response:
        path = STYLESHEETS.get(name)
        if path is None:
            return not_found(request)
        return Response(path.read_bytes(), media_type="text/css; charset=utf-8")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 405:
            return render(request, "not_found.html.j2", status=405)
        return not_found(request)

    @app.exception_handler(Exception)
    async def server_error(request: Request, _exc: Exception) -> Response:  # logged by uvicorn; nothing shown
        response = render(request, "error.html.j2", status=500)  # outside the middleware: its headers, here too
        response.headers.update({**HEADERS, "Cache-Control": "no-store", "Pragma": "no-cache"})
        if cfg.secure:
            response.headers["Strict-Transport-Security"] = HSTS
        return response

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, _exc: RequestValidationError) -> Response:
        return not_found(request)

    app.include_router(signin.router)
    app.include_router(pages.router)
    app.include_router(admin.router)
    return app
