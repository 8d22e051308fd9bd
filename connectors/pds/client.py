"""A PDS trace over the PDS FHIR API (R4): `GET /Patient?family=&given=&birthdate=eq&gender=&address-postalcode=`
and `GET /Patient/{nhs}`, as NHS England's Personal Demographics Service (and its sandbox) answer them.

Optional and off by default: `PdsFhirClient.from_env()` gives a client only when `SCHOOLSLINK_PDS_TRACE_URL` names
a PDS FHIR base (e.g. `https://sandbox.api.service.nhs.uk/personal-demographics/FHIR/R4`, or a trust's own
gateway to PDS). `SCHOOLSLINK_PDS_TOKEN`, when set, is sent as a bearer token; how a token is obtained (NHS
England's signed-JWT application access) is the gateway's or the operator's business, not this client's.

Every request carries a fresh `X-Request-ID` (PDS requires one). Timeouts, connection failures, 408, 429 and 5xx are
retried with back-off (honouring `Retry-After`), then raised as `PdsTransientError`; other answers become the errors
of `connectors.pds.errors`, described from the Spine code only. Nothing this module logs or raises holds what was
searched for or the number read: httpx's own request log lines for PDS URLs are cut to the base.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import time
import uuid
from collections.abc import Callable, Mapping
from datetime import date
from typing import Any, Final

import httpx

from connectors.pds.errors import PdsPermanentError, PdsRequestError, PdsTransientError
from connectors.pds.trace import PdsCandidate, candidate_of_patient, candidates_of_bundle, error_of_outcome
from connectors.retry_after import retry_after_seconds

__all__ = ["ENV_AUTH", "ENV_URL", "PdsFhirClient"]

ENV_URL: Final = "SCHOOLSLINK_PDS_TRACE_URL"
ENV_AUTH: Final = "SCHOOLSLINK_PDS_TOKEN"
FHIR_JSON: Final = "application/fhir+json"
RETRY_AFTER_CAP_S: Final = 30.0
_GENDERS: Final = {"M": "male", "MALE": "male", "F": "female", "FEMALE": "female", "O": "other", "OTHER": "other",
                   "U": "unknown", "UNKNOWN": "unknown"}
_DIGITS: Final = re.compile(r"\d{10}")

log = logging.getLogger(__name__)


class _RedactPdsUrls(logging.Filter):
    """Cuts PDS request URLs in httpx's `HTTP Request: GET <url>` log lines to the base: the path holds an NHS
    number on a read, the query the details searched for."""

    def __init__(self) -> None:
        super().__init__()
        self.bases: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple):
            record.args = tuple(self._cut(a) for a in args)
        return True

    def _cut(self, arg: object) -> object:
        if isinstance(arg, httpx.URL | str):
            text = str(arg)
            for base in self.bases:
                if text.startswith(base):
                    return base + "/<redacted>"
        return arg


_REDACT = _RedactPdsUrls()


def _redact(base_url: str) -> None:
    """Cut httpx's log lines for requests under `base_url` (installed on first use; idempotent)."""
    httpx_log = logging.getLogger("httpx")
    if _REDACT not in httpx_log.filters:
        httpx_log.addFilter(_REDACT)
    _REDACT.bases.add(base_url)


class PdsFhirClient:
    """`PdsTrace` over the PDS FHIR API. `base_url` is the FHIR base (requests go to `<base>/Patient...`)."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 10.0,
        max_retries: int = 2,
        backoff_base: float = 0.5,
        backoff_max: float = 10.0,
        headers: Mapping[str, str] | None = None,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        self.base_url = base_url.rstrip("/")
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self._sleep = sleep
        _redact(self.base_url)
        self._http = httpx.Client(
            base_url=self.base_url + "/",
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            headers={"Accept": FHIR_JSON, "User-Agent": "schoolslink-pds-trace", **(headers or {})},
            transport=transport,
            follow_redirects=False,
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> PdsFhirClient | None:
        """The configured trace, or None when `SCHOOLSLINK_PDS_TRACE_URL` is unset (the default: no trace)."""
        env = os.environ if environ is None else environ
        url = (env.get(ENV_URL) or "").strip()
        if not url:
            return None
        token = (env.get(ENV_AUTH) or "").strip()
        return cls(url, headers={"Authorization": f"Bearer {token}"} if token else None)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> PdsFhirClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- the trace ------------------------------------------------------------------------------------------------

    def search(self, *, family: str, given: str, birthdate: date | str, gender: str | None = None,
               postcode: str | None = None) -> list[PdsCandidate]:
        """PDS's default (non-fuzzy) search. Family name, given name and date of birth are required."""
        dob = birthdate.isoformat() if isinstance(birthdate, date) else str(birthdate or "")[:10]
        if not (str(family or "").strip() and str(given or "").strip() and dob):
            raise PdsRequestError("PDS search: family name, given name and date of birth are all needed")
        params: dict[str, str] = {"family": str(family).strip(), "given": str(given).strip(), "birthdate": f"eq{dob}"}
        g = _GENDERS.get(str(gender or "").strip().upper())
        if g:
            params["gender"] = g
        if postcode and str(postcode).strip():
            params["address-postalcode"] = " ".join(str(postcode).split()).upper()
        return candidates_of_bundle(self._get("Patient", params, "PDS search"))

    def read(self, nhs_number: str) -> PdsCandidate:
        """`GET /Patient/{nhs}`. An NHS number that is not ten digits is refused here, before anything is sent."""
        nhs = str(nhs_number or "").replace(" ", "")
        if not _DIGITS.fullmatch(nhs):
            raise PdsRequestError("PDS read: an NHS number is ten digits")
        return candidate_of_patient(self._get(f"Patient/{nhs}", None, "PDS read"))

    # -- transport ------------------------------------------------------------------------------------------------

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        ceiling: float = min(self.backoff_max, self.backoff_base * 2.0**attempt)
        delay = ceiling / 2 + random.uniform(0, ceiling / 2)
        return max(delay, retry_after) if retry_after is not None else delay

    def _get(self, path: str, params: Mapping[str, str] | None, what: str) -> dict[str, Any]:
        attempt = 0
        while True:
            retry_after: float | None = None
            try:
                response = self._http.get(path, params=params, headers={"X-Request-ID": str(uuid.uuid4())})
            except httpx.TimeoutException as exc:
                failure: Exception = PdsTransientError(f"{what}: timed out ({type(exc).__name__})")
            except httpx.TransportError as exc:
                failure = PdsTransientError(f"{what}: connection failed ({type(exc).__name__})")
            else:
                if 200 <= response.status_code < 300:
                    return _json_object(response, what)
                failure = error_of_outcome(what, response.status_code, _json_or_none(response))
                if not isinstance(failure, PdsTransientError):
                    raise failure
                retry_after = retry_after_seconds(response.headers.get("retry-after"), RETRY_AFTER_CAP_S)
            if attempt >= self.max_retries:
                raise failure
            delay = self._backoff(attempt, retry_after)
            log.warning("%s; retrying in %.2fs (attempt %d of %d)", failure, delay, attempt + 2, self.max_retries + 1)
            self._sleep(delay)
            attempt += 1


def _json_or_none(response: httpx.Response) -> object:
    try:
        return json.loads(response.content)
    except ValueError:
        return None


def _json_object(response: httpx.Response, what: str) -> dict[str, Any]:
    body = _json_or_none(response)
    if not isinstance(body, dict):
        raise PdsPermanentError(f"{what}: HTTP {response.status_code} but the body is not a JSON object",
                                status=response.status_code)
    return body
