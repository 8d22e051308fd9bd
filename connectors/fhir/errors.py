"""Errors raised by the FHIR client.

Messages name the operation (method, resource type, interaction) and the server's status and
OperationOutcome summary. They never carry resource bodies, resource ids or query strings: those
may hold patient identifiers, and these messages end up in task logs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from connectors.fhir.client import EntryResult


class FhirError(Exception):
    """Base class for every error the FHIR client raises.

    ``status`` is the HTTP status when the server answered, else None (timeouts, refused
    connections, malformed responses). ``partial_results`` holds the per-entry results of the
    bundles that completed before a batch write failed part-way (empty otherwise), so a caller
    can still record what landed.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        partial_results: Sequence[EntryResult] = (),
    ) -> None:
        super().__init__(message)
        self.status = status
        self.partial_results: list[EntryResult] = list(partial_results)


class FhirTransientError(FhirError):
    """Timeouts, connection failures, 408, 429 and 5xx: worth retrying later.

    The client has already retried (with back-off) before raising this.
    """


class FhirPermanentError(FhirError):
    """Any other 4xx (and malformed responses): retrying the same request will not help."""


class FhirNotFoundError(FhirPermanentError):
    """404 / 410 on a read or history of one resource."""


class FhirPagingError(FhirError):
    """The server's search results cannot be paged safely (unsorted pages, ignored ``_offset``,
    a next-link cycle). Raised instead of looping or silently missing resources."""
