"""Keyed pseudonyms and deterministic ids.

The key lives outside the database: `SCHOOLSLINK_KEY` (hex or any string) in the environment, or
else a key file under `SCHOOLSLINK_HOME/secrets/pseudonym.key`, created on first use with mode 0600.
The same key always gives the same pseudonyms and resource ids, so a re-run yields the same resources
and the ids reveal nothing without the key.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from functools import lru_cache
from pathlib import Path

from schoolslink.settings import home


@lru_cache(maxsize=4)
def _load_key(env_value: str | None, path: str) -> bytes:
    if env_value:
        return env_value.encode()
    p = Path(path)
    if not p.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return p.read_text().strip().encode()


def key() -> bytes:
    env = os.environ.get("SCHOOLSLINK_KEY")
    if env:
        return _load_key(env, "")
    return _key_for_home(os.environ.get("SCHOOLSLINK_HOME", ""))


@lru_cache(maxsize=4)
def _key_for_home(_home_env: str) -> bytes:
    return _load_key(None, str(home() / "secrets" / "pseudonym.key"))


def pseudonym(kind: str, value: str, length: int = 20) -> str:
    """A keyed pseudonym for `value` of `kind` (e.g. 'upn', 'nhs'), safe to log and to send."""
    digest = hmac.new(key(), f"{kind}\x1f{value}".encode(), hashlib.sha256).hexdigest()
    return f"{kind[:3]}-{digest[:length]}"


def learner_key(upn: str) -> str:
    return pseudonym("lrn", upn.strip().upper())


def learner_identity(upn: str | None, uln: str | None) -> str:
    """What keys a learner: the UPN; for a college learner with none, 'ULN:' + the ULN (never a UPN's shape)."""
    u = (upn or "").strip().upper()
    if u:
        return u
    if uln and uln.strip():
        return "ULN:" + uln.strip()
    raise ValueError("a learner needs a UPN or a ULN")


def learner_key_of(row: dict[str, object]) -> str:
    """The learner key of a canonical learner dict (UPN, else ULN)."""
    return learner_key(learner_identity(str(row.get("upn") or ""), str(row.get("uln") or "")))


def source_key(source: str, school_urn: str, source_id: str) -> str:
    """A keyed id for a MIS's own record id (e.g. a Wonde student id) at one school."""
    return pseudonym("src", f"{source}\x1f{school_urn}\x1f{source_id}")


def patient_key(nhs_number: str) -> str:
    return pseudonym("pat", nhs_number.replace(" ", ""))


def resource_id(*parts: str) -> str:
    """A deterministic FHIR id (<= 64 chars, [A-Za-z0-9-.]) from our own source keys."""
    digest = hmac.new(key(), "\x1f".join(parts).encode(), hashlib.sha256).hexdigest()
    return f"sl-{digest[:40]}"


def match_hash(school_urn: str, surname: str, forename: str, dob_iso: str) -> str:
    """The keyed hash of a roll entry used for identity matching (names normalised)."""
    norm = "|".join(
        (school_urn.strip(), _norm_name(surname), _norm_name(forename), dob_iso.strip())
    )
    return hmac.new(key(), f"match\x1f{norm}".encode(), hashlib.sha256).hexdigest()[:32]


def _norm_name(s: str) -> str:
    return "".join(ch for ch in s.upper() if ch.isalpha())
