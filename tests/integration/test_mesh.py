"""The MESH connector and exchange against the real peer: NHS England's mesh-sandbox over mutual TLS on 127.0.0.1.

What these prove, each against the real sandbox (no MESH stand-in anywhere):

* our workflows are the sandbox's (endpoint look-up finds the trust's mailbox by ODS code and workflow);
* a message sent from X26ABC1 to X26ABC2 is recorded before it goes, becomes ``sent`` with MESH's message id,
  is never sent twice, reaches the recipient byte for byte (SHA-256), and becomes ``delivered`` once the
  recipient has acknowledged it; a chunked message of a few MB is reassembled (in memory and streamed to a file);
* a message never acknowledged becomes a ``dead_letter`` with a reason once the deadline passes (``now`` is
  passed in: no sleeping), and so does one MESH reports as failed, or one MESH refuses outright;
* a client without a certificate, or with one from another CA, is refused with :class:`MeshAuthError` (and
  so is a client that cannot verify the server); a send refused that way leaves the message pending;
* retries: a fault-injecting proxy in front of a second (plain HTTP, loopback) sandbox returns 429/5xx;
  ``Retry-After`` is honoured, back-off grows, a first upload is not repeated after a 5xx (it may have
  arrived) but later chunks and downloads are, and a failed send stays pending and goes on the next run;
* receiving acknowledges only after landing: a landing failure leaves the message in MESH;
* the ``mesh_exchange`` DAG runs through Airflow (``dag.test()``) with mesh.json pointing at the sandbox;
* no message body (a unique marker in every body, subject and local id we pass) appears in any log: ours
  (caplog), the sandbox's, Airflow's task logs, or the Airflow metadata database.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import http.client
import json
import logging
import os
import re
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select

from connectors.mesh.client import WORKFLOW_CONTEXT, WORKFLOW_CONTEXT_ACK, MeshConfig, MeshConnector
from connectors.mesh.errors import MeshAuthError, MeshPermanentError, MeshTransientError
from connectors.mesh.sandbox import MeshSandbox
from connectors.storage.sealed import open_sealed
from schoolslink.pipeline import mesh_exchange as mx
from schoolslink.store.schema import mesh_messages
from tests.integration.conftest_mesh import (
    MAILBOXES,
    OTHER_TRUST,
    PASSWORD,
    SCHOOL_SIDE,
    SHARED_KEY,
    TRUST_SIDE,
    WORKFLOWS,
    MeshPeer,
    sandbox_log,
)
from tests.paths import REPO

MARKER = f"PUPIL-BODY-MARKER-{uuid.uuid4().hex}"
NOW = dt.datetime(2026, 11, 26, 9, 0, tzinfo=dt.UTC)


def body(n: int = 0, size: int = 0) -> bytes:
    """A message body carrying the marker (as pupil data would), optionally padded with random bytes."""
    head = json.dumps({"learner": MARKER, "n": n, "note": "school context for a CYPMHS"}).encode()
    return head + (os.urandom(size) if size else b"")


@pytest.fixture(autouse=True)
def _no_body_in_any_log(caplog: pytest.LogCaptureFixture, request: pytest.FixtureRequest) -> Iterator[None]:
    caplog.set_level(logging.DEBUG)
    yield
    assert MARKER not in caplog.text
    for record in caplog.records:
        assert MARKER not in record.getMessage()
    if "mesh_peer" in request.fixturenames:
        assert MARKER not in sandbox_log(request.getfixturevalue("mesh_peer"))


def row(engine: Engine, local_id: str) -> dict[str, Any]:
    with engine.connect() as conn:
        found = conn.execute(select(mesh_messages).where(mesh_messages.c.local_id == local_id)).mappings().one()
    return dict(found)


def queue(engine: Engine, data: bytes, recipient: str = TRUST_SIDE, now: dt.datetime = NOW) -> str:
    with engine.begin() as conn:
        return mx.queue_message(conn, mailbox=SCHOOL_SIDE, recipient=recipient, workflow_id=WORKFLOW_CONTEXT,
                                data=data, run_id="test-run", now=now)


# -- the connector ------------------------------------------------------------------------------------------


def test_our_workflows_are_the_sandboxs(mesh: MeshPeer) -> None:
    with mesh.connector(SCHOOL_SIDE) as school:
        school.handshake()
        assert school.lookup("X26", WORKFLOW_CONTEXT) == [TRUST_SIDE]
        assert school.lookup("X27", WORKFLOW_CONTEXT) == [OTHER_TRUST]
        assert school.lookup("X26", WORKFLOW_CONTEXT_ACK) == [SCHOOL_SIDE]  # replies come back to us
        assert school.lookup("X26", "SOMEONE_ELSES_WORKFLOW") == []


def test_chunked_message_arrives_whole_in_memory_and_streamed(mesh: MeshPeer, tmp_path: Path) -> None:
    data = body(1, size=3 * 1024 * 1024 + 12345)
    with mesh.connector(SCHOOL_SIDE, max_chunk_size=1024 * 1024) as school, mesh.connector(TRUST_SIDE) as trust:
        message_id = school.send(TRUST_SIDE, WORKFLOW_CONTEXT, data, subject=MARKER, local_id=str(uuid.uuid4()))
        # MESH holds it as four chunks (the file store keeps one file per chunk).
        chunks = mesh.sandbox.store_dir / TRUST_SIDE / "in" / message_id
        assert sorted(p.name for p in chunks.iterdir()) == ["1", "2", "3", "4"]
        assert trust.inbox() == [message_id]
        assert hashlib.sha256(trust.download(message_id)).hexdigest() == hashlib.sha256(data).hexdigest()
        with open(tmp_path / "streamed.bin", "wb") as out:
            got = trust.download_to(message_id, out, block_size=64 * 1024)
        assert got.chunks == 4 and got.byte_count == len(data) and got.sender == SCHOOL_SIDE
        assert got.workflow_id == WORKFLOW_CONTEXT
        assert got.sha256 == hashlib.sha256(data).hexdigest()
        assert (tmp_path / "streamed.bin").read_bytes() == data
        assert MARKER not in repr(got)  # the sender's subject and local id stay out of its repr
        assert school.track(message_id).acknowledged is False
        trust.acknowledge(message_id)
        tracked = school.track(message_id)
        assert (tracked.status, tracked.acknowledged, tracked.downloaded, tracked.failed) == (
            "acknowledged", True, True, False)
        assert trust.inbox() == []


@pytest.mark.parametrize("case", ["no certificate", "certificate from another CA"])
def test_client_without_a_valid_certificate_is_refused(mesh: MeshPeer, case: str) -> None:
    overrides: dict[str, Any] = (
        {"client_cert": None, "client_key": None} if case == "no certificate"
        else {"client_cert": str(mesh.rogue.client.cert), "client_key": str(mesh.rogue.client.key)}
    )
    slept: list[float] = []
    with mesh.connector(SCHOOL_SIDE, sleep=slept.append, **overrides) as refused:
        with pytest.raises(MeshAuthError, match="the MESH server refused our TLS client certificate"):
            refused.handshake()
        with pytest.raises(MeshAuthError, match="refused our TLS client certificate") as err:
            refused.send(TRUST_SIDE, WORKFLOW_CONTEXT, body(), subject=MARKER, local_id=MARKER)
    assert MARKER not in str(err.value) and MARKER not in repr(err.value)
    assert str(err.value).startswith(f"MESH send for mailbox {SCHOOL_SIDE} failed")
    assert slept == []  # a refusal is not retried
    with mesh.connector(TRUST_SIDE) as trust:
        assert trust.inbox() == []


def test_client_that_cannot_verify_the_server_refuses_it(mesh: MeshPeer) -> None:
    with mesh.connector(SCHOOL_SIDE, ca_bundle=str(mesh.rogue.ca_cert)) as wary:
        with pytest.raises(MeshAuthError, match="could not verify the MESH server's TLS certificate"):
            wary.handshake()


def test_wrong_password_or_shared_key_is_an_auth_error(mesh: MeshPeer) -> None:
    for overrides in ({"password": "not-the-password"}, {"shared_key": "not-the-shared-key"}):
        with mesh.connector(SCHOOL_SIDE, **overrides) as wrong, pytest.raises(MeshAuthError, match="HTTP 403"):
            wrong.handshake()


def test_config_has_no_way_to_turn_tls_verification_off(mesh: MeshPeer) -> None:
    with pytest.raises(ValueError, match="unknown MESH config keys: verify"):
        MeshConfig.from_mapping({**mesh.settings(SCHOOL_SIDE), "verify": False})
    with pytest.raises(ValueError, match="https"):
        MeshConfig.from_mapping(mesh.settings(SCHOOL_SIDE, url="http://mesh.example.nhs.uk"))
    with pytest.raises(ValueError, match="shared_key"):
        MeshConfig.from_mapping(mesh.settings(SCHOOL_SIDE, shared_key=""))
    assert SHARED_KEY not in repr(mesh.config(SCHOOL_SIDE)) and PASSWORD not in repr(mesh.config(SCHOOL_SIDE))


# -- the exchange: states -----------------------------------------------------------------------------------


def test_sent_then_delivered_once_acknowledged(mesh: MeshPeer, store: Engine) -> None:
    data = body(2)
    local_id = queue(store, data)
    queued = row(store, local_id)
    assert queued["status"] == "pending" and queued["message_id"] is None
    assert queued["content_sha256"] == hashlib.sha256(data).hexdigest() and queued["byte_count"] == len(data)
    assert (queued["direction"], queued["mailbox"], queued["peer_mailbox"]) == ("out", SCHOOL_SIDE, TRUST_SIDE)
    spooled = mx.spool_dir() / f"{local_id}.sealed"
    assert MARKER.encode() not in spooled.read_bytes()  # the body waits sealed, never in plain

    with mesh.connector(SCHOOL_SIDE) as school, mesh.connector(TRUST_SIDE) as trust:
        assert mx.send_pending(school, engine=store, now=NOW) == {
            "mesh_sent": 1, "mesh_send_failed": 0, "mesh_dead_letter": 0}
        sent = row(store, local_id)
        assert sent["status"] == "sent" and sent["message_id"] and sent["attempts"] == 1
        # Idempotent: a second run sends nothing more.
        assert mx.send_pending(school, engine=store, now=NOW)["mesh_sent"] == 0
        assert trust.inbox() == [sent["message_id"]]

        assert mx.track_sent(school, NOW + dt.timedelta(minutes=15), engine=store)["mesh_awaiting_ack"] == 1

        landed: dict[str, bytes] = {}
        counts = mx.receive(trust, lambda mid, data: landed.__setitem__(mid, data), engine=store, now=NOW)
        assert counts["mesh_received"] == 1 and counts["mesh_acknowledged"] == 1
        assert hashlib.sha256(landed[sent["message_id"]]).hexdigest() == sent["content_sha256"]
        assert trust.inbox() == []

        assert mx.track_sent(school, NOW + dt.timedelta(minutes=30), engine=store)["mesh_delivered"] == 1
    delivered = row(store, local_id)
    assert delivered["status"] == "delivered" and delivered["delivered_at"] is not None
    assert not spooled.exists()  # delivered: the sealed body is gone
    with store.connect() as conn:
        received = conn.execute(select(mesh_messages).where(mesh_messages.c.direction == "in")).mappings().one()
    assert (received["status"], received["mailbox"], received["peer_mailbox"]) == ("acknowledged", TRUST_SIDE,
                                                                                   SCHOOL_SIDE)
    assert received["content_sha256"] == sent["content_sha256"]


def test_not_acknowledged_within_the_deadline_is_a_dead_letter(mesh: MeshPeer, store: Engine,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = queue(store, body(3)), queue(store, body(4))
    with mesh.connector(SCHOOL_SIDE) as school:
        assert mx.send_pending(school, engine=store, now=NOW)["mesh_sent"] == 2
        message_id = row(store, first)["message_id"]
        assert mx.track_sent(school, NOW + dt.timedelta(hours=23, minutes=59), engine=store) == {
            "mesh_delivered": 0, "mesh_dead_letter": 0, "mesh_awaiting_ack": 2}
        # The deadline from the environment ...
        monkeypatch.setenv(mx.DEADLINE_ENV, "2")
        assert mx.track_sent(school, NOW + dt.timedelta(hours=2), engine=store)["mesh_dead_letter"] == 2
    dead = row(store, first)
    assert dead["status"] == "dead_letter" and dead["dead_at"] is not None
    assert dead["reason"] == (f"sent as message {message_id} at 2026-11-26 09:00 UTC, not acknowledged by "
                              f"{TRUST_SIDE} within 2 h")
    assert (mx.spool_dir() / f"{second}.sealed").exists()  # kept, to send again by hand


def test_default_and_argument_deadline(mesh: MeshPeer, store: Engine) -> None:
    local_id = queue(store, body(5))
    with mesh.connector(SCHOOL_SIDE) as school:
        mx.send_pending(school, engine=store, now=NOW)
        assert mx.track_sent(school, NOW + dt.timedelta(hours=23), engine=store)["mesh_dead_letter"] == 0
        assert mx.track_sent(school, NOW + dt.timedelta(hours=24), engine=store)["mesh_dead_letter"] == 1
    assert row(store, local_id)["reason"].endswith(f"not acknowledged by {TRUST_SIDE} within 24 h")
    assert mx.delivery_deadline(6) == dt.timedelta(hours=6)


def test_mesh_reporting_a_failure_makes_a_dead_letter(mesh: MeshPeer, store: Engine) -> None:
    local_id = queue(store, body(6))
    with mesh.connector(SCHOOL_SIDE) as school:
        mx.send_pending(school, engine=store, now=NOW)
        message_id = row(store, local_id)["message_id"]
        mesh.sandbox.add_message_event(message_id, "error", code="14", description="undeliverable")
        assert school.track(message_id).failed
        assert mx.track_sent(school, NOW + dt.timedelta(minutes=15), engine=store)["mesh_dead_letter"] == 1
    assert row(store, local_id)["reason"].startswith(f"sent as message {message_id} at 2026-11-26 09:00 UTC; "
                                                     f"MESH reports it error")


def test_refused_outright_is_a_dead_letter_at_once(mesh: MeshPeer, store: Engine) -> None:
    local_id = queue(store, body(7), recipient="X26NOBODY")
    with mesh.connector(SCHOOL_SIDE) as school:
        assert mx.send_pending(school, engine=store, now=NOW)["mesh_dead_letter"] == 1
        with pytest.raises(MeshPermanentError) as err:
            school.send("X26NOBODY", WORKFLOW_CONTEXT, body(), subject=MARKER, local_id=MARKER)
    assert str(err.value) == f"MESH send for mailbox {SCHOOL_SIDE} failed: HTTP 417"
    dead = row(store, local_id)
    assert dead["status"] == "dead_letter" and "HTTP 417" in dead["reason"] and dead["message_id"] is None


def test_refused_certificate_leaves_the_message_pending(mesh: MeshPeer, store: Engine) -> None:
    local_id = queue(store, body(8))
    with mesh.connector(SCHOOL_SIDE, client_cert=None, client_key=None) as refused, pytest.raises(MeshAuthError):
        mx.send_pending(refused, engine=store, now=NOW)
    pending = row(store, local_id)
    assert pending["status"] == "pending" and pending["attempts"] == 1
    assert "refused our TLS client certificate" in pending["last_error"]
    with mesh.connector(SCHOOL_SIDE) as school:
        assert mx.send_pending(school, engine=store, now=NOW)["mesh_sent"] == 1
    assert row(store, local_id)["attempts"] == 2


def test_pending_past_the_deadline_is_a_dead_letter(mesh: MeshPeer, store: Engine) -> None:
    local_id = queue(store, body(9), now=NOW)
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()  # nothing listens there now
    with mesh.connector(SCHOOL_SIDE, url=f"https://127.0.0.1:{port}", max_attempts=2) as down:
        assert mx.send_pending(down, engine=store, now=NOW)["mesh_send_failed"] == 1
        assert mx.track_sent(down, NOW + dt.timedelta(hours=25), engine=store)["mesh_dead_letter"] == 1
    dead = row(store, local_id)
    assert dead["reason"] == (f"queued at 2026-11-26 09:00 UTC for {TRUST_SIDE}, not sent within 24 h (1 attempt; "
                              f"last error: MESH send for mailbox {SCHOOL_SIDE} failed: could not connect)")


def test_nothing_is_acknowledged_until_it_has_landed(mesh: MeshPeer, store: Engine) -> None:
    with mesh.connector(TRUST_SIDE) as trust, mesh.connector(SCHOOL_SIDE) as school:
        reply = trust.send(SCHOOL_SIDE, WORKFLOW_CONTEXT_ACK, body(10), local_id=str(uuid.uuid4()))

        def broken(_mid: str, _data: bytes) -> None:
            raise OSError(f"disk full while writing {MARKER}")

        with pytest.raises(mx.MeshExchangeError, match="1 MESH message"):
            mx.receive(school, broken, engine=store, now=NOW)
        assert school.inbox() == [reply]  # still in MESH
        assert not trust.track(reply).acknowledged
        landed: list[bytes] = []
        assert mx.receive(school, lambda _m, d: landed.append(d), engine=store, now=NOW)["mesh_acknowledged"] == 1
        assert landed == [body(10)] and school.inbox() == [] and trust.track(reply).acknowledged


def test_run_tasks_do_nothing_without_mesh_config(sl_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(mx.CONFIG_ENV, raising=False)
    assert mx.mesh_config() is None
    assert mx.run_send("r", NOW) == mx.run_track("r", NOW) == mx.run_receive("r", NOW) == {"mesh_configured": 0}


# -- retries, against the real sandbox through a fault-injecting proxy --------------------------------------


@dataclass
class FaultProxy:
    """Forwards HTTP to a sandbox, except that the next requests matching a rule get the rule's answer."""

    upstream: int
    faults: list[tuple[str, str, int, dict[str, str]]] = field(default_factory=list)  # method, path regex, status
    seen: list[tuple[str, str, int]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def inject(self, method: str, path: str, status: int, times: int = 1, **headers: str) -> None:
        with self.lock:
            self.faults += [(method, path, status, dict(headers))] * times

    def take(self, method: str, path: str) -> tuple[int, dict[str, str]] | None:
        with self.lock:
            for i, (m, p, status, headers) in enumerate(self.faults):
                if m == method and re.search(p, path):
                    del self.faults[i]
                    return status, headers
        return None


def _handler(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

        def _any(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            data = self.rfile.read(length) if length else b""
            fault = proxy.take(self.command, self.path)
            if fault is not None:
                status, headers = fault
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k.replace("_", "-"), v)
                self.send_header("Content-Length", "0")
                self.end_headers()
                proxy.seen.append((self.command, self.path, status))
                return
            conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream, timeout=30)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
            conn.request(self.command, self.path, body=data or None, headers=headers)
            resp = conn.getresponse()
            payload = resp.read()
            conn.close()
            self.send_response(resp.status)
            for k, v in resp.getheaders():
                if k.lower() not in ("transfer-encoding", "connection", "content-length", "date", "server"):
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            proxy.seen.append((self.command, self.path, resp.status))

        do_GET = do_POST = do_PUT = do_DELETE = _any

    return Handler


@pytest.fixture(scope="module")
def flaky(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[MeshSandbox, FaultProxy, str]]:
    """A second sandbox on plain HTTP (loopback only) behind a proxy that injects 429s and 5xxs."""
    if not MAILBOXES.exists():
        pytest.skip(f"the MESH sandbox mailboxes are not at {MAILBOXES}")
    root = tmp_path_factory.mktemp("mesh-flaky")
    with MeshSandbox(mailboxes=MAILBOXES, workflows=WORKFLOWS, shared_key=SHARED_KEY, data_dir=root / "data",
                     log_path=root / "mesh-sandbox.log") as sandbox:
        proxy = FaultProxy(sandbox.port)
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(proxy))
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield sandbox, proxy, f"http://127.0.0.1:{server.server_address[1]}"
        finally:
            server.shutdown()
            server.server_close()
        assert MARKER not in Path(sandbox.log_path).read_text(encoding="utf-8", errors="replace")


def _flaky_connector(url: str, mailbox: str, slept: list[float], **extra: Any) -> MeshConnector:
    return MeshConnector(MeshConfig(url=url, mailbox=mailbox, password=PASSWORD, shared_key=SHARED_KEY, **extra),
                         sleep=slept.append)


def test_retry_after_is_honoured_and_backoff_grows(flaky: tuple[MeshSandbox, FaultProxy, str]) -> None:
    sandbox, proxy, url = flaky
    sandbox.reset()
    slept: list[float] = []
    with _flaky_connector(url, SCHOOL_SIDE, slept) as school, _flaky_connector(url, TRUST_SIDE, slept) as trust:
        proxy.inject("POST", r"/outbox$", 429, Retry_After="3")
        message_id = school.send(TRUST_SIDE, WORKFLOW_CONTEXT, body(11))
        assert len(slept) == 1 and 3.0 <= slept[0] <= 4.0  # at least what Retry-After asked
        slept.clear()
        proxy.inject("GET", r"/inbox$", 503, times=2)
        assert trust.inbox() == [message_id]  # exactly one copy arrived
        assert len(slept) == 2 and 0.25 <= slept[0] <= 0.5 and 0.5 <= slept[1] <= 1.0  # exponential, jittered
        slept.clear()
        proxy.inject("GET", r"/inbox$", 429, Retry_After="3600")  # longer than we wait: the caller decides
        with pytest.raises(MeshTransientError, match="HTTP 429"):
            trust.inbox()
        assert slept == []
        proxy.inject("GET", r"/inbox$", 502, times=4)
        with pytest.raises(MeshTransientError, match="MESH inbox for mailbox X26ABC2 failed: HTTP 502"):
            trust.inbox()
        assert len(slept) == 3  # four tries in all


def test_first_upload_not_repeated_after_5xx_but_chunks_and_downloads_are(
        flaky: tuple[MeshSandbox, FaultProxy, str]) -> None:
    sandbox, proxy, url = flaky
    sandbox.reset()
    slept: list[float] = []
    data = body(12, size=250_000)
    with _flaky_connector(url, SCHOOL_SIDE, slept, max_chunk_size=100_000) as school, \
            _flaky_connector(url, TRUST_SIDE, slept) as trust:
        proxy.inject("POST", r"/outbox$", 503)
        with pytest.raises(MeshTransientError, match="HTTP 503") as err:
            school.send(TRUST_SIDE, WORKFLOW_CONTEXT, data, subject=MARKER)
        assert err.value.maybe_sent and slept == []
        proxy.inject("POST", r"/outbox/[0-9A-F]+/2$", 500)
        proxy.inject("POST", r"/outbox/[0-9A-F]+/3$", 504)
        message_id = school.send(TRUST_SIDE, WORKFLOW_CONTEXT, data)
        assert len(slept) == 2
        proxy.inject("GET", r"/inbox/[0-9A-F]+/3$", 503)
        assert trust.download(message_id) == data  # the download started again from the first byte
        assert len(slept) == 3


def test_a_failed_send_stays_pending_and_goes_next_run(flaky: tuple[MeshSandbox, FaultProxy, str],
                                                       store: Engine) -> None:
    sandbox, proxy, url = flaky
    sandbox.reset()
    local_id = queue(store, body(13))
    slept: list[float] = []
    with _flaky_connector(url, SCHOOL_SIDE, slept) as school:
        proxy.inject("POST", r"/outbox$", 502)
        assert mx.send_pending(school, engine=store, now=NOW)["mesh_send_failed"] == 1
        pending = row(store, local_id)
        assert (pending["status"], pending["attempts"], pending["message_id"]) == ("pending", 1, None)
        assert pending["last_error"] == (f"MESH send for mailbox {SCHOOL_SIDE} failed: HTTP 502 "
                                         "(MESH may have it: no answer to the upload)")
        assert mx.send_pending(school, engine=store, now=NOW)["mesh_sent"] == 1
    sent = row(store, local_id)
    assert (sent["status"], sent["attempts"], sent["last_error"]) == ("sent", 2, None)


# -- the peer itself -----------------------------------------------------------------------------------------


def test_the_sandbox_dies_with_the_process_that_started_it(tmp_path: Path) -> None:
    import psutil

    script = (
        "import time\n"
        "from connectors.mesh.sandbox import MeshSandbox\n"
        f"s = MeshSandbox(mailboxes={str(MAILBOXES)!r}, workflows=[], shared_key='k', "
        f"data_dir={str(tmp_path / 'data')!r}, log_path={str(tmp_path / 'sandbox.log')!r}).start()\n"
        "print(s.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    assert parent.stdout is not None
    pid = int(parent.stdout.readline())
    assert psutil.Process(pid).is_running()
    parent.kill()  # no clean-up runs: only the closed stdin pipe tells the sandbox
    parent.wait()
    parent.stdout.close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the sandbox (pid {pid}) outlived the process that started it")


# -- the DAG through Airflow --------------------------------------------------------------------------------


def test_mesh_exchange_dag_runs_through_airflow(mesh: MeshPeer, sl_home: Path, tmp_path: Path) -> None:
    from schoolslink.airflow_runner import airflow_env, ensure_metadata_db
    from schoolslink.store.db import migrate

    config = sl_home / "config" / "mesh.json"
    config.parent.mkdir(parents=True)
    config.write_text(json.dumps(mesh.settings(SCHOOL_SIDE)), encoding="utf-8")
    engine = migrate()
    outgoing = body(14)
    local_id = queue(engine, outgoing, now=dt.datetime.now(dt.UTC))
    incoming = body(15, size=2048)
    with mesh.connector(TRUST_SIDE) as trust:
        reply = trust.send(SCHOOL_SIDE, WORKFLOW_CONTEXT_ACK, incoming, subject=MARKER, local_id=str(uuid.uuid4()))

    env = airflow_env(sl_home)
    ensure_metadata_db(env)
    res = subprocess.run([sys.executable, "-m", "schoolslink.airflow_runner", "mesh_exchange"], env=env,
                         capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout.strip().splitlines()[-1])["state"] == "success"

    sent = row(engine, local_id)
    assert sent["status"] == "sent" and sent["message_id"]
    with mesh.connector(TRUST_SIDE) as trust, mesh.connector(SCHOOL_SIDE) as school:
        assert trust.inbox() == [sent["message_id"]]
        assert hashlib.sha256(trust.download(sent["message_id"])).digest() == hashlib.sha256(outgoing).digest()
        assert school.inbox() == []  # the reply was landed and acknowledged
        assert trust.track(reply).acknowledged
    [landed] = sorted((sl_home / "landing" / "mesh" / SCHOOL_SIDE).glob("*.sealed"))
    with open_sealed(landed) as f:
        assert f.read() == incoming
    assert MARKER.encode() not in landed.read_bytes()  # landed sealed, not in plain

    af = sl_home / "airflow"
    with sqlite3.connect(af / "airflow.db") as db:
        states = dict(db.execute("select task_id, state from task_instance where dag_id = 'mesh_exchange'").fetchall())
    assert states == {"send_pending": "success", "track": "success", "receive": "success"}
    with sqlite3.connect(sl_home / "state.db") as db:
        [(summary,)] = db.execute("select summary from runs where dag_id = 'mesh_exchange'").fetchall()
    summary = json.loads(summary)
    assert {k: summary[k] for k in ("mesh_configured", "mesh_sent", "mesh_awaiting_ack", "mesh_received",
                                    "mesh_acknowledged")} == {"mesh_configured": 1, "mesh_sent": 1,
                                                              "mesh_awaiting_ack": 1, "mesh_received": 1,
                                                              "mesh_acknowledged": 1}
    # No body anywhere Airflow keeps things: task logs (dag.test() prints them), the metadata database
    # (XComs), whatever else is under AIRFLOW_HOME. Our own log lines are there, so the check is not vacuous.
    output = res.stdout + res.stderr
    assert f"as message {sent['message_id']}" in output and f"MESH message {reply} from {TRUST_SIDE}" in output
    assert MARKER not in output
    for path in af.rglob("*"):
        if path.is_file():
            assert MARKER.encode() not in path.read_bytes(), path
