"""MESH exchange: files to and from NHS CYPMHS mailboxes, durably and at most once per message id.

An outgoing message goes through these states (table ``mesh_messages``, direction ``out``):

    pending ──send──▶ sent ──tracking shows it acknowledged──▶ delivered
       │               │
       └───────────────┴──not delivered within the deadline, or MESH gave up on it──▶ dead_letter

* :func:`queue_message` records the message *before* anything is sent: a local id (a uuid4, never pupil
  data, sent as MESH's ``Mex-LocalID``), the destination mailbox, the workflow id, the content's SHA-256 and
  size, the time. The body itself is sealed (AES-256-GCM, ``connectors/storage/sealed.py``) into the spool,
  ``SCHOOLSLINK_HOME/mesh/outbox/<local id>.sealed``: it never rests in plain and never goes into the state
  store.
* :func:`send_pending` sends every pending message of the connector's mailbox. *Sent* means MESH returned a
  message id, which is stored at once; a row with a message id is never sent again. A failure that may pass
  (429, 5xx, a timeout) leaves the row pending with ``attempts`` and ``last_error`` for the next run; MESH
  refusing the message outright (say, an unknown recipient) makes it a dead letter at once, since sending it
  again cannot help; MESH refusing *us* (credentials, certificate) stops the run with the error, the rows
  staying pending until the configuration is fixed. If MESH took an upload but its answer was lost, the next
  run sends it again: the recipient sees the same local id twice and can tell.
* :func:`track_sent` asks MESH about each sent message: acknowledged by the recipient means *delivered*
  (``delivered_at``; the sealed body is then deleted), MESH giving up means *dead letter*, and a message not
  delivered within the deadline (``SCHOOLSLINK_MESH_DELIVERY_DEADLINE_HOURS``, default 24, or the argument)
  is a dead letter too, with a reason a person can act on, e.g. "sent as message 3F2A... at 2026-11-26 09:00
  UTC, not acknowledged by X26ABC2 within 24 h". A message still pending at its deadline becomes one as well.
  A dead letter keeps its sealed body, so it can be sent again by hand.
* :func:`receive` downloads every message in our inbox, hands it to a callback that lands it (the DAG passes
  the landing zone's ``land_bytes``), records it, and only then acknowledges it: if landing fails, MESH keeps
  the message and the next run tries again; if the acknowledgement is lost, the next run acknowledges it
  without landing it twice.

MESH settings are ``SCHOOLSLINK_HOME/config/mesh.json``, or the JSON file named by ``SCHOOLSLINK_MESH_CONFIG``
(keys: url, mailbox, password, shared_key, client_cert, client_key, ca_bundle; relative paths are under the
file's folder; ``SCHOOLSLINK_MESH_PASSWORD`` and ``SCHOOLSLINK_MESH_SHARED_KEY`` override the two secrets).
No file: MESH is not configured and the DAG's tasks do nothing.

What this module logs and returns: counts, local ids, MESH message ids and mailbox ids; never a body.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import logging
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from sqlalchemy import Connection, Engine, and_, insert, select, update

from connectors.mesh.client import MeshConfig, MeshConnector
from connectors.mesh.errors import MeshAuthError, MeshError, MeshPermanentError
from connectors.storage.sealed import SealedFileError, open_sealed, seal_bytes
from schoolslink.errors import ConfigurationError, SchoolslinkError
from schoolslink.pipeline.common import landing_zone, store
from schoolslink.settings import home
from schoolslink.store.schema import mesh_messages

log = logging.getLogger(__name__)

CONFIG_ENV: Final = "SCHOOLSLINK_MESH_CONFIG"
PASSWORD_ENV: Final = "SCHOOLSLINK_MESH_PASSWORD"  # noqa: S105 - the name of a variable, not a secret
SHARED_KEY_ENV: Final = "SCHOOLSLINK_MESH_SHARED_KEY"
DEADLINE_ENV: Final = "SCHOOLSLINK_MESH_DELIVERY_DEADLINE_HOURS"
DEFAULT_DEADLINE_HOURS: Final = 24.0
LANDING_KIND: Final = "mesh"  # the landing zone's folder for what arrives by MESH: mesh/<our mailbox>/

OUT: Final = "out"
IN: Final = "in"
PENDING: Final = "pending"
SENT: Final = "sent"
DELIVERED: Final = "delivered"
DEAD_LETTER: Final = "dead_letter"
RECEIVED: Final = "received"
ACKNOWLEDGED: Final = "acknowledged"


class MeshExchangeError(SchoolslinkError):
    """Some of the inbox could not be landed: those messages stay in MESH for the next run."""


# -- settings -----------------------------------------------------------------------------------------------


def config_path() -> Path:
    return Path(os.environ.get(CONFIG_ENV) or home() / "config" / "mesh.json")


def mesh_config() -> MeshConfig | None:
    """The MESH settings, or None when there is no config file (MESH not in use here)."""
    path = config_path()
    if not path.exists():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigurationError(f"{path}: not readable JSON ({type(exc).__name__})") from None
    if not isinstance(doc, dict):
        raise ConfigurationError(f"{path}: must be a JSON object")
    for key, env in (("password", PASSWORD_ENV), ("shared_key", SHARED_KEY_ENV)):
        if os.environ.get(env):
            doc[key] = os.environ[env]
    try:
        return MeshConfig.from_mapping(doc, base_dir=path.parent.resolve())
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"{path}: {exc}") from None


def delivery_deadline(hours: float | None = None) -> dt.timedelta:
    """How long a message may go unacknowledged before it is a dead letter (argument, env, else 24 h)."""
    if hours is None:
        raw = os.environ.get(DEADLINE_ENV, "").strip()
        try:
            hours = float(raw) if raw else DEFAULT_DEADLINE_HOURS
        except ValueError:
            raise ConfigurationError(f"{DEADLINE_ENV} must be a number of hours") from None
    if hours <= 0:
        raise ConfigurationError(f"{DEADLINE_ENV} must be more than 0 hours")
    return dt.timedelta(hours=hours)


def spool_dir() -> Path:
    """Where outgoing bodies wait, sealed, until MESH has delivered them."""
    return home() / "mesh" / "outbox"


def _spooled(spool: Path | None, local_id: str) -> Path:
    return (spool or spool_dir()) / f"{local_id}.sealed"


def _aware(value: dt.datetime | None) -> dt.datetime | None:
    """SQLite hands back naive datetimes: everything here is stored in UTC."""
    if value is None:
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


def _hours(delta: dt.timedelta) -> str:
    return f"{delta.total_seconds() / 3600:g} h"


def _when(value: dt.datetime | None) -> str:
    aware = _aware(value)
    return aware.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M UTC") if aware else "an unknown time"


# -- outgoing -----------------------------------------------------------------------------------------------


def queue_message(
    conn: Connection,
    *,
    mailbox: str,
    recipient: str,
    workflow_id: str,
    data: bytes,
    run_id: str | None = None,
    now: dt.datetime | None = None,
    spool: Path | None = None,
) -> str:
    """Record a message to send from our ``mailbox`` to ``recipient`` and seal its body into the spool.

    Returns the local id. Nothing is sent here; :func:`send_pending` sends. Runs in the caller's transaction,
    so a message queued alongside other state (an outbox row, a ledger entry) commits with it. The body is
    sealed first, so a row never exists without its body.
    """
    if not data:
        raise ValueError("MESH does not carry empty messages")
    now = now or dt.datetime.now(dt.UTC)
    local_id = str(uuid.uuid4())
    sha = hashlib.sha256(data).hexdigest()
    path = _spooled(spool, local_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    seal_bytes(data, path, {"kind": "mesh-out", "local_id": local_id, "size": len(data), "sha256": sha})
    conn.execute(insert(mesh_messages).values(
        local_id=local_id, direction=OUT, mailbox=mailbox.upper(), peer_mailbox=recipient.upper(),
        workflow_id=workflow_id, content_sha256=sha, byte_count=len(data), status=PENDING, attempts=0,
        run_id=run_id, created_at=now,
    ))
    return local_id


def _read_spooled(spool: Path | None, local_id: str, sha: str) -> bytes | str:
    """The sealed body, or why it cannot be sent (missing, damaged, not what was queued)."""
    path = _spooled(spool, local_id)
    if not path.exists():
        return "its sealed body is missing from the MESH spool"
    try:
        with open_sealed(path) as f:
            data = f.read()
    except SealedFileError as exc:
        return f"its sealed body cannot be opened ({exc})"
    if hashlib.sha256(data).hexdigest() != sha:
        return "its sealed body is not what was queued (SHA-256 differs)"
    return data


def _dead_letter(conn: Connection, local_id: str, reason: str, now: dt.datetime) -> None:
    conn.execute(update(mesh_messages).where(mesh_messages.c.local_id == local_id)
                 .values(status=DEAD_LETTER, reason=reason[:500], dead_at=now))
    log.warning("MESH message %s is a dead letter: %s", local_id, reason)


def _store(engine: Engine | None) -> Engine:
    return engine if engine is not None else store()


def send_pending(
    connector: MeshConnector,
    *,
    engine: Engine | None = None,
    now: dt.datetime | None = None,
    spool: Path | None = None,
) -> dict[str, int]:
    """Send every pending message from the connector's mailbox, oldest first; return counts.

    Each send is claimed (``attempts`` + 1) in its own transaction before it goes, and its message id stored in
    another straight after, so a crash in between costs at most one repeat, never a lost message.
    """
    eng = _store(engine)
    mailbox = connector.mailbox
    counts = {"mesh_sent": 0, "mesh_send_failed": 0, "mesh_dead_letter": 0}
    with eng.connect() as conn:
        rows = conn.execute(
            select(mesh_messages.c.local_id, mesh_messages.c.peer_mailbox, mesh_messages.c.workflow_id,
                   mesh_messages.c.content_sha256)
            .where(mesh_messages.c.direction == OUT, mesh_messages.c.mailbox == mailbox,
                   mesh_messages.c.status == PENDING, mesh_messages.c.message_id.is_(None))
            .order_by(mesh_messages.c.created_at, mesh_messages.c.local_id)
        ).all()
    for local_id, recipient, workflow_id, sha in rows:
        at = now or dt.datetime.now(dt.UTC)
        body = _read_spooled(spool, local_id, sha)
        if isinstance(body, str):
            with eng.begin() as conn:
                _dead_letter(conn, local_id, f"not sent: {body}", at)
            counts["mesh_dead_letter"] += 1
            continue
        with eng.begin() as conn:
            claimed = conn.execute(
                update(mesh_messages)
                .where(mesh_messages.c.local_id == local_id, mesh_messages.c.status == PENDING,
                       mesh_messages.c.message_id.is_(None))
                .values(attempts=mesh_messages.c.attempts + 1)
            ).rowcount
        if not claimed:  # another run took it meanwhile
            continue
        try:
            message_id = connector.send(recipient, workflow_id, body, local_id=local_id,
                                        filename=f"{local_id}.dat")
        except MeshAuthError as exc:
            with eng.begin() as conn:
                conn.execute(update(mesh_messages).where(mesh_messages.c.local_id == local_id)
                             .values(last_error=str(exc)[:500]))
            raise  # MESH refuses us, not this message: nothing else will go either until that is fixed
        except MeshPermanentError as exc:
            with eng.begin() as conn:
                _dead_letter(conn, local_id, f"not sent: MESH refused it ({exc}); sending it again cannot help", at)
            counts["mesh_dead_letter"] += 1
            continue
        except MeshError as exc:
            note = " (MESH may have it: no answer to the upload)" if exc.maybe_sent else ""
            with eng.begin() as conn:
                conn.execute(update(mesh_messages).where(mesh_messages.c.local_id == local_id)
                             .values(last_error=(str(exc) + note)[:500]))
            log.warning("MESH message %s not sent this time (%s); the next run tries again", local_id, exc)
            counts["mesh_send_failed"] += 1
            continue
        with eng.begin() as conn:
            conn.execute(update(mesh_messages).where(mesh_messages.c.local_id == local_id)
                         .values(status=SENT, message_id=message_id, sent_at=now or dt.datetime.now(dt.UTC),
                                 last_error=None))
        log.info("MESH message %s sent to %s as message %s", local_id, recipient, message_id)
        counts["mesh_sent"] += 1
    return counts


def track_sent(
    connector: MeshConnector,
    now: dt.datetime,
    deadline: dt.timedelta | None = None,
    *,
    engine: Engine | None = None,
    spool: Path | None = None,
) -> dict[str, int]:
    """Mark sent messages delivered (acknowledged by the recipient) or dead letters; return counts.

    ``now`` is the time the deadline is measured to (the run's time; tests pass their own). A message still
    pending ``deadline`` after it was queued is a dead letter too.
    """
    eng = _store(engine)
    deadline = deadline or delivery_deadline()
    mailbox = connector.mailbox
    counts = {"mesh_delivered": 0, "mesh_dead_letter": 0, "mesh_awaiting_ack": 0}
    with eng.connect() as conn:
        sent = conn.execute(
            select(mesh_messages.c.local_id, mesh_messages.c.message_id, mesh_messages.c.peer_mailbox,
                   mesh_messages.c.sent_at)
            .where(mesh_messages.c.direction == OUT, mesh_messages.c.mailbox == mailbox,
                   mesh_messages.c.status == SENT)
            .order_by(mesh_messages.c.sent_at)
        ).all()
    for local_id, message_id, recipient, sent_at in sent:
        sent_at = _aware(sent_at) or now
        error: str | None = None
        try:
            info = connector.track(message_id)
        except MeshAuthError:
            raise
        except MeshError as exc:
            info, error = None, str(exc)
        with eng.begin() as conn:
            if info is not None and info.acknowledged:
                conn.execute(update(mesh_messages).where(mesh_messages.c.local_id == local_id)
                             .values(status=DELIVERED, delivered_at=info.status_timestamp or now, last_error=None))
                _spooled(spool, local_id).unlink(missing_ok=True)  # delivered: the body need not be kept
                log.info("MESH message %s (%s) delivered to %s", local_id, message_id, recipient)
                counts["mesh_delivered"] += 1
            elif info is not None and info.failed:
                code = f", code {info.status_code}" if info.status_code else ""
                _dead_letter(conn, local_id, f"sent as message {message_id} at {_when(sent_at)}; MESH reports it "
                             f"{info.status or 'failed'}{code}: it will not reach {recipient}", now)
                counts["mesh_dead_letter"] += 1
            elif now - sent_at >= deadline:
                note = f" (last tracking error: {error})" if error else ""
                _dead_letter(conn, local_id, f"sent as message {message_id} at {_when(sent_at)}, not acknowledged "
                             f"by {recipient} within {_hours(deadline)}{note}", now)
                counts["mesh_dead_letter"] += 1
            else:
                conn.execute(update(mesh_messages).where(mesh_messages.c.local_id == local_id)
                             .values(last_error=error[:500] if error else None))
                counts["mesh_awaiting_ack"] += 1
    with eng.begin() as conn:
        stale = conn.execute(
            select(mesh_messages.c.local_id, mesh_messages.c.peer_mailbox, mesh_messages.c.created_at,
                   mesh_messages.c.attempts, mesh_messages.c.last_error)
            .where(mesh_messages.c.direction == OUT, mesh_messages.c.mailbox == mailbox,
                   mesh_messages.c.status == PENDING)
        ).all()
        for local_id, recipient, created_at, attempts, last_error in stale:
            created = _aware(created_at) or now
            if now - created < deadline:
                continue
            last = f"; last error: {last_error}" if last_error else ""
            _dead_letter(conn, local_id, f"queued at {_when(created)} for {recipient}, not sent within "
                         f"{_hours(deadline)} ({attempts} attempt{'s' if attempts != 1 else ''}{last})", now)
            counts["mesh_dead_letter"] += 1
    return counts


# -- incoming -----------------------------------------------------------------------------------------------


def receive(
    connector: MeshConnector,
    land: Callable[[str, bytes], object],
    *,
    engine: Engine | None = None,
    now: dt.datetime | None = None,
    run_id: str | None = None,
) -> dict[str, int]:
    """Download every message in our inbox, land it with ``land(message_id, data)``, then acknowledge it.

    The acknowledgement (after which MESH forgets the message) comes only after ``land`` returned and the
    message was recorded, so nothing is lost if landing fails: the message stays in the inbox and the next run
    tries again. One message failing does not stop the others; if any could not be landed,
    :class:`MeshExchangeError` is raised at the end (counts only), so the run shows it.
    """
    eng = _store(engine)
    mailbox = connector.mailbox
    counts = {"mesh_received": 0, "mesh_acknowledged": 0, "mesh_receive_failed": 0, "mesh_land_failed": 0}
    for message_id in connector.inbox():
        at = now or dt.datetime.now(dt.UTC)
        with eng.connect() as conn:
            known = conn.execute(
                select(mesh_messages.c.local_id, mesh_messages.c.status)
                .where(and_(mesh_messages.c.message_id == message_id, mesh_messages.c.direction == IN))
            ).first()
        if known is None:
            buf = io.BytesIO()
            try:
                got = connector.download_to(message_id, buf)
            except MeshAuthError:
                raise
            except MeshError as exc:
                log.warning("MESH message %s not downloaded this time (%s)", message_id, exc)
                counts["mesh_receive_failed"] += 1
                continue
            try:
                land(message_id, buf.getvalue())
            except Exception as exc:  # noqa: BLE001 - whatever went wrong, the message stays in MESH
                log.error("MESH message %s could not be landed (%s); it stays in the inbox", message_id,
                          type(exc).__name__)
                counts["mesh_land_failed"] += 1
                continue
            finally:
                buf.close()
            with eng.begin() as conn:
                conn.execute(insert(mesh_messages).values(
                    local_id=str(uuid.uuid4()), direction=IN, mailbox=mailbox, peer_mailbox=got.sender or "",
                    workflow_id=got.workflow_id or "", content_sha256=got.sha256, byte_count=got.byte_count,
                    status=RECEIVED, message_id=message_id, attempts=1, run_id=run_id, created_at=at,
                ))
            counts["mesh_received"] += 1
            log.info("MESH message %s from %s (%s, %d bytes) landed", message_id, got.sender, got.workflow_id,
                     got.byte_count)
        try:
            connector.acknowledge(message_id)
        except MeshAuthError:
            raise
        except MeshError as exc:  # landed and recorded: the next run acknowledges it without landing it again
            log.warning("MESH message %s landed but not acknowledged this time (%s)", message_id, exc)
            counts["mesh_receive_failed"] += 1
            continue
        with eng.begin() as conn:
            conn.execute(update(mesh_messages)
                         .where(mesh_messages.c.message_id == message_id, mesh_messages.c.direction == IN)
                         .values(status=ACKNOWLEDGED, delivered_at=at))
        counts["mesh_acknowledged"] += 1
    if counts["mesh_land_failed"]:
        raise MeshExchangeError(
            f"{counts['mesh_land_failed']} MESH message(s) for mailbox {mailbox} could not be landed; they stay "
            f"in the inbox for the next run ({counts['mesh_received']} landed)"
        )
    return counts


# -- what the DAG's tasks call ------------------------------------------------------------------------------


def _not_configured() -> dict[str, int]:
    log.info("MESH is not configured (no %s): nothing to do", config_path())
    return {"mesh_configured": 0}


def run_send(run_id: str, now: dt.datetime) -> dict[str, int]:
    """mesh_exchange's first task: send what is pending."""
    cfg = mesh_config()
    if cfg is None:
        return _not_configured()
    with MeshConnector(cfg) as mesh:
        return {"mesh_configured": 1, **send_pending(mesh, now=now)}


def run_track(run_id: str, now: dt.datetime, deadline_hours: float | None = None) -> dict[str, int]:
    """mesh_exchange's second task: delivered or dead letter."""
    cfg = mesh_config()
    if cfg is None:
        return _not_configured()
    with MeshConnector(cfg) as mesh:
        return {"mesh_configured": 1, **track_sent(mesh, now, delivery_deadline(deadline_hours))}


def run_receive(run_id: str, now: dt.datetime) -> dict[str, int]:
    """mesh_exchange's third task: land the inbox in the landing zone (``mesh/<our mailbox>/``, sealed)."""
    cfg = mesh_config()
    if cfg is None:
        return _not_configured()
    zone = landing_zone()

    def land(message_id: str, data: bytes) -> Any:
        return zone.land_bytes(LANDING_KIND, cfg.mailbox, "bin", data)

    with MeshConnector(cfg) as mesh:
        return {"mesh_configured": 1, **receive(mesh, land, run_id=run_id, now=now)}
