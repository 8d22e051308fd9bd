"""Portal accounts (`portal_users`): roles, organisations, passwords (argon2id), TOTP codes, lock-out.

Roles (what each may open is decided in `schoolslink.portal.access`):

| role | who | sees |
|---|---|---|
| `dsl` | designated safeguarding lead | their schools' feeds, pupil pages, downloads, history, the school summary |
| `smhl` | senior mental health lead | the same |
| `school_admin` | manages the portal's users for their schools | users only: no pupil data |
| `link_worker` | the trust's link worker | the trust's monthly summary only |

A school role's organisations are school URNs; a link worker's are trust ODS codes. A local account signs in
with a password and a TOTP code (RFC 6238, 30 s steps; the secret is sealed under the seal key, outside the
database; a code is never accepted twice). An OIDC account has neither: the provider signs it in.

Failed sign-ins (a wrong password or code) count per account; `lockout_after` in a row lock it for `lockout`,
whatever is typed. Unknown addresses take the same time and say the same as a wrong password.
"""

from __future__ import annotations

import base64
import hmac
import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

import pyotp
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import Connection, func, insert, select, update

from connectors.storage.sealed import seal_key
from schoolslink.audit.query import utc
from schoolslink.store.schema import portal_users

ROLES: dict[str, str] = {
    "dsl": "Designated safeguarding lead",
    "smhl": "Senior mental health lead",
    "school_admin": "School admin",
    "link_worker": "Trust link worker",
}
PUPIL_ROLES = frozenset({"dsl", "smhl"})  # may see pupil data of their schools
SCHOOL_ROLES = frozenset({"dsl", "smhl", "school_admin"})
MIN_PASSWORD = 12
MAX_PASSWORD = 256
TOTP_ISSUER = "schoolslink portal"
TOTP_STEP = 30

_EMAIL = re.compile(r"^[^@\s]{1,64}@[A-Za-z0-9.-]{1,190}\.[A-Za-z]{2,}$")
_URN = re.compile(r"^\d{6,7}$")
_ODS = re.compile(r"^[A-Z0-9]{3,10}$")
_HASHER = PasswordHasher()  # argon2id, the library's (RFC 9106 low-memory) parameters
_DUMMY_HASH = _HASHER.hash(secrets.token_urlsafe(16))  # verified against for unknown addresses: same time taken


class AccountError(ValueError):
    """An account cannot be made or changed as asked; the message says which field and what to do."""


@dataclass(frozen=True, slots=True)
class PortalUser:
    user_id: str
    email: str
    role: str
    organisations: tuple[str, ...]
    auth: str  # local | oidc
    disabled: bool = False

    @property
    def recipient(self) -> str:
        """How the ledger names this user as the recipient of what a page showed."""
        return f"portal:{self.user_id}"

    @property
    def role_name(self) -> str:
        return ROLES.get(self.role, self.role)


def _user(row: Any) -> PortalUser:
    return PortalUser(str(row.user_id), str(row.email), str(row.role), tuple(row.organisations or ()),
                      str(row.auth), bool(row.disabled))


# -- checks ------------------------------------------------------------------------------------------------------


def normalise_email(text: str) -> str:
    email = text.strip().lower()
    if not _EMAIL.match(email):
        raise AccountError("email: enter an email address in the format name@example.org")
    return email


def check_role(role: str) -> str:
    r = role.strip().lower().replace("-", "_")
    if r not in ROLES:
        raise AccountError(f"role: choose one of {', '.join(ROLES)}")
    return r


def check_organisations(role: str, organisations: Iterable[str]) -> tuple[str, ...]:
    """School URNs (6 or 7 digits) for a school role; trust ODS codes for a link worker. At least one."""
    orgs = tuple(sorted({o.strip().upper() for o in organisations if o and o.strip()}))
    if not orgs:
        raise AccountError("school or trust: name at least one (a school's URN, or a trust's ODS code for a "
                           "link worker)")
    if role == "link_worker":
        bad = [o for o in orgs if not _ODS.match(o)]
        if bad:
            raise AccountError("trust: an ODS code has 3 to 10 letters and digits, e.g. R9X")
    elif any(not _URN.match(o) for o in orgs):
        raise AccountError("school: a URN has 6 or 7 digits, e.g. 900001")
    return orgs


def check_password(password: str, email: str) -> None:
    if len(password) < MIN_PASSWORD:
        raise AccountError(f"password: use at least {MIN_PASSWORD} characters (three random words work well)")
    if len(password) > MAX_PASSWORD:
        raise AccountError(f"password: use at most {MAX_PASSWORD} characters")
    if password.strip().lower() == email.strip().lower():
        raise AccountError("password: it must not be your email address")


def new_password() -> str:
    """A random password to hand over once (about 130 bits)."""
    return "-".join(secrets.token_urlsafe(6) for _ in range(4))


# -- the TOTP secret, sealed -------------------------------------------------------------------------------------


def seal_totp(secret: str, user_id: str) -> str:
    nonce = secrets.token_bytes(12)
    sealed = AESGCM(seal_key()).encrypt(nonce, secret.encode(), f"portal-totp\x1f{user_id}".encode())
    return "v1:" + base64.b64encode(nonce + sealed).decode()


def unseal_totp(text: str, user_id: str) -> str:
    try:
        raw = base64.b64decode(text.removeprefix("v1:"))
        return AESGCM(seal_key()).decrypt(raw[:12], raw[12:], f"portal-totp\x1f{user_id}".encode()).decode()
    except (InvalidTag, ValueError) as exc:
        raise AccountError("the account's TOTP secret cannot be opened with this seal key: reset the account") \
            from exc


def provisioning_uri(secret: str, email: str) -> str:
    """otpauth://totp/... for an authenticator app (type it in, or make it a QR code)."""
    return pyotp.TOTP(secret).provisioning_uri(name=email, issuer_name=TOTP_ISSUER)


# -- reading and writing accounts ----------------------------------------------------------------------------------


def get(conn: Connection, user_id: str) -> PortalUser | None:
    row = conn.execute(select(portal_users).where(portal_users.c.user_id == user_id)).first()
    return _user(row) if row is not None else None


def by_email(conn: Connection, email: str) -> PortalUser | None:
    row = conn.execute(select(portal_users).where(portal_users.c.email == email.strip().lower())).first()
    return _user(row) if row is not None else None


def list_users(conn: Connection, organisations: Sequence[str] | None = None) -> list[PortalUser]:
    """Every account, or those naming one of `organisations`; by email."""
    users = [_user(r) for r in conn.execute(select(portal_users).order_by(portal_users.c.email))]
    if organisations is None:
        return users
    wanted = set(organisations)
    return [u for u in users if wanted & set(u.organisations)]


@dataclass(frozen=True, slots=True)
class NewAccount:
    user: PortalUser
    totp_secret: str | None  # local accounts: for the provisioning URI, shown once
    password: str | None  # a generated password, shown once (None when the caller chose it, or OIDC)

    @property
    def totp_uri(self) -> str | None:
        return provisioning_uri(self.totp_secret, self.user.email) if self.totp_secret else None


def add(conn: Connection, *, email: str, role: str, organisations: Iterable[str], now: datetime, created_by: str,
        auth: str = "local", password: str | None = None) -> NewAccount:
    """A new account. Local: a password (generated when none is given) and a new TOTP secret."""
    email = normalise_email(email)
    role = check_role(role)
    orgs = check_organisations(role, organisations)
    if auth not in ("local", "oidc"):
        raise AccountError("sign-in: local or oidc")
    if by_email(conn, email) is not None:
        raise AccountError("email: an account with this email address already exists")
    user_id = "u-" + secrets.token_hex(12)
    generated = None
    values: dict[str, Any] = {}
    secret = None
    if auth == "local":
        if password is None:
            password = generated = new_password()
        check_password(password, email)
        secret = pyotp.random_base32()
        values = {"password_hash": _HASHER.hash(password), "totp_sealed": seal_totp(secret, user_id)}
    conn.execute(insert(portal_users).values(
        user_id=user_id, email=email, role=role, organisations=list(orgs), auth=auth, disabled=False,
        failed_attempts=0, created_at=now, created_by=created_by, **values))
    return NewAccount(PortalUser(user_id, email, role, orgs, auth), secret, generated)


def set_disabled(conn: Connection, user_id: str, disabled: bool = True) -> bool:
    """Disable (or enable) an account; False if there is none. Its sessions end at their next request."""
    res = conn.execute(update(portal_users).where(portal_users.c.user_id == user_id).values(disabled=disabled))
    return bool(res.rowcount)


# -- signing in --------------------------------------------------------------------------------------------------


class SignIn(StrEnum):
    OK = "ok"
    FAILED = "failed"  # unknown address, wrong password or code, or a disabled account: one message for all
    LOCKED = "locked"  # too many failures in a row (said so only to someone who has shown they know the password)
    LOCKED_QUIET = "locked_quiet"  # locked (by this failure, or before) and the password was wrong: told FAILED's
    #                                message, so that locking an address cannot tell anyone whether it has an account


@dataclass(frozen=True, slots=True)
class Attempt:
    outcome: SignIn
    user: PortalUser | None = None  # who tried (None for an unknown address)


def _locked(row: Any, now: datetime) -> bool:
    return row.locked_until is not None and utc(row.locked_until) > now


def _failed(conn: Connection, row: Any, now: datetime, lockout_after: int, lockout: timedelta,
            locked: SignIn = SignIn.LOCKED) -> SignIn:
    t = portal_users.c
    # counted in the database, not read and written back: sign-ins handled at once (threads, processes) each count
    n = conn.execute(update(portal_users).where(t.user_id == row.user_id)
                     .values(failed_attempts=func.coalesce(t.failed_attempts, 0) + 1)
                     .returning(t.failed_attempts)).scalar_one()
    if int(n) < lockout_after:
        return SignIn.FAILED
    conn.execute(update(portal_users).where(t.user_id == row.user_id)
                 .values(failed_attempts=0, locked_until=now + lockout))
    return locked


def check_password_sign_in(conn: Connection, email: str, password: str, now: datetime, *, lockout_after: int,
                           lockout: timedelta) -> Attempt:
    """The first step of a local sign-in. A locked account answers LOCKED to the right password and LOCKED_QUIET
    to a wrong one, as the failure that locks it does: every address, with or without an account, locked or not,
    costs one password hash and gets the same answer to a wrong password."""
    row = conn.execute(select(portal_users).where(portal_users.c.email == email.strip().lower(),
                                                  portal_users.c.auth == "local")).first()
    if row is None:
        try:
            _HASHER.verify(_DUMMY_HASH, password or "-")
        except VerificationError:
            pass
        return Attempt(SignIn.FAILED)
    user = _user(row)
    try:
        ok = bool(row.password_hash) and _HASHER.verify(str(row.password_hash), password or "-")
    except (VerificationError, InvalidHashError):
        ok = False
    if _locked(row, now):
        return Attempt(SignIn.LOCKED if ok and not user.disabled else SignIn.LOCKED_QUIET, user)
    if not ok or user.disabled:
        return Attempt(_failed(conn, row, now, lockout_after, lockout, SignIn.LOCKED_QUIET), user)
    if _HASHER.check_needs_rehash(str(row.password_hash)):
        conn.execute(update(portal_users).where(portal_users.c.user_id == user.user_id)
                     .values(password_hash=_HASHER.hash(password)))
    return Attempt(SignIn.OK, user)


def check_code_sign_in(conn: Connection, user_id: str, code: str, now: datetime, *, lockout_after: int,
                       lockout: timedelta) -> Attempt:
    """The second step: the TOTP code for now (one step either side for clock drift), never one used before."""
    row = conn.execute(select(portal_users).where(portal_users.c.user_id == user_id)).first()
    if row is None or not row.totp_sealed:
        return Attempt(SignIn.FAILED)
    user = _user(row)
    if _locked(row, now):
        return Attempt(SignIn.LOCKED, user)
    totp = pyotp.TOTP(unseal_totp(str(row.totp_sealed), user.user_id), interval=TOTP_STEP)
    typed = re.sub(r"\s", "", code or "")
    now_step = int(now.timestamp()) // TOTP_STEP
    last = int(row.totp_last_step) if row.totp_last_step is not None else -1
    step = next((s for s in (now_step - 1, now_step, now_step + 1)
                 if s > last and hmac.compare_digest(totp.at(s * TOTP_STEP).encode(), typed.encode())), None)
    if step is None or user.disabled:
        return Attempt(_failed(conn, row, now, lockout_after, lockout), user)
    t = portal_users.c
    taken = conn.execute(update(portal_users)  # compare-and-set: of two sign-ins with one code, one wins
                         .where(t.user_id == user.user_id, (t.totp_last_step.is_(None)) | (t.totp_last_step < step))
                         .values(totp_last_step=step, failed_attempts=0, locked_until=None, last_sign_in_at=now))
    if taken.rowcount != 1:
        return Attempt(_failed(conn, row, now, lockout_after, lockout), user)
    return Attempt(SignIn.OK, user)


def oidc_account(conn: Connection, *, issuer: str, subject: str, email: str | None, role: str | None,
                 schools: tuple[str, ...], trusts: tuple[str, ...], now: datetime) -> PortalUser:
    """The account an OIDC sign-in is: found by (issuer, subject), else an OIDC account made beforehand for the
    same email (`portal user add --auth oidc`), else a new one. The provider's role wins; else the account's.
    Its organisations are the provider's organisation claim (schools; trusts for a link worker), never the
    account's. AccountError when there is no role, no organisation, or the account is disabled or a local one."""
    row = conn.execute(select(portal_users).where(portal_users.c.oidc_issuer == issuer,
                                                  portal_users.c.oidc_subject == subject)).first()
    if row is None and email:
        row = conn.execute(select(portal_users).where(portal_users.c.email == email.strip().lower())).first()
        if row is not None and (row.auth != "oidc" or row.oidc_subject is not None):
            raise AccountError("this email address belongs to another portal account: ask your school admin")
    if row is not None and row.disabled:
        raise AccountError("your portal account is disabled: ask your school admin")
    chosen = check_role(role) if role else (str(row.role) if row is not None else None)
    if chosen is None:
        raise AccountError("your sign-in gives no portal role: ask your school admin to add you")
    named = trusts if chosen == "link_worker" else schools
    if not named:
        raise AccountError("your sign-in names no organisation this portal serves for your role")
    orgs = check_organisations(chosen, named)
    if row is None:
        user_id = "u-" + secrets.token_hex(12)
        conn.execute(insert(portal_users).values(
            user_id=user_id, email=normalise_email(email) if email else f"{user_id}@oidc.invalid", role=chosen,
            organisations=list(orgs), auth="oidc", oidc_issuer=issuer, oidc_subject=subject, disabled=False,
            failed_attempts=0, created_at=now, created_by="oidc", last_sign_in_at=now))
        return PortalUser(user_id, email or "", chosen, orgs, "oidc")
    conn.execute(update(portal_users).where(portal_users.c.user_id == row.user_id).values(
        role=chosen, organisations=list(orgs), oidc_issuer=issuer, oidc_subject=subject, last_sign_in_at=now))
    return PortalUser(str(row.user_id), str(row.email), chosen, orgs, "oidc")
