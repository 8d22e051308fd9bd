"""MLLP framing: `0x0B message 0x1C 0x0D`, and an incremental decoder for a byte stream.

`FrameDecoder.feed(data)` takes whatever one read returned and gives back the frames it completed, in order:

- a frame cut across reads is kept until its end arrives; several frames in one read come out together;
- bytes outside a frame (before a start byte: line noise, a keep-alive, a client speaking something else) are
  dropped and counted in `discarded`;
- a start byte inside a frame means the frame before it was abandoned by its sender: the decoder resynchronises
  on the last start byte and counts the abandoned bytes in `discarded`;
- a frame longer than `max_frame` (default 1 MiB) is never buffered whole: the decoder keeps its first bytes
  (enough for the MSH segment, so the listener can still refuse it by control id), drops the rest as it streams
  past, and gives back one `Oversize` in the frame's place when its end arrives.

Pure and synchronous, no I/O: the listener (listener.py) and the sender (sender.py) both use it.
"""

from __future__ import annotations

from typing import Final, NamedTuple

START: Final = b"\x0b"
END: Final = b"\x1c\x0d"
MAX_FRAME: Final = 1 << 20
HEAD: Final = 4096  # what an oversize frame keeps: its MSH segment, for the refusal

__all__ = ["END", "HEAD", "MAX_FRAME", "START", "FrameDecoder", "Oversize", "frame"]


class Oversize(NamedTuple):
    """A frame longer than the decoder's limit: its first `HEAD` bytes and its full length."""

    head: bytes
    length: int


def frame(message: bytes) -> bytes:
    """`message` wrapped in MLLP's start and end bytes."""
    return START + message + END


class FrameDecoder:
    """Incremental MLLP frame decoder (see the module docstring)."""

    __slots__ = ("_buf", "_head", "_in_frame", "_scan", "_skipped", "discarded", "max_frame")

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.max_frame = max_frame
        self.discarded = 0  # bytes dropped: outside any frame, or an abandoned frame's start
        self._buf = bytearray()
        self._in_frame = False  # the buffer holds a frame's content (its start byte already consumed)
        self._scan = 0  # where to look for the end next: the content before it has been searched
        self._head: bytes | None = None  # set while an oversize frame streams past
        self._skipped = 0

    @property
    def pending(self) -> int:
        """Bytes held for a frame not yet complete."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes | Oversize]:
        """The frames `data` completes, in order (message content without the framing bytes)."""
        buf = self._buf
        if (not buf and not self._in_frame and data[:1] == START and data[-2:] == END
                and data.find(END) == len(data) - 2):
            body = data[1:-2]  # the common case: exactly one whole frame in one read
            if START not in body and len(body) <= self.max_frame:
                return [body]
        buf += data
        out: list[bytes | Oversize] = []
        while buf:
            if not self._in_frame:
                i = buf.find(START)
                if i < 0:
                    self.discarded += len(buf)
                    buf.clear()
                    break
                self.discarded += i
                del buf[: i + 1]
                self._in_frame = True
                self._scan = 0
            if self._head is not None:
                if not self._skip_oversize(out):
                    break
                continue
            j = buf.find(END, self._scan)
            if j < 0:
                s = buf.rfind(START, self._scan)
                if s >= 0:  # the sender gave up on this frame and began another
                    self.discarded += s + 1
                    del buf[: s + 1]
                    self._scan = 0
                if len(buf) > self.max_frame:
                    self._head = bytes(buf[:HEAD])
                    self._skipped = 0
                    continue
                self._scan = max(0, len(buf) - 1)  # END may straddle this read and the next
                break
            s = buf.rfind(START, 0, j)
            if s >= 0:
                self.discarded += s + 1
                del buf[: s + 1]
                j -= s + 1
            if j > self.max_frame:
                out.append(Oversize(bytes(buf[:HEAD]), j))
            else:
                out.append(bytes(buf[:j]))
            del buf[: j + 2]
            self._in_frame = False
        return out

    def _skip_oversize(self, out: list[bytes | Oversize]) -> bool:
        """Drop an oversize frame's content until its end; True once it ended (an `Oversize` added to `out`)."""
        buf = self._buf
        assert self._head is not None
        j = buf.find(END)
        if j < 0:
            keep = 1 if buf[-1:] == END[:1] else 0
            self._skipped += len(buf) - keep
            del buf[: len(buf) - keep]
            return False
        out.append(Oversize(self._head, self._skipped + j))
        del buf[: j + 2]
        self._head = None
        self._in_frame = False
        return True
