"""PDS trace: ask the Personal Demographics Service whose NHS number a pupil's details are (optional; off by
default). `trace.py`: the `PdsTrace` protocol, `PdsCandidate`, readers of PDS FHIR JSON; `client.py`: the PDS FHIR
API client (`PdsFhirClient`, configured by `SCHOOLSLINK_PDS_TRACE_URL`); `errors.py`: its errors."""

from connectors.pds.client import PdsFhirClient
from connectors.pds.errors import (
    PdsError,
    PdsNotFoundError,
    PdsPermanentError,
    PdsRequestError,
    PdsTransientError,
)
from connectors.pds.trace import PdsCandidate, PdsTrace

__all__ = ["PdsCandidate", "PdsError", "PdsFhirClient", "PdsNotFoundError", "PdsPermanentError", "PdsRequestError",
           "PdsTrace", "PdsTransientError"]
