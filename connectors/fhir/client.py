"""A small synchronous FHIR R4 client for what the pipeline needs.

* ``put_batch``: ``batch`` Bundles of ``PUT Type/id`` (our resources carry deterministic ids), one
  :class:`EntryResult` per resource; one bad entry never fails its bundle mates.
* ``search_since``: every resource of a type with ``_lastUpdated`` at or after a watermark, in
  ``_lastUpdated`` order, following ``next`` links where the server gives them and otherwise paging
  by advancing the ``_lastUpdated`` watermark itself (Medplum's router gives no links).
* ``put_batch(..., conditional=True)``: for servers that assign ids, ``PUT Type?identifier=system|value``
  (conditional update: creates once, then updates the same resource); ~400x slower on Medplum's router.
* ``transaction``: a small group of writes that must land together (refused above ``MAX_TRANSACTION``).
* ``read``, ``search`` (one page, ``_include``/``_revinclude`` resources included), ``patients_by_nhs_number``,
  ``history_count``, ``all_resources``.

TLS certificates are always verified: ``verify`` is True (the system's CA store) or a CA bundle (path or
``ssl.SSLContext``); there is no way to turn verification off.

Transient failures (timeouts, connection errors, 408, 429, 5xx) are retried with exponential
back-off and jitter, honouring ``Retry-After``; after the last attempt a
:class:`~connectors.fhir.errors.FhirTransientError` is raised. Other 4xx raise
:class:`~connectors.fhir.errors.FhirPermanentError` at once.

Nothing this module logs or raises contains resource bodies, resource ids or query strings; it
also strips query strings from httpx's own request log lines (see :func:`_install_log_redaction`).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import ssl
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, TypeAlias
from urllib.parse import quote, urlsplit

import httpx

from connectors.fhir.errors import (
    FhirError,
    FhirNotFoundError,
    FhirPagingError,
    FhirPermanentError,
    FhirTransientError,
)
from connectors.fhir.tls import tls_verify
from connectors.retry_after import retry_after_seconds

__all__ = ["MAX_TRANSACTION", "EntryResult", "FhirClient", "JsonDict", "QueryParams", "tls_verify"]

JsonDict: TypeAlias = dict[str, Any]
QueryValue: TypeAlias = str | int | Sequence[str]
QueryParams: TypeAlias = Mapping[str, QueryValue]

FHIR_JSON: Final = "application/fhir+json"
MESSAGE_LIMIT: Final = 300
MAX_TRANSACTION: Final = 20  # transactions are for small atomic groups; bigger ones are refused by servers
NHS_NUMBER_SYSTEM: Final = "https://fhir.nhs.uk/Id/nhs-number"
RETRY_AFTER_CAP_S: Final = 300.0
_TRANSIENT_4XX: Final = frozenset({408, 429})

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EntryResult:
    """The outcome of one ``PUT Type/id`` in a batch.

    ``status`` is the entry's HTTP status (0 if the server's response gave none). ``message`` is a
    truncated summary of the entry's OperationOutcome, only for failed entries; it never contains
    the resource we sent.
    """

    resource_type: str
    id: str
    status: int
    ok: bool
    version_id: str | None = None
    message: str | None = None


class _RedactQueryFilter(logging.Filter):
    """Drops the query string from URLs in httpx's ``HTTP Request: GET <url> ...`` log records."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and any(_is_url(a) for a in args):
            record.args = tuple(_url_without_query(a) if _is_url(a) else a for a in args)
        elif not args and isinstance(record.msg, str) and "?" in record.msg:
            # Already merged into the message (the pseudonymising log filter rewrites records as they are made).
            record.msg = _QUERY_IN_TEXT.sub(r"\1?<redacted>", record.msg)
        return True


_QUERY_IN_TEXT: Final = re.compile(r"(https?://[^\s?\"']+)\?[^\s\"']*")


def _is_url(arg: object) -> bool:
    return isinstance(arg, httpx.URL) or (isinstance(arg, str) and arg.startswith(("http://", "https://")))


def _url_without_query(url: object) -> str:
    text = str(url)
    cut = text.find("?")
    return text if cut == -1 else text[:cut] + "?<redacted>"


_redaction_installed = False


def _install_log_redaction() -> None:
    """httpx logs every request URL at INFO (Airflow task logs run at INFO); our search URLs can
    carry NHS numbers, so strip query strings from those records. Idempotent."""
    global _redaction_installed
    if not _redaction_installed:
        logging.getLogger("httpx").addFilter(_RedactQueryFilter())
        _redaction_installed = True


def _parse_instant(value: str) -> datetime:
    """A FHIR instant (``...Z`` or ``...+00:00``, any fractional precision) as an aware datetime."""
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed


def _parse_status(status: object) -> int:
    """``"201 Created"`` -> 201; anything unparseable -> 0."""
    if isinstance(status, int):
        return status
    if isinstance(status, str):
        head = status.strip().split(" ", 1)[0]
        if head.isdigit():
            return int(head)
    return 0


def _parse_etag(etag: object) -> str | None:
    """``W/"3"`` -> ``"3"``."""
    if not isinstance(etag, str) or not etag:
        return None
    value = etag[2:] if etag.startswith("W/") else etag
    return value.strip('"') or None


def _outcome_summary(outcome: object) -> str | None:
    """A short, single-line summary of an OperationOutcome's issues (codes, texts, paths)."""
    if not isinstance(outcome, dict) or outcome.get("resourceType") != "OperationOutcome":
        return None
    parts: list[str] = []
    for issue in outcome.get("issue") or []:
        if not isinstance(issue, dict):
            continue
        code = issue.get("code") or "?"
        details = issue.get("details")
        text = issue.get("diagnostics") or (details.get("text") if isinstance(details, dict) else None)
        expression = issue.get("expression") or issue.get("location")
        piece = str(code)
        if text:
            piece += f": {text}"
        if isinstance(expression, list) and expression:
            piece += f" @ {', '.join(str(e) for e in expression[:3])}"
        parts.append(piece)
    if not parts:
        return None
    return _truncate(" ".join("; ".join(parts).split()))


def _truncate(text: str, limit: int = MESSAGE_LIMIT) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _response_summary(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return f"HTTP {response.status_code}"
    summary = _outcome_summary(body)
    return f"HTTP {response.status_code}" + (f" ({summary})" if summary else "")


def _identifier_query(resource: JsonDict) -> str | None:
    """``identifier=system|value`` from a resource's first identifier (URL-encoded), or None."""
    for ident in resource.get("identifier") or []:
        if isinstance(ident, dict) and isinstance(ident.get("system"), str) and isinstance(ident.get("value"), str):
            return "identifier=" + quote(f"{ident['system']}|{ident['value']}", safe="")
    return None


def _last_updated(resource: JsonDict) -> str:
    meta = resource.get("meta")
    value = meta.get("lastUpdated") if isinstance(meta, dict) else None
    if not isinstance(value, str):
        raise FhirPermanentError(
            f"search {resource.get('resourceType')}: a resource in the results has no meta.lastUpdated"
        )
    return value


def _version_key(resource: JsonDict) -> tuple[str, str | None]:
    meta = resource.get("meta")
    vid = meta.get("versionId") if isinstance(meta, dict) else None
    return str(resource.get("id")), vid if isinstance(vid, str) else None


class FhirClient:
    """Synchronous FHIR R4 client over one keep-alive ``httpx.Client``.

    ``base_url`` is the FHIR base (e.g. ``http://127.0.0.1:8080/fhir/R4``). ``timeout`` is the
    per-request read/write timeout in seconds. ``bundle_size`` is the number of entries per batch
    Bundle in :meth:`put_batch`. ``max_retries`` is the number of retries after the first attempt
    for transient failures; back-off is ``backoff_base * 2**attempt`` (capped at ``backoff_max``)
    with jitter, or at least the server's ``Retry-After``.
    """

    def __init__(
        self,
        base_url: str,
        timeout: float = 60,
        bundle_size: int = 2000,
        *,
        max_retries: int = 4,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        headers: Mapping[str, str] | None = None,
        auth: httpx.Auth | None = None,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
        verify: bool | str | os.PathLike[str] | ssl.SSLContext = True,
    ) -> None:
        verify = tls_verify(verify)
        if bundle_size < 1:
            raise ValueError("bundle_size must be at least 1")
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        _install_log_redaction()
        self.base_url = base_url.rstrip("/")
        self.bundle_size = bundle_size
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self._sleep = sleep
        base_headers = {"Accept": FHIR_JSON, "User-Agent": "schoolslink-fhir-client"}
        base_headers.update(headers or {})
        self._origin = urlsplit(self.base_url)[:2]
        self._auth = auth
        self._http = httpx.Client(
            base_url=self.base_url + "/",
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            headers=base_headers,
            auth=auth,
            transport=transport,
            verify=verify,
            limits=httpx.Limits(max_keepalive_connections=4, keepalive_expiry=30.0),
            follow_redirects=False,
        )

    # -- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        self._http.close()
        close_auth = getattr(self._auth, "close", None)  # an OAuth auth holds its own token client
        if callable(close_auth):
            close_auth()

    def __enter__(self) -> FhirClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- transport with retries ------------------------------------------------------------

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        ceiling: float = min(self.backoff_max, self.backoff_base * 2.0**attempt)
        delay = ceiling / 2 + random.uniform(0, ceiling / 2)
        if retry_after is not None:
            delay = max(delay, retry_after)
        return delay

    def _request(
        self,
        method: str,
        url: str,
        what: str,
        *,
        params: QueryParams | None = None,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        not_found_ok: bool = False,
    ) -> httpx.Response:
        """Send one request, retrying transient failures. ``what`` names the operation in errors
        (no ids, no query). Returns the response for 2xx (and 404/410 when ``not_found_ok``)."""
        attempt = 0
        while True:
            retry_after: float | None = None
            try:
                response = self._http.request(method, url, params=params, content=content, headers=headers)
            except httpx.TimeoutException as exc:
                failure = f"{what}: timed out ({type(exc).__name__})"
                status: int | None = None
            except httpx.TransportError as exc:
                failure = f"{what}: connection failed ({type(exc).__name__})"
                status = None
            else:
                status = response.status_code
                if 200 <= status < 300 or (not_found_ok and status in (404, 410)):
                    return response
                if status in (404, 410):
                    raise FhirNotFoundError(f"{what}: {_response_summary(response)}", status=status)
                if status not in _TRANSIENT_4XX and status < 500:
                    raise FhirPermanentError(f"{what}: {_response_summary(response)}", status=status)
                failure = f"{what}: {_response_summary(response)}"
                retry_after = retry_after_seconds(response.headers.get("retry-after"), RETRY_AFTER_CAP_S)
            if attempt >= self.max_retries:
                raise FhirTransientError(f"{failure}; gave up after {attempt + 1} attempt(s)", status=status) from None
            delay = self._backoff(attempt, retry_after)
            log.warning("%s; retrying in %.2fs (attempt %d of %d)", failure, delay, attempt + 2, self.max_retries + 1)
            self._sleep(delay)
            attempt += 1

    def _json(self, response: httpx.Response, what: str) -> JsonDict:
        try:
            body = json.loads(response.content)
        except ValueError:
            raise FhirPermanentError(f"{what}: response is not JSON", status=response.status_code) from None
        if not isinstance(body, dict):
            raise FhirPermanentError(f"{what}: response is not a JSON object", status=response.status_code)
        return body

    # -- writes ----------------------------------------------------------------------------

    def put_batch(self, resources: Sequence[JsonDict], *, conditional: bool = False) -> list[EntryResult]:
        """Write ``resources`` as ``batch`` Bundles of ``PUT Type/id``, ``bundle_size`` per Bundle.

        ``conditional=True`` is for servers that assign their own ids: each entry is ``PUT
        Type?identifier=system|value`` with the resource's first identifier (which must be ours and
        unique), sent without its id; the server creates it once and updates the same resource after.
        The result's ``id`` is still our id (the key the outbox keeps).

        Returns one :class:`EntryResult` per resource, in input order. A failed entry (4xx) is
        reported in its result and does not affect the others. A failure of a whole Bundle raises
        :class:`FhirTransientError` (after retries) or :class:`FhirPermanentError`, with the results
        of the Bundles already written in ``partial_results``.

        Raises ``ValueError`` before sending anything if a resource lacks a string
        ``resourceType`` or ``id``.
        """
        for index, resource in enumerate(resources):
            rtype, rid = resource.get("resourceType"), resource.get("id")
            if not isinstance(rtype, str) or not rtype or not isinstance(rid, str) or not rid:
                raise ValueError(f"resources[{index}] needs a string resourceType and id for PUT Type/id")
            if conditional and _identifier_query(resource) is None:
                raise ValueError(f"resources[{index}] has no identifier with system and value for a conditional PUT")
        results: list[EntryResult] = []
        for start in range(0, len(resources), self.bundle_size):
            chunk = resources[start : start + self.bundle_size]
            try:
                results.extend(self._put_bundle(chunk, conditional))
            except FhirError as exc:
                exc.partial_results = list(results)
                raise
        return results

    def _put_bundle(self, chunk: Sequence[JsonDict], conditional: bool = False) -> list[EntryResult]:
        what = f"batch {'conditional ' if conditional else ''}PUT of {len(chunk)} resource(s)"
        if conditional:
            entries = [
                {
                    "resource": {k: v for k, v in resource.items() if k != "id"},
                    "request": {"method": "PUT", "url": f"{resource['resourceType']}?{_identifier_query(resource)}"},
                }
                for resource in chunk
            ]
        else:
            entries = [
                {
                    "resource": resource,
                    "request": {"method": "PUT", "url": f"{resource['resourceType']}/{resource['id']}"},
                }
                for resource in chunk
            ]
        bundle = {"resourceType": "Bundle", "type": "batch", "entry": entries}
        payload = json.dumps(bundle, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        del bundle
        response = self._request(
            "POST",
            "",
            what,
            content=payload,
            headers={"Content-Type": FHIR_JSON, "Prefer": "return=minimal"},
        )
        body = self._json(response, what)
        replies = body.get("entry")
        if body.get("resourceType") != "Bundle" or not isinstance(replies, list) or len(replies) != len(chunk):
            got = len(replies) if isinstance(replies, list) else 0
            raise FhirPermanentError(
                f"{what}: malformed batch-response ({got} entries for {len(chunk)} requests)",
                status=response.status_code,
            )
        return [self._entry_result(resource, entry) for resource, entry in zip(chunk, replies, strict=True)]

    @staticmethod
    def _entry_result(resource: JsonDict, entry: object) -> EntryResult:
        rtype, rid = str(resource["resourceType"]), str(resource["id"])
        reply = entry.get("response") if isinstance(entry, dict) else None
        if not isinstance(reply, dict):
            return EntryResult(rtype, rid, 0, False, None, "no response in the batch-response entry")
        status = _parse_status(reply.get("status"))
        ok = 200 <= status < 300
        version_id = _parse_etag(reply.get("etag"))
        echoed = entry.get("resource") if isinstance(entry, dict) else None
        if version_id is None and ok and isinstance(echoed, dict):
            meta = echoed.get("meta")
            vid = meta.get("versionId") if isinstance(meta, dict) else None
            version_id = vid if isinstance(vid, str) else None
        message: str | None = None
        if not ok:
            outcome = reply.get("outcome")
            if outcome is None and isinstance(echoed, dict) and echoed.get("resourceType") == "OperationOutcome":
                outcome = echoed
            message = _outcome_summary(outcome) or f"HTTP {status}"
        return EntryResult(rtype, rid, status, ok, version_id, message)

    def transaction(self, resources: Sequence[JsonDict]) -> list[EntryResult]:
        """``PUT Type/id`` of a few resources that must land together, as one ``transaction`` Bundle.

        All or nothing: a refusal raises :class:`FhirPermanentError` with the server's
        OperationOutcome summary. Refuses more than ``MAX_TRANSACTION`` resources before sending
        (servers refuse big transactions; use :meth:`put_batch` for bulk).
        """
        if not resources:
            return []
        if len(resources) > MAX_TRANSACTION:
            raise ValueError(f"a transaction is for small atomic groups: {len(resources)} resources "
                             f"(at most {MAX_TRANSACTION}); use put_batch")
        what = f"transaction of {len(resources)} resource(s)"
        bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
            {"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
            for r in resources]}
        payload = json.dumps(bundle, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        response = self._request("POST", "", what, content=payload,
                                 headers={"Content-Type": FHIR_JSON, "Prefer": "return=minimal"})
        body = self._json(response, what)
        entries = body.get("entry")
        if not isinstance(entries, list) or len(entries) != len(resources):
            raise FhirPermanentError(f"{what}: malformed transaction-response", status=response.status_code)
        results = [self._entry_result(r, e) for r, e in zip(resources, entries, strict=True)]
        bad = [r for r in results if not r.ok]
        if bad:
            raise FhirPermanentError(f"{what}: refused ({bad[0].message})", status=bad[0].status)
        return results

    # -- reads -----------------------------------------------------------------------------

    def patients_by_nhs_number(self, nhs_number: str, params: QueryParams | None = None) -> list[JsonDict]:
        """The trust's Patient(s) with this NHS number (read only: we never write a Patient).

        ``params`` can add ``_revinclude`` (e.g. ``ServiceRequest:subject``) to fetch what refers to
        the Patient in the same round trip. Refuses a value that is not ten digits before sending.
        """
        digits = nhs_number.replace(" ", "")
        if len(digits) != 10 or not digits.isdigit():
            raise ValueError("an NHS number is ten digits")
        query: dict[str, QueryValue] = {"identifier": f"{NHS_NUMBER_SYSTEM}|{digits}"}
        query.update(params or {})
        return self.search("Patient", query)

    def read(self, resource_type: str, resource_id: str) -> JsonDict:
        """``GET Type/id``. Raises :class:`FhirNotFoundError` for 404/410."""
        what = f"read {resource_type}"
        return self._json(self._request("GET", f"{resource_type}/{resource_id}", what), what)

    def history_count(self, resource_type: str, resource_id: str) -> int:
        """Number of versions in ``Type/id/_history`` (``total`` if given, else counted, following
        ``next`` links)."""
        what = f"history {resource_type}"
        body = self._json(self._request("GET", f"{resource_type}/{resource_id}/_history", what), what)
        if isinstance(body.get("total"), int):
            return int(body["total"])
        count = 0
        visited: set[str] = set()
        while True:
            count += len(body.get("entry") or [])
            next_url = self._next_link(body, what)
            if next_url is None:
                return count
            if next_url in visited:
                raise FhirPagingError(f"{what}: next links form a cycle")
            visited.add(next_url)
            body = self._json(self._request("GET", next_url, what), what)

    def search(self, resource_type: str, params: QueryParams | None = None) -> list[JsonDict]:
        """One page of ``GET Type?params``: the resources of its ``match``/``include`` entries."""
        what = f"search {resource_type}"
        body = self._json(self._request("GET", resource_type, what, params=params), what)
        return self._bundle_resources(body)

    def all_resources(self, resource_type: str) -> list[JsonDict]:
        """Every resource of a type (test convenience; pages through :meth:`search_since`)."""
        return list(self.search_since(resource_type, None))

    @staticmethod
    def _bundle_resources(bundle: JsonDict) -> list[JsonDict]:
        out: list[JsonDict] = []
        for entry in bundle.get("entry") or []:
            if not isinstance(entry, dict):
                continue
            resource = entry.get("resource")
            search = entry.get("search")
            mode = search.get("mode") if isinstance(search, dict) else None
            if isinstance(resource, dict) and mode != "outcome":
                out.append(resource)
        return out

    def _next_link(self, bundle: JsonDict, what: str) -> str | None:
        for link in bundle.get("link") or []:
            if isinstance(link, dict) and link.get("relation") == "next" and isinstance(link.get("url"), str):
                url = str(link["url"])
                if urlsplit(url)[:2] != self._origin and urlsplit(url).netloc:
                    raise FhirPagingError(f"{what}: next link points at another server; not followed")
                return url
        return None

    def search_since(
        self,
        resource_type: str,
        since: str | None,
        page_size: int = 1000,
        params: QueryParams | None = None,
    ) -> Iterator[JsonDict]:
        """Yield every ``resource_type`` resource with ``meta.lastUpdated >= since`` (all of them
        when ``since`` is None), in ``_lastUpdated`` order, each version at most once.

        ``since`` should be a ``meta.lastUpdated`` value this server gave (e.g. the greatest one
        seen by the previous pull). The request uses ``ge`` so nothing written in the same instant
        as the watermark is missed; the caller sees those boundary resources again and skips them
        by id + versionId (this method does that for the pages of one call). ``params`` adds
        filters (e.g. ``{"_tag:not": "..."}``).

        Paging: when the server returns ``link[rel=next]`` it is followed. Otherwise (Medplum's
        router) each next page is ``_lastUpdated=ge<last value seen>``; a run of more than
        ``page_size`` resources with the same ``lastUpdated`` is stepped through with ``_offset``.
        The iteration ends at the first short page, so it terminates even under concurrent
        writes; resources written after that page are left for the next pull. Raises
        :class:`FhirPagingError` rather than loop or skip when the server ignores ``_sort`` or
        ``_offset``.
        """
        if page_size < 1:
            raise ValueError("page_size must be at least 1")
        what = f"search {resource_type} by _lastUpdated"
        watermark = since  # the server's own string: what we send back in _lastUpdated=ge...
        wm_time = _parse_instant(since) if since else None
        seen_at_wm: set[tuple[str, str | None]] = set()  # versions yielded whose lastUpdated == watermark
        offset = 0  # in watermark paging: resources at == watermark to skip (set only for long ties)
        next_url: str | None = None
        visited: set[str] = set()
        extra = dict(params or {})

        while True:
            if next_url is not None:
                body = self._json(self._request("GET", next_url, what), what)
            else:
                query: dict[str, QueryValue] = dict(extra)
                if watermark is not None:
                    query["_lastUpdated"] = f"ge{watermark}"
                query["_sort"] = "_lastUpdated"
                query["_count"] = str(page_size)
                if offset:
                    query["_offset"] = str(offset)
                body = self._json(self._request("GET", resource_type, what, params=query), what)

            page = [r for r in self._bundle_resources(body) if r.get("resourceType") == resource_type]
            link = self._next_link(body, what)
            query_wm_time = wm_time
            new_count = 0
            prev_time: datetime | None = None
            trailing_run = 0  # resources at the end of the page sharing its last lastUpdated
            for resource in page:
                lu = _last_updated(resource)
                lu_time = _parse_instant(lu)
                if prev_time is not None and lu_time <= prev_time:
                    if lu_time < prev_time:
                        raise FhirPagingError(f"{what}: server did not sort by _lastUpdated; cannot page safely")
                    trailing_run += 1
                else:
                    trailing_run = 1
                prev_time = lu_time
                key = _version_key(resource)
                if wm_time is not None and lu_time < wm_time:
                    # Older than the watermark (a server whose ge is coarser than our instants):
                    # already covered by an earlier page or pull.
                    continue
                if wm_time is not None and lu_time == wm_time:
                    if key in seen_at_wm:
                        continue
                    seen_at_wm.add(key)
                else:
                    watermark, wm_time = lu, lu_time
                    seen_at_wm = {key}
                new_count += 1
                yield resource

            if link is not None:
                if link in visited:
                    raise FhirPagingError(f"{what}: next links form a cycle")
                visited.add(link)
                next_url = link
                continue
            if next_url is not None or len(page) < page_size:
                # End of a linked result set, or a short page: everything up to now has been seen.
                return
            # Watermark paging: the next page starts at the greatest lastUpdated seen so far.
            if query_wm_time is not None and wm_time == query_wm_time:
                # The whole page sat at the old watermark (a run of ties longer than a page): step
                # through the run with _offset.
                if new_count == 0:
                    raise FhirPagingError(
                        f"{what}: more than {page_size} resources share one lastUpdated and the server "
                        "ignores _offset (or reorders them); use a larger page_size"
                    )
                offset += len(page)
            else:
                if trailing_run >= len(page):
                    # The whole page is one run of ties at the new watermark: continue after it.
                    offset = trailing_run
                else:
                    # Re-fetch from the new watermark's start: the few resources at exactly that
                    # instant already yielded are dropped via seen_at_wm, so nothing depends on the
                    # server ordering ties the same way twice.
                    offset = 0
