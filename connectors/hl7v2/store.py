"""The durable HL7v2 message store: every message is committed before its acknowledgment is sent.

Table `hl7_messages` (schoolslink/store/schema.py, migration 0007) in the state store: SQLite by default (the file
under SCHOOLSLINK_HOME, in WAL mode with `synchronous=FULL`, so a commit has reached the disk when it returns) or
PostgreSQL (`synchronous_commit=on`), or any URL given.

Group commit. The listener runs the writer in a process of its own (`WriterProcess`, which runs `serve_pipe`):
it sends everything received while the previous commit was in flight, and the writer stores it as one multi-row
INSERT (one transaction, one fsync for the lot), then answers with the outcomes, which the listener sets on its
items before it writes any of their ACKs. Nothing is acknowledged before that answer. (`start`/`submit` give the
same group commit on a thread, calling `on_commit` with the batch.) Duplicates are looked up just before, in one
query per sender.

What is stored, per message: sender (MSH-3^MSH-4), control id (MSH-10), message type (`ADT^A08`), when it arrived,
the body sealed (AES-256-GCM under the seal key of connectors/storage/sealed.py, which lives outside the database;
the sender and control id are bound in as associated data, so a body moved to another row does not open), status
`received`, and the acknowledgment code. A message the hot path refused (AE/AR) is stored too, as `quarantined`
with the reason (the ERR text) and the ERR-3 code, so nothing a trust sent is lost and the run report can count it;
its ACK is still AE/AR. An oversize frame (over 1 MiB) is not stored: it is refused (AR 207) unread.

Duplicates. The same MSH-10 from the same sender (a resend after a lost ACK, or after a listener restart) is
acknowledged again with the code stored the first time, and stored once: within one batch (the later copy takes the
first's outcome), across batches and across restarts (a look-up of the batch's keys before the insert, and a UNIQUE
index on (sender, control_id) under it).

If a commit fails (the database is down, the disk is full), the batch's messages are acknowledged AR with ERR-3 207
("not stored: send it again"); a sender that resends is deduplicated as above, so a commit that did in fact succeed
is not stored twice.

The API of the full-parse stage (schoolslink/pipeline/hl7_apply.py):

    store = MessageStore()                    # SCHOOLSLINK_DB_URL or the SQLite file; migrates the schema
    for m in store.pending(500):              # status 'received', oldest first: StoredMessage, body unsealed
        ...                                   # m.id, m.sender, m.control_id, m.message_type, m.received_at, m.body
        store.mark(m.id, "applied")           # or store.mark(m.id, "quarantined", reason="PID-5: ...")
    store.counts()                            # {'received': n, 'applied': n, 'quarantined': n}

A reason names a segment, field and rule, never a value (it is read by people who may not see the record).
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import logging
import marshal
import os
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import Engine, func, select, update
from sqlalchemy.engine import make_url

from connectors.hl7v2.ack import build_ack
from connectors.hl7v2.fastcheck import ACCEPT, REFUSE_REJECT, Checked
from connectors.storage.sealed import SealedFileError, key_id, seal_key
from schoolslink.settings import db_url
from schoolslink.store.db import migrate
from schoolslink.store.schema import hl7_messages

__all__ = ["STATUSES", "MessageSealer", "MessageStore", "Pending", "StoredMessage", "WriterProcess", "reply"]

log = logging.getLogger(__name__)

STATUSES: Final = ("received", "applied", "quarantined")
T_NOT_STORED: Final = "the message could not be stored and was not kept: send it again"
T_CHECK_FAILED: Final = "the listener could not check this message (an internal error): it was kept; tell the operator"
_KEY_MAX: Final = 200  # sender and control id columns; a longer value is kept as its hash
_TYPE_MAX: Final = 100
_MAX_BATCH: Final = 10_000
# One multi-row INSERT per batch (up to _ROWS rows: one statement is one transaction, one fsync) rather than
# executemany: the driver lets go of the GIL once per statement, not once per row, so the event loop and the writer
# hand it over a few times per commit instead of once per message. IN lists of the duplicate look-up are padded to a
# few sizes, so a few prepared statements serve every batch.
_ROWS: Final = 256
_SIZES: Final = (1, 4, 16, 64, 256)
_REPO: Final = Path(__file__).resolve().parents[2]
# Under a steady stream of commits a PASSIVE checkpoint never catches up with the writer, so SQLite never starts the
# WAL again from its beginning: it grew by about 100 MB a second under the benchmark's load, every frame a new block
# of the file (allocated, zeroed, written back), which halved the writer's speed. Once the WAL holds this many frames
# and a PASSIVE checkpoint has copied most of them, a RESTART checkpoint copies the rest and makes the next commit
# start the WAL again. It runs between two commits (under the writer's own lock) and never waits: when a reader (any
# process on the same database) still needs the WAL, it gives up at once and the next round tries again.
_WAL_RESTART_FRAMES: Final = 2048
_WAL_LIMIT: Final = 64 << 20  # a WAL grown past this (a burst, a long reader) is cut back to it when it restarts


class Pending:
    """One message on its way through the store. The listener sets `checked`, `body` and `owner` (its connection);
    the store sets the outcome (`ack`, `error`, `text`, `duplicate`) before `on_commit` sees it; the listener
    then puts the framed acknowledgment in `reply`."""

    __slots__ = ("ack", "body", "checked", "duplicate", "error", "owner", "reply", "text")

    def __init__(self, checked: Checked, body: bytes, owner: Any = None) -> None:
        self.checked = checked
        self.body = body
        self.owner = owner
        self.ack: str | None = None
        self.error: str | None = None
        self.text: str | None = None
        self.duplicate = False
        self.reply: bytes | None = None


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """A stored message as the full-parse stage reads it (`body` unsealed)."""

    id: int
    sender: str | None
    control_id: str | None
    message_type: str | None
    received_at: datetime
    body: bytes

    def __repr__(self) -> str:  # never the body
        return (f"StoredMessage(id={self.id}, sender={self.sender!r}, control_id={self.control_id!r}, "
                f"message_type={self.message_type!r}, {len(self.body)} bytes)")


def _bounded(value: str, limit: int = _KEY_MAX) -> str:
    if len(value) <= limit:
        return value
    return "sha256:" + hashlib.sha256(value.encode("utf-8", "surrogateescape")).hexdigest()


class MessageSealer:
    """Seals message bodies for a database column: `SLH1` | key id (6 bytes) | nonce (12) | AES-256-GCM ciphertext.

    The nonce is this sealer's random 8-byte prefix and a 4-byte counter (a new prefix when it wraps), so no
    randomness is drawn per message. The associated data binds the sender and control id of the row.
    """

    MAGIC: Final = b"SLH1"

    def __init__(self, key: bytes | None = None) -> None:
        key = key if key is not None else seal_key()
        self._aead = AESGCM(key)
        self._kid = bytes.fromhex(key_id(key))
        self._prefix = secrets.token_bytes(8)
        self._n = 0
        self._lock = threading.Lock()

    @staticmethod
    def _aad(sender: str | None, control_id: str | None) -> bytes:
        return f"{sender or ''}\x1f{control_id or ''}".encode("utf-8", "surrogateescape")

    def seal(self, body: bytes, sender: str | None, control_id: str | None) -> bytes:
        with self._lock:
            self._n += 1
            if self._n >= 1 << 32:
                self._prefix = secrets.token_bytes(8)
                self._n = 1
            nonce = self._prefix + self._n.to_bytes(4, "big")
        return self.MAGIC + self._kid + nonce + self._aead.encrypt(nonce, body, self._aad(sender, control_id))

    def unseal(self, blob: bytes, sender: str | None, control_id: str | None) -> bytes:
        if blob[:4] != self.MAGIC:
            raise SealedFileError("not a sealed message")
        if blob[4:10] != self._kid:
            raise SealedFileError("message was sealed under another key: it cannot be read with this one")
        try:
            return self._aead.decrypt(blob[10:22], blob[22:], self._aad(sender, control_id))
        except InvalidTag:
            raise SealedFileError("sealed message is damaged or belongs to another row (authentication failed)") \
                from None


class _Writer:
    """The writer's own DB-API connection, per back end: SQLite (WAL, synchronous=FULL) or PostgreSQL."""

    def __init__(self, url: str) -> None:
        u = make_url(url)
        self.backend = u.get_backend_name()
        if self.backend == "sqlite":
            self.ph = "?"
            self.path = u.database or ":memory:"
        elif self.backend == "postgresql":
            self.ph = "%s"
            self._conninfo = u.set(drivername="postgresql").render_as_string(hide_password=False)
        else:
            raise ValueError(f"the HL7v2 message store runs on SQLite or PostgreSQL, not {self.backend}")
        self.conn: Any = None
        cols = "sender, control_id, message_type, received_at, body, status, reason, ack_code, ack_error"
        # constant text and placeholders only: every value is a bound parameter
        self._insert_head = f"INSERT INTO hl7_messages ({cols}) VALUES "  # noqa: S608
        self._row = f"({', '.join([self.ph] * 9)})"
        self._insert_sql: dict[int, str] = {}  # by number of rows, made when first needed
        self.lookup_sql = {
            n: ("SELECT control_id, id, ack_code, ack_error, reason FROM hl7_messages WHERE sender = "  # noqa: S608
                f"{self.ph} AND control_id IN ({', '.join([self.ph] * n)})")
            for n in _SIZES
        }

    def connect(self) -> Any:
        """The connection, in autocommit mode: one statement is one transaction, or `insert` opens one."""
        if self.conn is None:
            conn: Any
            if self.backend == "sqlite":
                conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                       cached_statements=_ROWS + 2 * len(_SIZES))
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")  # a commit returns after the WAL is on the disk
                conn.execute("PRAGMA busy_timeout=30000")
                conn.execute(f"PRAGMA journal_size_limit={_WAL_LIMIT}")
                conn.execute("PRAGMA cache_size=-65536")
            else:
                import psycopg

                conn = psycopg.connect(self._conninfo, autocommit=True)
                conn.execute("SET synchronous_commit = on")  # a commit returns after the WAL is flushed
            self.conn = conn
        return self.conn

    def insert(self, rows: list[tuple[Any, ...]]) -> int:
        """Insert `rows` durably, all or none, and return the highest id given. Up to 256 rows are one multi-row
        INSERT, which is a transaction of its own (committed, and on disk, when it returns); more are 256-row
        INSERTs in one explicit transaction."""
        conn = self.connect()
        cur = conn.cursor()
        if len(rows) <= _ROWS:
            return self._insert(cur, rows)
        parts = [rows[i:i + _ROWS] for i in range(0, len(rows), _ROWS)]
        if self.backend == "postgresql":
            with conn.transaction():
                return max(self._insert(cur, part) for part in parts)
        cur.execute("BEGIN IMMEDIATE")
        try:
            highest = max(self._insert(cur, part) for part in parts)
            cur.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return highest

    def _insert(self, cur: Any, rows: list[tuple[Any, ...]]) -> int:
        """One INSERT statement of up to 256 rows; the highest id it gave."""
        sql = self._insert_sql.get(len(rows))
        if sql is None:
            sql = self._insert_sql[len(rows)] = (self._insert_head + ", ".join([self._row] * len(rows))
                                                 + (" RETURNING id" if self.backend == "postgresql" else ""))
        cur.execute(sql, [v for r in rows for v in r])
        if self.backend == "sqlite":
            return int(cur.lastrowid)  # the last row's: rowids are handed out in order
        return max(int(r[0]) for r in cur.fetchall())

    def lookup(self, sender: str, cids: list[str]) -> list[tuple[Any, ...]]:
        """(control id, id, ack code, ack error, reason) of the stored messages among `cids` from `sender`."""
        size = next(n for n in _SIZES if n >= len(cids))
        cur = self.connect().cursor()
        cur.execute(self.lookup_sql[size], [sender, *cids, *[cids[-1]] * (size - len(cids))])
        return list(cur.fetchall())

    def timestamp(self, now: datetime) -> Any:
        # as SQLAlchemy's SQLite DateTime writes it (UTC, naive text); PostgreSQL takes the aware datetime
        return now.strftime("%Y-%m-%d %H:%M:%S.%f") if self.backend == "sqlite" else now

    def close(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            finally:
                self.conn = None


def _integrity_error(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.IntegrityError) or getattr(exc, "sqlstate", None) == "23505"


def _data_error(exc: BaseException) -> bool:
    """The database refused a value (class 22, data exception), not the connection or the disk: a fault of one
    message, worth isolating."""
    sqlstate = getattr(exc, "sqlstate", None)
    return (isinstance(exc, ValueError) or any(c.__name__ == "DataError" for c in type(exc).__mro__)  # any driver's
            or (isinstance(sqlstate, str) and sqlstate[:2] == "22"))


class MessageStore:
    """The `hl7_messages` table: the listener's group-committing writer, and the full-parse stage's API."""

    def __init__(self, url: str | None = None, *, key: bytes | None = None) -> None:
        self.url = url or db_url()
        self.key = key  # None: the seal key from the environment (a writer process finds it the same way)
        self._idle = False  # the writer waits for work: the next submit wakes it
        self.engine: Engine = migrate(self.url)
        self.sealer = MessageSealer(key)
        self._writer = _Writer(self.url)
        self._write_lock = threading.Lock()
        self._cond = threading.Condition()
        self._queue: list[Pending] = []
        self._closing = False
        self._thread: threading.Thread | None = None
        self._on_commit: Callable[[list[Pending]], None] | None = None
        self._on_stored: Callable[[int, int], None] | None = None
        self._hooks: Any = None
        self._checkpointer: threading.Thread | None = None
        self._checkpoint_due = threading.Event()
        self.stats = {"batches": 0, "stored": 0, "duplicates": 0, "refused": 0, "failed": 0, "highest_id": 0,
                      "wal_restarts": 0, "wal_restarts_refused": 0}

    # -- the listener's side ----------------------------------------------------------------------------------------

    def start(self, on_commit: Callable[[list[Pending]], None],
              on_stored: Callable[[int, int], None] | None = None) -> None:
        """Start the writer thread. `on_commit(batch)` is called on it after each commit (or failed commit);
        `on_stored(new_messages, highest_id)` on a thread of its own after each batch that stored messages to be
        applied, so a slow or failing hook never holds up a commit or an ACK."""
        from concurrent.futures import ThreadPoolExecutor

        self._on_commit = on_commit
        self._on_stored = on_stored
        if on_stored is not None:
            self._hooks = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hl7-on-stored")
        self._start_checkpoints()
        self._thread = threading.Thread(target=self._run, name="hl7-store-writer", daemon=True)
        self._thread.start()

    def _start_checkpoints(self) -> None:
        conn = self._writer.connect()
        if self._writer.backend == "sqlite":
            conn.execute("PRAGMA wal_autocheckpoint=0")  # checkpoints run on a thread of their own (_checkpoints)
            self._checkpointer = threading.Thread(target=self._checkpoints, name="hl7-store-checkpoint", daemon=True)
            self._checkpointer.start()

    def submit(self, items: Iterable[Pending]) -> None:
        """Queue messages for the next commit (any thread)."""
        with self._cond:
            if self._closing:
                raise RuntimeError("the message store is closing")
            self._queue.extend(items)
            if self._idle:  # a busy writer takes the queue when its commit is done: no need to wake it
                self._cond.notify()

    def queued(self) -> int:
        with self._cond:
            return len(self._queue)

    def close(self, timeout: float = 30.0) -> None:
        """Commit what is queued, stop the writer, wait for the hook thread, close the connection."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self._checkpointer is not None:
            self._checkpoint_due.set()
            self._checkpointer.join(timeout)
            self._checkpointer = None
        if self._hooks is not None:
            self._hooks.shutdown(wait=True)
            self._hooks = None
        with self._write_lock:
            self._writer.close()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._idle = True
                while not self._queue and not self._closing:
                    self._cond.wait()
                self._idle = False
                if not self._queue:
                    return
                batch = self._queue[:_MAX_BATCH]  # everything that queued up while the last commit was in flight
                del self._queue[:_MAX_BATCH]
            new, highest = self.write(batch)
            assert self._on_commit is not None
            try:
                self._on_commit(batch)
            except Exception as exc:  # noqa: BLE001 - the writer must outlive a listener bug
                log.error("acknowledging a batch of %d messages failed (%s)", len(batch), type(exc).__name__)
            if new and self._hooks is not None:
                self._hooks.submit(self._call_on_stored, new, highest)

    def serve_pipe(self, conn: Any) -> None:
        """The writer process's loop (`WriterProcess`): each request on `conn` is one batch, each message as
        `WriterProcess.item` makes it (the listener's verdict and the frame); store it in one commit (`write`), and
        only then answer with the outcomes that differ from the verdicts (duplicates, a failed commit), new
        messages, highest id and stats. Ends when the listener closes its end."""
        self._start_checkpoints()
        conn.send_bytes(b"ready")
        try:
            while True:
                try:
                    blob = conn.recv_bytes()
                except (EOFError, OSError):
                    return
                batch = [Pending(Checked(a, e, t, None, None, None, s, cid, mt), body)
                         for a, e, t, s, cid, mt, body in marshal.loads(blob)]  # noqa: S302 - our own pipe
                new, highest = self.write(batch)
                changed = [(i, p.ack, p.error, p.text, p.duplicate) for i, p in enumerate(batch)
                           if p.duplicate or p.ack != p.checked.ack or p.error != p.checked.error
                           or p.text != p.checked.text]
                conn.send_bytes(marshal.dumps((changed, new, highest, self.stats)))
        finally:
            self.close()

    def _checkpoints(self) -> None:
        """SQLite: copy the WAL into the database file now and then, off the writer's path (a checkpoint run by the
        committing connection would hold up that commit's ACKs). PASSIVE, which never blocks the writer; then, when
        the WAL has grown past _WAL_RESTART_FRAMES and the PASSIVE one copied most of it, RESTART, so the next commit
        reuses the WAL from its start (see _WAL_RESTART_FRAMES). The RESTART holds the writer's lock, so it runs
        between two commits, and has no busy timeout: a reader still in the WAL makes it give up at once (counted in
        `stats["wal_restarts_refused"]`) rather than keep the writer waiting behind it."""
        conn = sqlite3.connect(self._writer.path, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA busy_timeout=0")
            while True:
                self._checkpoint_due.wait(1.0)
                self._checkpoint_due.clear()
                try:
                    _busy, frames, done = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    if frames >= _WAL_RESTART_FRAMES and frames - done <= frames // 4:
                        with self._write_lock:  # between two commits; a commit waits for it here, not in SQLite
                            busy = conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()[0]
                        self.stats["wal_restarts_refused" if busy else "wal_restarts"] += 1
                except sqlite3.Error as exc:
                    log.warning("a WAL checkpoint failed (%s); the next one will try again", type(exc).__name__)
                with self._cond:
                    if self._closing and self._thread is None:
                        return
        finally:
            conn.close()

    def _call_on_stored(self, new: int, highest: int) -> None:
        assert self._on_stored is not None
        try:
            self._on_stored(new, highest)
        except Exception as exc:  # noqa: BLE001 - a hook's failure is logged, never the messages' business
            log.error("the on_stored hook failed (%s) for %d new messages up to id %d", type(exc).__name__, new,
                      highest)

    def write(self, batch: Sequence[Pending]) -> tuple[int, int]:
        """Store `batch` in one transaction and set each item's outcome. Returns (messages stored as `received`,
        the highest id it gave). A failed commit sets AR 207 on every item and returns (0, 0); but when the database
        refused the batch for its data (one odd message), it is stored again in halves, so that message alone is
        refused and the rest of the batch, other senders' messages among them, is stored."""
        with self._write_lock:
            return self._write_isolating(batch)

    def _write_isolating(self, batch: Sequence[Pending]) -> tuple[int, int]:
        for attempt in (1, 2):
            try:
                return self._write(batch)
            except Exception as exc:  # noqa: BLE001 - any failure: nothing of the batch is kept
                if attempt == 1 and _integrity_error(exc):
                    continue  # another writer stored one of these keys meanwhile: look again
                code = getattr(exc, "sqlstate", None) or getattr(exc, "sqlite_errorname", None) or ""
                if not _integrity_error(exc):
                    self._writer.close()  # reconnect for the next batch
                if len(batch) > 1 and _data_error(exc):
                    half = len(batch) // 2
                    new1, high1 = self._write_isolating(batch[:half])
                    new2, high2 = self._write_isolating(batch[half:])
                    return new1 + new2, max(high1, high2)
                log.error("a batch of %d messages could not be stored (%s %s): refused with AR 207",
                          len(batch), type(exc).__name__, code)
                for p in batch:
                    p.ack, p.error, p.text, p.duplicate = REFUSE_REJECT, "207", T_NOT_STORED, False
                self.stats["failed"] += len(batch)
                return 0, 0
        raise AssertionError("unreachable")

    def _write(self, batch: Sequence[Pending]) -> tuple[int, int]:
        w = self._writer
        stamp = w.timestamp(datetime.now(UTC))
        first: dict[tuple[str, str], Pending] = {}
        copies: list[tuple[Pending, Pending]] = []
        by_sender: dict[str, list[str]] = {}
        keyed: list[tuple[Pending, str | None, str | None]] = []
        for p in batch:
            c = p.checked
            sender, cid = c.sender, c.control_id
            if sender is not None and cid is not None:
                if len(sender) > _KEY_MAX or len(cid) > _KEY_MAX:
                    sender, cid = _bounded(sender), _bounded(cid)
                k = (sender, cid)
                f = first.get(k)
                if f is not None:
                    copies.append((p, f))
                    continue
                first[k] = p
                ids = by_sender.get(sender)
                if ids is None:
                    by_sender[sender] = [cid]
                else:
                    ids.append(cid)
            elif sender is not None:
                sender = _bounded(sender)
            keyed.append((p, sender, cid))
        known = self._lookup(by_sender) if by_sender else {}
        rows: list[tuple[Any, ...]] = []
        new_received = 0
        seal = self.sealer.seal
        for p, sender, cid in keyed:
            hit = known.get((sender, cid)) if known else None  # type: ignore[arg-type]
            if hit is not None:
                p.ack, p.error = hit[1], hit[2]
                p.text = hit[3] if hit[2] is not None else None
                p.duplicate = True
                continue
            c = p.checked
            ack = p.ack = c.ack
            p.error, p.text = c.error, c.text
            mtype = c.message_type
            if mtype is not None and len(mtype) > _TYPE_MAX:
                mtype = _bounded(mtype, _TYPE_MAX)
            if ack == ACCEPT:
                new_received += 1
                rows.append((sender, cid, mtype, stamp, seal(p.body, sender, cid), "received", None, ack, None))
            else:
                rows.append((sender, cid, mtype, stamp, seal(p.body, sender, cid), "quarantined", c.text, ack,
                             c.error))
        highest = w.insert(rows) if rows else 0
        for p, f in copies:
            p.ack, p.error, p.text, p.duplicate = f.ack, f.error, f.text, True
        s = self.stats
        s["batches"] += 1
        if s["batches"] % 64 == 0:
            self._checkpoint_due.set()
        s["stored"] += len(rows)
        s["duplicates"] += len(batch) - len(rows)
        s["refused"] += len(rows) - new_received
        if highest > s["highest_id"]:
            s["highest_id"] = highest
        return new_received, highest

    def _lookup(self, by_sender: dict[str, list[str]]) -> dict[tuple[str, str], tuple[Any, ...]]:
        """The stored (id, ack_code, ack_error, reason) of each (sender, control id) already in the table. Read
        before the insert and outside its transaction: this is the only writer, and should another process store
        one of these keys meanwhile, the unique index refuses the insert and the batch is looked up again."""
        out: dict[tuple[str, str], tuple[Any, ...]] = {}
        top = _SIZES[-1]
        for sender, cids in by_sender.items():
            for i in range(0, len(cids), top):
                for cid, id_, ack, err, reason in self._writer.lookup(sender, cids[i:i + top]):
                    out[(sender, cid)] = (id_, ack, err, reason)
        return out

    # -- the full-parse stage's side --------------------------------------------------------------------------------

    def pending(self, limit: int = 500) -> list[StoredMessage]:
        """Up to `limit` messages with status `received`, oldest first, bodies unsealed. A body that does not
        unseal (damaged, moved, or sealed under another key) is marked `quarantined` with the reason and left out."""
        t = hl7_messages.c
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(t.id, t.sender, t.control_id, t.message_type, t.received_at, t.body)
                .where(t.status == "received").order_by(t.id).limit(limit)).all()
        out: list[StoredMessage] = []
        for r in rows:
            try:
                body = self.sealer.unseal(bytes(r.body), r.sender, r.control_id)
            except SealedFileError as exc:
                log.error("hl7_messages id %d cannot be unsealed (%s): quarantined", r.id, exc)
                self.mark(r.id, "quarantined", reason=f"the stored body cannot be unsealed: {exc}")
                continue
            at = r.received_at if r.received_at.tzinfo else r.received_at.replace(tzinfo=UTC)
            out.append(StoredMessage(r.id, r.sender, r.control_id, r.message_type, at, body))
        return out

    def mark(self, message_id: int, status: str, reason: str | None = None) -> bool:
        """Set a message's status (`applied` or `quarantined`, or `received` to process it again) and reason.
        False if there is no such message."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}")
        with self.engine.begin() as conn:
            done = conn.execute(update(hl7_messages).where(hl7_messages.c.id == message_id)
                                .values(status=status, reason=reason))
        return bool(done.rowcount)

    def counts(self) -> dict[str, int]:
        """Messages per status (every status present, 0 when none)."""
        t = hl7_messages.c
        with self.engine.connect() as conn:
            got: dict[str, int] = {r[0]: r[1] for r in conn.execute(select(t.status, func.count()).group_by(t.status))}
        return {s: int(got.get(s, 0)) for s in STATUSES}

    def control_ids(self, sender: str | None = None) -> set[str]:
        """The control ids stored (from one sender): what the tests and the benchmark compare with the ACKs."""
        t = hl7_messages.c
        q = select(t.control_id).where(t.control_id.is_not(None))
        if sender is not None:
            q = q.where(t.sender == sender)
        with self.engine.connect() as conn:
            return {r[0] for r in conn.execute(q)}


def reply(p: Pending) -> bytes:
    """The framed ACK of a message whose outcome the store has set (after its commit)."""
    c = p.checked
    return build_ack(c, p.ack or REFUSE_REJECT, p.error, p.text,
                     None if p.duplicate or p.error != c.error else c.location, framed=True)


def _writer_main(fd: int) -> None:
    """The writer process (`python -c`, see WriterProcess): its settings arrive first on the pipe. It stops when
    the listener closes the pipe (or dies), never on a signal, so a SIGTERM or Ctrl-C sent to the whole process
    group still lets the listener commit and acknowledge what it received."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    conn = Connection(fd)
    url, key, level = marshal.loads(conn.recv_bytes())  # noqa: S302 - from the listener that started us
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s (writer): %(message)s")
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 20, 100)
    MessageStore(url, key=key).serve_pipe(conn)


class _Answers(asyncio.Protocol):
    """The listener's end of the writer pipe: length-prefixed answers (multiprocessing's framing) in, one call each."""

    def __init__(self, on_answer: Callable[[bytes], None], on_lost: Callable[[], None]) -> None:
        self.on_answer = on_answer
        self.on_lost = on_lost
        self.buf = bytearray()
        self.closing = False

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        while len(buf) >= 4:
            n = int.from_bytes(buf[:4], "big", signed=True)
            if len(buf) < 4 + n:
                return
            msg = bytes(buf[4:4 + n])
            del buf[:4 + n]
            self.on_answer(msg)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closing:
            self.on_lost()


class WriterProcess:
    """The store's writer in a process of its own, so sealing, SQLite and fsync run on another core than the event
    loop (no shared interpreter lock). The listener sends a batch with `send`; `on_answer` gets the answer after
    the commit that holds it returned, and `answer` sets each message's outcome from it. The listener keeps one
    batch in flight: what arrives meanwhile is the next batch (group commit)."""

    def __init__(self, store: MessageStore) -> None:
        # a fresh interpreter (not a fork: no threads, loop or connections copied; not multiprocessing's spawn,
        # which would run the parent's __main__ again); settings, the seal key with them, go over the pipe
        ours, theirs = socket.socketpair()
        code = (f"import sys; sys.path.insert(0, {str(_REPO)!r}); "
                f"from connectors.hl7v2.store import _writer_main; _writer_main({theirs.fileno()})")
        self.process = subprocess.Popen([sys.executable, "-c", code], pass_fds=[theirs.fileno()],
                                        stdin=subprocess.DEVNULL)
        theirs.close()
        self._conn = Connection(ours.detach())
        try:
            self._conn.send_bytes(marshal.dumps((store.url, store.key, logging.getLogger().getEffectiveLevel())))
            if self._conn.recv_bytes() != b"ready":
                raise EOFError
        except (EOFError, OSError):
            self._conn.close()
            code_ = self.process.wait(10)
            raise RuntimeError(f"the HL7v2 store's writer process failed to start (exit status {code_})") from None
        self._transport: asyncio.Transport | None = None
        self._answers: _Answers | None = None

    async def connect(self, on_answer: Callable[[bytes], None], on_lost: Callable[[], None]) -> None:
        """Put the pipe on the running loop (non-blocking both ways)."""
        sock = socket.socket(fileno=os.dup(self._conn.fileno()))
        self._conn.close()
        sock.setblocking(False)
        answers = self._answers = _Answers(on_answer, on_lost)
        transport, _ = await asyncio.get_running_loop().create_unix_connection(lambda: answers, sock=sock)
        self._transport = transport

    def send(self, batch: list[Pending]) -> None:
        assert self._transport is not None
        blob = marshal.dumps([(c.ack, c.error, c.text, c.sender, c.control_id, c.message_type, p.body)
                              for p in batch for c in (p.checked,)])
        self._transport.writelines((len(blob).to_bytes(4, "big", signed=True), blob))

    @staticmethod
    def answer(msg: bytes, batch: list[Pending]) -> tuple[int, int, dict[str, int]]:
        """Set the outcome of each message of `batch` (the batch in flight) from the writer's answer; returns
        (new messages, highest id, the store's stats)."""
        changed, new, highest, stats = marshal.loads(msg)  # noqa: S302 - from our own child, over our own pipe
        for p in batch:
            c = p.checked
            p.ack, p.error, p.text = c.ack, c.error, c.text
        for i, ack, error, text, duplicate in changed:
            p = batch[i]
            p.ack, p.error, p.text, p.duplicate = ack, error, text, duplicate
        return new, highest, stats

    def close_pipe(self) -> None:
        """Close the pipe (on the loop): the writer process finishes (nothing is in flight by then) and exits."""
        if self._answers is not None:
            self._answers.closing = True
        if self._transport is not None:
            self._transport.close()
        else:
            self._conn.close()

    def close(self, timeout: float = 30.0) -> None:
        """Wait for the writer process to exit after `close_pipe` (which this calls if it was not connected)."""
        if self._transport is None:
            self.close_pipe()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.error("the HL7v2 store's writer process did not stop in %.0f s: killed", timeout)
            self.process.kill()
            self.process.wait(5)
