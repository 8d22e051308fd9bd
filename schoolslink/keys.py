"""Keys: the id key names things, the pseudonym key makes what auditors and other parties see.

Two keys, both outside the database (docs/audit-ledger.md, "Keys"):

- **The id key** (`SCHOOLSLINK_ID_KEY`) derives our FHIR resource ids and every keyed column of the state store:
  learner, patient and source keys, match hashes and match keys. The same key always gives the same ids, so a
  re-run yields the same resources. It names the trust's copies of our resources, so it is not rotated on a
  schedule. Where it is not set, the first pseudonym key (version "1") stands in for it: the pseudonym key itself
  until the first rotation, and afterwards the version-1 key kept in `SCHOOLSLINK_KEY_PREVIOUS`.
- **The pseudonym key** (`SCHOOLSLINK_KEY`, else `SCHOOLSLINK_HOME/secrets/pseudonym.key`) makes the subject
  pseudonyms the ledger records (`ledger_subject`: a keyed hash of the state store's key) and the log filter's
  tokens. It is versioned and rotated freely: `SCHOOLSLINK_KEY_VERSION` (default "1") names it and each ledger
  entry records it; the keys still held after a rotation are listed in `SCHOOLSLINK_KEY_PREVIOUS` as
  `version:key,version:key`; a query by subject tries every key held (`subject_keys_for_upn`). Rotating it
  changes nothing in the state store and no resource id. Verifying the ledger needs no key at all.

Every setting is read from the environment; with `SCHOOLSLINK_SECRETS=airflow` one missing there is read from the
secrets backend configured for Airflow (`[secrets] backend`: AWS Secrets Manager, HashiCorp Vault, ...) as the
Variable of the same name in lower case (`schoolslink_key`, `schoolslink_id_key`, ...), never from Airflow's
metadata database.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import unicodedata
from collections.abc import Callable, Mapping
from datetime import date
from functools import lru_cache
from pathlib import Path
from typing import Any

from schoolslink.identifiers import is_valid_nhs_number
from schoolslink.settings import home


class KeyConfigError(ValueError):
    """A key is missing or misconfigured: said in words an operator acts on, never quoting a key."""


def setting(name: str) -> str:
    """A key setting: the environment variable `name`, else (with `SCHOOLSLINK_SECRETS=airflow`) Airflow's custom
    secrets backend's Variable `name.lower()`; '' if neither has it."""
    value = os.environ.get(name, "").strip()
    if value or os.environ.get("SCHOOLSLINK_SECRETS", "").strip().lower() != "airflow":
        return value
    return _from_secrets_backend(name.lower())


@lru_cache(maxsize=16)
def _from_secrets_backend(variable: str) -> str:
    from airflow.sdk.configuration import get_custom_secret_backend  # only when configured: Airflow is heavy

    backend = get_custom_secret_backend()
    if backend is None:
        raise KeyConfigError("SCHOOLSLINK_SECRETS=airflow, but Airflow has no secrets backend configured "
                           "([secrets] backend); set one, or set the keys in the environment")
    return str(backend.get_variable(variable) or "").strip()


def _key_file(p: Path) -> bytes:
    """The key in file `p`, made (random, mode 0600) on first use: for development and the demo."""
    if not p.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first: read theirs
            return p.read_text().strip().encode()
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return p.read_text().strip().encode()


def key() -> bytes:
    """The pseudonym key in force (version `key_version()`)."""
    env = setting("SCHOOLSLINK_KEY")
    if env:
        return env.encode()
    return _key_for_home(os.environ.get("SCHOOLSLINK_HOME", ""))


@lru_cache(maxsize=4)
def _key_for_home(_home_env: str) -> bytes:
    return _key_file(home() / "secrets" / "pseudonym.key")


def id_key() -> bytes:
    """The id key: resource ids and the state store's keyed columns. `SCHOOLSLINK_ID_KEY`; where that is not set,
    the first pseudonym key (version "1": the key in force if no rotation has happened yet, else the one kept in
    `SCHOOLSLINK_KEY_PREVIOUS`), so a rotation of the pseudonym key never changes it."""
    env = setting("SCHOOLSLINK_ID_KEY")
    if env:
        return env.encode()
    if key_version() == FIRST_VERSION:
        return key()
    for version, k in previous_keys():
        if version == FIRST_VERSION:
            return k
    raise KeyConfigError("SCHOOLSLINK_ID_KEY is not set and the first pseudonym key (version 1), which stands in "
                         "for it, is not held in SCHOOLSLINK_KEY_PREVIOUS: set SCHOOLSLINK_ID_KEY to that key "
                         "(docs/audit-ledger.md, Keys)")


FIRST_VERSION = "1"


def key_version() -> str:
    """The version name of the current pseudonym key (`SCHOOLSLINK_KEY_VERSION`, default "1")."""
    return setting("SCHOOLSLINK_KEY_VERSION") or FIRST_VERSION


def _versioned(raw: str, name: str) -> list[tuple[str, bytes]]:
    out: list[tuple[str, bytes]] = []
    for i, item in enumerate(p.strip() for p in raw.split(",") if p.strip()):
        version, sep, k = item.partition(":")
        if not sep or not version.strip() or not k.strip():
            raise KeyConfigError(f"{name} item {i + 1}: expected version:key")
        out.append((version.strip(), k.strip().encode()))
    return out


def previous_keys() -> list[tuple[str, bytes]]:
    """Earlier pseudonym keys still held after a rotation, from `SCHOOLSLINK_KEY_PREVIOUS` ("v1:key,v2:key"). A
    malformed item (no version or no key) is refused, naming its position only."""
    return _versioned(setting("SCHOOLSLINK_KEY_PREVIOUS"), "SCHOOLSLINK_KEY_PREVIOUS")


def held_keys() -> list[tuple[str, bytes]]:
    """Every pseudonym key held, as (version, key): the current one first, then the previous ones."""
    current = key_version()
    return [(current, key()), *((v, k) for v, k in previous_keys() if v != current)]


def held_id_keys() -> list[bytes]:
    """The id key, then any earlier id keys listed in `SCHOOLSLINK_ID_KEY_PREVIOUS` ("v1:key,..."): kept only so
    the ledger can still be searched by UPN or NHS number for entries made before an id key was replaced."""
    first = id_key()
    return [first, *(k for _v, k in _versioned(setting("SCHOOLSLINK_ID_KEY_PREVIOUS"), "SCHOOLSLINK_ID_KEY_PREVIOUS")
                     if k != first)]


def _pseudonym_with(k: bytes, kind: str, value: str, length: int = 20) -> str:
    digest = hmac.new(k, f"{kind}\x1f{value}".encode(), hashlib.sha256).hexdigest()
    return f"{kind[:3]}-{digest[:length]}"


def pseudonym(kind: str, value: str, length: int = 20) -> str:
    """A keyed pseudonym for `value` of `kind` (e.g. 'upn', 'nhs') under the id key: what the state store keeps."""
    return _pseudonym_with(id_key(), kind, value, length)


def _ledger_subject_with(k: bytes, state_key: str) -> str:
    kind, sep, _ = state_key.partition("-")
    prefix = kind if sep and len(kind) == 3 and kind.isalpha() else "sub"
    digest = hmac.new(k, f"ledger-subject\x1f{state_key}".encode(), hashlib.sha256).hexdigest()
    return f"{prefix}-{digest[:24]}"


def ledger_subject(state_key: str) -> str:
    """The subject pseudonym the ledger records for a state store key (`lrn-…`, `pat-…`), under the pseudonym key
    in force: the ledger and everything made from it (queries, reports, AuditEvents) never show a state key."""
    return _ledger_subject_with(key(), state_key)


def ledger_subjects(state_key: str) -> list[tuple[str, str]]:
    """The ledger subject of a state key under every pseudonym key held, as (key version, subject)."""
    return [(v, _ledger_subject_with(k, state_key)) for v, k in held_keys()]


def learner_keys_for_identity(identity: str) -> list[str]:
    """The learner key of an identity (UPN, or 'ULN:' + ULN) under every id key held, the current one first."""
    return [_pseudonym_with(k, "lrn", identity.strip().upper()) for k in held_id_keys()]


def patient_keys_for_nhs_number(nhs_number: str) -> list[str]:
    """The patient key of an NHS number under every id key held, the current one first."""
    return [_pseudonym_with(k, "pat", nhs_number.replace(" ", "")) for k in held_id_keys()]


def subject_keys_for_upn(upn: str) -> list[tuple[str, str]]:
    """The ledger subjects of `upn` under every key held, as (key version, subject): what a query of the ledger by
    subject must look for (an entry's `key_version` says which pseudonym key made its `subject_key`)."""
    return [vs for lk in learner_keys_for_identity(upn) for vs in ledger_subjects(lk)]


def subject_keys_for_identity(upn: str | None, uln: str | None) -> list[tuple[str, str]]:
    """As `subject_keys_for_upn`, for a learner keyed by UPN or else ULN (`learner_identity`)."""
    return subject_keys_for_upn(learner_identity(upn, uln))


def patient_keys_for_nhs(nhs_number: str) -> list[tuple[str, str]]:
    """The ledger subjects of an NHS number's patient key under every key held, as (key version, subject)."""
    return [vs for pk in patient_keys_for_nhs_number(nhs_number) for vs in ledger_subjects(pk)]


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
    digest = hmac.new(id_key(), "\x1f".join(parts).encode(), hashlib.sha256).hexdigest()
    return f"sl-{digest[:40]}"


def match_hash(school_urn: str, surname: str, forename: str, dob_iso: str) -> str:
    """The keyed hash of a roll entry used for identity matching (names normalised)."""
    norm = "|".join(
        (school_urn.strip(), _norm_name(surname), _norm_name(forename), dob_iso.strip())
    )
    return hmac.new(id_key(), f"match\x1f{norm}".encode(), hashlib.sha256).hexdigest()[:32]


def _norm_name(s: str) -> str:
    return "".join(ch for ch in s.upper() if ch.isalpha())



def match_key(kind: str, school_urn: str, value: str) -> str:
    """The keyed hash of one normalised attribute (`kind`: surname, forename, dob, ...) of a pupil or trust Patient,
    scoped to one school, for scored matching (schoolslink/governance/scoring.py normalises the value first).

    Equal only for the same kind, school and value, so two records of one school can be compared attribute by
    attribute without either being stored in plain; scoped to the school so equal values at different schools
    give different keys (no cross-school linkage by frequency). 12 hex digits (48 bits): ample to tell the values
    of one school's roll apart, and meaningless without the key.
    """
    return match_keyer(school_urn)(kind, value)


def match_keyer(school_urn: str) -> Callable[[str, str], str]:
    """`match_key` for one school, `(kind, value) -> key`: HMAC-SHA256 (RFC 2104) with the inner and outer hash
    states for the key and school prepared once, since a roll is keyed by the thousand."""
    inner, outer = _match_key_states(id_key(), school_urn.strip())

    def keyed(kind: str, value: str) -> str:
        h = inner.copy()
        h.update(f"{kind}\x1f{value}".encode())
        o = outer.copy()
        o.update(h.digest())
        return str(o.hexdigest()[:12])

    return keyed


@lru_cache(maxsize=1024)
def _match_key_states(k: bytes, school_urn: str) -> tuple[Any, Any]:
    """SHA-256 states after (key XOR ipad) + the message prefix, and after (key XOR opad): HMAC's two halves."""
    block = hashlib.sha256().block_size
    k = hashlib.sha256(k).digest() if len(k) > block else k
    k = k.ljust(block, b"\0")
    inner = hashlib.sha256(bytes(b ^ 0x36 for b in k))
    inner.update(f"match-key\x1f{school_urn}\x1f".encode())
    outer = hashlib.sha256(bytes(b ^ 0x5C for b in k))
    return inner, outer


# Match keys: one keyed hash per normalised attribute, for scored matching (schoolslink/governance/scoring.py) ------
#
#   sn / psn / snx   legal surname / preferred (school) or usual (trust) surname / Soundex code of the legal surname
#   fn / pfn         legal forename / preferred (school) or usual (trust) forename
#   dob / dobx       date of birth / the same date with day and month swapped (only when both are 1-12 and differ)
#   sex              M or F (anything else is left out: missing, not a disagreement)
#   pc / pcd         full postcode / its outward code (district)
#   nhs              pupils only: the patient key of the NHS number the school's MIS holds, if any
#
# Legal and preferred names are keyed under one kind (so either compares with the other side's), and so are dob and
# dobx. Names are folded to A-Z (accents, spaces, hyphens, apostrophes dropped); postcodes to capitals, no spaces.

MATCH_KEY_NAMES = ("sn", "psn", "snx", "fn", "pfn", "dob", "dobx", "sex", "pc", "pcd", "nhs")


def fold_name(value: object) -> str:
    """A name folded to A-Z: accents dropped, then everything that is not a letter."""
    text = unicodedata.normalize("NFKD", str(value or "")).upper()
    return "".join(ch for ch in text if "A" <= ch <= "Z")


_SOUNDEX = {**dict.fromkeys("BFPV", "1"), **dict.fromkeys("CGJKQSXZ", "2"), **dict.fromkeys("DT", "3"),
            "L": "4", **dict.fromkeys("MN", "5"), "R": "6"}


def soundex(name: str) -> str:
    """American Soundex of a name already folded to A-Z ('' for ''): a letter and three digits."""
    if not name:
        return ""
    out, prev = name[0], _SOUNDEX.get(name[0], "")
    for ch in name[1:]:
        code = _SOUNDEX.get(ch, "")
        if code and code != prev:
            out += code
            if len(out) == 4:
                break
        if ch not in "HW":  # H and W do not separate equal codes; vowels do
            prev = code
    return out.ljust(4, "0")


def _sex(value: object) -> str | None:
    return {"M": "M", "MALE": "M", "F": "F", "FEMALE": "F"}.get(str(value or "").strip().upper())


def _postcode(value: object) -> str | None:
    s = "".join(str(value or "").split()).upper()
    return s if 5 <= len(s) <= 7 and s.isascii() and s.isalnum() else None


def _swapped(dob_iso: str) -> str | None:
    d = date.fromisoformat(dob_iso)
    if d.day > 12 or d.day == d.month:
        return None
    return date(d.year, d.day, d.month).isoformat()


def match_keys(school_urn: object, *, surname: object, forename: object, dob: object,
               preferred_surname: object = None, preferred_forename: object = None, sex: object = None,
               postcode: object = None, nhs_key: str | None = None) -> dict[str, str] | None:
    """The match keys of one record at one school (None without a school: there is nothing to match within).

    `dob` is an ISO date (or a date). A preferred name equal to the legal one is left out. `nhs_key` is the patient
    key (`patient_key`) of an NHS number the school holds; a trust Patient's own key is kept beside its match keys.
    """
    urn = str(school_urn or "").strip()
    if not urn:
        return None
    k = match_keyer(urn)
    out: dict[str, str] = {}
    sn, fn = fold_name(surname), fold_name(forename)
    psn, pfn = fold_name(preferred_surname), fold_name(preferred_forename)
    if sn:
        out["sn"] = k("surname", sn)
        out["snx"] = k("surname-soundex", soundex(sn))
    if psn and psn != sn:
        out["psn"] = k("surname", psn)
    if fn:
        out["fn"] = k("forename", fn)
    if pfn and pfn != fn:
        out["pfn"] = k("forename", pfn)
    dob_iso = dob.isoformat() if isinstance(dob, date) else str(dob or "")[:10]
    if dob_iso:
        out["dob"] = k("dob", dob_iso)
        swapped = _swapped(dob_iso)
        if swapped:
            out["dobx"] = k("dob", swapped)  # the kind of dob, so it compares with the other side's dob
    s = _sex(sex)
    if s:
        out["sex"] = k("sex", s)
    pc = _postcode(postcode)
    if pc:
        out["pc"] = k("postcode", pc)
        out["pcd"] = k("postcode-district", pc[:-3])
    if nhs_key:
        out["nhs"] = nhs_key
    return out


def learner_match_keys(learner: Mapping[str, Any]) -> dict[str, str] | None:
    """The match keys of a canonical learner dict (as the work store holds it: ISO dob, M/F/U sex)."""
    nhs = str(learner.get("nhs_number") or "").replace(" ", "")
    return match_keys(
        learner.get("school_urn"), surname=learner.get("surname"), forename=learner.get("forename"),
        dob=learner.get("dob"), preferred_surname=learner.get("preferred_surname"),
        preferred_forename=learner.get("preferred_forename"), sex=learner.get("sex"),
        postcode=learner.get("postcode"), nhs_key=patient_key(nhs) if is_valid_nhs_number(nhs) else None,
    )
