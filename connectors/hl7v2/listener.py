"""The MLLP listener: check each message (fastcheck.py), store it durably (store.py), and only then acknowledge it.

    listener = MllpListener(MessageStore(), host="0.0.0.0", port=2575, ssl=server_context(cert, key, client_ca))
    asyncio.run(listener.serve())          # until SIGTERM or SIGINT, or `await listener.stop()`

One asyncio server (`asyncio.Protocol`, on uvloop when it is installed), any number of connections, each carrying
any number of messages, one at a time (stop-and-wait) or pipelined. For each frame: the hot-path checks, then the
message is queued for the store's next group commit, which runs in the writer process (store.WriterProcess: sealing,
SQLite and fsync on another core, not under this process's interpreter lock); one batch is in flight at a time, and
what arrives meanwhile is the next. When the writer answers that the commit holding a message has returned, its ACK
(AA, or AE/AR with ERR-3) is written back. A connection's ACKs go back in the order its messages arrived. An ACK is
never written for a message that is not yet on disk: that is what AA means here. Should the writer process die,
the listener stops (with an error) without acknowledging what it had not answered.

- A connection that pipelines more than `max_inflight` unacknowledged messages is paused until ACKs catch up.
- A frame over `max_message` bytes (1 MiB) is refused with AR 207 unread and not stored; its ACK keeps its place.
- `on_stored(new_messages, highest_id)`, if given, is called once per committed batch that stored messages to
  apply, on a thread of its own (in this process), never delaying a commit or an ACK (that is how events are
  published; this module imports no event library). Its exceptions are logged by type, without message content.
- SIGTERM or SIGINT: stop accepting and stop reading, commit and acknowledge everything already received, close.
- A commit the writer has not answered for `stall_warning` seconds (10; the database locked by another process, a
  disk that stopped answering) is logged as an error, with how long and how many messages wait, and again each
  further `stall_warning` seconds, then once when it returns: the senders see only ACKs that do not come.
- Logs carry counts, ids and peer addresses, never message content.

`ListenerProcess` runs `schoolslink mllp listen` as a child process (tests and the benchmark).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import ssl as ssl_module
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Final, cast

from connectors.hl7v2.ack import build_ack
from connectors.hl7v2.fastcheck import REFUSE_REJECT, Checked, check
from connectors.hl7v2.mllp import MAX_FRAME, FrameDecoder, Oversize
from connectors.hl7v2.store import T_CHECK_FAILED, T_NOT_STORED, MessageStore, Pending, WriterProcess, reply
from connectors.peer_process import REPO_ROOT, PeerProcess

__all__ = ["T_CHECK_FAILED", "T_OVERSIZE", "ListenerProcess", "MllpListener", "run", "server_context"]

log = logging.getLogger(__name__)

T_OVERSIZE: Final = "message over the listener's size limit: not stored; split it, or ask for the limit to be raised"
_STATS_EVERY: Final = 10.0  # seconds between the counts in the log
_MAX_BATCH: Final = 10_000  # frames per hand-over to the writer
_MAX_BYTES: Final = 64 << 20  # and bytes (the pipe's framing takes under 2 GiB a message)


def server_context(cert: str | Path, key: str | Path, client_ca: str | Path | None = None) -> ssl_module.SSLContext:
    """TLS for the listener (1.2 or later): our certificate and key; with `client_ca`, mutual TLS (a client must
    present a certificate that chains to it)."""
    ctx = ssl_module.SSLContext(ssl_module.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl_module.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert), str(key))
    if client_ca is not None:
        ctx.verify_mode = ssl_module.CERT_REQUIRED
        ctx.load_verify_locations(str(client_ca))
    return ctx


class _Connection(asyncio.Protocol):
    """One client connection: frames in, ACKs out in arrival order."""

    __slots__ = ("closed", "decoder", "listener", "paused", "peer", "queue", "transport", "write_paused")

    def __init__(self, listener: MllpListener) -> None:
        self.listener = listener
        self.decoder = FrameDecoder(listener.max_message)
        self.queue: deque[Pending] = deque()  # received, not yet acknowledged, in order
        self.transport: asyncio.Transport | None = None
        self.paused = False  # reading paused: too many messages not yet acknowledged
        self.write_paused = False  # reading paused: the sender is not reading its ACKs
        self.closed = False
        self.peer = "?"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.listener.connections.add(self)
        self.listener.counts["connections"] += 1
        if self.listener.stopping:
            transport.close()
        log.debug("connection from %s", self.peer)

    def data_received(self, data: bytes) -> None:
        lst = self.listener
        if lst.stopping:  # shutting down: what arrives now is read and dropped, never acknowledged
            lst.counts["dropped_at_shutdown"] += len(self.decoder.feed(data))
            return
        ready = False
        q = self.queue
        for fr in self.decoder.feed(data):
            if fr.__class__ is Oversize:
                assert isinstance(fr, Oversize)
                try:
                    c = check(fr.head)
                except Exception:  # noqa: BLE001 - refused all the same, for its size
                    c = Checked(REFUSE_REJECT, "207", T_OVERSIZE, None, None, None, None, None, None)
                p = Pending(c, b"", self)
                p.ack, p.error, p.text = REFUSE_REJECT, "207", T_OVERSIZE
                p.reply = build_ack(c, REFUSE_REJECT, "207", T_OVERSIZE, framed=True)  # ready now: nothing to store
                q.append(p)
                lst.counts["oversize"] += 1
                log.warning("a %d-byte message from %s refused: over the %d-byte limit", fr.length, self.peer,
                            lst.max_message)
                ready = True
                continue
            assert isinstance(fr, bytes)
            try:
                c = check(fr)
            except Exception as exc:  # noqa: BLE001 - a bug in the checks must not drop the connection's messages
                log.error("the hot-path checks failed on a message from %s (%s): refused with AR 207", self.peer,
                          type(exc).__name__)
                c = Checked(REFUSE_REJECT, "207", T_CHECK_FAILED, None, None, None, None, None, None)
            p = Pending(c, fr, self)
            q.append(p)
            lst.enqueue(p)
        if ready:
            self.flush()
        if len(q) > lst.max_inflight and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def pause_writing(self) -> None:
        """The transport's buffer of unread ACKs is full (a sender that does not read them): read no more from it,
        so its ACKs cannot pile up in memory without end."""
        self.write_paused = True
        if self.transport is not None and not self.paused:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.transport is not None and not self.paused and not self.closed:
            self.transport.resume_reading()

    def flush(self) -> None:
        """Write the ACKs that are ready at the head of the queue (one write for all of them)."""
        q = self.queue
        out: list[bytes] = []
        while q and q[0].reply is not None:
            out.append(q.popleft().reply or b"")
        if out and not self.closed and self.transport is not None:
            self.transport.write(b"".join(out))
        if self.paused and len(q) <= self.listener.max_inflight // 2 and self.transport is not None:
            self.paused = False
            if not self.write_paused:
                self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.listener.connections.discard(self)
        if self.decoder.discarded:
            self.listener.counts["discarded_bytes"] += self.decoder.discarded
        log.debug("connection from %s closed (%d messages unacknowledged)", self.peer, len(self.queue))


class MllpListener:
    """The listener (see the module docstring)."""

    def __init__(self, store: MessageStore, *, host: str = "127.0.0.1", port: int = 2575,
                 ssl: ssl_module.SSLContext | None = None, on_stored: Callable[[int, int], None] | None = None,
                 max_message: int = MAX_FRAME, max_inflight: int = 1000, stall_warning: float = 10.0) -> None:
        self.store = store
        self.host = host
        self.port = port
        self.ssl = ssl
        self.on_stored = on_stored
        self.max_message = max_message
        self.max_inflight = max_inflight
        if not stall_warning > 0:
            raise ValueError("stall_warning must be over 0 seconds")
        self.stall_warning = stall_warning
        self.stalls = 0  # commits that took longer than stall_warning
        self._sent_at = 0.0  # when the batch in flight went to the writer
        self._stall_logged = 0.0  # how long it had waited when last logged (0: not logged)
        self._watchdog: asyncio.Future[None] | None = None
        self.connections: set[_Connection] = set()
        self.counts = {"connections": 0, "messages": 0, "oversize": 0, "discarded_bytes": 0, "dropped_at_shutdown": 0}
        self.stopping = False
        self._outbox: list[Pending] = []  # received, not yet handed to the writer
        self._batch: list[Pending] | None = None  # with the writer: its commit not yet answered
        self._inflight = 0  # received, not yet committed
        self._writer: WriterProcess | None = None
        self._hooks: Any = None
        self.failed = False
        self._torn_down = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._stopped: asyncio.Event | None = None
        self._drained: asyncio.Event | None = None
        self._tasks: set[asyncio.Future[None]] = set()  # stop() started by a signal: kept until done

    # -- the hot path ---------------------------------------------------------------------------------------------

    def enqueue(self, p: Pending) -> None:
        self._inflight += 1
        if not self._outbox and self._batch is None:
            assert self._loop is not None
            self._loop.call_soon(self._submit)  # once per loop pass: every connection's frames in one hand-over
        self._outbox.append(p)

    def _submit(self) -> None:
        """Hand what was received to the writer, unless a commit is in flight: then it is the next batch."""
        if self._batch is not None or not self._outbox or self._writer is None:
            return
        n = size = 0
        for p in self._outbox:  # up to _MAX_BATCH frames, and about _MAX_BYTES (one frame is up to 1 MiB)
            n += 1
            size += len(p.body)
            if n >= _MAX_BATCH or size >= _MAX_BYTES:
                break
        batch = self._outbox[:n]
        try:
            self._writer.send(batch)
        except Exception as exc:  # noqa: BLE001 - nothing of it reached the writer: nobody is acknowledged
            log.critical("handing a batch of %d messages to the writer failed (%s)", n, type(exc).__name__)
            self._writer_lost()
            return
        del self._outbox[:n]
        self._batch = batch
        self._sent_at = time.monotonic()

    def _committed(self, answer: bytes) -> None:
        """The writer answered (the commit holding the batch in flight has returned): write its ACKs, hand over
        the next batch."""
        batch, self._batch = self._batch, None
        assert batch is not None
        new, highest, stats = WriterProcess.answer(answer, batch)
        if self._stall_logged:
            self._stall_logged = 0.0
            lost = sum(1 for p in batch if p.text == T_NOT_STORED)
            if lost:
                log.error("the store answered after %.1f s, and could not store the commit: %d messages refused "
                          "with AR 207 (their senders must send them again)", time.monotonic() - self._sent_at, lost)
            else:
                log.warning("the store answered after %.1f s: %d messages stored and acknowledged",
                            time.monotonic() - self._sent_at, len(batch))
        self._submit()  # the next group commit starts before this one's ACKs are written
        self.store.stats.update(stats)
        owners = set()
        for p in batch:
            p.reply = reply(p)
            p.body = b""
            owners.add(p.owner)
        for conn in owners:
            conn.flush()
        self._inflight -= len(batch)
        self.counts["messages"] += len(batch)
        if new and self._hooks is not None:
            self._hooks.submit(self.store._call_on_stored, new, highest)
        if self._inflight == 0 and self._drained is not None:
            self._drained.set()

    def _writer_lost(self) -> None:
        """The writer process is gone: what it had not answered is unacknowledged (the senders will send it again;
        what it did commit is deduplicated then). Fail-stop: close every connection and stop, with an error."""
        log.critical("the HL7v2 store's writer process is gone: %d messages unacknowledged; stopping",
                     self._inflight)
        self.failed = self.stopping = True
        self._inflight = 0
        self._outbox.clear()
        self._batch = None
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()
        if self._drained is not None:
            self._drained.set()  # a stop() in progress goes on to its teardown
        self._tasks.add(asyncio.ensure_future(self._teardown()))  # the writer reaped, the store closed

    # -- lifecycle --------------------------------------------------------------------------------------------------

    async def start(self) -> int:
        """Start the writer and the server; returns the port (useful with port 0)."""
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        if self.on_stored is not None:
            from concurrent.futures import ThreadPoolExecutor

            self.store._on_stored = self.on_stored
            self._hooks = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hl7-on-stored")
        self._writer = await self._loop.run_in_executor(None, WriterProcess, self.store)
        try:
            await self._writer.connect(self._committed, self._writer_lost)
            self._server = await self._loop.create_server(lambda: _Connection(self), self.host, self.port,
                                                          ssl=self.ssl, reuse_address=True, backlog=512)
        except BaseException:  # cannot bind, say: no writer process left behind
            self.stopping = True
            await self._teardown()
            raise
        sock = self._server.sockets[0]
        self.port = int(sock.getsockname()[1])
        log.info("MLLP listener on %s:%d (TLS %s), storing to %s", self.host, self.port,
                 "off" if self.ssl is None else
                 ("mutual" if self.ssl.verify_mode == ssl_module.CERT_REQUIRED else "on"),
                 self.store.engine.url.get_backend_name())
        return self.port

    async def serve(self, ready: Callable[[int], None] | None = None, *, stop_on_stdin_eof: bool = False) -> None:
        """Start, call `ready(port)`, run until SIGTERM/SIGINT or `stop()` (or, with `stop_on_stdin_eof`, until
        standard input closes: the parent that started us is gone), then shut down gracefully."""
        port = await self.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, lambda: self._tasks.add(asyncio.ensure_future(self.stop())))
        if stop_on_stdin_eof:
            fd = sys.stdin.fileno()

            def on_stdin() -> None:
                if not os.read(fd, 4096):
                    loop.remove_reader(fd)
                    self._tasks.add(asyncio.ensure_future(self.stop()))

            loop.add_reader(fd, on_stdin)
        if ready is not None:
            ready(port)
        stats = asyncio.ensure_future(self._log_stats())
        self._watchdog = asyncio.ensure_future(self._watch_commits())
        assert self._stopped is not None
        await self._stopped.wait()  # after _teardown, which stopped the watchdog
        stats.cancel()
        if self.failed:
            raise RuntimeError("the HL7v2 store's writer process is gone")

    async def _watch_commits(self) -> None:
        """Log a commit that has not been answered for `stall_warning` seconds, and again each further period."""
        while True:
            await asyncio.sleep(min(1.0, self.stall_warning / 4))
            if self._batch is None:
                continue
            waited = time.monotonic() - self._sent_at
            if waited >= self.stall_warning and waited - self._stall_logged >= self.stall_warning:
                if not self._stall_logged:
                    self.stalls += 1
                self._stall_logged = waited
                log.error("the store has not answered a commit for %.1f s: %d messages wait for their ACKs (%d in "
                          "that commit); is the database locked by another process, or the disk not answering?",
                          waited, self._inflight, len(self._batch))

    async def _log_stats(self) -> None:
        seen = dict(self.store.stats)
        while True:
            await asyncio.sleep(_STATS_EVERY)
            now = dict(self.store.stats)
            if now != seen:
                log.info("stored %d, duplicates %d, refused %d, failed %d in %d batches; highest id %d; "
                         "%d connections open", now["stored"] - seen["stored"],
                         now["duplicates"] - seen["duplicates"], now["refused"] - seen["refused"],
                         now["failed"] - seen["failed"], now["batches"] - seen["batches"], now["highest_id"],
                         len(self.connections))
                seen = now

    async def stop(self, timeout: float = 30.0, linger: float = 2.0) -> None:
        """Stop accepting; commit and acknowledge every message already received; then close each connection.

        Messages that arrive after the stop began are read and dropped unacknowledged (the sender will send them
        again): reading them rather than leaving them in the socket keeps the close a FIN, not a reset that could
        take the last ACKs with it. A connection that can be half-closed is, after its last ACK, and given `linger`
        seconds to close from its side."""
        if self.stopping and not self.failed:
            return
        if self._torn_down:
            return
        self.stopping = True
        t0 = time.monotonic()
        try:
            if self._server is not None:
                self._server.close()
            self._submit()
            self._drained = asyncio.Event()
            if self._inflight:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._drained.wait(), timeout)
            for conn in list(self.connections):
                t = conn.transport
                if t is None or conn.closed:
                    continue
                conn.flush()
                if conn.paused:
                    conn.paused = False
                    t.resume_reading()
                try:
                    if t.can_write_eof():
                        t.write_eof()  # after the last ACK: the sender reads them all, then end of stream
                    else:
                        t.close()
                except OSError:  # the peer reset it meanwhile (asyncio's own loop raises; uvloop reports it)
                    t.abort()
            deadline = time.monotonic() + linger
            while self.connections and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            for conn in list(self.connections):
                if conn.transport is not None:
                    conn.transport.close()
            await asyncio.sleep(0)
        finally:
            await self._teardown()
        s = self.store.stats
        log.info("MLLP listener stopped in %.1f s: %d messages stored in %d commits, %d duplicates, %d refused, "
                 "%d failed, %d oversize, %d connections; %d arrived while stopping (not acknowledged)",
                 time.monotonic() - t0, s["stored"], s["batches"], s["duplicates"], s["refused"], s["failed"],
                 self.counts["oversize"], self.counts["connections"], self.counts["dropped_at_shutdown"])

    async def _teardown(self) -> None:
        """Close the writer (it exits when its pipe closes), the hook thread and the store; then `serve` returns.
        Runs once, whatever went before it (a clean stop, a failed one, the writer's death)."""
        if self._torn_down:
            return
        self._torn_down = True
        if self._watchdog is not None:  # nothing more will be answered: no more "has not answered" lines
            self._watchdog.cancel()
        if self._inflight:
            log.error("%d messages were not acknowledged when the listener stopped (their senders will send them "
                      "again)", self._inflight)
        loop = asyncio.get_running_loop()
        try:
            if self._writer is not None:
                self._writer.close_pipe()
                await loop.run_in_executor(None, self._writer.close)
            if self._hooks is not None:
                await loop.run_in_executor(None, self._hooks.shutdown)
            await loop.run_in_executor(None, self.store.close)
        finally:
            if self._stopped is not None:
                self._stopped.set()


def run(listener: MllpListener, ready: Callable[[int], None] | None = None, *, stop_on_stdin_eof: bool = False) -> None:
    """Run `listener` until it stops, on uvloop when it is installed. Meant for a process of its own: it also tunes
    the garbage collector for a server (what was loaded at start is frozen out of collections; collections are
    rarer), which spares the hot path a full collection over every module's objects every few thousand messages."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 20, 100)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - the plain asyncio loop works, a little slower
        factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    else:
        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(listener.serve(ready, stop_on_stdin_eof=stop_on_stdin_eof))


class ListenerProcess(PeerProcess):
    """`schoolslink mllp listen` as a child process on 127.0.0.1 (port 0: any free port).

    `env` should set SCHOOLSLINK_HOME and, for another store, SCHOOLSLINK_DB_URL. `args` adds options (TLS)."""

    error: ClassVar[type[Exception]] = RuntimeError
    name: ClassVar[str] = "MLLP listener"
    script: ClassVar[Path] = REPO_ROOT / "schoolslink" / "mllp_cli.py"
    cwd: ClassVar[Path] = REPO_ROOT
    log_prefix: ClassVar[str] = "schoolslink-mllp-"

    def __init__(self, *, port: int = 0, env: dict[str, str] | None = None, args: list[str] | None = None,
                 log_path: str | Path | None = None, startup_timeout: float = 60.0,
                 wrapper: list[str] | None = None) -> None:
        super().__init__(port=port, log_path=log_path, startup_timeout=startup_timeout, install=False, env=env)
        self.args = list(args or [])
        self.wrapper = list(wrapper or [])  # e.g. strace and its options

    def _command(self) -> list[str]:
        return [*self.wrapper, sys.executable, "-m", "schoolslink.cli", "mllp", "listen", "--host", "127.0.0.1",
                "--port", str(self.requested_port), "--exit-on-stdin-eof", *self.args]

    def kill(self) -> None:
        """SIGKILL, no clean-up (the durability tests)."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        self.stop()

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait: the graceful shutdown. Returns the exit status."""
        proc = self._proc
        assert proc is not None
        proc.terminate()
        code = proc.wait(timeout=timeout)
        self.stop()
        return code
