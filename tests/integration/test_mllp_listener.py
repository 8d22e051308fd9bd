"""The MLLP listener as a real process on 127.0.0.1: ACK codes, duplicates, TLS, the send CLI, shutdown, and
durability (kill -9 under load on SQLite and PostgreSQL; strace: the WAL is fsynced before each ACK is written).

Synthetic messages only: NHS numbers from the 999 test range, made-up names.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from connectors.hl7v2.listener import ListenerProcess, MllpListener
from connectors.hl7v2.mllp import FrameDecoder, Oversize, frame
from connectors.hl7v2.sender import Ack, MllpSender, NoAcknowledgment, client_context, parse_ack
from connectors.hl7v2.store import MessageStore
from connectors.mesh.sandbox import make_throwaway_pki
from schoolslink.identifiers import make_test_nhs_number

REPO = Path(__file__).resolve().parents[2]
SEAL_KEY = "5e" * 32
GOOD = make_test_nhs_number(7)
BAD = GOOD[:9] + str((int(GOOD[9]) + 1) % 10)


def adt(cid: str, *, nhs: str = GOOD, version: str = "2.4", event: str = "A08", sender: str = "PAS|RX1") -> bytes:
    return (f"MSH|^~\\&|{sender}|SCHOOLSLINK|SL|20261126120000||ADT^{event}^ADT_A01|{cid}|P|{version}\r"
            f"EVN|{event}|20261126120000\r"
            f"PID|1||{nhs}^^^NHS^NH~RX1-{cid}^^^RX1^MR||TESTPATIENT^NOONE||20120301|F\r"
            "PV1|1|O\r").encode()


@pytest.fixture()
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The listener's environment; the test process shares the seal key so it can read what was stored."""
    e = {"SCHOOLSLINK_HOME": str(tmp_path / "home"), "SCHOOLSLINK_SEAL_KEY": SEAL_KEY,
         "SCHOOLSLINK_KEY": "test-key-not-secret", "SCHOOLSLINK_DB_URL": f"sqlite:///{tmp_path / 'state.db'}"}
    for k, v in e.items():
        monkeypatch.setenv(k, v)
    return e


@pytest.fixture()
def listener(env: dict[str, str], tmp_path: Path) -> Iterator[ListenerProcess]:
    with ListenerProcess(env=env, log_path=tmp_path / "listener.log") as lp:
        yield lp


def _store(env: dict[str, str]) -> MessageStore:
    return MessageStore(env["SCHOOLSLINK_DB_URL"])


def _no_content_in(log: Path) -> None:
    text = log.read_text(errors="replace")
    for needle in (GOOD, BAD, "TESTPATIENT", "NOONE", "20120301"):
        assert needle not in text, needle


# -- codes ----------------------------------------------------------------------------------------------------------


def test_ack_codes_and_what_is_stored(listener: ListenerProcess, env: dict[str, str], tmp_path: Path) -> None:
    with MllpSender("127.0.0.1", listener.port, timeout=10) as s:
        ok = s.send(adt("OK1"))
        ae = s.send(adt("AE1", nhs=BAD))
        ar_version = s.send(adt("AR1", version="2.9"))
        ar_event = s.send(adt("AR2", event="A02"))
        ar_msh = s.send(b"EVN|A08\rPID|1\r")
    assert (ok.code, ok.control_id, ok.error) == ("AA", "OK1", None)
    assert (ae.code, ae.error, ae.text) == ("AE", "102", "PID-3: NHS number fails its check digit")
    assert (ar_version.code, ar_version.error) == ("AR", "203")
    assert (ar_event.code, ar_event.error) == ("AR", "201")
    assert (ar_msh.code, ar_msh.error, ar_msh.control_id) == ("AR", "100", "")
    store = _store(env)
    assert store.counts() == {"received": 1, "applied": 0, "quarantined": 4}
    [m] = store.pending(10)
    assert (m.sender, m.control_id, m.message_type, m.body) == ("PAS^RX1", "OK1", "ADT^A08", adt("OK1"))
    with store.engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT control_id, status, ack_code, ack_error, reason, body FROM hl7_messages "
                                    "ORDER BY id").all()
    assert [(r[0], r[1], r[2], r[3]) for r in rows] == [
        ("OK1", "received", "AA", None), ("AE1", "quarantined", "AE", "102"), ("AR1", "quarantined", "AR", "203"),
        ("AR2", "quarantined", "AR", "201"), (None, "quarantined", "AR", "100")]
    assert rows[1][4] == "PID-3: NHS number fails its check digit"
    for r in rows:  # sealed at rest: nothing of the message in plain
        assert GOOD.encode() not in bytes(r[5]) and b"TESTPATIENT" not in bytes(r[5])
    assert store.mark(m.id, "applied") and store.counts()["applied"] == 1 and store.pending(10) == []
    _no_content_in(tmp_path / "listener.log")


def test_pipelined_acks_come_back_in_order(listener: ListenerProcess) -> None:
    ids = [f"P{i:04d}" for i in range(300)]
    msgs = [adt(c, nhs=BAD if i % 7 == 0 else GOOD) for i, c in enumerate(ids)]
    with socket.create_connection(("127.0.0.1", listener.port), timeout=20) as sock:
        sock.sendall(b"".join(frame(m) for m in msgs))
        acks = _read_acks(sock, len(msgs))
    assert [a.control_id for a in acks] == ids
    assert [a.code for a in acks] == ["AE" if i % 7 == 0 else "AA" for i in range(len(ids))]


def _read_acks(sock: socket.socket, n: int) -> list[Ack]:
    d = FrameDecoder()
    out: list[Ack] = []
    while len(out) < n:
        data = sock.recv(65536)
        if not data:
            break
        out += [parse_ack(f) for f in d.feed(data) if not isinstance(f, Oversize)]
    return out


def test_oversize_message_is_refused_and_the_connection_goes_on(env: dict[str, str], tmp_path: Path) -> None:
    with ListenerProcess(env=env, log_path=tmp_path / "l.log", args=["--max-message", "2000"]) as lp, \
            socket.create_connection(("127.0.0.1", lp.port), timeout=20) as sock:
        big = adt("BIG1") + b"ZU1|" + b"x" * 10_000 + b"\r"
        sock.sendall(b"\x0bnoise first" + frame(big) + frame(adt("AFTER1")))
        acks = _read_acks(sock, 2)
    assert [(a.code, a.error, a.control_id) for a in acks] == [("AR", "207", "BIG1"), ("AA", None, "AFTER1")]
    assert _store(env).control_ids() == {"AFTER1"}


# -- duplicates -----------------------------------------------------------------------------------------------------


def test_duplicates_are_acknowledged_again_and_stored_once(store_url: str, env: dict[str, str], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    env = {**env, "SCHOOLSLINK_DB_URL": store_url}
    monkeypatch.setenv("SCHOOLSLINK_DB_URL", store_url)
    with ListenerProcess(env=env, log_path=tmp_path / "a.log") as lp:
        with MllpSender("127.0.0.1", lp.port) as s:
            assert s.send(adt("D1")).code == "AA"
            assert s.send(adt("D1")).code == "AA"  # a resend after a lost ACK
            first = s.send(adt("E1", nhs=BAD))
            again = s.send(adt("E1"))  # same control id, now with a good number: the first answer stands
            other = s.send(adt("D1", sender="OTHERPAS|RX2"))  # another sender may use the same MSH-10
        assert (first.code, first.error) == ("AE", "102")
        assert (again.code, again.error, again.text) == ("AE", "102", first.text)
        assert other.code == "AA"
        with socket.create_connection(("127.0.0.1", lp.port), timeout=20) as sock:  # in one batch
            sock.sendall(frame(adt("S1")) * 5 + frame(adt("S2")) + frame(adt("S1")))
            acks = _read_acks(sock, 7)
        assert [(a.code, a.control_id) for a in acks] == [("AA", "S1")] * 5 + [("AA", "S2"), ("AA", "S1")]
    with ListenerProcess(env=env, log_path=tmp_path / "b.log") as lp, MllpSender("127.0.0.1", lp.port) as s:
        assert s.send(adt("D1")).code == "AA"  # across a restart
        assert s.send(adt("E1", nhs=BAD)).code == "AE"
        assert s.send(adt("N1")).code == "AA"
    store = MessageStore(store_url)
    with store.engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT sender, control_id FROM hl7_messages").all()
    assert sorted((r[0], r[1]) for r in rows) == sorted([
        ("PAS^RX1", "D1"), ("PAS^RX1", "E1"), ("OTHERPAS^RX2", "D1"), ("PAS^RX1", "S1"), ("PAS^RX1", "S2"),
        ("PAS^RX1", "N1")])
    assert store.counts() == {"received": 5, "applied": 0, "quarantined": 1}


def test_store_group_commit_duplicates_and_the_full_parse_api(store_url: str, env: dict[str, str]) -> None:
    from connectors.hl7v2.fastcheck import check
    from connectors.hl7v2.store import Pending

    store = MessageStore(store_url)
    msgs = [adt(f"G{i:04d}", nhs=BAD if i % 50 == 0 else GOOD) for i in range(600)]
    batch = [Pending(check(m), m) for m in msgs] + [Pending(check(msgs[1]), msgs[1])]  # a copy in the same batch
    new, highest = store.write(batch)  # more than one INSERT's worth: one explicit transaction
    assert new == 588 and highest >= 600
    assert [p.ack for p in batch[:3]] == ["AE", "AA", "AA"] and batch[-1].duplicate and batch[-1].ack == "AA"
    assert store.counts() == {"received": 588, "applied": 0, "quarantined": 12}
    again = [Pending(check(m), m) for m in msgs[:100]]
    assert store.write(again) == (0, 0)
    assert all(p.duplicate for p in again) and again[50].ack == "AE" and again[50].error == "102"
    assert again[50].text == "PID-3: NHS number fails its check digit"
    first = store.pending(10)
    assert [m.control_id for m in first] == [f"G{i:04d}" for i in range(1, 11)]
    assert first[0].body == msgs[1] and "bytes" in repr(first[0]) and GOOD not in repr(first[0])
    assert store.mark(first[0].id, "applied") and not store.mark(10**9, "applied")
    with pytest.raises(ValueError):
        store.mark(first[1].id, "done")
    with store.engine.begin() as conn:  # a body moved onto another row does not open: quarantined, not returned
        conn.exec_driver_sql(f"UPDATE hl7_messages SET control_id = 'MOVED' WHERE id = {first[1].id}")
    assert first[1].id not in {m.id for m in store.pending(10)}
    assert store.counts() == {"received": 586, "applied": 1, "quarantined": 13}
    with store.engine.begin() as conn:  # the store breaks: the batch is refused with AR 207 and nothing is kept
        conn.exec_driver_sql("ALTER TABLE hl7_messages RENAME TO hl7_messages_gone")
    failed = [Pending(check(adt("F1")), adt("F1"))]
    assert store.write(failed) == (0, 0)
    assert (failed[0].ack, failed[0].error) == ("AR", "207")
    store.close()


class _CommitStream:
    """A store committing on its writer thread, fed one commit at a time: back to back, as under load."""

    def __init__(self, env: dict[str, str]) -> None:
        self.store = MessageStore(env["SCHOOLSLINK_DB_URL"])
        self._committed = threading.Event()
        self.store.start(on_commit=lambda batch: self._committed.set())

    def commits(self, prefix: str, rounds: range) -> Iterator[int]:
        """One commit of ten messages per round, each waited for; yields after each. Ten senders' streams: the
        unique index is written widely."""
        from connectors.hl7v2.fastcheck import check
        from connectors.hl7v2.store import Pending

        for n in rounds:
            msgs = [adt(f"{prefix}{k}-{n}") for k in range(10)]
            self._committed.clear()
            self.store.submit(Pending(check(m), m) for m in msgs)
            assert self._committed.wait(30)
            yield len(msgs)


def test_the_wal_starts_again_under_a_steady_stream_of_commits(env: dict[str, str]) -> None:
    """Commits back to back leave a PASSIVE checkpoint no moment to catch up: without the RESTART checkpoint the WAL
    grew by every commit's pages (about 100 MB a second under load), each a new block of the file to allocate."""
    stream = _CommitStream(env)
    store = stream.store
    wal = Path(env["SCHOOLSLINK_DB_URL"].removeprefix("sqlite:///") + "-wal")
    largest = 0
    written = 0
    try:
        for sent in stream.commits("W", range(1500)):
            largest = max(largest, wal.stat().st_size)
            written += sent
    finally:
        store.close()
    assert store.counts()["received"] == written == 15_000
    # 1,500 commits of ten rows each write over 100 MB of WAL frames; the file stays at a few megabytes
    assert largest < 24 << 20, f"the WAL grew to {largest >> 20} MB"


def test_a_reader_in_the_wal_makes_the_restart_give_up_not_the_writer_wait(env: dict[str, str]) -> None:
    """Another process reading the same database (the pipeline shares it) keeps the WAL in use: the RESTART
    checkpoint must give up at once and let commits go on, and succeed once the reader has gone."""
    import sqlite3

    path = env["SCHOOLSLINK_DB_URL"].removeprefix("sqlite:///")
    stream = _CommitStream(env)
    store = stream.store
    reading = threading.Event()
    done = threading.Event()

    def reader() -> None:  # read transactions back to back, each open for a while
        conn = sqlite3.connect(path, isolation_level=None)
        try:
            while not done.is_set():
                conn.execute("BEGIN")
                conn.execute("SELECT count(*) FROM hl7_messages").fetchone()
                reading.set()
                done.wait(0.3)
                conn.execute("COMMIT")
        finally:
            conn.close()

    t = threading.Thread(target=reader)
    t.start()
    try:
        assert reading.wait(10)
        for _ in stream.commits("R", range(1500)):
            pass
        refused = store.stats["wal_restarts_refused"]
        done.set()
        t.join(10)
        for _ in stream.commits("R", range(1500, 2500)):  # the reader gone: the WAL starts again
            pass
        deadline = time.monotonic() + 10
        while store.stats["wal_restarts"] == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        done.set()
        t.join(10)
        store.close()
    assert refused >= 1, "the reader never kept the WAL in use: the test proves nothing"
    assert store.stats["wal_restarts"] >= 1
    assert store.counts()["received"] == 25_000


# -- TLS ------------------------------------------------------------------------------------------------------------


def test_tls_and_mutual_tls(env: dict[str, str], tmp_path: Path) -> None:
    pki = make_throwaway_pki(tmp_path / "pki")
    other = make_throwaway_pki(tmp_path / "other", ca_name="another CA")
    tls = ["--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key)]
    with ListenerProcess(env=env, log_path=tmp_path / "tls.log", args=tls) as lp:
        with MllpSender("127.0.0.1", lp.port, ssl=client_context(pki.ca_cert), timeout=5) as s:
            assert s.send(adt("T1")).code == "AA"
        with MllpSender("127.0.0.1", lp.port, timeout=2, retries=1) as plain, pytest.raises(NoAcknowledgment):
            plain.send(adt("T2"))  # a plain client to a TLS port gets nothing
        with MllpSender("127.0.0.1", lp.port, ssl=client_context(other.ca_cert), timeout=5) as s, \
                pytest.raises(OSError):
            s.send(adt("T3"))  # a listener certificate the client does not trust
    mutual = [*tls, "--tls-client-ca", str(pki.ca_cert)]
    with ListenerProcess(env=env, log_path=tmp_path / "mtls.log", args=mutual) as lp:
        with MllpSender("127.0.0.1", lp.port, ssl=client_context(pki.ca_cert, pki.client.cert, pki.client.key)) as s:
            assert s.send(adt("M1")).code == "AA"
        with MllpSender("127.0.0.1", lp.port, ssl=client_context(pki.ca_cert), timeout=3, retries=0) as s, \
                pytest.raises((OSError, NoAcknowledgment)):
            s.send(adt("M2"))  # no client certificate
        bad_client = client_context(pki.ca_cert, other.client.cert, other.client.key)
        with MllpSender("127.0.0.1", lp.port, ssl=bad_client, timeout=3, retries=0) as s, \
                pytest.raises((OSError, NoAcknowledgment)):
            s.send(adt("M3"))  # a client certificate from another CA
    assert _store(env).control_ids() == {"T1", "M1"}


# -- the send CLI ---------------------------------------------------------------------------------------------------


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "schoolslink.cli", "mllp", *args], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, **env}, timeout=120)


def test_send_cli(listener: ListenerProcess, env: dict[str, str], tmp_path: Path) -> None:
    mixed = tmp_path / "mixed.hl7"  # LF line endings and a blank line between messages, as people save them
    mixed.write_bytes(adt("C1").replace(b"\r", b"\n") + b"\n" + adt("C2", nhs=BAD).replace(b"\r", b"\n")
                      + adt("C3", version="2.8").replace(b"\r", b"\r\n"))
    good = tmp_path / "good.hl7"
    good.write_bytes(adt("C4") + b"\r" + adt("C5"))
    port = str(listener.port)
    r = _cli("send", str(mixed), str(good), "--port", port, "--json", env=env)
    assert r.returncode == 1, r.stderr
    doc = json.loads(r.stdout)
    assert [(m["file"], m["index"], m["control_id"], m["ack"]) for m in doc["messages"]] == [
        (str(mixed), 1, "C1", "AA"), (str(mixed), 2, "C2", "AE"), (str(mixed), 3, "C3", "AR"),
        (str(good), 1, "C4", "AA"), (str(good), 2, "C5", "AA")]
    assert doc["messages"][1]["error"] == "102: PID-3: NHS number fails its check digit"
    assert doc["messages"][0]["error"] is None
    assert doc["counts"] == {"AA": 3, "AE": 1, "AR": 1, "failed": 0}
    r = _cli("send", str(good), "--port", port, env=env)
    assert r.returncode == 0 and r.stdout.splitlines() == [f"{good}:1 AA C4", f"{good}:2 AA C5"]
    empty = tmp_path / "empty.hl7"
    empty.write_text("\n\n")
    r = _cli("send", str(empty), "--port", port, "--json", env=env)
    assert r.returncode == 1 and "holds no HL7 message" in json.loads(r.stdout)["error"]
    assert _cli("send", str(tmp_path / "missing.hl7"), "--port", port, env=env).returncode == 2
    assert _cli("send", "--port", port, env=env).returncode == 2
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        closed_port = str(free.getsockname()[1])
    r = _cli("send", str(good), "--port", closed_port, "--retries", "0", "--timeout", "2", "--json", env=env)
    assert r.returncode == 1 and json.loads(r.stdout)["counts"]["failed"] == 2
    assert _store(env).control_ids() == {"C1", "C2", "C3", "C4", "C5"}


# -- shutdown and the hook ------------------------------------------------------------------------------------------


def test_sigterm_acknowledges_what_it_received_then_stops(env: dict[str, str], tmp_path: Path) -> None:
    lp = ListenerProcess(env=env, log_path=tmp_path / "term.log").start()
    try:
        with socket.create_connection(("127.0.0.1", lp.port), timeout=20) as sock:
            sock.sendall(b"".join(frame(adt(f"G{i}")) for i in range(2000)))
            time.sleep(0.05)
            code = lp.terminate()
            acks = _read_acks(sock, 2000)
    finally:
        lp.stop()
    assert code == 0
    stored = _store(env).control_ids()
    # every message it took in was stored and acknowledged; none stored without its ACK being sent
    assert {a.control_id for a in acks} == stored
    assert all(a.code == "AA" for a in acks)
    assert "MLLP listener stopped" in (tmp_path / "term.log").read_text()


def test_on_stored_hook_runs_per_commit_and_its_failures_are_logged_without_content(
        env: dict[str, str], caplog: pytest.LogCaptureFixture) -> None:
    calls: list[tuple[int, int]] = []

    def hook(new: int, highest: int) -> None:
        calls.append((new, highest))
        if len(calls) == 1:
            raise RuntimeError(f"publishing failed for {GOOD}")  # a careless hook: its text is never logged

    async def main() -> list[Ack]:
        lst = MllpListener(_store(env), port=0, on_stored=hook)
        port = await lst.start()

        def client() -> list[Ack]:
            with MllpSender("127.0.0.1", port) as s:
                return [s.send(adt(f"H{i}")) for i in range(5)] + [s.send(adt("H0")), s.send(adt("HX", nhs=BAD))]

        acks = await asyncio.get_running_loop().run_in_executor(None, client)
        await lst.stop()
        return acks

    with caplog.at_level("INFO"):
        acks = asyncio.run(main())
    assert [a.code for a in acks] == ["AA"] * 6 + ["AE"]
    assert sum(n for n, _ in calls) == 5  # messages to apply: not the duplicate, not the refused one
    assert calls[-1][1] >= 5 and [h for _, h in calls] == sorted(h for _, h in calls)
    assert any("on_stored hook failed (RuntimeError)" in r.getMessage() for r in caplog.records)
    assert GOOD not in caplog.text and "TESTPATIENT" not in caplog.text


def test_listen_publishes_an_event_per_commit_on_redis(env: dict[str, str], tmp_path: Path) -> None:
    redis = pytest.importorskip("redis")
    client = redis.Redis(host="127.0.0.1", port=6379, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.exceptions.ConnectionError:
        pytest.skip("no Redis at 127.0.0.1:6379")
    prefix = f"sltest{os.getpid()}x{time.monotonic_ns()}"
    sub = client.pubsub()
    sub.subscribe(f"{prefix}.hl7v2")
    events_env = {**env, "SCHOOLSLINK_EVENTS": "redis://127.0.0.1:6379/0", "SCHOOLSLINK_EVENTS_PREFIX": prefix}
    with ListenerProcess(env=events_env, log_path=tmp_path / "ev.log") as lp, MllpSender("127.0.0.1", lp.port) as s:
        assert s.send(adt("EV1")).code == "AA"
        assert s.send(adt("EV2", nhs=BAD)).code == "AE"  # refused: nothing to apply, no event
        got: list[dict[str, object]] = []
        deadline = time.monotonic() + 10
        while not got and time.monotonic() < deadline:
            m = sub.get_message(timeout=0.5)
            if m and m["type"] == "message":
                got.append(json.loads(m["data"]))
    sub.close()
    client.close()
    assert got and got[0]["topic"] == "hl7v2"
    assert got[0]["data"] == {"count": 1, "max_id": 1}  # counts and ids only: nothing from the message


# -- durability -----------------------------------------------------------------------------------------------------


def _load(port: int, prefix: str, acked: list[str], stop: threading.Event, pipelined: bool) -> None:
    """One sender until the listener dies: stop-and-wait, or bursts of 20 frames; records each AA'd control id."""
    n = 0
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            while not stop.is_set():
                burst = 20 if pipelined else 1
                ids = [f"{prefix}{n + i}" for i in range(burst)]
                n += burst
                sock.sendall(b"".join(frame(adt(c)) for c in ids))
                for a in _read_acks(sock, burst):
                    if a.code == "AA":
                        acked.append(a.control_id)
    except OSError:
        return


def test_kill_9_under_load_loses_no_acknowledged_message(store_url: str, env: dict[str, str], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    env = {**env, "SCHOOLSLINK_DB_URL": store_url}
    monkeypatch.setenv("SCHOOLSLINK_DB_URL", store_url)
    lp = ListenerProcess(env=env, log_path=tmp_path / "kill.log").start()
    acked: list[str] = []
    stop = threading.Event()
    threads = [threading.Thread(target=_load, args=(lp.port, f"K{k}-", acked, stop, k % 2 == 1), daemon=True)
               for k in range(8)]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while len(acked) < 3000 and time.monotonic() < deadline:
            time.sleep(0.02)
        lp.kill()  # SIGKILL mid-stream: no shutdown, no flush
        stop.set()
        for t in threads:
            t.join(20)
    finally:
        stop.set()
        lp.stop()
    assert len(acked) >= 3000, "the load never got going"
    stored = MessageStore(store_url).control_ids()
    missing = set(acked) - stored
    assert not missing, f"{len(missing)} messages were acknowledged AA but are not in the store"
    assert len(stored) >= len(set(acked))


# -- strace: fsync before ACK ---------------------------------------------------------------------------------------

_LINE = re.compile(r"^(?:\[pid\s+(?P<pid>\d+)\]\s+|(?P<pid2>\d+)\s+)?(?P<ts>\d\d:\d\d:\d\d\.\d+)\s+(?P<rest>.*)$")
_CALL = re.compile(r"^(?P<call>\w+)\((?P<fd>\d+)<(?P<path>[^>]*)>(?P<args>.*)$")
_RESUMED = re.compile(r"^<\.\.\. (?P<call>\w+) resumed>")


def _strace_events(path: Path) -> list[tuple[float, str, str, str, str, str]]:
    """(time, phase 'start'|'end', call, fd path, argument text, thread id), in time order, from `strace -f -tt -yy`
    output."""
    events = []
    pending: dict[tuple[str, str], tuple[str, str]] = {}  # (pid, call) -> (fd path, args) of an unfinished call
    for raw in path.read_text(errors="replace").splitlines():  # "<tid> <hh:mm:ss.us> <call>(...)"
        m = _LINE.match(raw)
        if not m:
            continue
        pid = m.group("pid") or m.group("pid2") or "0"
        h, mi, s = m.group("ts").split(":")
        ts = int(h) * 3600 + int(mi) * 60 + float(s)
        rest = m.group("rest")
        r = _RESUMED.match(rest)
        if r:  # the arguments a call returns (what read() read) are on this line
            fdpath, _ = pending.pop((pid, r.group("call")), ("", ""))
            events.append((ts, "end", r.group("call"), fdpath, rest, pid))
            continue
        c = _CALL.match(rest)
        if not c:
            continue
        events.append((ts, "start", c.group("call"), c.group("path"), c.group("args"), pid))
        if rest.endswith("<unfinished ...>"):
            pending[(pid, c.group("call"))] = (c.group("path"), c.group("args"))
        else:
            events.append((ts, "end", c.group("call"), c.group("path"), c.group("args"), pid))
    events.sort(key=lambda e: e[0])
    return events


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed (apt-get install strace)")
def test_strace_wal_is_fsynced_before_each_ack_is_written(env: dict[str, str], tmp_path: Path) -> None:
    trace = tmp_path / "strace.txt"
    wrapper = ["strace", "-f", "-tt", "-yy", "-s", "100000", "-o", str(trace),
               "-e", "trace=fsync,fdatasync,write,pwrite64,writev,sendto,sendmsg,read,recvfrom"]
    with ListenerProcess(env=env, log_path=tmp_path / "strace.log", wrapper=wrapper, startup_timeout=120) as lp:
        probe = subprocess.run(["strace", "-f", "-e", "trace=none", "true"], capture_output=True, timeout=30)
        if probe.returncode != 0:
            pytest.skip(f"strace cannot trace here: {probe.stderr.decode(errors='replace')[:200]}")
        ids: list[str] = []
        with MllpSender("127.0.0.1", lp.port) as s:  # stop-and-wait: each commit holds one message
            for i in range(15):
                assert s.send(adt(f"W{i:03d}")).code == "AA"
                ids.append(f"W{i:03d}")
        with socket.create_connection(("127.0.0.1", lp.port), timeout=20) as sock:  # pipelined: batches
            burst = [f"B{i:03d}" for i in range(60)]
            sock.sendall(b"".join(frame(adt(c)) for c in burst))
            assert [a.code for a in _read_acks(sock, len(burst))] == ["AA"] * len(burst)
            ids += burst
        time.sleep(0.5)
    events = _strace_events(trace)
    wal = [e for e in events if e[3].endswith("state.db-wal")]
    assert any(e[2] in ("fdatasync", "fsync") for e in wal), "no fsync of the WAL was traced"
    batches = set()
    for cid in ids:
        # the commit that stored the message: the first WAL write holding its control id (the row or its index
        # entry; later commits rewrite the same pages), by the writer: a process of its own, the listener's child,
        # which `strace -f` follows (its ACK is written by the listener's event loop, in another process; times
        # from -tt are wall-clock, so they compare across processes)
        stored = next(e for e in wal if e[1] == "start" and e[2] == "pwrite64" and cid in e[4])
        ack = next(e for e in events if e[1] == "start" and e[2] in ("write", "writev", "sendto", "sendmsg")
                   and "TCP" in e[3] and f"MSA|AA|{cid}\\r" in e[4])
        acked = ack[0]
        assert ack[5] != stored[5], "the WAL should be written by the writer process, not the event loop"
        assert stored[0] < acked, f"{cid}: acknowledged before it was written to the WAL"
        synced = [e for e in wal if e[1] == "end" and e[2] in ("fdatasync", "fsync") and e[5] == stored[5]
                  and stored[0] < e[0] <= acked]
        assert synced, f"{cid}: its ACK was written before its commit's WAL fsync returned"
        batches.add(synced[0][0])
    assert len(batches) < len(ids), "the burst should have been committed in batches (group commit)"


# -- failure paths found in review ---------------------------------------------------------------------------------


def test_a_stop_after_a_sender_reset_its_connection_still_tears_down(env: dict[str, str]) -> None:
    """On asyncio's own loop, half-closing a connection the peer has just reset raises: the stop must still close
    the writer process and the store, and serve() return."""
    lst = MllpListener(_store(env), port=0)

    async def main() -> bool:
        ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        serve = asyncio.ensure_future(lst.serve(ready.set_result))
        port = await ready
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"".join(frame(adt(f"RST{i}")) for i in range(5)))
        await asyncio.sleep(0.5)  # the ACKs are written; the sender never reads them
        s.close()  # unread data: the close is a reset
        await lst.stop()
        done, _ = await asyncio.wait([serve], timeout=20)
        return bool(done)

    assert asyncio.run(main()) is True
    assert lst._writer is not None and lst._writer.process.poll() is not None  # the writer process is gone
    assert _store(env).counts()["received"] == 5


def test_a_commit_the_database_holds_up_is_logged_then_acknowledged(env: dict[str, str],
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    """Another process holds the SQLite write lock: the commit waits (the senders see ACKs that do not come), the
    listener says so in its log, and once the lock goes the message is stored and acknowledged AA."""
    import sqlite3

    caplog.set_level(logging.INFO)
    lst = MllpListener(_store(env), port=0, stall_warning=0.5)
    blocker = sqlite3.connect(env["SCHOOLSLINK_DB_URL"].removeprefix("sqlite:///"), isolation_level=None)

    async def main() -> str:
        ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        serve = asyncio.ensure_future(lst.serve(ready.set_result))
        port = await ready
        loop = asyncio.get_running_loop()

        def send(cid: str) -> str:
            with MllpSender("127.0.0.1", port, timeout=30) as s:
                return s.send(adt(cid)).code

        assert await loop.run_in_executor(None, send, "FREE1") == "AA"
        await asyncio.sleep(0.8)  # past stall_warning: a commit that returned is no stall
        assert "has not answered" not in caplog.text
        blocker.execute("BEGIN IMMEDIATE")  # the write lock, held
        sent = loop.run_in_executor(None, send, "HELD1")
        await asyncio.sleep(1.6)
        assert not sent.done()  # no ACK while the commit cannot happen
        blocker.execute("COMMIT")
        code = await sent
        await lst.stop()
        await asyncio.wait([serve], timeout=20)
        return code

    try:
        assert asyncio.run(main()) == "AA"
    finally:
        blocker.close()
    assert lst.stalls == 1
    waited = [float(m) for m in re.findall(r"has not answered a commit for ([\d.]+) s", caplog.text)]
    assert waited and min(waited) >= 0.5 and "1 messages wait" in caplog.text  # logged once the threshold passed
    assert "the store answered after" in caplog.text and "1 messages stored and acknowledged" in caplog.text
    assert "HELD1" not in caplog.text and GOOD not in caplog.text
    assert _store(env).counts()["received"] == 2


def test_a_sender_that_never_reads_its_acks_is_not_read_from(env: dict[str, str]) -> None:
    """Unread ACKs would otherwise pile up in the listener's memory without end: once its transport's buffer is
    full, the listener stops reading from that sender."""
    lst = MllpListener(_store(env), port=0, max_inflight=100)

    async def main() -> tuple[int, int]:
        port = await lst.start()
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", port))
        s.setblocking(False)
        loop = asyncio.get_running_loop()
        data = b"".join(frame(adt(f"NR{i}")) for i in range(60_000))
        sent = 0
        try:  # as much as the listener will take, reading no ACK
            while sent < len(data):
                await asyncio.wait_for(loop.sock_sendall(s, data[sent:sent + 65536]), 5)
                sent += 65536
        except TimeoutError:
            pass
        await asyncio.sleep(1)
        conn = next(iter(lst.connections))
        buffered = conn.transport.get_write_buffer_size() if conn.transport is not None else 0
        s.close()
        await lst.stop()
        return sent, buffered

    sent, buffered = asyncio.run(main())
    assert sent < 60_000 * len(frame(adt("NR00000")))  # the sender was held back
    assert buffered < 1 << 20  # and what waits for it stays bounded (was ~10 MB for 150,000 messages)


@pytest.mark.parametrize("store_url", ["postgresql"], indirect=True)  # SQLite stores any value it is given
def test_a_value_the_database_refuses_fails_only_its_own_message(store_url: str, env: dict[str, str]) -> None:
    """A batch the database refuses for one message's data is stored again in halves: that message alone gets
    AR 207, the rest of the batch (other senders' messages among them) is stored and acknowledged. (fastcheck
    refuses and writes out control characters in keys; this is the store's own net under it.)"""
    from connectors.hl7v2.fastcheck import Checked, check
    from connectors.hl7v2.store import T_NOT_STORED, Pending

    store = MessageStore(store_url)
    batch = [Pending(check(adt(f"ISO{i}", sender=f"PAS{i}|RX1")), adt(f"ISO{i}")) for i in range(7)]
    c = batch[3].checked  # one whose key PostgreSQL cannot take: NUL in text
    batch[3] = Pending(Checked(c.ack, c.error, c.text, c.location, c.enc, c.msh, "P\x00AS^RX1", c.control_id,
                               c.message_type), batch[3].body)
    try:
        new, _ = store.write(batch)
    finally:
        store.close()
    assert new == 6
    assert [p.ack for p in batch] == ["AA", "AA", "AA", "AR", "AA", "AA", "AA"]
    assert batch[3].error == "207" and batch[3].text == T_NOT_STORED
    assert _store(env | {"SCHOOLSLINK_DB_URL": store_url}).counts()["received"] == 6


def test_a_listener_that_cannot_bind_leaves_no_writer_behind(env: dict[str, str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        lst = MllpListener(_store(env), port=taken.getsockname()[1])
        lst.port = taken.getsockname()[1]

        async def main() -> None:
            await lst.start()

        with pytest.raises(OSError):
            asyncio.run(main())
    assert lst._writer is not None and lst._writer.process.poll() is not None
