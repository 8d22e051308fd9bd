"""Server-side sessions (`portal_sessions`): the cookie holds 32 random bytes; the table holds their SHA-256.

Two kinds, each with its own cookie (schoolslink.portal.config): `login`, a sign-in under way (the user awaiting
a TOTP code, or the OIDC state, nonce and PKCE verifier), and `session`, a signed-in user. A session ends after
`idle` without a request, `max_age` after sign-in, at sign-out, or when its account is disabled; an ended or
unknown token opens nothing. Signing in always makes a new token (no session fixation). Each row has its own
CSRF token, the synchroniser token every POST form carries.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, delete, insert, select, update

from schoolslink.audit.query import utc
from schoolslink.portal.config import PortalConfig
from schoolslink.store.schema import portal_sessions

LOGIN = "login"
SESSION = "session"
_TOUCH_EVERY = timedelta(seconds=30)  # last_seen_at is written at most this often


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Session:
    session_hash: str
    kind: str
    user_id: str | None
    csrf_token: str
    role: str | None
    organisations: tuple[str, ...]
    pending: dict[str, Any]
    created_at: datetime
    last_seen_at: datetime
    expires_at: datetime

    def csrf_ok(self, sent: str | None) -> bool:
        return bool(sent) and hmac.compare_digest(self.csrf_token.encode(), str(sent).encode())


def _session(row: Any) -> Session:
    return Session(str(row.session_hash), str(row.kind), row.user_id, str(row.csrf_token), row.role,
                   tuple(row.organisations or ()), dict(row.pending or {}), utc(row.created_at),
                   utc(row.last_seen_at), utc(row.expires_at))


def create(conn: Connection, kind: str, now: datetime, lifetime: timedelta, *, user_id: str | None = None,
           role: str | None = None, organisations: tuple[str, ...] = (), pending: dict[str, Any] | None = None
           ) -> tuple[str, Session]:
    """A new row and the token for its cookie."""
    token = secrets.token_urlsafe(32)
    row = {"session_hash": token_hash(token), "kind": kind, "user_id": user_id,
           "csrf_token": secrets.token_urlsafe(32), "role": role, "organisations": list(organisations),
           "pending": pending or {}, "created_at": now, "last_seen_at": now, "expires_at": now + lifetime}
    conn.execute(insert(portal_sessions).values(**row))
    return token, Session(token_hash(token), kind, user_id, str(row["csrf_token"]), role, tuple(organisations),
                          dict(pending or {}), now, now, now + lifetime)


def live(s: Session, now: datetime, idle: timedelta | None) -> bool:
    return now < s.expires_at and (idle is None or now < s.last_seen_at + idle)


@dataclass(frozen=True, slots=True)
class Found:
    session: Session | None
    expired: bool = False  # a token that was a session, now ended: the page says so
    user_id: str | None = None  # whose it was (an ended session)


def find(conn: Connection, token: str | None, kind: str, now: datetime, cfg: PortalConfig) -> Found:
    """The live row of this kind for a cookie's token (and its idle clock moved on), or why not."""
    if not token or len(token) > 200:
        return Found(None)
    row = conn.execute(select(portal_sessions).where(portal_sessions.c.session_hash == token_hash(token),
                                                     portal_sessions.c.kind == kind)).first()
    if row is None:
        return Found(None)
    s = _session(row)
    if row.ended_at is not None or not live(s, now, cfg.idle if kind == SESSION else None):
        if row.ended_at is None:
            end(conn, s.session_hash, now)
        return Found(None, expired=kind == SESSION, user_id=s.user_id)
    if now - s.last_seen_at >= _TOUCH_EVERY:
        conn.execute(update(portal_sessions).where(portal_sessions.c.session_hash == s.session_hash)
                     .values(last_seen_at=now))
    return Found(s)


def set_pending(conn: Connection, s: Session, pending: dict[str, Any]) -> None:
    conn.execute(update(portal_sessions).where(portal_sessions.c.session_hash == s.session_hash)
                 .values(pending=pending))


def end(conn: Connection, session_hash: str, now: datetime) -> None:
    conn.execute(update(portal_sessions).where(portal_sessions.c.session_hash == session_hash,
                                               portal_sessions.c.ended_at.is_(None)).values(ended_at=now))


def end_all_for(conn: Connection, user_id: str, now: datetime) -> None:
    conn.execute(update(portal_sessions).where(portal_sessions.c.user_id == user_id,
                                               portal_sessions.c.ended_at.is_(None)).values(ended_at=now))


def purge(conn: Connection, before: datetime) -> int:
    """Delete rows that ended or expired before `before` (keeps the table small; sign-ins are in portal_events)."""
    if conn.dialect.name == "sqlite":  # SQLite keeps naive UTC text
        before = before.replace(tzinfo=None)
    res = conn.execute(delete(portal_sessions).where((portal_sessions.c.expires_at < before)
                                                     | (portal_sessions.c.ended_at < before)))
    return int(res.rowcount or 0)
