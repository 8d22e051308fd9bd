"""Sealed files: pupil data at rest, encrypted and authenticated, readable as a seekable stream.

A sealed file is AES-256-GCM in fixed 64 KiB chunks (the STREAM construction), so a 200 MB export is
sealed and read with constant memory and a reader can seek (the CTF reader looks back at a file's end to
tell truncation from other damage):

    magic "SLSEAL1\\n" | u16 header length | header JSON | nonce prefix (8 bytes) | chunk 0 | chunk 1 | ...

Each chunk is its plaintext (64 KiB, the last one shorter and possibly empty) sealed with nonce
`prefix || u32 counter`, and with the header bytes, the counter and a final-chunk flag as associated data.
So a changed header, a swapped, reordered or altered chunk, or a file cut short (even at a chunk boundary:
the new last chunk was not sealed as the final one) fails authentication and is refused with
`SealedFileError`; nothing unauthenticated is ever handed to a reader.

The header holds metadata only (what kind of file, which school, when it landed, when it may be deleted,
the key id): never pupil data. The key is 32 random bytes kept outside the database: `SCHOOLSLINK_SEAL_KEY`
(64 hex digits) in the environment, or `SCHOOLSLINK_HOME/secrets/seal.key`, created on first use with mode
0600. The header names the key (`kid`, a hash prefix), so a file sealed under another key is refused with
that reason rather than as damage.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any, Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from schoolslink.settings import home

MAGIC: Final = b"SLSEAL1\n"
CHUNK: Final = 1 << 16
TAG: Final = 16
_PREFIX: Final = 8
_MAX_HEADER: Final = 4096
KEY_ENV: Final = "SCHOOLSLINK_SEAL_KEY"


class SealedFileError(Exception):
    """A sealed file cannot be opened: not sealed, damaged, cut short, or sealed under another key."""


# Key ---------------------------------------------------------------------------------------------------------


def _key_file() -> Path:
    return home() / "secrets" / "seal.key"


def seal_key() -> bytes:
    env = os.environ.get(KEY_ENV)
    if env:
        try:
            k = bytes.fromhex(env.strip())
        except ValueError:
            raise SealedFileError(f"{KEY_ENV} must be 64 hex digits") from None
        if len(k) != 32:
            raise SealedFileError(f"{KEY_ENV} must be 64 hex digits")
        return k
    p = _key_file()
    if not p.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another process made it first
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
    return bytes.fromhex(p.read_text().strip())


def key_id(key: bytes) -> str:
    return hashlib.sha256(b"schoolslink-seal\x1f" + key).hexdigest()[:12]


# Writing -----------------------------------------------------------------------------------------------------


class SealWriter(io.RawIOBase):
    """A write-only stream that seals what is written to `path` (via a temporary file, renamed on close).

    Close it (or use it as a context manager) to finish: only then does `path` exist. `abort()` drops it.
    """

    def __init__(self, path: Path, meta: dict[str, Any], key: bytes | None = None) -> None:
        super().__init__()
        self._key = key if key is not None else seal_key()
        self._aead = AESGCM(self._key)
        self.path = path
        header = json.dumps({**meta, "kid": key_id(self._key)}, sort_keys=True, separators=(",", ":")).encode()
        if len(header) > _MAX_HEADER:
            raise ValueError("sealed-file header too long")
        self._header = header
        self._prefix = secrets.token_bytes(_PREFIX)
        self._counter = 0
        self._buf = bytearray()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = path.with_name(path.name + ".part")
        self._f: IO[bytes] | None = self._tmp.open("wb")
        self._f.write(MAGIC + struct.pack(">H", len(header)) + header + self._prefix)

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        data = bytes(b)
        self._buf += data
        while len(self._buf) > CHUNK:  # keep at least one byte back: the final chunk must be sealed as final
            self._emit(bytes(self._buf[:CHUNK]), final=False)
            del self._buf[:CHUNK]
        return len(data)

    def _emit(self, plain: bytes, *, final: bool) -> None:
        assert self._f is not None
        nonce = self._prefix + struct.pack(">I", self._counter)
        aad = self._header + struct.pack(">IB", self._counter, 1 if final else 0)
        self._f.write(self._aead.encrypt(nonce, plain, aad))
        self._counter += 1
        if self._counter >= 1 << 32:
            raise ValueError("file too large to seal")

    def close(self) -> None:
        if self._f is not None and not self.closed:
            self._emit(bytes(self._buf), final=True)
            self._buf.clear()
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            self._f = None
            os.replace(self._tmp, self.path)
        super().close()

    def abort(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
            self._tmp.unlink(missing_ok=True)
        super().close()


def seal_file(src: Path, dest: Path, meta: dict[str, Any], key: bytes | None = None) -> Path:
    """Seal the plain file `src` as `dest` (streaming); `src` is left for the caller to remove."""
    w = SealWriter(dest, meta, key)
    try:
        with src.open("rb") as f:
            while chunk := f.read(CHUNK * 4):
                w.write(chunk)
    except BaseException:
        w.abort()
        raise
    w.close()
    return dest


def seal_bytes(data: bytes | Iterable[bytes], dest: Path, meta: dict[str, Any], key: bytes | None = None) -> Path:
    w = SealWriter(dest, meta, key)
    try:
        for part in [data] if isinstance(data, bytes) else data:
            w.write(part)
    except BaseException:
        w.abort()
        raise
    w.close()
    return dest


# Reading -----------------------------------------------------------------------------------------------------


def read_header(path: Path) -> dict[str, Any]:
    """The metadata of a sealed file (not authenticated until a chunk is read). SealedFileError if not sealed."""
    with path.open("rb") as f:
        header, _ = _read_header(f)
    meta: dict[str, Any] = json.loads(header)
    return meta


def _read_header(f: IO[bytes]) -> tuple[bytes, int]:
    head = f.read(len(MAGIC) + 2)
    if len(head) < len(MAGIC) + 2 or head[: len(MAGIC)] != MAGIC:
        raise SealedFileError("not a sealed file")
    (n,) = struct.unpack(">H", head[len(MAGIC):])
    if n > _MAX_HEADER:
        raise SealedFileError("sealed file header is damaged")
    header = f.read(n)
    if len(header) != n:
        raise SealedFileError("sealed file is cut short")
    try:
        json.loads(header)
    except ValueError:
        raise SealedFileError("sealed file header is damaged") from None
    return header, len(MAGIC) + 2 + n


class SealReader(io.RawIOBase):
    """A read-only, seekable stream of a sealed file's plaintext; each chunk is authenticated before use."""

    def __init__(self, path: Path, key: bytes | None = None) -> None:
        super().__init__()
        self._f = path.open("rb")
        try:
            self._header, start = _read_header(self._f)
            self.meta: dict[str, Any] = json.loads(self._header)
            key = key if key is not None else seal_key()
            if self.meta.get("kid") != key_id(key):
                raise SealedFileError("file was sealed under another key: it cannot be read with this one")
            self._aead = AESGCM(key)
            self._prefix = self._f.read(_PREFIX)
            body = os.fstat(self._f.fileno()).st_size - start - _PREFIX
            if len(self._prefix) != _PREFIX or body < TAG:
                raise SealedFileError("sealed file is cut short")
            self._start = start + _PREFIX
            self._nchunks = -(-body // (CHUNK + TAG))
            last = body - (self._nchunks - 1) * (CHUNK + TAG)
            if last < TAG:
                raise SealedFileError("sealed file is cut short")
            self.size = body - self._nchunks * TAG
        except BaseException:
            self._f.close()
            raise
        self._pos = 0
        self._cached: tuple[int, bytes] | None = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def _chunk(self, i: int) -> bytes:
        if self._cached is not None and self._cached[0] == i:
            return self._cached[1]
        self._f.seek(self._start + i * (CHUNK + TAG))
        sealed = self._f.read(CHUNK + TAG)
        final = i == self._nchunks - 1
        nonce = self._prefix + struct.pack(">I", i)
        aad = self._header + struct.pack(">IB", i, 1 if final else 0)
        try:
            plain = self._aead.decrypt(nonce, sealed, aad)
        except InvalidTag:
            raise SealedFileError(
                "sealed file is damaged or cut short (authentication failed): nothing from it can be used"
            ) from None
        self._cached = (i, plain)
        return plain

    def readinto(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        if self._pos >= self.size or not len(view):
            if self._pos >= self.size and self._nchunks and self._cached is None:
                self._chunk(self._nchunks - 1)  # an empty file still proves it is whole
            return 0
        i, off = divmod(self._pos, CHUNK)
        plain = self._chunk(i)
        n = min(len(view), len(plain) - off)
        view[:n] = plain[off: off + n]
        self._pos += n
        return n

    def readall(self) -> bytes:
        out = bytearray()
        while chunk := self.read(CHUNK):
            out += chunk
        return bytes(out)

    def close(self) -> None:
        self._f.close()
        self._cached = None
        super().close()


def open_sealed(path: Path, key: bytes | None = None) -> io.BufferedReader:
    """A buffered, seekable binary stream of a sealed file's plaintext."""
    return io.BufferedReader(SealReader(path, key), buffer_size=CHUNK)


def open_text_sealed(path: Path, key: bytes | None = None, encoding: str = "utf-8") -> io.TextIOWrapper:
    return io.TextIOWrapper(open_sealed(path, key), encoding=encoding, newline="")


def is_sealed(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False
