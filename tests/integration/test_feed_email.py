"""The feed-ready email, sent through aiosmtpd's Controller on 127.0.0.1 with STARTTLS (a throwaway CA).

Asserts the notice arrives over TLS, says which school, which night and where, and carries no pupil data:
none of the feed's names, UPNs or statuses, in the subject or the body."""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
import ssl
from collections.abc import Iterator
from email import message_from_bytes
from email.message import Message
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.integration.test_feed_delivery_folder import DAY, PUPILS, quarantined, write_feed


class Inbox:
    """aiosmtpd handler: keeps each message with whether it came over TLS."""

    def __init__(self) -> None:
        self.messages: list[tuple[Message, list[str], bool]] = []

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or b""
        self.messages.append((message_from_bytes(raw), list(envelope.rcpt_tos), session.ssl is not None))
        return "250 OK"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cert(tmp: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (it is its own CA): (cert file, key file)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cf, kf = tmp / "smtp.pem", tmp / "smtp.key"
    cf.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    kf.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))
    return cf, kf


@pytest.fixture()
def smtp_peer(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """Two aiosmtpd servers on loopback: one that requires STARTTLS, one that does not offer it."""
    cert, key = _cert(tmp_path)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    inbox, plain_inbox = Inbox(), Inbox()
    tls = Controller(inbox, hostname="127.0.0.1", port=_free_port(), tls_context=ctx, require_starttls=True)
    plain = Controller(plain_inbox, hostname="127.0.0.1", port=_free_port())
    tls.start()
    plain.start()
    try:
        yield {"port": tls.port, "plain_port": plain.port, "ca": cert, "inbox": inbox, "plain_inbox": plain_inbox}
    finally:
        tls.stop()
        plain.stop()


@pytest.fixture()
def feed_home(sl_home: Path) -> Path:
    from schoolslink.store.db import migrate

    migrate()
    return sl_home


def test_feed_ready_email_arrives_over_starttls_and_carries_no_pupil_data(
        smtp_peer: dict[str, Any], feed_home: Path, tmp_path: Path) -> None:
    from schoolslink.pipeline.feed_delivery import deliver
    from schoolslink.settings import feeds_dir

    share = tmp_path / "share"
    share.mkdir()
    cfg = feed_home / "config" / "feed-delivery.yaml"
    cfg.parent.mkdir(parents=True)
    cfg.write_text(f"""
smtp: {{host: 127.0.0.1, port: {smtp_peer['port']}, from: feeds@trust.example, starttls: true,
        ca_file: {smtp_peer['ca']}}}
retry: {{attempts: 1, wait_seconds: 0}}
schools:
  "100001":
    name: Fernbrook Primary
    folder: {{path: {share}}}
    notify_email: [dsl@fernbrook.example, senco@fernbrook.example]
""")
    write_feed(feeds_dir(), "100001")
    counts = deliver("r-mail", DAY)
    assert counts["feed_delivered"] == 1 and counts["feed_ready_emails"] == 1, counts

    [(msg, rcpts, over_tls)] = smtp_peer["inbox"].messages
    assert over_tls
    assert sorted(rcpts) == ["dsl@fernbrook.example", "senco@fernbrook.example"]
    subject = str(msg["Subject"])
    body = msg.get_payload(decode=True).decode()
    assert "Fernbrook Primary" in subject and "100001" in subject and DAY.isoformat() in subject
    assert str(share / DAY.isoformat()) in body
    assert "3 rows" in body
    whole = subject + body + msg.as_string()
    for p in PUPILS:
        for value in p.values():
            assert value not in whole, "pupil data in the feed-ready email"


def test_no_silent_downgrade_when_starttls_is_not_offered(smtp_peer: dict[str, Any], feed_home: Path,
                                                          tmp_path: Path) -> None:
    from schoolslink.pipeline.feed_delivery import deliver
    from schoolslink.settings import feeds_dir

    share = tmp_path / "share"
    share.mkdir()
    cfg = feed_home / "config" / "feed-delivery.yaml"
    cfg.parent.mkdir(parents=True)
    cfg.write_text(f"""
smtp: {{host: 127.0.0.1, port: {smtp_peer['plain_port']}, from: feeds@trust.example, starttls: true}}
retry: {{attempts: 1, wait_seconds: 0}}
schools:
  "100001": {{folder: {{path: {share}}}, notify_email: [dsl@fernbrook.example]}}
""")
    write_feed(feeds_dir(), "100001")
    counts = deliver("r-mail2", DAY)
    # The feed went; the notice did not, and why is recorded.
    assert counts["feed_delivered"] == 1 and counts["feed_ready_email_failed"] == 1, counts
    assert smtp_peer["plain_inbox"].messages == []
    [row] = quarantined("feed-email:")
    assert "does not offer STARTTLS" in row["reason"]
