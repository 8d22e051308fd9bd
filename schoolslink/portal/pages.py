"""The portal's pages: a school's feed tonight and its history, a pupil's referral, the feed files, summaries.

Who may open what (anything else answers 404 and is recorded as refused, schoolslink.portal.web):

| address | who |
|---|---|
| `/schools/<URN>/...` feeds, pupils, files | DSL and SMHL whose organisations include the URN |
| `/schools/<URN>/summaries/...` | the same |
| `/trusts/<ODS>/summaries/...` | the trust's link workers |
| `/admin/users` | school admins (schoolslink.portal.admin) |

Every feed page, pupil page and file download is recorded in the ledger, one entry per pupil row shown
(schoolslink.portal.audit).
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response
from sqlalchemy import Connection

from schoolslink.portal import published
from schoolslink.portal.audit import event, record_shown
from schoolslink.portal.published import FeedUnavailable
from schoolslink.portal.web import Viewer, not_found, parse_day, portal, refused, render, to_sign_in, visitor

router = APIRouter()

TAG_CLASS = {
    "received": "nhsuk-tag--grey", "being_assessed": "nhsuk-tag--blue", "accepted_waiting": "nhsuk-tag--yellow",
    "in_treatment": "nhsuk-tag--green", "not_accepted": "nhsuk-tag--red", "discharged": "nhsuk-tag--white",
    "moved_to_adult_services": "nhsuk-tag--purple", "moved_area": "nhsuk-tag--aqua-green",
    "entered-in-error": "nhsuk-tag--orange",
}


@router.get("/")
def home(request: Request) -> Response:
    p = portal(request)
    with p.engine.begin() as conn:
        visit = visitor(request, conn)
        v = visit.viewer
        if v is None:
            return to_sign_in(request, visit)
        if v.user.role == "school_admin":
            return RedirectResponse("/admin/users", status_code=303)
        if v.user.role == "link_worker":
            if len(v.organisations) == 1:
                return RedirectResponse(f"/trusts/{v.organisations[0]}/summaries", status_code=303)
            return render(request, "trusts.html.j2", viewer=v, trusts=v.organisations)
        if len(v.organisations) == 1:
            return RedirectResponse(f"/schools/{v.organisations[0]}", status_code=303)
        schools = [(urn, next(iter(published.feed_dates(urn)), None)) for urn in v.organisations]
        return render(request, "schools.html.j2", viewer=v, schools=schools)


def _school(request: Request, conn: Connection, urn: str, what: str) -> Viewer | Response:
    """The viewer, if they may see this school's pupil data; else the response to give (sign-in or 404)."""
    visit = visitor(request, conn)
    v = visit.viewer
    if v is None:
        return to_sign_in(request, visit)
    if not v.sees_pupils:
        return refused(request, conn, v, urn, f"{what}: the role {v.user.role} sees no pupil data")
    if not v.has(urn):
        return refused(request, conn, v, urn, f"{what}: not one of the user's schools")
    return v


@router.get("/schools/{urn}")
def school(request: Request, urn: str) -> Response:
    p = portal(request)
    with p.engine.begin() as conn:
        v = _school(request, conn, urn, "school")
        if not isinstance(v, Viewer):
            return v
        days = published.feed_dates(urn)
        if not days:
            return render(request, "no_feed.html.j2", viewer=v, urn=urn)
        return RedirectResponse(f"/schools/{urn}/feeds/{days[0].isoformat()}", status_code=303)


@router.get("/schools/{urn}/feeds")
def history(request: Request, urn: str) -> Response:
    p = portal(request)
    with p.engine.begin() as conn:
        v = _school(request, conn, urn, "feed history")
        if not isinstance(v, Viewer):
            return v
        return render(request, "history.html.j2", viewer=v, urn=urn, nights=published.history(urn))


def _school_feed(request: Request, conn: Connection, urn: str, day_text: str, what: str
                 ) -> tuple[Viewer, published.Feed] | Response:
    """The viewer and that night's feed, if they may see this school's pupil data and the feed is there; else
    the response to give (sign-in, a logged 404, or the feed's problem)."""
    v = _school(request, conn, urn, what)
    if not isinstance(v, Viewer):
        return v
    day = parse_day(day_text)
    if day is None or day not in published.feed_dates(urn):
        return refused(request, conn, v, urn, f"{what}: no feed for that night")
    try:
        return v, published.load(urn, day)
    except FeedUnavailable as exc:
        return render(request, "feed_problem.html.j2", status=503, viewer=v, urn=urn, day=day, problem=str(exc))


def _shown(conn: Connection, v: Viewer, urn: str, doc: dict[str, Any], rows: list[dict[str, Any]], task: str,
           at: datetime) -> None:
    """The ledger entries for showing `rows` of a feed document to the viewer."""
    record_shown(conn, user_id=v.user.user_id, urn=urn, rows=rows, mapping_version=str(doc.get("mapping_version", "")),
                 task=task, at=at)


@router.get("/schools/{urn}/feeds/{day}")
def feed(request: Request, urn: str, day: str) -> Response:
    p = portal(request)
    with p.engine.begin() as conn:
        vf = _school_feed(request, conn, urn, day, "feed")
        if not isinstance(vf, tuple):
            return vf
        v, f = vf
        latest = published.feed_dates(urn)[0]
        _shown(conn, v, urn, f.full, f.rows, "feed_page", p.now())
        return render(request, "feed.html.j2", viewer=v, urn=urn, feed=f, latest=latest, tag_class=TAG_CLASS,
                      downloads=published.DOWNLOADS)


@router.get("/schools/{urn}/feeds/{day}/pupils/{pid}")
def pupil(request: Request, urn: str, day: str, pid: str) -> Response:
    p = portal(request)
    with p.engine.begin() as conn:
        vf = _school_feed(request, conn, urn, day, "pupil page")
        if not isinstance(vf, tuple):
            return vf
        v, f = vf
        row = f.row(pid)
        if row is None:
            return refused(request, conn, v, urn, "pupil page: no such pupil in this school's feed that night")
        _shown(conn, v, urn, f.full, [row], "pupil_page", p.now())
        return render(request, "pupil.html.j2", viewer=v, urn=urn, feed=f, row=row,
                      timeline=published.timeline(f, row), tag_class=TAG_CLASS)


@router.get("/schools/{urn}/feeds/{day}/files/{name}")
def download(request: Request, urn: str, day: str, name: str) -> Response:
    p = portal(request)
    with p.engine.begin() as conn:
        vf = _school_feed(request, conn, urn, day, "download")
        if not isinstance(vf, tuple):
            return vf
        v, f = vf
        if name not in published.DOWNLOADS:
            return refused(request, conn, v, urn, "download: not a feed file")
        try:
            data, media_type, _rows = published.download(urn, f.day, name)
        except FeedUnavailable as exc:
            return render(request, "feed_problem.html.j2", status=503, viewer=v, urn=urn, day=f.day,
                          problem=str(exc))
        doc = f.changes if name.startswith("changes") else f.full
        _shown(conn, v, urn, doc, doc.get("rows", []), f"download:{name}", p.now())
    filename = f"schoolslink-{urn}-{f.day.isoformat()}-{name}"
    return Response(data, media_type=media_type,
                    headers={"Content-Disposition": f'attachment; filename="{filename}"'})


# -- summaries ---------------------------------------------------------------------------------------------------


def _summary_viewer(request: Request, conn: Connection, kind: str, code: str) -> Viewer | Response:
    if kind == "school":
        return _school(request, conn, code, "school summary")
    visit = visitor(request, conn)
    v = visit.viewer
    if v is None:
        return to_sign_in(request, visit)
    if v.user.role != "link_worker" or not v.has(code):
        return refused(request, conn, v, code, "trust summary: not one of the user's trusts")
    return v


def _summaries(request: Request, kind: str, code: str) -> Response:
    p = portal(request)
    with p.engine.begin() as conn:
        v = _summary_viewer(request, conn, kind, code)
        if not isinstance(v, Viewer):
            return v
        return render(request, "summaries.html.j2", viewer=v, kind=kind, code=code,
                      months=published.summary_months(kind, code))


def _summary(request: Request, kind: str, code: str, month: str) -> Response:
    p = portal(request)
    with p.engine.begin() as conn:
        v = _summary_viewer(request, conn, kind, code)
        if not isinstance(v, Viewer):
            return v
        if month not in published.summary_months(kind, code):
            return refused(request, conn, v, code, f"{kind} summary: no summary for that month")
        try:
            body = published.summary_body(kind, code, month)
        except FeedUnavailable:
            return not_found(request, v)
        event(conn, p.now(), "view_summary", user_id=v.user.user_id, organisation=code, detail=f"{kind} {month}")
        label = date.fromisoformat(f"{month}-01").strftime("%B %Y")
        return render(request, "summary.html.j2", viewer=v, kind=kind, code=code, month=month, label=label,
                      body=body)


@router.get("/schools/{urn}/summaries")
def school_summaries(request: Request, urn: str) -> Response:
    return _summaries(request, "school", urn)


@router.get("/schools/{urn}/summaries/{month}")
def school_summary(request: Request, urn: str, month: str) -> Response:
    return _summary(request, "school", urn, month)


@router.get("/trusts/{ods}/summaries")
def trust_summaries(request: Request, ods: str) -> Response:
    return _summaries(request, "trust", ods)


@router.get("/trusts/{ods}/summaries/{month}")
def trust_summary(request: Request, ods: str, month: str) -> Response:
    return _summary(request, "trust", ods, month)
