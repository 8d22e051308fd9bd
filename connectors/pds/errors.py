"""Errors raised by the PDS trace client.

    PdsError                    base: `status` (HTTP, or None) and `code` (the Spine error code, or None)
    ├── PdsTransientError       timeouts, refused connections, 408, 429, 5xx (after the client's retries)
    └── PdsPermanentError       any other 4xx, or a response that is not what PDS sends
        ├── PdsRequestError     PDS refused the request (INVALID_SEARCH_DATA, INVALID_RESOURCE_ID, ...)
        └── PdsNotFoundError    no Patient has that NHS number (RESOURCE_NOT_FOUND)

Messages name the operation, the HTTP status and the Spine code with our own description of it. They never carry
what was searched for, the NHS number read, or PDS's `diagnostics` text (which can echo the values searched).
"""

from __future__ import annotations


class PdsError(Exception):
    """Base of every error the PDS trace client raises."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class PdsTransientError(PdsError):
    """PDS was slow or down: worth trying again on a later run."""


class PdsPermanentError(PdsError):
    """Retrying the same request will not help."""


class PdsRequestError(PdsPermanentError):
    """PDS refused the request as it was made (the Spine code says why)."""


class PdsNotFoundError(PdsPermanentError):
    """No Patient has the NHS number read."""
