"""A local stand-in for the PDS FHIR API sandbox (tests only): real HTTP on 127.0.0.1, answering with the sandbox's
own canned responses (../shared/corpora/nhs/pds-fhir-sandbox: `mocks/*.json`, `errors/*.json`), byte for byte.

What it implements, as the sandbox does, under the sandbox's base path (`PREFIX`):

- `GET /Patient?family=&given=&birthdate=eqYYYY-MM-DD[&gender=][&address-postalcode=]`: Jane Smith, 2010-10-22 ->
  `mocks/PatientSearch.json`; Janet Smythe, 2005-06-16 -> `mocks/Sensitive_PatientSearch.json` (restricted);
  anything else an empty searchset Bundle. No family or no birthdate, or a birthdate without its `eq` prefix ->
  400 `errors/INVALID_SEARCH_DATA.json`. Tests add searches of their own with `add_search`.
- `GET /Patient/{nhs}`: 9000000009 -> `mocks/Patient.json`, 9000000025 -> `mocks/Sensitive_Patient.json`,
  9000000033 -> `mocks/Minimal_Patient.json`; another valid NHS number -> 404 `errors/RESOURCE_NOT_FOUND.json`; an
  id that is not a valid NHS number -> 400 `errors/INVALID_RESOURCE_ID.json`.
- Every request needs an `X-Request-ID` header: without one, 412 `errors/PRECONDITION_FAILED.json`.
- `fail_next(status, body=None, n=1)`: the next n requests get that status (and an error file's body) first.

Every request is recorded in `requests` (path, query, status).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

from schoolslink.identifiers import is_valid_nhs_number
from tests.paths import CORPORA

PDS_CORPUS = CORPORA / "nhs" / "pds-fhir-sandbox"
MOCKS = PDS_CORPUS / "mocks"
ERRORS = PDS_CORPUS / "errors"
PREFIX = "/personal-demographics/FHIR/R4"  # the sandbox's base path
EMPTY_SEARCHSET = {"resourceType": "Bundle", "type": "searchset", "total": 0}
READS = {"9000000009": "Patient.json", "9000000025": "Sensitive_Patient.json", "9000000033": "Minimal_Patient.json"}
SEARCHES = {("smith", "jane", "2010-10-22"): "PatientSearch.json",
            ("smythe", "janet", "2005-06-16"): "Sensitive_PatientSearch.json"}


def corpus_file(path: Path) -> bytes:
    return path.read_bytes()


@dataclass
class Seen:
    path: str
    query: dict[str, list[str]]
    status: int
    request_id: str | None


@dataclass
class PdsSandbox:
    """The server's state: extra searches, forced failures, and what it was asked."""

    searches: dict[tuple[str, str, str], bytes] = field(default_factory=dict)
    failures: list[tuple[int, bytes | None]] = field(default_factory=list)
    requests: list[Seen] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add_search(self, family: str, given: str, birthdate: str, body: dict[str, Any]) -> None:
        self.searches[(family.lower(), given.lower(), birthdate)] = json.dumps(body).encode()

    def fail_next(self, status: int, error_file: str | None = None, n: int = 1) -> None:
        body = corpus_file(ERRORS / error_file) if error_file else None
        self.failures.extend([(status, body)] * n)

    def answer(self, path: str, query: dict[str, list[str]], request_id: str | None) -> tuple[int, bytes]:
        with self.lock:
            if self.failures:
                status, body = self.failures.pop(0)
                return status, body or b""
        if not path.startswith(PREFIX + "/"):
            return 404, corpus_file(ERRORS / "RESOURCE_NOT_FOUND.json")
        path = path[len(PREFIX):]
        if not request_id:
            return 412, corpus_file(ERRORS / "PRECONDITION_FAILED.json")
        if path == "/Patient":
            family = (query.get("family") or [""])[0]
            birthdate = (query.get("birthdate") or [""])[0]
            given = (query.get("given") or [""])[0]
            if not family or not birthdate.startswith("eq") or len(birthdate) != 12:
                return 400, corpus_file(ERRORS / "INVALID_SEARCH_DATA.json")
            key = (family.lower(), given.lower(), birthdate[2:])
            if key in self.searches:
                return 200, self.searches[key]
            if key in SEARCHES:
                return 200, corpus_file(MOCKS / SEARCHES[key])
            return 200, json.dumps(EMPTY_SEARCHSET).encode()
        if path.startswith("/Patient/") and path.count("/") == 2:
            nhs = path.rsplit("/", 1)[1]
            if not is_valid_nhs_number(nhs):
                return 400, corpus_file(ERRORS / "INVALID_RESOURCE_ID.json")
            if nhs in READS:
                return 200, corpus_file(MOCKS / READS[nhs])
            return 404, corpus_file(ERRORS / "RESOURCE_NOT_FOUND.json")
        return 404, corpus_file(ERRORS / "RESOURCE_NOT_FOUND.json")


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        query = parse_qs(parts.query)
        request_id = self.headers.get("X-Request-ID")
        status, body = self.server.sandbox.answer(parts.path, query, request_id)
        self.server.sandbox.requests.append(Seen(parts.path, query, status, request_id))
        self.send_response(status)
        self.send_header("Content-Type", "application/fhir+json")
        self.send_header("Content-Length", str(len(body)))
        if status == 429:
            self.send_header("Retry-After", "0")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: object) -> None:  # quiet
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, sandbox: PdsSandbox) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.sandbox = sandbox


class PdsServer:
    """`with PdsServer() as pds:` serves on 127.0.0.1 at `pds.base_url` (a FHIR base: `<base>/Patient`)."""

    def __init__(self) -> None:
        self.sandbox = PdsSandbox()
        self._server = _Server(self.sandbox)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}{PREFIX}"

    def __enter__(self) -> PdsServer:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
