"""Portal accounts and sessions on a real state store (SQLite, and PostgreSQL where there is one): what an account
may be, argon2id passwords, the sealed TOTP secret, codes accepted once and only near now, lock-out after
failures, OIDC accounts, and sessions that end (idle, absolute, signed out) and keep only a hash of their token.
Time is passed in, never read."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pyotp
import pytest
from sqlalchemy import Engine, select

from schoolslink.portal import accounts, sessions
from schoolslink.portal.accounts import AccountError, SignIn
from schoolslink.portal.config import PortalConfig
from schoolslink.store.schema import portal_sessions, portal_users

NOW = datetime(2026, 11, 26, 9, 0, tzinfo=UTC)
LOCK = {"lockout_after": 3, "lockout": timedelta(minutes=15)}


@pytest.fixture()
def eng(store: Engine) -> Engine:
    """A fresh state store: SQLite, and PostgreSQL at 127.0.0.1 where there is one (tests/conftest.py)."""
    return store


def _add(eng: Engine, email: str = "dsl@school.example.sch.uk", role: str = "dsl", orgs: tuple[str, ...] = ("900001",),
         **kw: str) -> accounts.NewAccount:
    with eng.begin() as conn:
        return accounts.add(conn, email=email, role=role, organisations=orgs, now=NOW, created_by="test", **kw)


@pytest.mark.parametrize(("email", "role", "orgs", "field"), [
    ("not-an-email", "dsl", ("900001",), "email"),
    ("a@b.example", "headteacher", ("900001",), "role"),
    ("a@b.example", "dsl", (), "school or trust"),
    ("a@b.example", "dsl", ("R9X",), "school"),
    ("a@b.example", "link_worker", ("900001-",), "trust"),
])
def test_what_an_account_may_be(eng: Engine, email: str, role: str, orgs: tuple[str, ...], field: str) -> None:
    with pytest.raises(AccountError) as err:
        _add(eng, email, role, orgs)
    assert str(err.value).startswith(f"{field}:")


def test_a_weak_password_or_a_second_account_for_an_address_is_refused(eng: Engine) -> None:
    with pytest.raises(AccountError, match="at least 12"):
        _add(eng, password="short")
    with pytest.raises(AccountError, match="must not be your email"):
        _add(eng, "long.address@school.example.sch.uk", password="Long.Address@school.example.sch.uk")
    _add(eng)
    with pytest.raises(AccountError, match="already exists"):
        _add(eng, "DSL@School.Example.Sch.UK", "smhl")


def test_the_password_is_argon2id_and_the_totp_secret_is_sealed(eng: Engine) -> None:
    made = _add(eng)
    assert made.password and made.totp_secret and made.totp_uri
    assert made.totp_uri.startswith("otpauth://totp/schoolslink%20portal:dsl%40school.example.sch.uk?secret=")
    with eng.connect() as conn:
        row = conn.execute(select(portal_users)).one()
    assert row.password_hash.startswith("$argon2id$") and made.password not in row.password_hash
    assert made.totp_secret not in row.totp_sealed and row.totp_sealed.startswith("v1:")
    assert accounts.unseal_totp(row.totp_sealed, made.user.user_id) == made.totp_secret
    with pytest.raises(AccountError, match="cannot be opened"):  # sealed to its account: not movable to another
        accounts.unseal_totp(row.totp_sealed, "u-someone-else")


def _password(eng: Engine, email: str, password: str, at: datetime = NOW) -> accounts.Attempt:
    with eng.begin() as conn:
        return accounts.check_password_sign_in(conn, email, password, at, **LOCK)  # type: ignore[arg-type]


def _code(eng: Engine, user_id: str, code: str, at: datetime = NOW) -> accounts.Attempt:
    with eng.begin() as conn:
        return accounts.check_code_sign_in(conn, user_id, code, at, **LOCK)  # type: ignore[arg-type]


def test_a_totp_code_counts_near_now_and_once(eng: Engine) -> None:
    made = _add(eng)
    uid, totp = made.user.user_id, pyotp.TOTP(made.totp_secret or "")
    assert _password(eng, made.user.email, made.password or "").outcome is SignIn.OK
    assert _code(eng, uid, totp.at(NOW - timedelta(minutes=5))).outcome is SignIn.FAILED  # too old
    assert _code(eng, uid, totp.at(NOW - timedelta(seconds=30))).outcome is SignIn.OK  # one step back: drift
    assert _code(eng, uid, totp.at(NOW - timedelta(seconds=30))).outcome is SignIn.FAILED  # never twice
    assert _code(eng, uid, totp.at(NOW)).outcome is SignIn.OK
    assert _code(eng, uid, totp.at(NOW)).outcome is SignIn.FAILED
    assert _code(eng, uid, totp.at(NOW + timedelta(minutes=2)), NOW).outcome is SignIn.FAILED  # too far ahead


def test_sign_ins_at_the_same_moment_each_count_and_a_code_is_taken_once(eng: Engine) -> None:
    """The portal checks passwords on worker threads: failures counted at once are each counted (the lock-out is
    not outrun), and of two sign-ins with one code, one wins."""
    from concurrent.futures import ThreadPoolExecutor

    made = _add(eng)
    email, password = made.user.email, made.password or ""
    with ThreadPoolExecutor(3) as pool:
        outcomes = list(pool.map(lambda _: _password(eng, email, "wrong-password!").outcome, range(3)))
    assert sorted(outcomes) == sorted([SignIn.FAILED, SignIn.FAILED, SignIn.LOCKED_QUIET])
    assert _password(eng, email, password).outcome is SignIn.LOCKED
    other = _add(eng, "smhl@school.example.sch.uk", "smhl")
    code = pyotp.TOTP(other.totp_secret or "").at(NOW)
    with ThreadPoolExecutor(2) as pool:
        outcomes = list(pool.map(lambda _: _code(eng, other.user.user_id, code).outcome, range(2)))
    assert sorted(outcomes) == sorted([SignIn.OK, SignIn.FAILED])


def test_failures_in_a_row_lock_the_account_whatever_is_typed(eng: Engine) -> None:
    made = _add(eng)
    email, password = made.user.email, made.password or ""
    assert [_password(eng, email, "wrong-password!").outcome for _ in range(3)] == [SignIn.FAILED, SignIn.FAILED,
                                                                                     SignIn.LOCKED_QUIET]
    assert _password(eng, email, "wrong-password!").outcome is SignIn.LOCKED_QUIET  # told no more than FAILED
    assert _password(eng, email, password).outcome is SignIn.LOCKED  # the right password: still locked
    later = NOW + timedelta(minutes=16)
    assert _password(eng, email, password, later).outcome is SignIn.OK
    # a wrong code counts too
    codes = [_code(eng, made.user.user_id, "000000", later).outcome for _ in range(3)]
    assert codes[-1] is SignIn.LOCKED


def test_an_unknown_address_or_a_disabled_account_fails_like_a_wrong_password(eng: Engine) -> None:
    made = _add(eng)
    assert _password(eng, "nobody@school.example.sch.uk", "whatever-it-is").outcome is SignIn.FAILED
    with eng.begin() as conn:
        assert accounts.set_disabled(conn, made.user.user_id)
    assert _password(eng, made.user.email, made.password or "").outcome is SignIn.FAILED


def test_oidc_accounts(eng: Engine) -> None:
    iss = "https://signin.example"
    with eng.begin() as conn:
        new = accounts.oidc_account(conn, issuer=iss, subject="s1", email="a@school.example.sch.uk", role="dsl",
                                    schools=("900001",), trusts=(), now=NOW)
        again = accounts.oidc_account(conn, issuer=iss, subject="s1", email="a@school.example.sch.uk", role="dsl",
                                      schools=("900002",), trusts=(), now=NOW)
        assert again.user_id == new.user_id and again.organisations == ("900002",)  # the claim, as it is now
        # made beforehand with a role: the provider need not give one
        pre = accounts.add(conn, email="b@school.example.sch.uk", role="smhl", organisations=["900001"], now=NOW,
                           created_by="test", auth="oidc")
        b = accounts.oidc_account(conn, issuer=iss, subject="s2", email="b@school.example.sch.uk", role=None,
                                  schools=("900001",), trusts=(), now=NOW)
        assert (b.user_id, b.role) == (pre.user.user_id, "smhl") and pre.totp_secret is None
        with pytest.raises(AccountError, match="no portal role"):
            accounts.oidc_account(conn, issuer=iss, subject="s3", email="c@school.example.sch.uk", role=None,
                                  schools=("900001",), trusts=(), now=NOW)
        with pytest.raises(AccountError, match="no organisation"):
            accounts.oidc_account(conn, issuer=iss, subject="s4", email="d@school.example.sch.uk", role="link_worker",
                                  schools=("900001",), trusts=(), now=NOW)
        local = accounts.add(conn, email="e@school.example.sch.uk", role="dsl", organisations=["900001"], now=NOW,
                             created_by="test")
        with pytest.raises(AccountError, match="another portal account"):  # never takes over a local account
            accounts.oidc_account(conn, issuer=iss, subject="s5", email=local.user.email, role="dsl",
                                  schools=("900001",), trusts=(), now=NOW)
        accounts.set_disabled(conn, new.user_id)
        with pytest.raises(AccountError, match="disabled"):
            accounts.oidc_account(conn, issuer=iss, subject="s1", email=None, role="dsl", schools=("900001",),
                                  trusts=(), now=NOW)


def test_sessions_end_idle_absolute_and_signed_out_and_keep_only_a_hash(eng: Engine) -> None:
    cfg = PortalConfig(idle=timedelta(minutes=15), max_age=timedelta(hours=8))
    with eng.begin() as conn:
        token, s = sessions.create(conn, sessions.SESSION, NOW, cfg.max_age, user_id="u-1", role="dsl",
                                   organisations=("900001",))
        stored = conn.execute(select(portal_sessions)).one()
    assert stored.session_hash == sessions.token_hash(token) and token not in str(tuple(stored))

    def find(at: datetime, tok: str = token, kind: str = sessions.SESSION) -> sessions.Found:
        with eng.begin() as conn:
            return sessions.find(conn, tok, kind, at, cfg)

    assert find(NOW + timedelta(minutes=10)).session is not None
    assert find(NOW + timedelta(minutes=24)).session is not None  # idle counts from the last request
    assert find(NOW + timedelta(minutes=24), kind=sessions.LOGIN).session is None  # not a sign-in row
    assert find(NOW + timedelta(minutes=24), tok=token[:-1] + "x").session is None
    gone = find(NOW + timedelta(minutes=40))  # 16 minutes without a request
    assert gone.session is None and gone.expired
    assert find(NOW + timedelta(minutes=41)).session is None  # and it stays ended

    with eng.begin() as conn:
        token2, _ = sessions.create(conn, sessions.SESSION, NOW, cfg.max_age, user_id="u-1")
    t = NOW
    for _ in range(40):  # busy all day, a request every 14 minutes: still ends at 8 hours
        t += timedelta(minutes=14)
        if find(t, token2).session is None:
            break
    assert NOW + cfg.max_age <= t < NOW + cfg.max_age + timedelta(minutes=14)

    with eng.begin() as conn:
        token3, s3 = sessions.create(conn, sessions.SESSION, NOW, cfg.max_age, user_id="u-2")
        sessions.end(conn, s3.session_hash, NOW)
    assert find(NOW, token3).session is None
    assert s.csrf_ok(s.csrf_token) and not s.csrf_ok("") and not s.csrf_ok(None) and not s.csrf_ok(s3.csrf_token)
