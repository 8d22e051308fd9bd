"""Events over Redis pub/sub on 127.0.0.1: our publisher, the redis provider's trigger that Airflow's AssetWatcher
runs (in-process here: its `run()` generator awaited), the disabled publisher, an outage, and the landing watcher.

Each test uses a channel prefix of its own (pub/sub channels are global to a Redis server, whatever the db).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from connectors.events import DisabledPublisher, RedisPublisher, channel, publisher_from_env, read_message
from schoolslink.airflow_services import wait_for

REDIS_URL = "redis://127.0.0.1:6379/0"


def _redis_up() -> bool:
    try:
        return bool(redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping())
    except redis.RedisError:
        return False


pytestmark = pytest.mark.skipif(not _redis_up(), reason="no Redis at 127.0.0.1:6379")


@pytest.fixture()
def prefix(monkeypatch: pytest.MonkeyPatch) -> str:
    p = f"sltest-{uuid.uuid4().hex[:10]}"
    monkeypatch.setenv("SCHOOLSLINK_EVENTS", REDIS_URL)
    monkeypatch.setenv("SCHOOLSLINK_EVENTS_PREFIX", p)
    monkeypatch.setenv("AIRFLOW_CONN_SCHOOLSLINK_EVENTS", "redis://127.0.0.1:6379")
    return p


def subscribers(name: str) -> int:
    return int(redis.Redis.from_url(REDIS_URL).pubsub_numsub(name)[0][1])


class Listener:
    """A plain Redis subscriber that collects what arrives on some channels."""

    def __init__(self, *channels: str) -> None:
        self.pubsub = redis.Redis.from_url(REDIS_URL).pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
        self.pubsub.subscribe(*channels)
        self.pubsub.get_message(timeout=5)  # the subscription is confirmed
        self.got: list[dict[str, Any]] = []

    def until(self, n: int, timeout: float = 30.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(self.got) < n and time.monotonic() < deadline:
            m = self.pubsub.get_message(timeout=0.2)
            if m and m["type"] == "message":
                self.got.append({"channel": m["channel"].decode(), **json.loads(m["data"])})
        assert len(self.got) >= n, f"expected {n} message(s), got {self.got}"
        return self.got

    def close(self) -> None:
        self.pubsub.close()


def test_the_message_queue_trigger_receives_what_we_publish(prefix: str) -> None:
    from schoolslink.schedules import event_trigger

    trigger = event_trigger("landing")
    assert trigger.serialize()[1]["channels"] == [f"{prefix}.landing"]
    publisher = publisher_from_env()
    assert isinstance(publisher, RedisPublisher)

    async def first_event() -> Any:
        async def publish_once_subscribed() -> None:
            while subscribers(f"{prefix}.landing") < 1:
                await asyncio.sleep(0.05)
            publisher.publish("landing", {"kind": "mis", "school_urn": "100001", "sha256": "ab" * 32, "size": 7})

        task = asyncio.create_task(publish_once_subscribed())
        async for event in trigger.run():  # what the triggerer runs for the AssetWatcher
            await task
            return event
        return None

    event = asyncio.run(asyncio.wait_for(first_event(), timeout=60))
    publisher.close()
    assert event is not None and event.payload["channel"] == f"{prefix}.landing"
    assert read_message(event.payload["data"]) == [
        {"topic": "landing", "data": {"kind": "mis", "school_urn": "100001", "sha256": "ab" * 32, "size": 7}}]
    assert publisher.stats["published"] == 1 and publisher.stats["failed"] == 0


def test_the_disabled_publisher_publishes_nothing(prefix: str) -> None:
    listener = Listener(channel("landing", prefix))
    try:
        disabled = DisabledPublisher()
        disabled.publish("landing", {"kind": "mis", "school_urn": "100001"})
        disabled.close()
        real = publisher_from_env()
        real.publish("landing", {"kind": "sentinel"})
        real.close()
        [only] = listener.until(1)
        assert only["data"] == {"kind": "sentinel"}  # the first thing on the channel: nothing came before it
        assert disabled.stats["published"] == 0
    finally:
        listener.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture()
def private_redis(tmp_path: Path) -> Iterator[tuple[int, Any]]:
    """A Redis server of our own on a free port, which the test can stop and start again (an outage)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed")
    port = _free_port()
    procs: list[subprocess.Popen[bytes]] = []

    def start() -> None:
        procs.append(subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                       "--appendonly", "no", "--dir", str(tmp_path)], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
        wait_for(lambda: _ping(port), 30, "the private Redis to answer", every=0.05)

    start()
    try:
        yield port, start
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=10)


def _ping(port: int) -> bool:
    try:
        return bool(redis.Redis(port=port, socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        return False


def test_a_redis_outage_never_raises_is_counted_and_logged_without_payload(
        private_redis: tuple[int, Any], caplog: pytest.LogCaptureFixture) -> None:
    port, start_again = private_redis
    url = f"redis://127.0.0.1:{port}/0"
    publisher = publisher_from_env({"SCHOOLSLINK_EVENTS": url, "SCHOOLSLINK_EVENTS_PREFIX": "outage"})
    caplog.set_level(logging.DEBUG, logger="connectors.events")
    publisher.publish("hl7v2", {"count": 1, "max_id": 41})
    assert publisher.flush(10)
    assert publisher.stats["published"] == 1

    redis.Redis(port=port).shutdown(nosave=True)  # the outage
    wait_for(lambda: not _ping(port), 30, "the private Redis to stop", every=0.05)
    for i in range(3):
        publisher.publish("hl7v2", {"count": 1, "max_id": 4242 + i})  # returns at once, raises nothing
    assert publisher.flush(30)
    assert publisher.stats["failed"] == 3
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "not published" in warnings[0].getMessage()  # once per outage, not per event
    assert "4242" not in caplog.text and "max_id" not in caplog.text  # never the payload

    start_again()  # back: the next event goes through
    publisher.publish("hl7v2", {"count": 2, "max_id": 44})
    assert publisher.flush(30)
    publisher.close()
    assert publisher.stats["published"] == 2
    assert "published again" in caplog.text


def test_a_refused_connection_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    publisher = publisher_from_env({"SCHOOLSLINK_EVENTS": f"redis://127.0.0.1:{_free_port()}/0"})
    publisher.publish("fhir", {"trust_ods": "R9X", "key": "fhir-notifications/R9X/x.json.sealed", "events": 1})
    publisher.close(timeout=10)
    assert publisher.stats["failed"] == 1
    assert "R9X" not in caplog.text


# The landing watcher --------------------------------------------------------------------------------------------


@pytest.fixture()
def watched(prefix: str, sl_home: Path) -> Iterator[tuple[Path, Listener]]:
    from connectors.events.watcher import LandingWatcher

    listener = Listener(channel("landing", prefix))
    publisher = publisher_from_env()
    watcher = LandingWatcher(publisher, settle=0.5)
    watcher.start()
    try:
        yield watcher.root, listener
    finally:
        watcher.stop()
        publisher.close()
        listener.close()


def test_the_watcher_publishes_each_completed_drop_once(watched: tuple[Path, Listener], tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    import hashlib

    root, listener = watched
    caplog.set_level(logging.INFO)
    school = root / "mis" / "100001"
    school.mkdir(parents=True)
    body = b"<CTfile>" + b"x" * 300_000 + b"</CTfile>"

    # 1. written in place, in several writes: one event, on close
    with (school / "ctf-DEMOSURNAME.xml").open("wb") as f:
        for i in range(0, len(body), 65536):
            f.write(body[i:i + 65536])
            f.flush()
    # 2. written as .part, then renamed into place: one event, for the rename (the .part is ignored)
    part = school / "export.csv.part"
    part.write_bytes(b"UPN,Surname\n")
    part.rename(school / "export.csv")
    # 3. ignored: a hidden temporary file, a sealed file, a file in refused/
    (school / ".export.csv.AbCdEf").write_bytes(b"tmp")
    (school / "20261126T010203000001Z-0001.xml.sealed").write_bytes(b"SLSEAL1\n")
    (root / "refused" / "100001").mkdir(parents=True)
    (root / "refused" / "100001" / "x.xml.sealed").write_bytes(b"SLSEAL1\n")
    # 4. moved in from outside the landing zone (same file system): one event
    outside = tmp_path / "staging" / "register.csv"
    outside.parent.mkdir()
    outside.write_bytes(b"consent register")
    outside.rename(root / "consent" / "100002.csv")
    # 5. a whole school folder moved in: its file counts once its size has held
    folder = tmp_path / "staging" / "100003"
    folder.mkdir()
    (folder / "ctf.xml").write_bytes(b"<CTfile/>")
    folder.rename(root / "mis" / "100003")

    got = listener.until(4)
    by_school = sorted((m["data"]["kind"], m["data"]["school_urn"], m["data"]["size"]) for m in got)
    assert by_school == [("consent", "100002", 16), ("mis", "100001", 12), ("mis", "100001", len(body)),
                         ("mis", "100003", 9)]
    full = next(m for m in got if m["data"]["size"] == len(body))
    assert full["data"]["sha256"] == hashlib.sha256(body).hexdigest()  # the whole file, not a partial one
    assert all(set(m["data"]) == {"kind", "school_urn", "sha256", "size"} for m in got)
    # Nothing more: a sentinel published now is the next message (no duplicate for any drop)
    publisher = publisher_from_env()
    publisher.publish("landing", {"kind": "sentinel"})
    publisher.close()
    assert listener.until(5)[4]["data"] == {"kind": "sentinel"}
    assert "DEMOSURNAME" not in caplog.text  # a file is named by school and hash, never by its name


def test_the_watcher_announces_files_that_landed_while_it_was_down(prefix: str, sl_home: Path) -> None:
    from connectors.events.watcher import LandingWatcher

    (sl_home / "landing" / "mis" / "100001").mkdir(parents=True)
    (sl_home / "landing" / "mis" / "100001" / "ctf.xml").write_bytes(b"<CTfile/>")
    listener = Listener(channel("landing", prefix))
    publisher = publisher_from_env()
    try:
        with LandingWatcher(publisher):
            [m] = listener.until(1)
        assert m["data"] == {"kind": "startup", "waiting": 1}
    finally:
        publisher.close()
        listener.close()


def test_files_whose_events_were_lost_are_found_by_the_rescan_once(prefix: str, sl_home: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """An inotify queue overflow drops events and nobody learns which: the rescan finds such a file and publishes it
    once it has held still, and never again a file already published or announced at start."""
    from connectors.events.watcher import LandingWatcher

    caplog.set_level(logging.INFO)
    root = sl_home / "landing"
    (root / "mis" / "100001").mkdir(parents=True)
    (root / "mis" / "100001" / "waiting.xml").write_bytes(b"<CTfile/>")  # there before the watcher: announced
    listener = Listener(channel("landing", prefix))
    publisher = publisher_from_env()
    watcher = LandingWatcher(publisher, settle=0.3, rescan=0.3)
    try:
        watcher.start()
        assert listener.until(1)[0]["data"] == {"kind": "startup", "waiting": 1}
        (root / "mis" / "100002").mkdir()
        (root / "mis" / "100002" / "heard.xml").write_bytes(b"<CTfile>heard</CTfile>")  # its close is an event
        assert listener.until(2)[1]["data"]["school_urn"] == "100002"
        # the events are lost from here on (as in an overflow): the watcher's inotify observer hears nothing more
        observer, watcher._observer = watcher._observer, None
        observer.stop()
        observer.join(5)
        (root / "mis" / "100003").mkdir()
        (root / "mis" / "100003" / "LOSTNAME.xml").write_bytes(b"<CTfile>lost</CTfile>")
        found = listener.until(3)[2]["data"]
        assert (found["kind"], found["school_urn"], found["size"]) == ("mis", "100003", 21)
        os.utime(root / "mis" / "100002" / "heard.xml")  # a touch: new times, the same content
        time.sleep(1.5)  # several more rescans: nothing is published twice
        publisher.publish("landing", {"kind": "sentinel"})
        assert listener.until(4)[3]["data"] == {"kind": "sentinel"}
        assert watcher.rescued == 1
    finally:
        watcher.stop()
        publisher.close()
        listener.close()
    assert "had no event" in caplog.text and "LOSTNAME" not in caplog.text


def test_a_file_deleted_and_dropped_again_is_announced_again(watched: tuple[Path, Listener]) -> None:
    """The same content under the same name, after the first copy was taken: a new drop, announced again; a touch of
    a file already announced is not."""
    root, listener = watched
    school = root / "mis" / "100006"
    school.mkdir(parents=True)
    (school / "ctf.xml").write_bytes(b"<CTfile>same</CTfile>")
    first = listener.until(1)[0]["data"]
    (school / "ctf.xml").unlink()
    (school / "ctf.xml").write_bytes(b"<CTfile>same</CTfile>")
    again = listener.until(2)[1]["data"]
    assert again == first and again["school_urn"] == "100006"
    with (school / "ctf.xml").open("ab"):  # opened for writing and closed unchanged: a close event, no news
        pass
    publisher = publisher_from_env()
    publisher.publish("landing", {"kind": "sentinel"})
    publisher.close()
    assert listener.until(3)[2]["data"] == {"kind": "sentinel"}


def test_watcher_thread_is_gone_after_stop(prefix: str, sl_home: Path) -> None:
    from connectors.events.watcher import LandingWatcher

    before = {t.name for t in threading.enumerate()}
    publisher = publisher_from_env()
    with LandingWatcher(publisher):
        pass
    publisher.close()
    assert "landing-watcher" not in {t.name for t in threading.enumerate()} - before


def test_a_file_moved_in_with_a_clock_ahead_of_ours_is_still_published(watched: tuple[Path, Listener],
                                                                        tmp_path: Path) -> None:
    """Inside a folder moved in whole (no close of its own), a file counts once it has held still: watched, not
    judged by a time stamp that another machine's clock may have set a day ahead."""
    root, listener = watched
    folder = tmp_path / "staging" / "100004"
    folder.mkdir(parents=True)
    (folder / "ctf.xml").write_bytes(b"<CTfile/>")
    ahead = time.time() + 86_400
    os.utime(folder / "ctf.xml", (ahead, ahead))
    folder.rename(root / "mis" / "100004")
    [m] = listener.until(1)
    assert (m["data"]["kind"], m["data"]["school_urn"], m["data"]["size"]) == ("mis", "100004", 9)


def test_a_watcher_whose_zone_is_gone_says_so_and_its_command_exits(prefix: str, sl_home: Path) -> None:
    """watchdog stops watching when the watched folder itself is deleted: `landing watch` must then exit non-zero,
    so the service manager restarts it (and the restart announces what is waiting), not run on deaf."""
    from connectors.events.watcher import LandingWatcher

    publisher = publisher_from_env()
    try:
        with LandingWatcher(publisher) as watcher:
            assert watcher.alive()
            shutil.rmtree(watcher.root)
            assert not watcher.alive()
    finally:
        publisher.close()
    (sl_home / "landing").mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "schoolslink.cli", "landing", "watch"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None and proc.stdout.readline().startswith("WATCHING ")
        shutil.rmtree(sl_home / "landing")
        assert proc.wait(timeout=30) == 1
        assert proc.stderr is not None and "exiting so it is restarted" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_landing_watch_refuses_a_rescan_period_of_zero(sl_home: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "schoolslink.cli", "landing", "watch", "--rescan", "0"],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)
    assert done.returncode == 2 and "--rescan must be over 0 seconds" in done.stderr
