"""A thin, typed wrapper over NHS England's ``mesh_client.MeshClient``: MESH (Message Exchange for Social care
and Health) as the rest of schoolslink needs it.

    config = MeshConfig(url=..., mailbox="X26ABC1", password=..., shared_key=..., client_cert=..., client_key=...,
                        ca_bundle=...)
    with MeshConnector(config) as mesh:
        message_id = mesh.send("X26ABC2", WORKFLOW_CONTEXT, data, local_id=str(uuid4()))
        for mid in mesh.inbox():
            data = mesh.download(mid)
            ...  # land it durably first, then:
            mesh.acknowledge(mid)

What this adds to mesh_client, and why:

* **Our exceptions** (:mod:`connectors.mesh.errors`): callers decide between "try again later"
  (:class:`MeshTransientError`), "fix the configuration" (:class:`MeshAuthError`) and "this will never work"
  (:class:`MeshPermanentError`) without reading HTTP codes, and no exception text ever carries a body, subject
  or local id (they can hold pupil data).
* **Retries we can reason about**: mesh_client's own urllib3 retries are switched off; we retry 429, 5xx,
  timeouts and dropped connections with exponential back-off and jitter, honouring ``Retry-After``. The first
  upload of a message (``POST .../outbox``) is retried only when the server cannot have accepted it (a 429, or
  no connection was ever made), because a retry after a 5xx or a timeout could deliver it twice; later chunks
  are safe to re-send. Downloads restart from the first byte.
* **TLS always verified**: with an ``https`` URL the server's certificate is checked against ``ca_bundle``
  (else mesh_client's NHS bundle for a known NHS endpoint, else the usual public CAs) and its host name is
  checked. There is deliberately no option to turn verification off. Plain ``http`` is accepted only for a
  loopback address (a local test server); real MESH is always mutual TLS.
* **A clear answer when MESH refuses our client certificate.** Under TLS 1.3 a server checks the client's
  certificate after the client thinks the handshake is done, and many servers then just close the
  connection, which looks like any dropped connection. When a connection drops, we make one short probe
  connection with the same certificates: if the server takes our request there, the drop was transient; if it
  closes again straight after the handshake, it is refusing our certificate (:class:`MeshAuthError`).
* **Chunking** both ways: a message larger than ``max_chunk_size`` is uploaded in chunks; a chunked message is
  reassembled on download, and :meth:`MeshConnector.download_to` streams it into a file so a big message never
  sits in memory.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import logging
import math
import random
import socket
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final, TypeVar, cast
from urllib.parse import urlparse

import requests
from mesh_client import MeshClient, Message, try_get_endpoint_from_url

from connectors.mesh.errors import MeshAuthError, MeshError, MeshPermanentError, MeshTransientError
from connectors.retry_after import retry_after_seconds

__all__ = [
    "WORKFLOW_CONTEXT",
    "WORKFLOW_CONTEXT_ACK",
    "MeshConfig",
    "MeshConnector",
    "ReceivedMessage",
    "TrackingInfo",
]

log = logging.getLogger(__name__)

#: Our own MESH workflow ids. A school's context for a CYPMHS (and anything else we send a trust) travels as
#: SCHOOLSLINK_CONTEXT; the other side's acknowledgement or reply as SCHOOLSLINK_CONTEXT_ACK. MESH routes and
#: permits by workflow id, so both sides' mailboxes must be registered for them.
WORKFLOW_CONTEXT: Final = "SCHOOLSLINK_CONTEXT"
WORKFLOW_CONTEXT_ACK: Final = "SCHOOLSLINK_CONTEXT_ACK"

CLIENT_CERT_REFUSED: Final = "the MESH server refused our TLS client certificate"
SERVER_CERT_UNVERIFIED: Final = "we could not verify the MESH server's TLS certificate against our CA bundle"
_LOOPBACK: Final = frozenset({"127.0.0.1", "localhost", "::1"})
RETRY_AFTER_CAP_S: Final = 300.0  # a longer Retry-After is waited for this long: a task must not hang for hours
_TRANSIENT_STATUS: Final = frozenset({408, 425, 429, 500, 502, 503, 504})
# OpenSSL alert reasons a server sends when it will not take our certificate (a server that says so, rather
# than just closing the connection).
_CERT_ALERTS: Final = (
    "CERTIFICATE_REQUIRED", "UNKNOWN_CA", "BAD_CERTIFICATE", "CERTIFICATE_UNKNOWN", "CERTIFICATE_EXPIRED",
    "CERTIFICATE_REVOKED", "UNSUPPORTED_CERTIFICATE", "ACCESS_DENIED", "HANDSHAKE_FAILURE",
)
_CONNECT_FAILURES: Final = ("NewConnectionError", "Failed to establish a new connection", "Connection refused",
                            "NameResolutionError")
T = TypeVar("T")
#: The keys a mesh.json may hold (MeshConfig.from_mapping).
CONFIG_KEYS: Final = ("url", "mailbox", "password", "shared_key", "client_cert", "client_key", "ca_bundle",
                      "connect_timeout_s", "read_timeout_s", "max_chunk_size", "max_attempts", "backoff_base_s",
                      "backoff_max_s", "max_retry_after_s")


# -- configuration ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MeshConfig:
    """How to reach one MESH mailbox.

    ``shared_key`` is the MESH environment's shared secret that signs each request's authorisation token; it
    has no default (mesh_client would otherwise fall back to a well-known value, and a request signed with the
    wrong key is refused as a bad password would be). ``client_cert``/``client_key``: the mailbox's TLS client
    certificate and key (PEM), both or neither. ``ca_bundle``: the CA certificates that MESH's server
    certificate must chain to. Passwords and keys are left out of ``repr``.
    """

    url: str
    mailbox: str
    password: str = field(repr=False)
    shared_key: str = field(repr=False)
    client_cert: Path | None = None
    client_key: Path | None = None
    ca_bundle: Path | None = None
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 120.0
    max_chunk_size: int = 20 * 1024 * 1024  # MESH takes chunks up to 100 MB; smaller keeps our memory flat
    max_attempts: int = 4  # per operation, the first try included
    backoff_base_s: float = 0.5
    backoff_max_s: float = 30.0
    max_retry_after_s: float = 120.0  # a longer Retry-After is not waited for: the error goes to the caller
    application_name: str = "schoolslink"

    def __post_init__(self) -> None:
        parsed = urlparse(self.url)
        if parsed.scheme == "http":
            if parsed.hostname not in _LOOPBACK:
                raise ValueError("MESH url must be https:// (plain http is accepted only for a loopback test server)")
        elif parsed.scheme != "https" or not parsed.hostname:
            raise ValueError("MESH url must be https://host[:port]")
        for name in ("mailbox", "password", "shared_key"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"MESH {name} is required")
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("MESH client_cert and client_key go together: give both or neither")
        if self.max_chunk_size < 1 or self.max_attempts < 1:
            raise ValueError("MESH max_chunk_size and max_attempts must be 1 or more")

    @property
    def tls(self) -> bool:
        return urlparse(self.url).scheme == "https"

    @classmethod
    def from_mapping(cls, doc: Mapping[str, Any], base_dir: Path | None = None) -> MeshConfig:
        """Build from a JSON-style mapping (``mesh.json``); relative certificate paths are under ``base_dir``.

        Unknown keys are refused, so a misspelt key (or an attempt at a "verify": false) is an error rather than
        silently ignored.
        """
        unknown = sorted(set(doc) - set(CONFIG_KEYS))
        if unknown:
            raise ValueError(f"unknown MESH config keys: {', '.join(unknown)} (known: {', '.join(CONFIG_KEYS)})")
        missing = [k for k in ("url", "mailbox", "password", "shared_key") if not doc.get(k)]
        if missing:
            raise ValueError(f"MESH config needs {', '.join(missing)}")

        def path(key: str) -> Path | None:
            value = doc.get(key)
            if value in (None, ""):
                return None
            p = Path(str(value)).expanduser()
            return p if p.is_absolute() or base_dir is None else base_dir / p

        numbers: dict[str, Any] = {}
        for key in ("connect_timeout_s", "read_timeout_s", "backoff_base_s", "backoff_max_s", "max_retry_after_s"):
            if key in doc:
                numbers[key] = float(doc[key])
        for key in ("max_chunk_size", "max_attempts"):
            if key in doc:
                numbers[key] = int(doc[key])
        return cls(url=str(doc["url"]), mailbox=str(doc["mailbox"]).upper(), password=str(doc["password"]),
                   shared_key=str(doc["shared_key"]), client_cert=path("client_cert"), client_key=path("client_key"),
                   ca_bundle=path("ca_bundle"), **numbers)


# -- results ------------------------------------------------------------------------------------------------


def _timestamp(value: object) -> dt.datetime | None:
    if not value or not isinstance(value, str):
        return None
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        try:
            parsed = dt.datetime.strptime(value, "%Y%m%d%H%M%S")
        except ValueError:
            return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=dt.UTC)


@dataclass(frozen=True, slots=True)
class TrackingInfo:
    """What MESH says about a message we sent.

    ``acknowledged``: the recipient downloaded it and acknowledged it (MESH's proof of delivery).
    ``downloaded``: the recipient has it; MESH only tells a sender about a download once it is acknowledged,
    so this is true exactly when ``acknowledged`` is (or MESH reports a ``downloaded`` status).
    ``failed``: MESH gave up on it (an error or undeliverable status); it will never be delivered.
    """

    message_id: str
    status: str  # lower case, as MESH says it: uploading, accepted, acknowledged, error, undeliverable ...
    recipient: str | None
    acknowledged: bool
    downloaded: bool
    failed: bool
    status_code: str | None = None
    status_timestamp: dt.datetime | None = None
    upload_timestamp: dt.datetime | None = None
    expiry_time: dt.datetime | None = None

    @classmethod
    def from_response(cls, message_id: str, doc: Mapping[str, Any]) -> TrackingInfo:
        status = str(doc.get("status") or doc.get("statusDescription") or "").strip().lower()
        acknowledged = status == "acknowledged"
        failed = status in {"error", "undeliverable", "failed", "expired"} or doc.get("status_success") is False
        return cls(
            message_id=str(doc.get("message_id") or message_id),
            status=status,
            recipient=doc.get("recipient"),
            acknowledged=acknowledged,
            downloaded=acknowledged or status == "downloaded",
            failed=failed and not acknowledged,
            status_code=doc.get("status_code"),
            status_timestamp=_timestamp(doc.get("status_timestamp")),
            upload_timestamp=_timestamp(doc.get("upload_timestamp")),
            expiry_time=_timestamp(doc.get("expiry_time")),
        )


@dataclass(frozen=True, slots=True)
class ReceivedMessage:
    """A message downloaded from our inbox (metadata only; the bytes went where the caller asked).

    ``local_id`` and ``subject`` are the sender's and may hold anything, pupil data included: store them if you
    must, never log them.
    """

    message_id: str
    sender: str | None
    workflow_id: str | None
    filename: str | None
    local_id: str | None = field(repr=False)
    subject: str | None = field(repr=False)
    chunks: int
    byte_count: int
    sha256: str


# -- failures -----------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Failure:
    error: MeshError
    retry_after: float | None = None
    reached_server: bool = True  # False: no connection was made, so nothing can have been accepted


def _chain_text(exc: BaseException) -> str:
    """Everything the exception and its causes say, to search for known failure kinds (never shown)."""
    parts: list[str] = []
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        cur = todo.pop()
        if id(cur) in seen:
            continue
        seen.add(id(cur))
        parts.append(f"{type(cur).__name__}: {cur!r}")
        for nxt in (cur.__cause__, cur.__context__, getattr(cur, "reason", None), *cur.args):
            if isinstance(nxt, BaseException):
                todo.append(nxt)
    return "\n".join(parts)


def _verify(config: MeshConfig) -> str | bool:
    """What the server's certificate is checked against: a path, or True for the default CAs. Never False."""
    if config.ca_bundle is not None:
        return str(config.ca_bundle)
    known = try_get_endpoint_from_url(config.url)
    if known is not None and isinstance(known.verify, str):
        return known.verify
    return True


class MeshConnector:
    """One MESH mailbox: send, list, download, acknowledge, track. Close it (or use ``with``) when done.

    ``sleep`` and ``rng`` are how the back-off waits and jitters (tests may pass their own to keep time).
    """

    def __init__(
        self,
        config: MeshConfig,
        *,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ) -> None:
        for key in ("client_cert", "client_key", "ca_bundle"):
            p = getattr(config, key)
            if p is not None and not Path(p).is_file():
                raise ValueError(f"MESH {key} {p} is not a file")
        self.config = config
        self._sleep = sleep
        self._rng = rng or random.Random()  # jitter, not a secret
        cert: tuple[str, str] | None = None
        if config.client_cert is not None and config.client_key is not None:
            cert = (str(config.client_cert), str(config.client_key))
        self._client = MeshClient(
            config.url,
            config.mailbox,
            config.password,
            shared_key=config.shared_key.encode("utf-8"),
            cert=cert,
            # Never False: our CA bundle, else mesh_client's NHS bundle for a known NHS endpoint, else the usual
            # public CAs. check_hostname is always on.
            verify=_verify(config),
            check_hostname=True,
            max_chunk_size=config.max_chunk_size,
            transparent_compress=False,
            max_retries=0,  # we retry, with back-off and jitter, knowing which requests are safe to repeat
            timeout=cast(Any, (config.connect_timeout_s, config.read_timeout_s)),  # requests takes the pair
            application_name=config.application_name,
        )

    # -- lifecycle ------------------------------------------------------------------------------------------

    @property
    def mailbox(self) -> str:
        return self.config.mailbox

    def close(self) -> None:
        self._client.close()  # type: ignore[no-untyped-call]

    def __enter__(self) -> MeshConnector:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"MeshConnector(mailbox={self.config.mailbox!r}, url={self.config.url!r})"

    # -- operations -----------------------------------------------------------------------------------------

    def handshake(self) -> None:
        """Check that MESH knows this mailbox and takes our credentials and certificate (MESH asks clients to
        do this once a day)."""
        self._call("handshake", self._client.handshake)

    def send(
        self,
        recipient: str,
        workflow_id: str,
        data: bytes,
        subject: str | None = None,
        local_id: str | None = None,
        *,
        filename: str | None = None,
        content_type: str | None = None,
    ) -> str:
        """Send ``data`` to mailbox ``recipient`` under ``workflow_id``; return MESH's message id.

        Larger than ``max_chunk_size``: uploaded in chunks. A :class:`MeshTransientError` with ``maybe_sent``
        means MESH may have the message even so (no answer to the upload): a repeat carries the same
        ``local_id``, by which the recipient can tell it.
        """
        if not data:
            raise ValueError("MESH does not carry empty messages")
        headers: dict[str, str] = {"workflow_id": workflow_id}
        for key, value in (("subject", subject), ("local_id", local_id), ("filename", filename),
                           ("content_type", content_type)):
            if value is not None:
                headers[key] = value
        size = self.config.max_chunk_size
        total = math.ceil(len(data) / size)

        def first() -> str:
            response = self._client.send_chunk(recipient=recipient, chunk=data[:size], chunk_num=1,
                                               total_chunks=total, compress=False, **headers)
            if response.status_code not in (200, 202):
                response.raise_for_status()
                raise requests.HTTPError(response=response)  # a 1xx/3xx: not what MESH answers an upload with
            try:
                answer = response.json()
                message_id = answer.get("message_id") or answer.get("messageID")
            except (ValueError, AttributeError):
                message_id = None
            if not isinstance(message_id, str) or not message_id:
                raise MeshPermanentError("send", self.mailbox, status=response.status_code,
                                         reason="no message id in MESH's answer")
            return message_id

        message_id = self._call("send", first, first_upload=True)
        for n in range(2, total + 1):
            chunk = data[(n - 1) * size : n * size]

            def upload(n: int = n, chunk: bytes = chunk) -> None:
                self._client.send_chunk(recipient=recipient, chunk=chunk, chunk_num=n, total_chunks=total,
                                        compress=False, message_id=message_id)

            self._call(f"send (chunk {n} of {total})", upload, message_id=message_id)
        return message_id

    def inbox(self, workflow_filter: str | None = None) -> list[str]:
        """The ids of every message waiting in our inbox (all pages), oldest first."""
        return self._call("inbox", lambda: list(self._client.iterate_message_ids(workflow_filter=workflow_filter)))

    def download(self, message_id: str) -> bytes:
        """The whole message, chunks reassembled. For big messages prefer :meth:`download_to`."""
        buf = io.BytesIO()
        self.download_to(message_id, buf)
        return buf.getvalue()

    def download_to(self, message_id: str, out: IO[bytes], block_size: int = 1 << 20) -> ReceivedMessage:
        """Stream a message (every chunk, in order) into ``out``, ``block_size`` bytes at a time.

        On a transient failure the download starts again from the first byte: ``out`` is rewound and cut back
        to where it was if it is seekable; if it is not, a failure after the first byte is not retried.
        """
        start = out.tell() if out.seekable() else None
        wrote = False

        def attempt() -> ReceivedMessage:
            nonlocal wrote
            if start is not None:
                out.seek(start)
                out.truncate()
            elif wrote:
                raise MeshTransientError("download", self.mailbox, reason="interrupted, and the output cannot rewind",
                                         message_id=message_id)
            message: Message = self._client.retrieve_message(message_id)
            digest = hashlib.sha256()
            count = 0
            try:
                while block := message.read(block_size):
                    out.write(block)
                    wrote = True
                    digest.update(block)
                    count += len(block)
            finally:
                message.close()  # type: ignore[no-untyped-call]
            chunk_range = str(message.mex_header("chunk-range", "1:1") or "1:1")
            try:
                chunks = int(chunk_range.split(":")[1])
            except (IndexError, ValueError):
                chunks = 1
            return ReceivedMessage(message_id=message_id, sender=message.sender, workflow_id=message.workflow_id,
                                   filename=message.filename, local_id=message.local_id, subject=message.subject,
                                   chunks=chunks, byte_count=count, sha256=digest.hexdigest())

        return self._call("download", attempt, message_id=message_id)

    def acknowledge(self, message_id: str) -> None:
        """Tell MESH we have the message safely: it leaves our inbox and the sender sees it acknowledged."""
        self._call("acknowledge", lambda: self._client.acknowledge_message(message_id), message_id=message_id)

    def track(self, message_id: str) -> TrackingInfo:
        """Where a message we sent has got to (only the sending mailbox can track it)."""
        doc = self._call("track", lambda: self._client.track_message(message_id), message_id=message_id)
        return TrackingInfo.from_response(message_id, cast(Mapping[str, Any], doc))

    def lookup(self, ods_code: str, workflow_id: str) -> list[str]:
        """The mailbox ids registered for an organisation (ODS code) and workflow: where to send it."""
        doc = self._call("lookup", lambda: self._client.lookup_endpoint(ods_code, workflow_id))
        return [str(r["mailbox_id"]) for r in doc.get("results", []) if r.get("mailbox_id")]

    # -- retries and errors ---------------------------------------------------------------------------------

    def _call(self, operation: str, fn: Callable[[], T], *, message_id: str | None = None,
              first_upload: bool = False) -> T:
        attempts = self.config.max_attempts
        for attempt in range(1, attempts + 1):
            try:
                return fn()
            except MeshError:
                raise
            except Exception as exc:  # noqa: BLE001 - every failure is classified into our own errors
                failure = self._classify(operation, exc, message_id)
            error = failure.error
            if first_upload and isinstance(error, MeshTransientError):
                safe = failure.error.status == 429 or not failure.reached_server
                if not safe:
                    error.maybe_sent = True
                    raise error from None
            if not isinstance(error, MeshTransientError) or attempt == attempts:
                raise error from None
            delay = self._delay(attempt, failure.retry_after)
            if delay is None:
                raise error from None
            log.warning("%s; retrying in %.1f s (try %d of %d)", error, delay, attempt + 1, attempts)
            self._sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    def _delay(self, attempt: int, retry_after: float | None) -> float | None:
        """Exponential back-off with jitter (half fixed, half random); at least what Retry-After asks."""
        if retry_after is not None:
            if retry_after > self.config.max_retry_after_s:
                return None
            return retry_after + self._rng.uniform(0, min(1.0, retry_after * 0.1 + 0.1))
        cap = min(self.config.backoff_max_s, self.config.backoff_base_s * 2.0 ** (attempt - 1))
        return cap / 2 + self._rng.uniform(0, cap / 2)

    def _classify(self, operation: str, exc: BaseException, message_id: str | None) -> _Failure:
        mailbox = self.mailbox
        if isinstance(exc, requests.HTTPError) and exc.response is not None:
            status = exc.response.status_code
            if status in (401, 403):
                return _Failure(MeshAuthError(operation, mailbox, status=status, message_id=message_id,
                                              reason="MESH refused the mailbox's credentials"))
            if status in _TRANSIENT_STATUS or status >= 500:
                return _Failure(MeshTransientError(operation, mailbox, status=status, message_id=message_id),
                                retry_after=retry_after_seconds(
                                    exc.response.headers.get("Retry-After") if exc.response is not None else None,
                                    RETRY_AFTER_CAP_S))
            return _Failure(MeshPermanentError(operation, mailbox, status=status, message_id=message_id))
        text = _chain_text(exc)
        if "CERTIFICATE_VERIFY_FAILED" in text or isinstance(exc, ssl.SSLCertVerificationError):
            return _Failure(MeshAuthError(operation, mailbox, reason=SERVER_CERT_UNVERIFIED, message_id=message_id))
        if any(alert in text.upper() for alert in _CERT_ALERTS):
            return _Failure(MeshAuthError(operation, mailbox, reason=CLIENT_CERT_REFUSED, message_id=message_id))
        if isinstance(exc, requests.ConnectTimeout) or any(s in text for s in _CONNECT_FAILURES):
            return _Failure(MeshTransientError(operation, mailbox, reason="could not connect", message_id=message_id),
                            reached_server=False)
        if isinstance(exc, requests.Timeout) or "ReadTimeout" in text or isinstance(exc, TimeoutError):
            return _Failure(MeshTransientError(operation, mailbox, reason="timed out", message_id=message_id))
        if isinstance(exc, requests.RequestException | OSError) or "ProtocolError" in text:
            # A dropped connection: transient, unless the server is refusing our TLS certificate.
            if self.config.tls:
                refused = self._probe_tls()
                if refused is not None:
                    return _Failure(MeshAuthError(operation, mailbox, reason=refused, message_id=message_id))
            return _Failure(MeshTransientError(operation, mailbox, reason=f"connection lost ({type(exc).__name__})",
                                               message_id=message_id))
        return _Failure(MeshPermanentError(operation, mailbox, reason=f"unexpected {type(exc).__name__}",
                                           message_id=message_id))

    def _probe_tls(self) -> str | None:
        """One short TLS connection with our certificates: why the server refuses us, or None if it does not.

        A server that refuses a client certificate under TLS 1.3 often closes the connection without saying why,
        just after the handshake; the same close on a fresh connection, before any answer to a request, is that
        refusal rather than a passing fault.
        """
        parsed = urlparse(self.config.url)
        host = parsed.hostname or ""
        port = parsed.port or 443
        ctx = ssl.create_default_context(cafile=str(self.config.ca_bundle) if self.config.ca_bundle else None)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.config.client_cert is not None and self.config.client_key is not None:
            ctx.load_cert_chain(str(self.config.client_cert), str(self.config.client_key))
        try:
            raw = socket.create_connection((host, port), timeout=self.config.connect_timeout_s)
        except OSError:
            return None  # cannot reach it at all: that is not about certificates
        try:
            with ctx.wrap_socket(raw, server_hostname=host) as tls:
                tls.settimeout(self.config.read_timeout_s)
                tls.sendall(f"GET /messageexchange/_ping HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
                            .encode("ascii"))
                answer = tls.recv(1)
        except ssl.SSLCertVerificationError:
            return SERVER_CERT_UNVERIFIED
        except ssl.SSLError as exc:
            # Closed mid-handshake (TLS 1.2) or an alert about our certificate: refused. Anything else (say, a
            # server that does not speak TLS) is not about certificates.
            refused = isinstance(exc, ssl.SSLEOFError) or any(a in str(exc).upper() for a in _CERT_ALERTS)
            return CLIENT_CERT_REFUSED if refused else None
        except (ConnectionResetError, BrokenPipeError):
            return CLIENT_CERT_REFUSED
        except OSError:
            return None
        finally:
            raw.close()
        return CLIENT_CERT_REFUSED if answer == b"" else None
