"""MLLP framing (connectors/hl7v2/mllp.py): partial reads, several frames per read, noise, oversize frames."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connectors.hl7v2.mllp import END, HEAD, START, FrameDecoder, Oversize, frame
from connectors.hl7v2.sender import split_messages

A = b"MSH|^~\\&|PAS|RX1|||20261126||ADT^A08|1|P|2.4\rPID|1||9990000018^^^NHS^NH\r"
B = b"MSH|^~\\&|PAS|RX1|||20261126||ADT^A01|2|P|2.4\r"


def test_frame_wraps_in_start_and_end_bytes() -> None:
    assert frame(b"x") == b"\x0bx\x1c\x0d"
    assert START == b"\x0b" and END == b"\x1c\x0d"


def test_one_frame_in_one_read() -> None:
    assert FrameDecoder().feed(frame(A)) == [A]


def test_several_frames_in_one_read() -> None:
    d = FrameDecoder()
    assert d.feed(frame(A) + frame(B) + frame(A)) == [A, B, A]
    assert d.pending == 0 and d.discarded == 0


@pytest.mark.parametrize("cut", range(1, len(frame(A))))
def test_a_frame_cut_anywhere_across_two_reads(cut: int) -> None:
    d = FrameDecoder()
    data = frame(A)
    assert d.feed(data[:cut]) == []
    assert d.feed(data[cut:]) == [A]


def test_byte_by_byte() -> None:
    d = FrameDecoder()
    got: list[bytes | Oversize] = []
    for b in frame(A) + frame(B):
        got += d.feed(bytes([b]))
    assert got == [A, B]


def test_end_byte_pair_split_between_reads() -> None:
    d = FrameDecoder()
    assert d.feed(START + A + b"\x1c") == []
    assert d.feed(b"\x0d") == [A]


def test_a_lone_0x1c_inside_the_content_is_data() -> None:
    body = b"MSH|^~\\&|x\x1cy\r"
    assert FrameDecoder().feed(frame(body)) == [body]


def test_garbage_before_the_start_byte_is_dropped_and_counted() -> None:
    d = FrameDecoder()
    assert d.feed(b"GET / HTTP/1.1\r\n\r\n" + frame(A)) == [A]
    assert d.discarded == len(b"GET / HTTP/1.1\r\n\r\n")
    assert d.feed(b"noise only") == []
    assert d.discarded == len(b"GET / HTTP/1.1\r\n\r\n") + len(b"noise only")
    assert d.feed(b"\r\n" + frame(B)) == [B]


def test_garbage_between_frames() -> None:
    assert FrameDecoder().feed(frame(A) + b"\r\n\x00junk" + frame(B)) == [A, B]


def test_an_abandoned_frame_is_dropped_when_a_new_one_starts() -> None:
    d = FrameDecoder()
    assert d.feed(START + b"MSH|^~\\&|half a mess") == []
    assert d.feed(frame(B)) == [B]
    assert d.discarded == len(START + b"MSH|^~\\&|half a mess")
    assert FrameDecoder().feed(START + b"half" + frame(A)) == [A]


def test_empty_frame() -> None:
    assert FrameDecoder().feed(frame(b"")) == [b""]


def test_oversize_frame_in_one_read_is_refused_with_its_head() -> None:
    d = FrameDecoder(max_frame=1000)
    big = A + b"ZU1|" + b"x" * 5000 + b"\r"
    got = d.feed(frame(big) + frame(B))
    assert len(got) == 2 and isinstance(got[0], Oversize) and got[1] == B
    assert got[0].length == len(big) and got[0].head == big[:HEAD]


def test_oversize_frame_streamed_is_never_buffered_whole() -> None:
    limit = 64 * 1024
    d = FrameDecoder(max_frame=limit)
    big = A + b"ZU1|" + b"y" * (10 * limit) + b"\r"
    data = frame(big) + frame(B)
    got: list[bytes | Oversize] = []
    most = 0
    for i in range(0, len(data), 4096):
        got += d.feed(data[i:i + 4096])
        most = max(most, d.pending)
    assert most <= limit + 4096 + 1
    assert len(got) == 2 and isinstance(got[0], Oversize) and got[1] == B
    assert got[0].length == len(big) and got[0].head.startswith(A)


def test_oversize_end_split_across_reads() -> None:
    d = FrameDecoder(max_frame=10)
    assert d.feed(START + b"MSH|" + b"z" * 100 + b"\x1c") == []
    got = d.feed(b"\x0d" + frame(b"ok"))
    assert isinstance(got[0], Oversize) and got[0].length == 104 and got[1] == b"ok"


def test_exactly_the_limit_is_accepted() -> None:
    body = b"x" * 100
    assert FrameDecoder(max_frame=100).feed(frame(body)) == [body]
    assert isinstance(FrameDecoder(max_frame=99).feed(frame(body))[0], Oversize)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=300).map(lambda b: b.replace(b"\x0b", b"").replace(b"\x1c\x0d", b"")),
                min_size=1, max_size=6),
       st.lists(st.integers(1, 200), min_size=1, max_size=30))
def test_any_chunking_gives_the_same_frames(bodies: list[bytes], sizes: list[int]) -> None:
    data = b"".join(frame(b) for b in bodies)
    d = FrameDecoder()
    got: list[bytes | Oversize] = []
    i = k = 0
    while i < len(data):
        n = sizes[k % len(sizes)]
        got += d.feed(data[i:i + n])
        i += n
        k += 1
    assert got == bodies


# -- files of messages (the sender) --------------------------------------------------------------------------------


def test_messages_in_a_file_split_on_blank_lines_and_msh() -> None:
    text = (b"MSH|^~\\&|A|||||ADT^A08|1|P|2.4\nPID|1\n\nMSH|^~\\&|B|||||ADT^A08|2|P|2.4\r\n"
            b"PID|2\r\nMSH|^~\\&|C|||||ADT^A08|3|P|2.4\rPID|3\r\r\n\n")
    got = split_messages(text)
    assert got == [b"MSH|^~\\&|A|||||ADT^A08|1|P|2.4\rPID|1\r", b"MSH|^~\\&|B|||||ADT^A08|2|P|2.4\rPID|2\r",
                   b"MSH|^~\\&|C|||||ADT^A08|3|P|2.4\rPID|3\r"]


def test_a_file_saved_with_its_framing() -> None:
    assert split_messages(frame(A)) == [A]


def test_a_file_without_messages() -> None:
    assert split_messages(b"\n \r\n\t\n") == []
