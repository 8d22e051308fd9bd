"""What can go wrong talking to MESH, as our own exceptions.

A message's body, subject and local id can hold pupil data, so no exception here ever carries them: the
text says only which operation failed, for which mailbox, and the HTTP status (or the kind of network or TLS
failure). The MESH message id, where there is one, is kept as an attribute for callers that store it, not
in the text. mesh_client's and requests' own exceptions are never chained (``from None``): their text
is not ours to vouch for.

    MeshError                 anything that went wrong
      MeshTransientError      429, 5xx, timeouts, dropped connections: worth trying again later
      MeshAuthError           401/403 (mailbox or password or shared key), and a TLS refusal either way
                              (the server refused our client certificate, or we could not verify the server's)
      MeshPermanentError      any other refusal (unknown recipient, unknown message, bad request): retrying
                              the same request will not help
"""

from __future__ import annotations

__all__ = ["MeshAuthError", "MeshError", "MeshPermanentError", "MeshTransientError"]


class MeshError(Exception):
    """A MESH operation failed. ``str()`` names the operation, the mailbox and the status, nothing more."""

    def __init__(
        self,
        operation: str,
        mailbox: str,
        *,
        status: int | None = None,
        reason: str | None = None,
        message_id: str | None = None,
        maybe_sent: bool = False,
    ) -> None:
        self.operation = operation
        self.mailbox = mailbox
        self.status = status
        self.reason = reason
        self.message_id = message_id
        # Only for sends: the server may have accepted the message even though we saw no answer (a 5xx or a
        # timeout after the upload), so sending it again could deliver it twice. The recipient can tell a
        # repeat by its local id.
        self.maybe_sent = maybe_sent
        super().__init__(self._text())

    def _text(self) -> str:
        what = f"MESH {self.operation} for mailbox {self.mailbox} failed"
        if self.status is not None:
            what += f": HTTP {self.status}"
        if self.reason:
            what += f" ({self.reason})" if self.status is not None else f": {self.reason}"
        return what

    def __reduce__(self) -> tuple[object, ...]:  # picklable across processes (Airflow, multiprocessing)
        return (_rebuild, (type(self), self.operation, self.mailbox, self.status, self.reason, self.message_id,
                           self.maybe_sent))


def _rebuild(cls: type[MeshError], operation: str, mailbox: str, status: int | None, reason: str | None,
             message_id: str | None, maybe_sent: bool) -> MeshError:
    return cls(operation, mailbox, status=status, reason=reason, message_id=message_id, maybe_sent=maybe_sent)


class MeshTransientError(MeshError):
    """Rate limited (429), a server error (5xx), a timeout or a dropped connection: try again later."""


class MeshAuthError(MeshError):
    """The mailbox's credentials (401/403) or our TLS client certificate were refused, or the server's
    certificate could not be verified. Retrying will not help until the configuration is fixed."""


class MeshPermanentError(MeshError):
    """MESH refused the request for a reason that retrying will not change (4xx other than 401/403/429)."""
