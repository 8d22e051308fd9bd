"""The FHIR notification receiver, for real: `schoolslink fhir receive` on 127.0.0.1 (its own process), Redis on
127.0.0.1. A valid notification is stored sealed before the 200 and then published; a wrong secret is 401 and a
malformed body 400 with an OperationOutcome; nothing personal, nor the secret, reaches the receiver's log."""

from __future__ import annotations

import json
import secrets
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest

from connectors.events import channel
from connectors.peer_process import REPO_ROOT, PeerProcess
from tests.integration.test_events_redis import REDIS_URL, Listener, pytestmark  # noqa: F401 (skip without Redis)
from tests.unit.test_events import r4b_notification

NHS = "9990000018"  # synthetic, test range
SURNAME, GIVEN = "ZQUORRIDGE", "PELLINORE"


class NotifyReceiver(PeerProcess):
    name = "FHIR notification receiver"
    script: ClassVar[Path] = REPO_ROOT / "schoolslink" / "events_cli.py"
    cwd: ClassVar[Path] = REPO_ROOT

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        super().__init__(port=0, log_path=log_path, startup_timeout=90, install=False, env=env)

    def _command(self) -> list[str]:
        return [sys.executable, "-m", "schoolslink.cli", "fhir", "receive", "--host", "127.0.0.1",
                "--port", "0"]


@dataclass
class Receiver:
    url: str
    home: Path
    secret: str
    prefix: str
    log: Path
    seal_key: str


@pytest.fixture(scope="module")
def receiver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Receiver]:
    home = tmp_path_factory.mktemp("notify")
    secret = secrets.token_urlsafe(24)
    prefix = f"sltest-{uuid.uuid4().hex[:10]}"
    seal_key = secrets.token_hex(32)
    env = {"SCHOOLSLINK_HOME": str(home), "SCHOOLSLINK_EVENTS": REDIS_URL, "SCHOOLSLINK_EVENTS_PREFIX": prefix,
           "SCHOOLSLINK_FHIR_NOTIFY_SECRET_R9X": secret, "SCHOOLSLINK_SEAL_KEY": seal_key,
           "SCHOOLSLINK_KEY": "notify-test-key", "PYTHONPATH": str(REPO_ROOT)}
    log = home / "receiver.log"
    with NotifyReceiver(env, log) as peer:
        yield Receiver(f"http://127.0.0.1:{peer.port}", home, secret, prefix, log, seal_key)


def post(r: Receiver, body: bytes, trust: str = "R9X", secret: str | None = None, auth: bool = True
         ) -> httpx.Response:
    hdrs = {"Content-Type": "application/fhir+json"}
    if auth:
        hdrs["Authorization"] = f"Bearer {r.secret if secret is None else secret}"
    return httpx.post(f"{r.url}/notify/{trust}", content=body, headers=hdrs, timeout=30)


def stored(r: Receiver, trust: str = "R9X") -> list[Path]:
    return sorted((r.home / "landing" / "fhir-notifications" / trust).glob("*.sealed"))


def with_patient(note: dict[str, Any]) -> dict[str, Any]:
    """A full-resource notification: it carries the subject (so it must never reach a log)."""
    note["entry"].append({"fullUrl": "Patient/p1", "resource": {
        "resourceType": "Patient", "id": "p1",
        "identifier": [{"system": "https://fhir.nhs.uk/Id/nhs-number", "value": NHS}],
        "name": [{"family": SURNAME, "given": [GIVEN]}], "birthDate": "2013-05-01"}})
    return note


def test_a_notification_is_stored_sealed_then_published(receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    from connectors.storage.sealed import open_sealed, read_header

    monkeypatch.setenv("SCHOOLSLINK_SEAL_KEY", receiver.seal_key)
    listener = Listener(channel("fhir", receiver.prefix))
    try:
        body = json.dumps(with_patient(r4b_notification(events=1))).encode()
        before = stored(receiver)
        res = post(receiver, body)
        assert res.status_code == 200, res.text
        assert res.json()["resourceType"] == "OperationOutcome"
        [new] = sorted(set(stored(receiver)) - set(before))  # on disk when the 200 came
        with open_sealed(new) as f:
            assert f.read() == body  # readable back, byte for byte
        assert new.read_bytes().startswith(b"SLSEAL1\n") and NHS.encode() not in new.read_bytes()
        header = read_header(new)
        assert (header["kind"], header["school_urn"], header["format"]) == ("fhir-notifications", "R9X", "json")
        [event] = listener.until(1)
        assert event["data"] == {"trust_ods": "R9X", "type": "event-notification", "events": 1,
                                 "key": str(new.relative_to(receiver.home / "landing"))}
        assert not list(new.parent.glob("*.part"))

        res = post(receiver, b"")  # an R4 rest-hook without payload: "something changed"
        assert res.status_code == 200
        assert listener.until(2)[1]["data"]["type"] == "rest-hook-ping"
        assert len(stored(receiver)) == len(before) + 2

        heartbeat = json.dumps(r4b_notification("heartbeat", 0)).encode()
        assert post(receiver, heartbeat).status_code == 200  # stored, but it says nothing changed: no event
        assert len(stored(receiver)) == len(before) + 3
        assert post(receiver, json.dumps(r4b_notification()).encode()).status_code == 200
        assert listener.until(3)[2]["data"]["type"] == "event-notification"  # the heartbeat published nothing
    finally:
        listener.close()


def test_a_wrong_or_missing_secret_is_401_and_nothing_is_kept(receiver: Receiver) -> None:
    body = json.dumps(with_patient(r4b_notification())).encode()
    before = {t: stored(receiver, t) for t in ("R9X", "R0A")}
    for res in (post(receiver, body, secret="not-the-secret"), post(receiver, body, auth=False),
                post(receiver, body, trust="R0A"),  # a trust with no secret configured
                post(receiver, body, secret=receiver.secret[:-1]),
                httpx.post(f"{receiver.url}/notify/R9X", content=body, timeout=30,
                           headers={"Authorization": receiver.secret})):  # not as a bearer token
        assert res.status_code == 401
        assert res.json()["issue"][0]["code"] == "security"
        assert receiver.secret not in res.text
    assert {t: stored(receiver, t) for t in ("R9X", "R0A")} == before


@pytest.mark.parametrize(("body", "problem"), [
    (b"{not json", "not valid JSON"),
    (b'{"resourceType": "Patient", "id": "p1"}', "must be a Bundle"),
    (b'{"resourceType": "Bundle", "type": "history", "entry": [{"resource": {"resourceType": "Patient"}}]}',
     "SubscriptionStatus"),
])
def test_a_malformed_body_is_400_with_an_operation_outcome(receiver: Receiver, body: bytes, problem: str) -> None:
    before = stored(receiver)
    res = post(receiver, body)
    assert res.status_code == 400
    assert res.headers["content-type"].startswith("application/fhir+json")
    outcome = res.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["severity"] == "error" and outcome["issue"][0]["code"] == "invalid"
    assert problem in outcome["issue"][0]["diagnostics"]
    assert stored(receiver) == before


def test_nothing_personal_and_no_secret_in_the_receivers_log(receiver: Receiver) -> None:
    post(receiver, json.dumps(with_patient(r4b_notification())).encode())
    post(receiver, json.dumps(with_patient(r4b_notification())).encode(), secret="wrong-" + NHS)
    post(receiver, b'{"resourceType": "Patient", "name": [{"family": "' + SURNAME.encode() + b'"}]}')
    deadline = time.monotonic() + 10
    while "refused" not in receiver.log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    text = receiver.log.read_text()
    assert "stored as fhir-notifications/R9X/" in text and "refused" in text  # it does log what happened
    for needle in (NHS, "999 000 0018", SURNAME, GIVEN, "2013-05-01", receiver.secret, "Bearer"):
        assert needle.lower() not in text.lower(), needle
