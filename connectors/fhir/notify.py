"""The FHIR subscription notification receiver: a trust's server tells us something changed; nhs_sync pulls sooner.

`schoolslink fhir receive --host 127.0.0.1 --port 8095` runs it (a Starlette app under uvicorn, on loopback
behind the trust-facing proxy). One route:

    POST /notify/<trust ODS>       a rest-hook Subscription notification

What is accepted (anything else is 400 with an OperationOutcome naming the problem):

- FHIR R4 rest-hook: an empty body (`channel.payload` absent: "something changed"), or a Bundle;
- FHIR R4B / the R4 Subscriptions Backport: a `history` Bundle whose first entry is a `SubscriptionStatus` (R4B)
  or a `Parameters` status (the R4 backport), with the notification type `handshake`, `heartbeat`,
  `event-notification`, `query-status` or `query-event`.

The request must carry the trust's shared secret (put it in the Subscription's `channel.header`): header
`Authorization: Bearer <secret>` by default, or the raw secret in the header `SCHOOLSLINK_FHIR_NOTIFY_HEADER`
names. It is compared in constant time; a wrong or missing secret, or a trust with no secret configured, is 401.
The header is never logged. Secrets, per trust: `SCHOOLSLINK_FHIR_NOTIFY_SECRET_<ODS>`, or
`SCHOOLSLINK_HOME/config/fhir-notify.json`:

    {"header": "Authorization", "trusts": {"R9X": {"secret_file": "secrets/fhir-notify-r9x"}}}

(`secret_file` relative to the home; or `"secret": "..."`). Order of work: the body is stored first — sealed
in the landing zone as `fhir-notifications/<ODS>/<landed-at>-<n>.json.sealed` (connectors/storage/landing.py
`land_bytes`: fsync'd, renamed into place, and the folder fsync'd after), kept for the landing zone's retention
— and only then is `fhir` published (connectors/events: `{"trust_ods", "key", "type", "events"}`, ids and counts
only) and 200 returned. A failure to store is 503 (the trust's server retries), nothing published. Handshakes,
heartbeats and query responses are stored but publish nothing: they say nothing changed. The notification's
contents are never logged: a log line names the trust, the notification type and the storage key.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from connectors.events import Publisher

log = logging.getLogger(__name__)

KIND: Final = "fhir-notifications"
HEADER_ENV: Final = "SCHOOLSLINK_FHIR_NOTIFY_HEADER"
SECRET_ENV: Final = "SCHOOLSLINK_FHIR_NOTIFY_SECRET_"  # noqa: S105 (a variable's name)
DEFAULT_HEADER: Final = "Authorization"
MAX_BODY: Final = 16 * 1024 * 1024
STATUS_TYPES: Final = ("handshake", "heartbeat", "event-notification", "query-status", "query-event")
PUBLISHED_TYPES: Final = ("event-notification", "rest-hook", "rest-hook-ping")
_ODS: Final = re.compile(r"^[A-Z0-9]{3,10}$")


class NotificationRefused(ValueError):
    """A body that is not a notification we accept; the message names the problem (never a value from it)."""


@dataclass(frozen=True)
class Notification:
    type: str  # handshake | heartbeat | event-notification | query-status | query-event | rest-hook | rest-hook-ping
    events: int  # how many events it reports (0 for a ping, a handshake or a heartbeat)


def read_notification(body: bytes, content_type: str = "") -> Notification:
    """What a rest-hook POST body is; NotificationRefused with the reason otherwise."""
    if not body.strip():
        return Notification("rest-hook-ping", 0)
    if content_type and not any(t in content_type for t in ("json", "*/*")):
        raise NotificationRefused("only JSON notifications are accepted (application/fhir+json)")
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than any FHIR resource
        raise NotificationRefused("the body is not valid JSON") from None
    if not isinstance(doc, dict):
        raise NotificationRefused("the body is not a FHIR resource (a JSON object)")
    if doc.get("resourceType") != "Bundle":
        raise NotificationRefused("a notification must be a Bundle (or an empty body)")
    entries = doc.get("entry", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise NotificationRefused("Bundle.entry must be a list of entries")
    if doc.get("type") != "history":
        return Notification("rest-hook", len(entries))
    first = entries[0].get("resource") if entries else None
    if not isinstance(first, dict):
        raise NotificationRefused("a history Bundle notification must start with a SubscriptionStatus entry")
    if first.get("resourceType") == "SubscriptionStatus":  # R4B
        kind = first.get("type")
        events = first.get("notificationEvent", [])
        if not isinstance(events, list):
            raise NotificationRefused("SubscriptionStatus.notificationEvent must be a list")
    elif first.get("resourceType") == "Parameters":  # the R4 Subscriptions Backport
        params = first.get("parameter", [])
        if not isinstance(params, list):
            raise NotificationRefused("the status Parameters.parameter must be a list")
        kind = next((p.get("valueCode") for p in params if isinstance(p, dict) and p.get("name") == "type"), None)
        events = [p for p in params if isinstance(p, dict) and p.get("name") == "notification-event"]
    else:
        raise NotificationRefused("a history Bundle notification must start with a SubscriptionStatus entry")
    if kind not in STATUS_TYPES:
        raise NotificationRefused(f"the SubscriptionStatus type must be one of {', '.join(STATUS_TYPES)}")
    return Notification(str(kind), len(events) or max(0, len(entries) - 1))


def operation_outcome(code: str, diagnostics: str, severity: str = "error") -> dict[str, Any]:
    return {"resourceType": "OperationOutcome",
            "issue": [{"severity": severity, "code": code, "diagnostics": diagnostics}]}


# Secrets ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NotifySecrets:
    """Each trust's shared secret and the header it comes in (holds secrets: never printed)."""

    header: str = DEFAULT_HEADER
    by_trust: Mapping[str, bytes] = field(default_factory=dict, repr=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> NotifySecrets:
        from schoolslink.errors import ConfigurationError
        from schoolslink.settings import home

        env = os.environ if env is None else env
        path = home() / "config" / "fhir-notify.json"
        doc: dict[str, Any] = {}
        if path.exists():
            try:
                doc = json.loads(path.read_text(encoding="utf-8"))
            except ValueError:
                raise ConfigurationError(f"{path}: not valid JSON") from None
        secrets: dict[str, bytes] = {}
        for ods, cfg in (doc.get("trusts") or {}).items():
            if not isinstance(cfg, dict):
                raise ConfigurationError(f"{path}: trusts.{ods} must be an object with secret or secret_file")
            if cfg.get("secret_file"):
                p = Path(cfg["secret_file"])
                p = p if p.is_absolute() else home() / p
                try:
                    secrets[str(ods).upper()] = p.read_text(encoding="utf-8").strip().encode()
                except OSError:
                    raise ConfigurationError(f"{path}: trusts.{ods}.secret_file cannot be read") from None
            elif cfg.get("secret"):
                secrets[str(ods).upper()] = str(cfg["secret"]).encode()
        for name, value in env.items():
            if not name.startswith(SECRET_ENV) or not value.strip():
                continue
            ods = name[len(SECRET_ENV):].upper()
            if ods.endswith("_FILE"):  # SCHOOLSLINK_FHIR_NOTIFY_SECRET_<ODS>_FILE: the secret is in that file
                ods = ods[:-len("_FILE")]
                try:
                    secret = Path(value.strip()).read_text(encoding="utf-8").strip().encode()
                except OSError:
                    raise ConfigurationError(f"{name}: the file it names cannot be read") from None
            else:
                secret = value.strip().encode()
            if not _ODS.match(ods) or ods == "FILE":
                raise ConfigurationError(f"{name}: name the trust by its ODS code, as {SECRET_ENV}<ODS> or "
                                         f"{SECRET_ENV}<ODS>_FILE")
            secrets[ods] = secret
        header = env.get(HEADER_ENV, "").strip() or str(doc.get("header") or DEFAULT_HEADER)
        return cls(header=header, by_trust=secrets)

    def allows(self, trust_ods: str, presented: str | None) -> bool:
        """Constant-time check of the presented header value against the trust's secret."""
        secret = self.by_trust.get(trust_ods)
        got = (presented or "").strip().encode()
        if self.header.lower() == "authorization":
            scheme, _, token = got.partition(b" ")
            got = token.strip() if scheme.lower() == b"bearer" else b""
        # Compare even when the trust has no secret, so the answer takes as long either way.
        ok = hmac.compare_digest(got, secret if secret is not None else b"\0" * 32)
        return ok and secret is not None and bool(got)


# The app ---------------------------------------------------------------------------------------------------------


def create_app(publisher: Publisher, secrets: NotifySecrets | None = None, landing_root: Path | None = None) -> Any:
    """The Starlette app: `POST /notify/{trust_ods}`."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from connectors.storage.landing import LandingZone

    keys = secrets or NotifySecrets.from_env()
    zone = LandingZone(landing_root)
    lock = asyncio.Lock()  # one write at a time: landing names are numbered by what is already in the folder

    def fhir_json(status: int, doc: dict[str, Any]) -> JSONResponse:
        return JSONResponse(doc, status_code=status, media_type="application/fhir+json")

    def store(trust: str, body: bytes) -> str:
        landed = zone.land_bytes(KIND, trust, "json", body)
        folder = landed.path.parent
        while True:  # the rename into place is durable, and so are folders made for a trust's first notification
            fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            if folder == zone.root or folder.parent == folder:
                break
            folder = folder.parent
        return landed.key

    async def notify(request: Request) -> JSONResponse:
        trust = str(request.path_params["trust_ods"]).upper()
        if not _ODS.match(trust) or not keys.allows(trust, request.headers.get(keys.header)):
            log.warning("notification refused (401): no valid secret for trust %s",
                        trust if _ODS.match(trust) else "(not an ODS code)")
            return fhir_json(401, operation_outcome("security", "missing or wrong notification secret for this "
                                                                "trust: check the Subscription's channel.header"))
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY:
                return fhir_json(413, operation_outcome("too-costly", "notification body over 16 MB"))
        try:
            note = read_notification(body, request.headers.get("content-type", ""))
        except NotificationRefused as exc:
            log.warning("notification from trust %s refused: %s", trust, exc)
            return fhir_json(400, operation_outcome("invalid", str(exc)))
        try:
            async with lock:
                key = await asyncio.to_thread(store, trust, body)
        except Exception as exc:  # noqa: BLE001 - not stored: the server must retry, so say so
            log.error("notification from trust %s not stored (%s): answered 503", trust, type(exc).__name__)
            return fhir_json(503, operation_outcome("transient", "the notification could not be stored: retry"))
        published = note.type in PUBLISHED_TYPES
        if published:
            publisher.publish("fhir", {"trust_ods": trust, "key": key, "type": note.type, "events": note.events})
        log.info("notification from trust %s (%s, %d event(s)) stored as %s%s", trust, note.type, note.events, key,
                 "; fhir event published" if published else "")
        return fhir_json(200, operation_outcome("informational", "stored", severity="information"))

    return Starlette(routes=[Route("/notify/{trust_ods}", notify, methods=["POST"])])


def serve(publisher: Publisher, host: str = "127.0.0.1", port: int = 0, ready: Any = None) -> None:
    """Run the receiver until SIGTERM or SIGINT; prints `LISTENING <port>` once it accepts connections
    (connectors/peer_process.py's convention), or calls `ready(port)`."""
    import socket

    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    bound = sock.getsockname()[1]
    config = uvicorn.Config(create_app(publisher), log_level="info", access_log=False, lifespan="off",
                            server_header=False, date_header=False)
    server = uvicorn.Server(config)

    async def main() -> None:
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not task.done():
            await asyncio.sleep(0.01)
        if server.started:
            if ready is not None:
                ready(bound)
            else:
                print(f"LISTENING {bound}", flush=True)
        await task

    try:
        asyncio.run(main())
    finally:
        sock.close()
