"""A local stand-in for the Wonde API v1.0 (tests only): real HTTP on 127.0.0.1, answers in Wonde's documented
shape, from in-memory synthetic schools.

What it implements (see connectors/mis/wonde.py for the sources):

- `GET /v1.0/schools/{id}/students`, `/students-leaver` and `/deletions`; an unknown school is 404, a school
  that has not approved the application 403; anything else 404.
- Bearer token authentication (`Authorization: Bearer <token>`): anything else is 401.
- `include=` (comma-separated): `extended_details`, `contacts` and `contacts.contact_details`, each wrapped as
  Wonde wraps includes (`{"data": ...}`).
- `updated_after=YYYY-MM-DD HH:MM:SS` (UTC here): only objects changed (deletions: deleted) after it; a
  malformed one is 400. `type=` on deletions.
- `per_page` / `page` paging with `meta.pagination` = {next, previous, more, per_page (text, as in the docs'
  example), current_page}. `next` links keep the request's query by default; `bare_next_links` makes them
  carry only `page` (as the docs' example shows) and `next_base` points them at another base URL.
- `fail_next(n, status, retry_after)`: the next n requests get that status (429 by default, with
  `Retry-After: 0`) before any other check.

Every request is recorded in `requests` (path, query, status, whether it carried the right token). Names, UPNs
(made with schoolslink.identifiers.make_upn) and contacts are synthetic.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from schoolslink.identifiers import make_upn

WONDE_TIME = "%Y-%m-%d %H:%M:%S"
DEFAULT_PER_PAGE = 50


def wonde_timestamp(when: dt.datetime) -> dict[str, Any]:
    """A Wonde date object: {date, timezone_type, timezone}."""
    return {"date": when.strftime("%Y-%m-%d %H:%M:%S.000000"), "timezone_type": 3, "timezone": "UTC"}


@dataclass
class FakeStudent:
    """One synthetic student: the object's own fields, its extended details and contacts (as the includes give
    them), and when it last changed."""

    fields: dict[str, Any]
    extended: dict[str, Any]
    contacts: list[dict[str, Any]]
    updated_at: dt.datetime

    @property
    def id(self) -> str:
        return str(self.fields["id"])

    @property
    def upn(self) -> str:
        return str(self.extended.get("upn"))

    def render(self, includes: set[str]) -> dict[str, Any]:
        obj = dict(self.fields)
        obj["updated_at"] = wonde_timestamp(self.updated_at)
        if "extended_details" in includes:
            obj["extended_details"] = {"data": dict(self.extended)}
        if "contacts" in includes or "contacts.contact_details" in includes:
            contacts = []
            for c in self.contacts:
                out = {k: v for k, v in c.items() if k != "contact_details"}
                if "contacts.contact_details" in includes:
                    out["contact_details"] = {"data": c.get("contact_details", {})}
                contacts.append(out)
            obj["contacts"] = {"data": contacts}
        return obj


def make_student(n: int, *, updated_at: dt.datetime, la: int = 999, estab: int = 2001, **overrides: Any) -> FakeStudent:
    """Synthetic student number n (valid UPN, synthetic names, one parent with responsibility). `overrides`
    replace top-level fields; `ext` (a dict) updates the extended details; `upn` sets the UPN as stated."""
    ext_over: dict[str, Any] = overrides.pop("ext", {})
    upn = overrides.pop("upn", make_upn(la, estab, n))
    fields: dict[str, Any] = {
        "id": f"A{1000000000 + n}",
        "upi": f"{n:032x}",
        "mis_id": str(n),
        "initials": "AE",
        "title": None,
        "surname": f"Example{n}",
        "forename": f"Ada{n}",
        "middle_names": None,
        "legal_surname": f"EXAMPLE{n}",
        "legal_forename": f"Adaline{n}",
        "gender": "FEMALE" if n % 2 else "MALE",
        "date_of_birth": {"date": f"{2010 + n % 6}-0{1 + n % 9}-1{n % 10} 00:00:00.000000", "timezone_type": 3,
                          "timezone": "Europe/London"},
        "restored_at": None,
        "created_at": wonde_timestamp(updated_at),
    }
    fields.update(overrides)
    extended: dict[str, Any] = {"upn": upn, "former_upn": None, "ethnicity_code": "WBRI", "free_school_meals": False,
                                "sen_status": "N", "in_lea_care": False}
    extended.update(ext_over)
    contacts = [{
        "id": f"C{1000000000 + n}",
        "title": "Mx",
        "surname": f"Example{n}",
        "forename": f"Parent{n}",
        "relationship": {"relationship": "Parent", "parental_responsibility": True, "priority": 1,
                         "bill_payer": True, "lives_with_pupil": True},
        "contact_details": {"emails": {"email": f"parent{n}@example.org", "primary": f"parent{n}@example.org"},
                            "telephones": {"mobile": f"07700 9{n:05d}", "primary": f"07700 9{n:05d}"}},
    }]
    return FakeStudent(fields, extended, contacts, updated_at)


@dataclass
class FakeSchool:
    approved: bool = True
    students: list[FakeStudent] = field(default_factory=list)
    leavers: list[FakeStudent] = field(default_factory=list)
    deletions: list[tuple[dict[str, Any], dt.datetime]] = field(default_factory=list)


@dataclass(frozen=True)
class SeenRequest:
    path: str
    query: dict[str, str]
    status: int
    authorised: bool


class WondeServer:
    """The stand-in, started on 127.0.0.1 on a free port (use as a context manager, or start() / close())."""

    def __init__(self, token: str = "test-token-not-secret") -> None:
        self.token = token
        self.schools: dict[str, FakeSchool] = {}
        self.requests: list[SeenRequest] = []
        self.bare_next_links = False
        self.next_base: str | None = None
        self._failures: list[tuple[int, str | None]] = []
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # Control --------------------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        assert self._httpd is not None, "start the server first"
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}/v1.0/"

    def school(self, school_id: str, *, approved: bool = True) -> FakeSchool:
        return self.schools.setdefault(school_id, FakeSchool(approved=approved))

    def fail_next(self, n: int, status: int = 429, retry_after: str | None = "0") -> None:
        with self._lock:
            self._failures.extend([(status, retry_after)] * n)

    def seen(self, endpoint: str | None = None) -> list[SeenRequest]:
        with self._lock:
            return [r for r in self.requests if endpoint is None or r.path.endswith(f"/{endpoint}")]

    def start(self) -> WondeServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                status, body, headers = server._answer(self.path, self.headers.get("Authorization"))
                payload = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # quiet: tests assert on `requests`

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> WondeServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # Answers --------------------------------------------------------------------------------------------

    def _answer(self, raw_path: str, auth: str | None) -> tuple[int, Any, dict[str, str]]:
        parts = urlsplit(raw_path)
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        authorised = auth == f"Bearer {self.token}"
        with self._lock:
            status, body, headers = self._route(parts.path, query, authorised)
            self.requests.append(SeenRequest(parts.path, query, status, authorised))
        return status, body, headers

    def _route(self, path: str, query: dict[str, str], authorised: bool) -> tuple[int, Any, dict[str, str]]:
        if self._failures:
            status, retry_after = self._failures.pop(0)
            return status, {"error": "Too Many Attempts."}, ({"Retry-After": retry_after} if retry_after else {})
        if not authorised:
            return 401, {"error": "Unauthenticated."}, {}
        segments = path.strip("/").split("/")
        if len(segments) != 4 or segments[0] != "v1.0" or segments[1] != "schools":
            return 404, {"error": "Not found."}, {}
        school = self.schools.get(segments[2])
        endpoint = segments[3]
        if school is None or endpoint not in ("students", "students-leaver", "deletions"):
            return 404, {"error": "Not found."}, {}
        if not school.approved:
            return 403, {"error": "School has not approved access."}, {}
        since: dt.datetime | None = None
        if query.get("updated_after"):
            try:
                since = dt.datetime.strptime(query["updated_after"], WONDE_TIME).replace(tzinfo=dt.UTC)
            except ValueError:
                return 400, {"error": "updated_after is not Y-m-d H:i:s"}, {}
        includes = {i for i in query.get("include", "").split(",") if i}
        items: list[dict[str, Any]]
        if endpoint == "deletions":
            items = [dict(d) for d, when in school.deletions if since is None or when > since
                     if query.get("type") in (None, "", d.get("type"))]
        else:
            pool = school.students if endpoint == "students" else school.leavers
            items = [s.render(includes) for s in pool if since is None or s.updated_at > since]
        try:
            per_page = int(query.get("per_page") or DEFAULT_PER_PAGE)
            page = int(query.get("page") or 1)
        except ValueError:
            return 400, {"error": "per_page and page are whole numbers"}, {}
        chunk = items[(page - 1) * per_page: page * per_page]
        more = page * per_page < len(items)
        return 200, {"data": chunk, "meta": {"pagination": {
            "next": self._link(path, query, page + 1) if more else None,
            "previous": self._link(path, query, page - 1) if page > 1 else None,
            "more": more,
            "per_page": str(per_page),
            "current_page": page,
        }}}, {}

    def _link(self, path: str, query: dict[str, str], page: int) -> str:
        base = (self.next_base or self.base_url).rstrip("/")
        rest = path.split("/v1.0", 1)[1]
        q = {"page": str(page)} if self.bare_next_links else {**query, "page": str(page)}
        return f"{base}{rest}?{urlencode(q)}"
