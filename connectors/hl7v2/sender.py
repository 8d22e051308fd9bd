"""The MLLP sender: messages from files, over one connection, each acknowledged before the next is sent.

    with MllpSender("127.0.0.1", 2575, timeout=10, retries=3) as s:
        for msg in read_messages(Path("adt.hl7")):
            ack = s.send(msg)              # Ack(code='AA', control_id='MSG00001', error=None, text=None, ...)

A file holds one or more messages: separated by blank lines, or each beginning with `MSH` at the start of a line.
Lines may end with LF, CR LF or CR; segments are sent ending with CR (as MLLP and HL7 expect).

If no ACK arrives within `timeout` seconds, or the connection drops, the sender reconnects and sends the same
message again (the same bytes, so the same MSH-10: the listener acknowledges a resend without storing it twice),
up to `retries` more times, then gives up on that message (`NoAcknowledgment`). An ACK whose MSA-2 is not the sent
message's control id is treated like a lost one.
"""

from __future__ import annotations

import socket
import ssl as ssl_module
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from connectors.hl7v2.fastcheck import WS, check
from connectors.hl7v2.mllp import FrameDecoder, Oversize, frame

__all__ = ["Ack", "MllpSender", "NoAcknowledgment", "client_context", "parse_ack", "read_messages", "split_messages"]


class NoAcknowledgment(Exception):
    """No acknowledgment for a message after every attempt (the message was not necessarily lost: resend it)."""


@dataclass(frozen=True, slots=True)
class Ack:
    """What the listener answered: MSA-1 `code`, MSA-2 `control_id`, ERR-3 `error` code and its `text`."""

    code: str
    control_id: str
    error: str | None
    text: str | None
    attempts: int = 1


def _unescape(value: bytes, enc: bytes) -> bytes:
    esc = enc[3:4]
    if esc not in value:
        return value
    table = {b"F": enc[0:1], b"S": enc[1:2], b"R": enc[2:3], b"E": esc, b"T": enc[4:5]}
    parts = value.split(esc)
    out = [parts[0]]
    for i in range(1, len(parts), 2):
        out.append(table.get(parts[i], esc + parts[i] + esc))
        if i + 1 < len(parts):
            out.append(parts[i + 1])
    return b"".join(out)


def parse_ack(raw: bytes) -> Ack:
    """An acknowledgment's MSA and ERR, read in its own encoding characters."""
    raw = raw.lstrip(WS)
    if raw[:3] != b"MSH" or len(raw) < 8:
        raise ValueError("the reply is not an HL7 acknowledgment (no MSH)")
    enc = raw[3:8]
    fs, comp = enc[:1], enc[1:2]
    code = control_id = b""
    error = text = None
    for seg in raw.replace(b"\n", b"\r").split(b"\r"):
        f = seg.split(fs)
        if f[0] == b"MSA":
            code = f[1] if len(f) > 1 else b""
            control_id = f[2] if len(f) > 2 else b""
        elif f[0] == b"ERR" and len(f) > 3 and error is None:
            c = f[3].split(comp)
            error = c[0].decode("ascii", "replace")
            text = _unescape(c[1], enc).decode("utf-8", "replace") if len(c) > 1 else None
    if code not in (b"AA", b"AE", b"AR", b"CA", b"CE", b"CR"):
        raise ValueError("the reply has no acknowledgment code (MSA-1)")
    return Ack(code.decode(), control_id.decode("ascii", "backslashreplace"), error, text)


def split_messages(data: bytes) -> list[bytes]:
    """The messages in a file's bytes (see the module docstring), each with CR segment terminators."""
    lines = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    out: list[bytes] = []
    current: list[bytes] = []
    for line in lines:
        line = line.strip(b"\x0b\x1c")  # a file saved with its MLLP framing
        if not line.strip(WS):
            if current:
                out.append(b"\r".join(current) + b"\r")
                current = []
            continue
        if line.startswith(b"MSH") and current:
            out.append(b"\r".join(current) + b"\r")
            current = []
        current.append(line.rstrip(WS))
    if current:
        out.append(b"\r".join(current) + b"\r")
    return out


def read_messages(path: Path) -> list[bytes]:
    return split_messages(path.read_bytes())


def client_context(ca: str | Path | None = None, cert: str | Path | None = None,
                   key: str | Path | None = None) -> ssl_module.SSLContext:
    """TLS for the sender: the listener's certificate checked against `ca` (else the system's CAs) and its host
    name; with `cert` and `key`, our client certificate (for a listener that requires mutual TLS)."""
    ctx = ssl_module.create_default_context(cafile=str(ca) if ca else None)
    ctx.minimum_version = ssl_module.TLSVersion.TLSv1_2
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key) if key else None)
    return ctx


class MllpSender:
    """One connection to a listener, stop-and-wait (see the module docstring)."""

    def __init__(self, host: str, port: int, *, ssl: ssl_module.SSLContext | None = None, timeout: float = 10.0,
                 retries: int = 3, connect_timeout: float | None = None) -> None:
        self.host = host
        self.port = port
        self.ssl = ssl
        self.timeout = timeout
        self.retries = retries
        self.connect_timeout = connect_timeout if connect_timeout is not None else timeout
        self._sock: socket.socket | None = None
        self._decoder = FrameDecoder()
        self._ready: list[bytes] = []

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None

    def _connect(self) -> socket.socket:
        if self._sock is None:
            sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.ssl is not None:
                try:
                    sock = self.ssl.wrap_socket(sock, server_hostname=self.host)
                except BaseException:
                    sock.close()
                    raise
            self._sock = sock
            self._decoder = FrameDecoder()
            self._ready = []
        return self._sock

    def _receive(self, sock: socket.socket, deadline: float) -> bytes:
        while not self._ready:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no acknowledgment in time")
            sock.settimeout(left)
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("the listener closed the connection")
            for fr in self._decoder.feed(data):
                if not isinstance(fr, Oversize):
                    self._ready.append(fr)
        return self._ready.pop(0)

    def send(self, message: bytes) -> Ack:
        """Send one message and return its acknowledgment (retrying as the module docstring says)."""
        control_id = check(message).control_id or ""
        why = ""
        for attempt in range(1, self.retries + 2):
            try:
                sock = self._connect()
                sock.settimeout(self.timeout)
                sock.sendall(frame(message))
                ack = parse_ack(self._receive(sock, time.monotonic() + self.timeout))
                if control_id and ack.control_id != control_id:
                    raise ConnectionError("the acknowledgment is for another message")
                return Ack(ack.code, ack.control_id, ack.error, ack.text, attempt)
            except ssl_module.SSLError:
                self.close()
                raise  # a TLS failure does not pass by trying again
            except (OSError, ValueError) as exc:  # TimeoutError and ConnectionError are OSErrors
                why = "timed out" if isinstance(exc, TimeoutError) else type(exc).__name__
                self.close()
        raise NoAcknowledgment(f"no acknowledgment after {self.retries + 1} attempts ({why})")
