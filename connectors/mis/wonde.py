"""Read English schools' MIS data through the Wonde API (wonde.com): a client that pulls a school, and a reader
that turns a landed pull into a `MisExport` (connectors/mis/base.py), like the CTF reader does for a file.

Two halves, with a file between them, so the pull can be sealed the moment it is written
(`connectors.storage.landing.land_bytes`) and read like any other export:

1. `WondeClient.pull(school_id, school_urn, updated_after)` returns one JSON-ready document::

       {"format": "wonde", "version": "v1.0", "school_urn": "<6 digits>", "school_id": "<Wonde id>",
        "pulled_at": "<ISO 8601 UTC, whole seconds>", "updated_after": "<ISO 8601 UTC>" | null,
        "qualifier": "full" | "partial", "students": [...], "leavers": [...], "deletions": [...]}

   `students`, `leavers` and `deletions` hold Wonde's objects exactly as returned. `pulled_at` is taken
   before the first request (rounded down to the second), so it is a safe next watermark: anything changed
   while the pull ran is read again next time. `qualifier` is "full" when `updated_after` is None (the whole
   roll: a learner it no longer lists has left) and "partial" otherwise.

2. `read_wonde(source)` reads that document (a path, bytes or a binary stream) into a `MisExport` with
   format "wonde", version "v1.0", the document's school_urn and qualifier, exported_at = pulled_at, the
   learners with their Wonde student ids (`source_ids`), leavers' UPNs in `left` and deleted students'
   Wonde ids in `deleted_source_ids`.

What Wonde's documentation says, and what this module chose where it is silent
------------------------------------------------------------------------------
From Wonde's API documentation (https://docs.wonde.com/docs/api/sync, https://docs.wonde.com/docs/api/1.0)
and its official client's README (https://github.com/wondeltd/php-client): the base URL is
`https://{domain}/v1.0/schools/` (api.wonde.com for UK schools); a token is sent as
`Authorization: Bearer <token>`; a property the token has no scope for is null; lists are paged with
`meta.pagination` = {next (a URL or null), previous, more (true/false), per_page, current_page}; related
objects are asked for with `include=` (comma-separated: extended_details, contacts, contact_details, ...);
`updated_after` filters by last change, written "YYYY-MM-DD HH:MM:SS"; deletions are listed at
/schools/{id}/deletions; leavers at /schools/{id}/students-leaver (the path the official client uses).

Chosen here, where the documentation found is silent:

- Students are asked for with include=extended_details,contacts,contacts.contact_details (`STUDENT_INCLUDES`)
  and `per_page`; leavers with include=extended_details; deletions with type=student. Every request carries
  its own query; when a `next` link lacks one of those parameters (the documented example shows only
  `page`), the client adds it, so a later page is never unfiltered or missing its includes.
- `updated_after` is sent in UTC, one minute (`WATERMARK_SLACK`) before the watermark. UTC because Wonde
  does not say which zone it reads the time in: UK wall-clock time is never behind UTC, so a UTC time read
  as UK time asks for more, never less; the slack covers clock skew. Reading a change twice is harmless.
- Deletions: each object's `id` is the deleted record's Wonde id; one with a non-null `restored_at`, or a
  `type` other than student, is skipped.
- 429 and 5xx answers, time-outs and dropped connections are retried, at most `max_retries` times: after the
  Retry-After header's seconds (or HTTP date) when it gives one (at most `RETRY_AFTER_CAP`), else after
  1, 2, 4 ... seconds (at most `BACKOFF_CAP`). Then `WondeError`. 401, 403 and 404 raise `WondeError` at
  once with what to do; any other 4xx or 3xx too (redirects are never followed: they could carry the token
  elsewhere).
- Only http(s) base URLs, and plain http only to a loopback address (tests): the token never crosses a
  network in clear. A `next` link to any other scheme, host or port than the base URL's, or to another path
  than the list being read (this school's students, say), is refused (`WondeError`) before anything is sent
  to it: a pagination link must not send the token elsewhere, nor mix another list in. A `next` link already
  followed (a loop) is refused too.
- Time-outs are explicit (`DEFAULT_TIMEOUT`), also on a caller's own httpx.Client.
- Field names. The student fields read (id, surname, forename, legal_surname, legal_forename, middle_names,
  gender, date_of_birth as {date, timezone_type, timezone}) are Wonde's as public integration guides show
  them; the extended-details names (upn, former_upn, uln, sen_status, in_lea_care or looked_after,
  free_school_meals, ethnicity_code) and a contact's relationship {relationship, parental_responsibility,
  priority} and contact_details {emails, telephones} are not in the documentation found. Every one of them is
  named once, in mappings/mis-in/wonde-learner.yaml (and the checks below), so a correction is a line there.
  Gender is read as M/F/U or MALE/FEMALE/UNKNOWN (the `wonde-gender` table); a date of birth's date part is
  taken as stated, with no time-zone arithmetic.

Nothing logged or raised carries pupil data or the token: log lines and `WondeError.reason` name the school's
Wonde id, the endpoint, HTTP status codes, counts and delays only; response bodies are never logged.

What `read_wonde` does with bad input (DESIGN.md, "Bad input")
----------------------------------------------------------------
- A bad *document* raises `connectors.mis.errors.FileRefused` and nothing from it is used: empty, not UTF-8
  JSON, truncated, nested too deeply, not an object, `format` not "wonde", `version` not "v1.0", no 6-digit
  `school_urn`, a `qualifier` that is not full or partial or that disagrees with `updated_after` (a "full"
  pull tells the pipeline who has left, so an incremental one must never pass for it), a `pulled_at` that is
  not an ISO date-time, an `updated_after` that is not one, `students` not a list, `leavers` or `deletions`
  present but not lists. Reasons never quote the document.
- A bad *student* is quarantined (`Quarantined`: record "student#N", its position, from 1; the field; every
  problem found in one reason; never a UPN, name or date) and the rest go on. Checked before the mapping:
  not an object; extended_details.data.upn missing, malformed or with a wrong check letter; a UPN already
  used by an earlier student in the pull (the later ones are quarantined, the reason names the first); no
  surname or forename (legal or not); date_of_birth missing, not a date, or after the pull; no gender; an
  in_lea_care / looked_after that is missing, null (Wonde's null for a property the token may not read) or
  not true or false (it decides who may see a record, so it is never guessed). A gender the `wonde-gender`
  code table does not list is reported among them as "gender is not one of M, F or U"; any other mapping
  error quarantines the record with the mapping's value-free reason.
- A bad *optional item* is dropped by the mapping and the reader adds a `MisWarning` and keeps the learner:
  a ULN that fails its check digit, each former UPN that fails the UPN check (former UPNs are only taken as
  Wonde states them), a free_school_meals that is not true or false, and a sen_status that is not a code of
  the `ctf-sen-provision` table (kept as stated).
- Leavers: each leaver's extended_details.data.upn goes to `left` (or "ULN:" + its ULN when it has no valid
  UPN but a valid ULN); leavers are never learners. A leaver with neither is a warning ("leaver#N"), as is a
  leaver whose UPN is also on the roll in this pull (the roll wins: it is not read as having left).
- Deletions: each id goes to `deleted_source_ids`; one without an id is a warning ("deletion#N").

How a student's values become canonical learner fields is the declarative mapping
`mappings/mis-in/wonde-learner.yaml` (with the `wonde-gender` code table and the functions in
schoolslink/mapping/functions_wonde.py), given `school_urn` as its run variable. Its output must be Learner's
fields (flags nested): a mapping that names anything else, or misses a required field, is a
ConfigurationError when a document is read.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import httpx

from connectors.mis.base import (
    LEARNER_REQUIRED_FIELDS,
    MisExport,
    MisWarning,
    Quarantined,
    checked_learner_mapping,
    learner_from_mapped,
    mapping_error_problems,
    sen_codes,
)
from connectors.mis.errors import FileRefused, MisInputError
from connectors.retry_after import retry_after_seconds
from schoolslink.errors import ConfigurationError
from schoolslink.identifiers import is_valid_uln, is_valid_upn
from schoolslink.mapping.engine import CompiledMapping, MappingError, MappingSet, load_mappings
from schoolslink.mapping.functions_wonde import stated_upns, wonde_bool, wonde_date, wonde_text
from schoolslink.model import Learner

log = logging.getLogger(__name__)

FORMAT: Final = "wonde"
API_VERSION: Final = "v1.0"
STUDENT_INCLUDES: Final[tuple[str, ...]] = ("extended_details", "contacts", "contacts.contact_details")
LEAVER_INCLUDES: Final[tuple[str, ...]] = ("extended_details",)
DEFAULT_TIMEOUT: Final = httpx.Timeout(30.0, connect=10.0)
BACKOFF_BASE: Final = 1.0  # seconds before the first retry when the answer gives no Retry-After
BACKOFF_CAP: Final = 60.0
RETRY_AFTER_CAP: Final = 300.0  # a longer Retry-After is waited for this long (a task must not hang for hours)
WATERMARK_SLACK: Final = dt.timedelta(minutes=1)
_WONDE_TIME: Final = "%Y-%m-%d %H:%M:%S"
_SCHOOL_ID_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
_URN_RE: Final = re.compile(r"\d{6}")
_UPN_SHAPE_RE: Final = re.compile(r"[A-Z]\d{11}[0-9ABCDEFGHJKLMNPQRTUVWXYZ]")
_USER_AGENT: Final = "schoolslink (Wonde client)"


class WondeError(MisInputError):
    """A pull from Wonde failed. `reason` says why and what to do; it never carries pupil data or the token.
    `status` is the HTTP status that ended it, when there was one."""

    def __init__(self, reason: str, *, status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


# The client -------------------------------------------------------------------------------------------------


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _origin(scheme: str, host: str, port: int | None) -> tuple[str, str, int]:
    return scheme, host.lower(), port if port is not None else (443 if scheme == "https" else 80)


def _utc(value: dt.datetime) -> dt.datetime:
    """An aware UTC datetime; a naive one is taken to be UTC."""
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


class WondeClient:
    """Pulls a school's students, leavers and deletions from the Wonde API (see the module docstring)."""

    def __init__(self, base_url: str, token: str, *, client: httpx.Client | None = None, per_page: int = 200,
                 max_retries: int = 5, sleep: Callable[[float], None] = time.sleep) -> None:
        """`base_url`: e.g. https://api.wonde.com/v1.0/ (the school's regional domain). `client`: an httpx
        client to use (closed by its owner); else one is made here and closed by `close()`. `sleep`: how to
        wait between retries (tests pass a recorder). Raises ConfigurationError for a base URL that is not
        http(s), plain http to anything but a loopback address, an empty token, or a bad per_page or
        max_retries."""
        parts = urlsplit(base_url.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigurationError("the Wonde base URL must be an http(s) URL, e.g. https://api.wonde.com/v1.0/")
        if parts.username is not None or parts.password is not None or parts.query or parts.fragment:
            raise ConfigurationError("the Wonde base URL must not carry credentials, a query or a fragment")
        if parts.scheme == "http" and not _is_loopback(parts.hostname):
            raise ConfigurationError("the Wonde base URL must be https (plain http only to a loopback address)")
        try:
            port = parts.port
        except ValueError:
            raise ConfigurationError("the Wonde base URL has a port that is not a number") from None
        if not token or any(c.isspace() for c in token):
            raise ConfigurationError("the Wonde token is empty or contains white space")
        if type(per_page) is not int or per_page < 1:
            raise ConfigurationError("per_page must be a whole number of at least 1")
        if type(max_retries) is not int or max_retries < 0:
            raise ConfigurationError("max_retries must be a whole number of at least 0")
        self._base = urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))
        self._origin = _origin(parts.scheme, parts.hostname, port)
        self._base_path = parts.path.rstrip("/") + "/"
        self._headers = {"Authorization": f"Bearer {token}", "Accept": "application/json",
                         "User-Agent": _USER_AGENT}
        self._owned = client is None
        self._http = client if client is not None else httpx.Client(timeout=DEFAULT_TIMEOUT, follow_redirects=False)
        self._per_page = per_page
        self._max_retries = max_retries
        self._sleep = sleep

    def __repr__(self) -> str:
        return f"WondeClient({self._base!r})"  # never the token

    def close(self) -> None:
        """Close the httpx client if this object made it."""
        if self._owned:
            self._http.close()

    def __enter__(self) -> WondeClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # Endpoints ----------------------------------------------------------------------------------------------

    def students(self, school_id: str, updated_after: dt.datetime | None) -> Iterator[dict[str, Any]]:
        """Every student (changed after `updated_after`, when given), with STUDENT_INCLUDES, page by page."""
        params = {"include": ",".join(STUDENT_INCLUDES), "per_page": str(self._per_page)}
        return self._paged(school_id, "students", params, updated_after)

    def leavers(self, school_id: str, updated_after: dt.datetime | None) -> Iterator[dict[str, Any]]:
        """Every leaver (students-leaver; changed after `updated_after`, when given), with extended_details."""
        params = {"include": ",".join(LEAVER_INCLUDES), "per_page": str(self._per_page)}
        return self._paged(school_id, "students-leaver", params, updated_after)

    def deletions(self, school_id: str, updated_after: dt.datetime | None) -> Iterator[dict[str, Any]]:
        """Every student deletion (changed after `updated_after`, when given)."""
        params = {"type": "student", "per_page": str(self._per_page)}
        return self._paged(school_id, "deletions", params, updated_after)

    def pull(self, school_id: str, school_urn: str, updated_after: dt.datetime | None) -> dict[str, Any]:
        """One pull of a school as a JSON-ready document (its shape is in the module docstring). Raises
        WondeError if any request fails; then nothing was pulled."""
        if type(school_urn) is not str or not _URN_RE.fullmatch(school_urn):
            raise ConfigurationError("school_urn must be the school's 6-digit URN")
        _check_school_id(school_id)
        pulled_at = dt.datetime.now(dt.UTC).replace(microsecond=0)  # before the first request: the next watermark
        since = _utc(updated_after) if updated_after is not None else None
        students = list(self.students(school_id, since))
        leavers = list(self.leavers(school_id, since))
        deletions = list(self.deletions(school_id, since))
        log.info("wonde: school %s: pulled %d students, %d leavers, %d deletions (%s)", school_id, len(students),
                 len(leavers), len(deletions), "full" if since is None else "changes only")
        return {
            "format": FORMAT,
            "version": API_VERSION,
            "school_urn": school_urn,
            "school_id": school_id,
            "pulled_at": pulled_at.isoformat(),
            "updated_after": since.isoformat() if since is not None else None,
            "qualifier": "full" if since is None else "partial",
            "students": students,
            "leavers": leavers,
            "deletions": deletions,
        }

    # Paging and requests ------------------------------------------------------------------------------------

    def _paged(self, school_id: str, endpoint: str, params: dict[str, str],
               updated_after: dt.datetime | None) -> Iterator[dict[str, Any]]:
        _check_school_id(school_id)  # before any request (the generator body runs on the first next())
        if updated_after is not None:
            params["updated_after"] = (_utc(updated_after) - WATERMARK_SLACK).strftime(_WONDE_TIME)
        return self._pages(school_id, endpoint, params)

    def _pages(self, school_id: str, endpoint: str, params: dict[str, str]) -> Iterator[dict[str, Any]]:
        url = f"{self._base}/schools/{school_id}/{endpoint}?{urlencode(params)}"
        followed: set[str] = {url}
        page = 1
        while True:
            body = self._get(url, school_id, endpoint)
            data = body.get("data")
            if type(data) is not list or any(type(item) is not dict for item in data):
                raise WondeError(f"Wonde's answer to the {endpoint} request for school {school_id} is not the "
                                 "documented shape (data is not a list of objects)")
            log.debug("wonde: school %s: %s page %d: %d records", school_id, endpoint, page, len(data))
            yield from data
            meta = body.get("meta")
            pagination = meta.get("pagination") if type(meta) is dict else None
            if type(pagination) is not dict:
                return  # not paged: the one page is all
            nxt = pagination.get("next")
            more = pagination.get("more")
            if more is False or (more is None and not nxt):
                return
            if not nxt or type(nxt) is not str:
                raise WondeError(f"Wonde says there are more {endpoint} pages for school {school_id} but gives no "
                                 "link to the next one")
            url = self._next_url(nxt, params, school_id, endpoint)
            if url in followed:
                raise WondeError(f"Wonde's {endpoint} pages for school {school_id} link back to a page already read")
            followed.add(url)
            page += 1

    def _next_url(self, link: str, params: dict[str, str], school_id: str, endpoint: str) -> str:
        """The next page's URL: only this school's same endpoint on the base URL's scheme, host and port (else
        refused: the token must not go elsewhere, nor another list's pages be mixed in), with any of this
        request's parameters the link lacks added."""
        parts = urlsplit(link)
        try:
            port = parts.port
        except ValueError:
            port = -1
        if (parts.scheme not in ("http", "https") or not parts.hostname or parts.username is not None
                or parts.password is not None or port == -1
                or _origin(parts.scheme, parts.hostname, port) != self._origin
                or parts.path.rstrip("/") != f"{self._base_path}schools/{school_id}/{endpoint}"):
            raise WondeError(f"the next-page link Wonde gave for the {endpoint} of school {school_id} points "
                             "outside the Wonde base URL or to another list; not followed (the token is only ever "
                             "sent to the base URL)")
        query = parse_qsl(parts.query, keep_blank_values=True)
        have = {k for k, _ in query}
        query += [(k, v) for k, v in params.items() if k not in have]
        return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), ""))

    def _get(self, url: str, school_id: str, endpoint: str) -> dict[str, Any]:
        """GET one page (its query is in `url`), retrying 429, 5xx and transport failures; the JSON object it
        answers."""
        attempt = 0
        while True:
            status: int | None = None
            retry_after: float | None = None
            try:
                resp = self._http.get(url, headers=self._headers, timeout=DEFAULT_TIMEOUT, follow_redirects=False)
            except httpx.TimeoutException:
                what = "timed out"
            except httpx.TransportError:
                what = "could not be completed (connection failed or dropped)"
            except httpx.HTTPError as exc:  # e.g. an answer that cannot be decoded: not something a retry mends
                raise WondeError(f"the {endpoint} request for school {school_id} failed ({type(exc).__name__}); "
                                 "not retried") from None
            else:
                status = resp.status_code
                if status == 200:
                    try:
                        body = resp.json()
                    except (ValueError, RecursionError):
                        raise WondeError(f"Wonde's answer to the {endpoint} request for school {school_id} is "
                                         "not JSON", status=status) from None
                    if type(body) is not dict:
                        raise WondeError(f"Wonde's answer to the {endpoint} request for school {school_id} is not "
                                         "a JSON object", status=status)
                    return body
                if status == 401:
                    raise WondeError(f"Wonde refused the token for school {school_id} (HTTP 401): check the token "
                                     "configured for this school", status=status)
                if status == 403:
                    raise WondeError(f"Wonde refused access to school {school_id} (HTTP 403): the school has not "
                                     "approved this application, or the token lacks the scope for "
                                     f"{endpoint}", status=status)
                if status == 404:
                    raise WondeError(f"school {school_id} was not found on Wonde (HTTP 404): check the school id "
                                     "and that the school has approved this application", status=status)
                if status != 429 and not 500 <= status <= 599:
                    raise WondeError(f"Wonde answered HTTP {status} to the {endpoint} request for school "
                                     f"{school_id}; not retried", status=status)
                what = f"got HTTP {status}"
                retry_after = retry_after_seconds(resp.headers.get("Retry-After"), RETRY_AFTER_CAP)
            if attempt >= self._max_retries:
                raise WondeError(f"the {endpoint} request for school {school_id} {what}, still after "
                                 f"{self._max_retries} retries; try again later", status=status)
            delay = retry_after if retry_after is not None else min(BACKOFF_CAP, BACKOFF_BASE * 2**attempt)
            attempt += 1
            log.warning("wonde: school %s: %s request %s; retry %d of %d in %.1f s", school_id, endpoint, what,
                        attempt, self._max_retries, delay)
            self._sleep(delay)


def _check_school_id(school_id: str) -> None:
    if type(school_id) is not str or not _SCHOOL_ID_RE.fullmatch(school_id):
        raise ConfigurationError("a Wonde school id is letters, digits, '-' or '_' (e.g. A1930499544)")


# The reader -------------------------------------------------------------------------------------------------

LEARNER_MAPPING: Final = "wonde-learner"
_GENDER_TABLE: Final = "wonde-gender"
_REQUIRED_FIELDS: Final = LEARNER_REQUIRED_FIELDS


@dataclass(frozen=True, slots=True)
class _LearnerMapping:
    compiled: CompiledMapping
    sen_codes: frozenset[str]


def _learner_mapping(ms: MappingSet | None) -> _LearnerMapping:
    """The compiled wonde-learner mapping, checked against Learner, and the SEN codes read without a warning."""
    ms = ms if ms is not None else load_mappings()
    return _LearnerMapping(checked_learner_mapping(ms, LEARNER_MAPPING), sen_codes(ms))


def _read_source(source: Path | bytes | IO[bytes]) -> bytes:
    if isinstance(source, os.PathLike):
        return Path(source).read_bytes()
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    data = source.read()
    if not isinstance(data, (bytes, bytearray)):
        raise TypeError("read_wonde reads bytes: open the file in binary mode")
    return bytes(data)


def _no_constants(_name: str) -> Any:
    raise ValueError("NaN and Infinity are not JSON")


_LITERALS: Final = ("true", "false", "null")
_NUMBER_HEAD_RE: Final = re.compile(r"-?\d*(?:\.\d*)?(?:[eE][+-]?\d*)?")


def _ran_out(text: str, err: json.JSONDecodeError) -> bool:
    """Whether a JSON document that starts like one failed only because its input ran out (truncation): the
    error is at its end, inside a string never closed, or on a value cut short (`fal`, `-1.`, a `\\u` escape)."""
    body = text.rstrip()
    if not body.lstrip().startswith(("{", "[")):
        return False
    if err.pos >= len(body) or err.msg.startswith("Unterminated string"):
        return True
    rest = body[err.pos:]
    if err.msg.startswith("Expecting value") and any(lit.startswith(rest) for lit in _LITERALS):
        return True
    if _NUMBER_HEAD_RE.fullmatch(rest) is not None:  # a number cut short: "-", "1.", "1e+"
        return True
    return err.msg.startswith("Invalid \\uXXXX") and re.fullmatch(r"u[0-9A-Fa-f]{0,3}", rest) is not None


def _parse(raw: bytes) -> Any:
    if not raw.strip():
        raise FileRefused("file is empty")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise FileRefused("file is not UTF-8 text: a Wonde pull is a JSON document") from None
    try:
        return json.loads(text, parse_constant=_no_constants)
    except json.JSONDecodeError as err:
        if _ran_out(text, err):
            raise FileRefused("file is truncated: the JSON document ends before it is complete") from None
        raise FileRefused(f"file is not JSON (line {err.lineno}): a Wonde pull is a JSON document") from None
    except ValueError:  # NaN / Infinity (refused above), or a number too long to read
        raise FileRefused("file is not JSON a Wonde pull can hold: NaN, Infinity or an over-long number") from None
    except RecursionError:
        raise FileRefused("file's JSON is nested too deeply to be a Wonde pull") from None


def _iso_datetime(value: Any) -> dt.datetime | None:
    if type(value) is not str or not value:
        return None
    try:
        return _utc(dt.datetime.fromisoformat(value))
    except ValueError:
        return None


@dataclass(slots=True)
class _Document:
    school_urn: str
    qualifier: str
    pulled_at: dt.datetime
    students: list[Any]
    leavers: list[Any]
    deletions: list[Any]


def _document(doc: Any) -> _Document:
    """The pull document's header fields and lists, or FileRefused (reasons never quote the document)."""
    if type(doc) is not dict:
        raise FileRefused("file is not a Wonde pull: its JSON is not an object")
    if doc.get("format") != FORMAT:
        raise FileRefused("file is not a Wonde pull: its format is not 'wonde'")
    if doc.get("version") != API_VERSION:
        raise FileRefused(f"the pull's version is not {API_VERSION}, the only Wonde API version read here")
    urn = doc.get("school_urn")
    if type(urn) is not str or not _URN_RE.fullmatch(urn):
        raise FileRefused("the pull has no 6-digit school_urn: cannot tell which school it is from")
    qualifier = doc.get("qualifier")
    if qualifier not in ("full", "partial"):
        raise FileRefused("the pull's qualifier must be 'full' or 'partial'")
    pulled_at = _iso_datetime(doc.get("pulled_at"))
    if pulled_at is None:
        raise FileRefused("the pull's pulled_at is missing or not an ISO date-time")
    since = doc.get("updated_after")
    if since is not None and _iso_datetime(since) is None:
        raise FileRefused("the pull's updated_after is not an ISO date-time")
    if (qualifier == "full") != (since is None):
        raise FileRefused("the pull's qualifier disagrees with its updated_after: a full pull has none, a partial "
                          "pull has one")
    students = doc.get("students")
    if type(students) is not list:
        raise FileRefused("the pull's students is not a list")
    lists: dict[str, list[Any]] = {}
    for name in ("leavers", "deletions"):
        v = doc.get(name)
        if v is None:
            lists[name] = []
        elif type(v) is list:
            lists[name] = v
        else:
            raise FileRefused(f"the pull's {name} is not a list")
    return _Document(urn, str(qualifier), pulled_at, students, lists["leavers"], lists["deletions"])


def _data_of(value: Any) -> dict[str, Any]:
    """An included object's fields ({"data": {...}} in Wonde), or {} when it is not there."""
    if type(value) is dict:
        inner = value.get("data")
        if type(inner) is dict:
            return inner
    return {}


def _first_stated(*values: Any) -> Any:
    return next((v for v in values if v is not None and v != ""), None)


_GENDER_TABLES: Final = frozenset({_GENDER_TABLE})


class _Reader:
    """State of one read of one pull document."""

    def __init__(self, mapping: _LearnerMapping, doc: _Document) -> None:
        self.compiled = mapping.compiled
        self.sen_codes = mapping.sen_codes
        self.doc = doc
        self.context = {"school_urn": doc.school_urn}
        self.pull_date = doc.pulled_at.date()
        self.seen: dict[str, int] = {}
        self.warnings: list[MisWarning] = []

    def warn(self, record: str, field: str, message: str) -> None:
        kind, _, pos = record.partition("#")
        self.warnings.append(MisWarning(record, field, f"{message} ({kind} #{pos})"))

    def read(self) -> MisExport:
        out = MisExport(format=FORMAT, version=API_VERSION, school_urn=self.doc.school_urn,
                        qualifier=self.doc.qualifier, exported_at=self.doc.pulled_at)
        for pos, student in enumerate(self.doc.students, 1):
            item = self.student(student, pos)
            if type(item) is Learner:
                out.learners.append(item)
                sid = student.get("id")
                out.source_ids.append(sid if type(sid) is str and sid else None)
            else:
                assert type(item) is Quarantined
                out.quarantined.append(item)
        out.records = len(self.doc.students)
        out.left = self.leavers()
        out.deleted_source_ids = self.deletions()
        out.warnings = self.warnings
        return out

    # Students -------------------------------------------------------------------------------------------

    def student(self, s: Any, pos: int) -> Learner | Quarantined:
        """Check a student's values (quarantining a bad record), map them with wonde-learner, warn of what was
        dropped. Reasons and warnings give the position, never a value."""
        if type(s) is not dict:
            return _quarantined(pos, [("student", "the student record is not an object")])
        ext = _data_of(s.get("extended_details"))
        problems: list[tuple[str, str]] = []

        # UPN: required, valid, unique in the pull.
        upn = (wonde_text(ext.get("upn")) or "").upper()
        if not upn:
            problems.append(("upn", "UPN is missing (extended_details.upn)"))
        elif not is_valid_upn(upn):
            if _UPN_SHAPE_RE.fullmatch(upn):
                problems.append(("upn", "UPN check letter is wrong"))
            else:
                problems.append(
                    ("upn", "UPN is not a UPN (13 characters: a check letter, 11 digits, a digit or letter)"))
        else:
            first = self.seen.get(upn)
            if first is None:
                self.seen[upn] = pos
            else:
                problems.append(("upn", f"duplicate UPN in the pull: the same UPN as student #{first}, which is kept"))

        if _first_stated(wonde_text(s.get("legal_surname")), wonde_text(s.get("surname"))) is None:
            problems.append(("surname", "surname is missing"))
        if _first_stated(wonde_text(s.get("legal_forename")), wonde_text(s.get("forename"))) is None:
            problems.append(("forename", "forename is missing"))

        try:
            dob_s = wonde_date(s.get("date_of_birth"))
        except ValueError:
            problems.append(("date_of_birth", "date_of_birth is not a date"))
        else:
            if dob_s is None:
                problems.append(("date_of_birth", "date_of_birth is missing"))
            elif dt.date.fromisoformat(dob_s) > self.pull_date:
                problems.append(("date_of_birth", "date_of_birth is after the date of the pull"))

        gender_stated = wonde_text(s.get("gender")) is not None
        if not gender_stated:
            problems.append(("gender", "gender is missing"))
        gender_at = len(problems)

        # Who may see a record depends on this flag: never guessed. Wonde gives null for a property the token
        # may not read, so a missing flag is not "not looked after": the record waits until it is stated.
        care = _first_stated(ext.get("in_lea_care"), ext.get("looked_after"))
        if care is None:
            problems.append(("in_lea_care", "in_lea_care (looked after) is not given: check the Wonde token may "
                                            "read extended details"))
        else:
            try:
                wonde_bool(care)
            except ValueError:
                problems.append(("in_lea_care", "in_lea_care (looked after) is not true or false"))

        if problems and not gender_stated:
            return _quarantined(pos, problems)
        # The mapping runs on a record with problems too when it states a gender: its code table says if the
        # code is another problem (the mapping looks the gender up first, so nothing else can fail before).
        try:
            out = self.compiled.run(s, self.context, record_key=f"student#{pos}")
        except MappingError as exc:
            return _quarantined(pos, mapping_error_problems(exc, problems, _GENDER_TABLES, gender_at, "gender"))
        if problems:
            return _quarantined(pos, problems)

        # The canonical learner: the mapping's output, with its dates as dates and its flags as LearnerFlags.
        try:
            learner = learner_from_mapped(out)
        except (KeyError, TypeError, ValueError):
            gave = [f for f in _REQUIRED_FIELDS if f not in out]
            what = f"no {', '.join(gave)}" if gave else "a date that is not a date or flags that are not flags"
            return _quarantined(pos, [("mapping", f"the {LEARNER_MAPPING} mapping gave {what}")])

        # Optional items the mapping dropped: warned about, as Wonde states them.
        record = f"student#{pos}"
        if wonde_text(ext.get("uln")) is not None and learner.uln is None:
            self.warn(record, "uln", "ULN fails its check digit; dropped")
        for former in stated_upns(ext.get("former_upn")):
            if not is_valid_upn(former):
                self.warn(record, "former_upn", "a former UPN fails the UPN check; dropped")
        if _first_stated(ext.get("free_school_meals")) is not None and learner.fsm_eligible is None:
            self.warn(record, "free_school_meals", "free_school_meals is not true or false; ignored")
        if learner.sen_provision not in self.sen_codes:
            self.warn(record, "sen_status", "sen_status is not E, K, N or S; kept as stated")
        return learner

    # Leavers and deletions ------------------------------------------------------------------------------

    def leavers(self) -> list[str]:
        left: list[str] = []
        for pos, leaver in enumerate(self.doc.leavers, 1):
            record = f"leaver#{pos}"
            ext = _data_of(leaver.get("extended_details")) if type(leaver) is dict else {}
            upn = (wonde_text(ext.get("upn")) or "").upper()
            uln = wonde_text(ext.get("uln"))
            if upn and is_valid_upn(upn):
                on_roll = self.seen.get(upn)
                if on_roll is not None:
                    self.warn(record, "upn", f"this leaver is also on the roll in this pull (student #{on_roll}); "
                                             "not read as having left")
                    continue
                ident = upn
            elif uln is not None and is_valid_uln(uln):
                ident = f"ULN:{uln}"
            else:
                self.warn(record, "upn", "leaver has no valid UPN or ULN: cannot tell which learner left; ignored")
                continue
            if ident not in left:
                left.append(ident)
        return left

    def deletions(self) -> list[str]:
        ids: list[str] = []
        for pos, d in enumerate(self.doc.deletions, 1):
            if type(d) is not dict:
                self.warn(f"deletion#{pos}", "id", "deletion is not an object; ignored")
                continue
            kind = d.get("type")
            if kind is not None and kind != "student":
                continue  # only student deletions are asked for; anything else is not ours to apply
            if d.get("restored_at") not in (None, ""):
                continue  # deleted, then restored: the record stands
            sid = d.get("id")
            if type(sid) is not str or not sid.strip():
                self.warn(f"deletion#{pos}", "id", "deletion has no id; ignored")
                continue
            if sid not in ids:
                ids.append(sid)
        return ids


def _quarantined(pos: int, problems: list[tuple[str, str]]) -> Quarantined:
    return Quarantined(f"student#{pos}", problems[0][0],
                       f"{'; '.join(reason for _, reason in problems)} (student #{pos})")


def read_wonde(source: Path | bytes | IO[bytes], *, mappings: MappingSet | None = None) -> MisExport:
    """Read a landed Wonde pull document (what `WondeClient.pull` returns, as JSON): a path, the bytes, or a
    binary stream (e.g. a sealed file opened for reading). Raises FileRefused for a document that must not be
    used (then nothing from it is returned); quarantines bad students and warns of dropped items (see the module
    docstring). `mappings`: where the wonde-learner mapping comes from (default: `load_mappings()`)."""
    mapping = _learner_mapping(mappings)  # a broken mapping is a ConfigurationError, not the document's
    doc = _document(_parse(_read_source(source)))
    return _Reader(mapping, doc).read()
