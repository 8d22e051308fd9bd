"""The feed-ready email: tells a school's named contacts that tonight's feed is waiting, and where.

Email is not a safe channel for pupil data, so the notice carries none: no names, UPNs, statuses or
anything per pupil; only the school's name and URN, the feed's date, where it was put and, at most, how
many rows it has. `send_feed_ready` builds the message from exactly those arguments, so nothing else can
leak into it.

SMTP with STARTTLS when configured: if the server does not offer STARTTLS the message is not sent (no
silent downgrade to plain text), and the server's certificate is verified (system CAs, or `ca_file`).
"""

from __future__ import annotations

import smtplib
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import formatdate, make_msgid


class EmailError(Exception):
    """A notice could not be sent; `transient` says whether trying again may help."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


@dataclass(frozen=True)
class SmtpSettings:
    """Our relay: host, port, sender, STARTTLS and optional login (the password never printed)."""

    host: str
    port: int
    sender: str
    starttls: bool = True
    ca_file: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    timeout: float = 20.0


def feed_ready_message(smtp: SmtpSettings, to: Sequence[str], *, school_urn: str, school_name: str | None,
                       feed_date: str, where: str, rows: int | None) -> EmailMessage:
    """The notice itself: school, date, place and row count only."""
    who = f"{school_name} (URN {school_urn})" if school_name else f"URN {school_urn}"
    msg = EmailMessage()
    msg["Subject"] = f"schoolslink: the status feed for {who} for {feed_date} is ready"
    msg["From"] = smtp.sender
    msg["To"] = ", ".join(to)
    msg["Date"] = formatdate(localtime=False)
    msg["Message-ID"] = make_msgid(domain=smtp.sender.rpartition("@")[2] or None)
    count = f"It has {rows} row{'s' if rows != 1 else ''}.\n" if rows is not None else ""
    msg.set_content(
        f"Tonight's schoolslink status feed for {who}, dated {feed_date}, is ready.\n\n"
        f"Where: {where}\n{count}\n"
        "manifest.json in that folder lists every file with its SHA-256; check them before importing.\n"
        "The feed holds pupil information: open it only in your school's secure systems. This email holds none.\n"
    )
    return msg


def send_feed_ready(smtp: SmtpSettings, to: Sequence[str], *, school_urn: str, school_name: str | None,
                    feed_date: str, where: str, rows: int | None) -> None:
    """Send the feed-ready notice to `to` through our relay."""
    if not to:
        return
    msg = feed_ready_message(smtp, to, school_urn=school_urn, school_name=school_name, feed_date=feed_date,
                             where=where, rows=rows)
    try:
        with smtplib.SMTP(smtp.host, smtp.port, timeout=smtp.timeout) as conn:
            conn.ehlo()
            if smtp.starttls:
                if not conn.has_extn("starttls"):
                    raise EmailError(f"{smtp.host}:{smtp.port} does not offer STARTTLS: notice not sent")
                conn.starttls(context=ssl.create_default_context(cafile=smtp.ca_file))
                conn.ehlo()
            if smtp.username:
                conn.login(smtp.username, smtp.password or "")
            refused = conn.send_message(msg)
    except EmailError:
        raise
    except smtplib.SMTPAuthenticationError:
        raise EmailError(f"{smtp.host}:{smtp.port} refused our SMTP login") from None
    except smtplib.SMTPRecipientsRefused:
        raise EmailError(f"{smtp.host}:{smtp.port} refused every recipient") from None
    except ssl.SSLError as exc:
        raise EmailError(f"TLS with {smtp.host}:{smtp.port} failed: {exc.reason or type(exc).__name__}") from None
    except (smtplib.SMTPServerDisconnected, smtplib.SMTPConnectError) as exc:
        raise EmailError(f"cannot send through {smtp.host}:{smtp.port}: {type(exc).__name__}",
                         transient=True) from None
    except smtplib.SMTPResponseException as exc:  # after its subclasses above; before OSError, its base
        raise EmailError(f"{smtp.host}:{smtp.port} answered {exc.smtp_code}",
                         transient=400 <= exc.smtp_code < 500) from None
    except OSError as exc:
        raise EmailError(f"cannot send through {smtp.host}:{smtp.port}: {type(exc).__name__}",
                         transient=True) from None
    if refused:
        raise EmailError(f"{smtp.host}:{smtp.port} refused {len(refused)} of {len(to)} recipients")
