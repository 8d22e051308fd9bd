"""A loopback HTTP proxy in front of the FHIR peer that counts requests and injects faults.

The Medplum peer validates structure only and never throttles or fails, so the failures a trust's
server produces are made here, on the wire, where the client sees exactly what it would see:

    with FaultProxy(medplum.base_url) as proxy:
        proxy.fail(500, times=1)                       # the next request gets a 500
        proxy.fail(429, times=2, retry_after="1")      # then two 429s with Retry-After
        proxy.refuse_entries({"obs-1"}, "Observation.code: unknown code")  # one batch entry refused
        FhirClient(proxy.base_url).put_batch(...)
        proxy.seen                                     # every request, with its batch entries

A refused entry is taken out of the Bundle before it is forwarded (so it never lands) and its
response entry is put back in place as `422` with an OperationOutcome, as HAPI answers a rule
violation. Listens on 127.0.0.1 only.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "host", "content-length",
        "te", "trailer"}


@dataclass
class Seen:
    """One request as the proxy saw it: method, path (no query), query, the status the client got and,
    for batch/transaction Bundles, each entry's (method, url)."""

    method: str
    path: str
    query: str
    status: int = 0
    entries: list[tuple[str, str]] = field(default_factory=list)
    injected: bool = False
    authorization: str | None = None  # the Authorization header as sent (test tokens only)

    @property
    def is_write(self) -> bool:
        return self.method in ("POST", "PUT", "PATCH", "DELETE")


@dataclass
class _Refusal:
    match: Callable[[dict[str, Any]], bool]
    diagnostics: str
    code: str
    remaining: int


@dataclass
class _Fault:
    status: int
    times: int
    retry_after: str | None
    delay: float
    match: Callable[[Seen], bool]


class FaultProxy:
    """Forwards to ``upstream_base`` (``http://127.0.0.1:PORT/fhir/R4``); see the module docstring."""

    def __init__(self, upstream_base: str) -> None:
        parts = urlsplit(upstream_base)
        self._up_host = parts.hostname or "127.0.0.1"
        self._up_port = parts.port or 80
        self._up_path = parts.path.rstrip("/")
        self._lock = threading.Lock()
        self._faults: list[_Fault] = []
        self._refuse: list[_Refusal] = []
        self.refused_ids: list[str] = []
        self.seen: list[Seen] = []
        self._server: ThreadingHTTPServer | None = None
        self._local = threading.local()

    # -- control ---------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        assert self._server is not None, "proxy not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}{self._up_path}"

    def fail(self, status: int, times: int = 1, *, retry_after: str | None = None, delay: float = 0.0,
             match: Callable[[Seen], bool] | None = None) -> None:
        """The next ``times`` requests that ``match`` (default: any) get ``status`` without reaching the
        server (status 0: forwarded, after ``delay`` seconds)."""
        with self._lock:
            self._faults.append(_Fault(status, times, retry_after, delay, match or (lambda _s: True)))

    def refuse_entries(self, ids: Iterable[str], diagnostics: str, code: str = "processing") -> None:
        """Batch entries whose resource id is in ``ids`` are refused with a 422 OperationOutcome."""
        wanted = set(ids)
        self.refuse_where(lambda r: r.get("id") in wanted, diagnostics, code, times=len(wanted))

    def refuse_where(self, match: Callable[[dict[str, Any]], bool], diagnostics: str, code: str = "processing",
                     times: int = 1) -> None:
        """The next ``times`` batch entries whose resource ``match`` are refused with a 422 OperationOutcome;
        their ids are kept in ``refused_ids``."""
        with self._lock:
            self._refuse.append(_Refusal(match, diagnostics, code, times))

    def reset(self) -> None:
        with self._lock:
            self._faults.clear()
            self._refuse.clear()
            self.seen.clear()
            self.refused_ids.clear()

    def writes(self) -> list[Seen]:
        with self._lock:
            return [s for s in self.seen if s.is_write]

    # -- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> FaultProxy:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                return  # nothing logged: paths and queries can carry identifiers

            def _handle(self) -> None:
                proxy._handle(self)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True).start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # -- the proxying itself ----------------------------------------------------------------

    def _upstream(self) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = http.client.HTTPConnection(self._up_host, self._up_port, timeout=600)
            self._local.conn = conn
        return conn

    def _take_fault(self, seen: Seen) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.times > 0 and fault.match(seen):
                    fault.times -= 1
                    return fault
        return None

    def _refusal_for(self, resource: dict[str, Any]) -> _Refusal | None:
        with self._lock:
            for rule in self._refuse:
                if rule.remaining > 0 and rule.match(resource):
                    rule.remaining -= 1
                    self.refused_ids.append(str(resource.get("id")))
                    return rule
        return None

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        path, _, query = h.path.partition("?")
        length = int(h.headers.get("content-length") or 0)
        body = h.rfile.read(length) if length else b""
        seen = Seen(h.command, path, query, authorization=h.headers.get("authorization"))
        bundle: dict[str, Any] | None = None
        if h.command == "POST" and body[:1] == b"{":
            try:
                doc = json.loads(body)
            except ValueError:
                doc = None
            if isinstance(doc, dict) and doc.get("resourceType") == "Bundle":
                bundle = doc
                seen.entries = [(str(e.get("request", {}).get("method")), str(e.get("request", {}).get("url")))
                                for e in doc.get("entry") or []]
        with self._lock:
            self.seen.append(seen)

        fault = self._take_fault(seen)
        if fault is not None:
            if fault.delay:
                time.sleep(fault.delay)
            if fault.status:
                seen.status, seen.injected = fault.status, True
                outcome = {"resourceType": "OperationOutcome", "issue": [
                    {"severity": "error", "code": "throttled" if fault.status == 429 else "exception",
                     "diagnostics": f"injected {fault.status}"}]}
                headers = {"Retry-After": fault.retry_after} if fault.retry_after else {}
                self._reply(h, fault.status, json.dumps(outcome).encode(), headers)
                return

        refused: dict[int, dict[str, Any]] = {}
        if bundle is not None and self._refuse:
            kept = []
            for index, entry in enumerate(bundle.get("entry") or []):
                resource = entry.get("resource") or {}
                rule = self._refusal_for(resource)
                if rule is None:
                    kept.append(entry)
                    continue
                code, diagnostics = rule.code, rule.diagnostics
                refused[index] = {"response": {"status": "422 Unprocessable Entity", "outcome": {
                    "resourceType": "OperationOutcome",
                    "issue": [{"severity": "error", "code": code, "diagnostics": diagnostics,
                               "expression": [f"{entry['resource'].get('resourceType')}"]}]}}}
            if refused:
                bundle["entry"] = kept
                body = json.dumps(bundle).encode()

        headers = {k: v for k, v in h.headers.items() if k.lower() not in _HOP}
        headers["Content-Length"] = str(len(body))
        for attempt in range(2):  # a kept-alive upstream connection may have been closed: reconnect once
            conn = self._upstream()
            try:
                conn.request(h.command, h.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                break
            except (http.client.HTTPException, OSError):
                conn.close()
                self._local.conn = None
                if attempt:
                    raise
        out_headers = {k: v for k, v in resp.getheaders() if k.lower() not in _HOP}
        if refused:
            reply = json.loads(data)
            entries = list(reply.get("entry") or [])
            merged: list[dict[str, Any]] = []
            it = iter(entries)
            total = len(entries) + len(refused)
            for index in range(total):
                merged.append(refused[index] if index in refused else next(it))
            reply["entry"] = merged
            data = json.dumps(reply).encode()
        seen.status = resp.status
        self._reply(h, resp.status, data, out_headers)

    @staticmethod
    def _reply(h: BaseHTTPRequestHandler, status: int, data: bytes, headers: dict[str, str]) -> None:
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)
