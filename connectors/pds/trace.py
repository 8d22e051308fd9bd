"""What a PDS trace is (`PdsTrace`), what it finds (`PdsCandidate`), and how PDS FHIR API JSON is read into it.

A trace asks the Personal Demographics Service who a set of details (family name, given name, date of birth,
gender, postcode) belongs to, or reads one NHS number. A candidate keeps only what identity matching needs: the NHS
number (hidden from `repr`, so it never reaches a log by accident), its UK Core verification status, whether the
record is restricted (`meta.security` R or V in the v3 Confidentiality system, or with no system: a restricted
record is never disclosed), PDS's own search score, and the version. Names, addresses and the rest of the Patient
are not read.

The readers here are pure functions over parsed JSON: `candidates_of_bundle` for a searchset Bundle (each entry's
`search.score`), `candidate_of_patient` for a read, `error_of_outcome` for an OperationOutcome body.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date
from typing import Any, Final, Protocol

from connectors.pds.errors import (
    PdsError,
    PdsNotFoundError,
    PdsPermanentError,
    PdsRequestError,
    PdsTransientError,
)
from schoolslink.constants import CONFIDENTIALITY_SYSTEM, NHS_NUMBER_SYSTEM, NHS_NUMBER_VERIFICATION_EXT
from schoolslink.identifiers import is_valid_nhs_number

__all__ = ["PdsCandidate", "PdsTrace", "candidate_of_patient", "candidates_of_bundle", "error_of_outcome"]

RESTRICTED_CODES: Final = frozenset({"R", "V"})

# Our own description of the Spine error codes PDS answers with (never PDS's text, which may echo what was sent).
SPINE_CODES: Final[dict[str, str]] = {
    "INVALID_SEARCH_DATA": "the search parameters are not valid",
    "INVALID_RESOURCE_ID": "the NHS number read is not a valid resource id",
    "RESOURCE_NOT_FOUND": "no Patient has that NHS number",
    "PRECONDITION_FAILED": "a required condition (header or version) was not met",
    "RESOURCE_VERSION_MISMATCH": "the version supplied is not the record's current version",
    "TOO_MANY_MATCHES": "too many Patients match the search",
    "MISSING_VALUE": "a required value is missing",
    "INVALID_VALUE": "a value is not valid",
    "ACCESS_DENIED": "access to PDS was denied",
    "UNSUPPORTED_SERVICE": "the service or interaction is not supported",
}
_CODE_SHAPE: Final = re.compile(r"[A-Z][A-Z0-9_]{0,59}")


@dataclass(frozen=True, slots=True)
class PdsCandidate:
    """One Patient PDS holds for the details traced (or the number read)."""

    nhs_number: str = field(repr=False)
    verification: str | None  # UK Core NHS number verification status: '01' number present and verified
    restricted: bool
    score: float | None  # the entry's search.score (1.0: agrees with everything searched); None for a read
    version_id: str | None = None

    @property
    def verified(self) -> bool:
        return self.verification == "01"


class PdsTrace(Protocol):
    """A PDS trace: search by demographics, or read by NHS number. Raises `connectors.pds.errors.PdsError`."""

    def search(self, *, family: str, given: str, birthdate: date | str, gender: str | None = None,
               postcode: str | None = None) -> list[PdsCandidate]:
        """The Patients PDS finds for these details, best first (an empty list: nobody)."""
        ...

    def read(self, nhs_number: str) -> PdsCandidate:
        """The Patient with this NHS number; `PdsNotFoundError` when there is none."""
        ...


def _is_restricted(meta: object) -> bool:
    if meta is None:
        return False
    security = meta.get("security") if isinstance(meta, dict) else None
    if not isinstance(meta, dict) or not isinstance(security or [], list):
        raise PdsPermanentError("PDS Patient: meta.security is not a list of codings: cannot tell if restricted")
    return any(isinstance(s, dict) and s.get("code") in RESTRICTED_CODES
               and s.get("system") in (None, CONFIDENTIALITY_SYSTEM) for s in security or ())


def candidate_of_patient(resource: Mapping[str, Any], score: float | None = None) -> PdsCandidate:
    """A PDS Patient resource -> its candidate. Refuses one with no valid NHS number (naming no value)."""
    if not isinstance(resource, Mapping) or resource.get("resourceType") != "Patient":
        raise PdsPermanentError("PDS answered with something that is not a Patient")
    idents = resource.get("identifier")
    nhs_ident = next((i for i in idents if isinstance(i, dict) and i.get("system") == NHS_NUMBER_SYSTEM), None) \
        if isinstance(idents, list) else None
    nhs = str((nhs_ident or {}).get("value") or resource.get("id") or "").replace(" ", "")
    if not is_valid_nhs_number(nhs):
        raise PdsPermanentError("PDS Patient has no NHS number that passes the modulus 11 check")
    verification = None
    for ext in (nhs_ident or {}).get("extension") or ():
        if isinstance(ext, dict) and ext.get("url") == NHS_NUMBER_VERIFICATION_EXT:
            codings = (ext.get("valueCodeableConcept") or {}).get("coding") or []
            if codings and isinstance(codings[0], dict) and codings[0].get("code"):
                verification = str(codings[0]["code"])
    meta = resource.get("meta")
    version = meta.get("versionId") if isinstance(meta, dict) else None
    return PdsCandidate(nhs, verification, _is_restricted(meta), score,
                        str(version) if version is not None else None)


def candidates_of_bundle(bundle: Mapping[str, Any]) -> list[PdsCandidate]:
    """A searchset Bundle -> its Patients, best score first (a Bundle with no entries: nobody)."""
    if not isinstance(bundle, Mapping) or bundle.get("resourceType") != "Bundle" or bundle.get("type") != "searchset":
        raise PdsPermanentError("PDS search answered with something that is not a searchset Bundle")
    entries = bundle.get("entry") or []
    if not isinstance(entries, list):
        raise PdsPermanentError("PDS search Bundle: entry is not a list")
    out: list[PdsCandidate] = []
    for entry in entries:
        if not isinstance(entry, dict):
            raise PdsPermanentError("PDS search Bundle: an entry is not an object")
        search = entry.get("search")
        raw = search.get("score") if isinstance(search, dict) else None
        if raw is not None and (isinstance(raw, bool) or not isinstance(raw, int | float) or not 0 <= raw <= 1):
            raise PdsPermanentError("PDS search Bundle: search.score is not a number from 0 to 1")
        out.append(candidate_of_patient(entry.get("resource") or {}, float(raw) if raw is not None else None))
    return sorted(out, key=lambda c: c.score if c.score is not None else -1.0, reverse=True)


def error_of_outcome(what: str, status: int, body: object) -> PdsError:
    """The error for a non-2xx answer: its class from the status and Spine code, its message from our own table."""
    code: str | None = None
    if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome":
        for issue in body.get("issue") or ():
            details = issue.get("details") if isinstance(issue, dict) else None
            for coding in (details.get("coding") or ()) if isinstance(details, dict) else ():
                value = coding.get("code") if isinstance(coding, dict) else None
                if isinstance(value, str) and _CODE_SHAPE.fullmatch(value):
                    code = value
                    break
            if code:
                break
    described = f", {code}: {SPINE_CODES.get(code, 'a Spine error code we do not know')}" if code else ""
    message = f"{what}: HTTP {status}{described}"
    if status in (408, 429) or status >= 500:
        return PdsTransientError(message, status=status, code=code)
    if status == 404 or code == "RESOURCE_NOT_FOUND":
        return PdsNotFoundError(message, status=status, code=code)
    if 400 <= status < 500:
        return PdsRequestError(message, status=status, code=code)
    return PdsPermanentError(message, status=status, code=code)
