"""Where else to go: each trust's signposting table, kept as data beside the agreements.

`agreements/signposting/<ODS>.yaml` (or `SCHOOLSLINK_AGREEMENTS`/signposting) names the services a school
can turn to when the trust did not accept a referral (`rejection`, keyed by MHSDS ReferRejectReason) or
discharged the young person (`closure`, keyed by MHSDS ReferClosReason), with a `default` for any code
without its own entry (and for an outcome with no code). A feed row for a not-accepted or discharged
referral carries the entry as two flat columns, `signposting` and `signposting_contact` (docs/feeds.md),
and only where the agreement and consent let the school see the outcome reason: which services a trust
suggests says something about why.

Format (agreements/README.md):

    trust: R9X                 # must match the file name
    reviewed: "2026-09-01"     # optional: when the trust last checked it
    services:                  # id -> name, offer, and at least one of email, phone, url, contact
      kooth: {name: Kooth, offer: free online counselling for 11 to 25 year olds, url: https://www.kooth.com}
    rejection: {"02": {services: [kooth]}}
    closure: {"04": {services: [kooth]}}
    default: {services: [kooth]}

Loading refuses, with `file:line: message`, unknown keys, codes the MHSDS code tables
(`mappings/code-tables/mhsds-referral-{rejection,closure}-reason.yaml`) do not list, references to
services not defined, and text holding `;` (the columns separate services with "; "). A trust with no
file gets no signposting; a bad file stops the feed build (`SignpostingError`, an `AgreementError`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from schoolslink.errors import AgreementError
from schoolslink.governance.agreement import Agreement, agreements_dir
from schoolslink.mapping.yamlnodes import LDict, LList, MappingFileError, line_of
from schoolslink.mapping.yamlnodes import load as load_yaml

REJECTION_TABLE = "mhsds-referral-rejection-reason"
CLOSURE_TABLE = "mhsds-referral-closure-reason"
SEPARATOR = "; "  # between services in the signposting columns
_TOP_KEYS = {"trust", "reviewed", "services", "rejection", "closure", "default"}
_SERVICE_KEYS = {"name", "offer", "email", "phone", "url", "contact"}
_HOW_KEYS = ("email", "phone", "url", "contact")
_ENTRY_KEYS = {"services"}
_ID = re.compile(r"^[a-z][a-z0-9_-]*$")
_EMAIL = re.compile(r"^[^@\s;]+@[^@\s;]+\.[^@\s;]+$")


class SignpostingError(AgreementError):
    """A signposting file is invalid: the message names the file and line."""


@dataclass(frozen=True, slots=True)
class Service:
    id: str
    name: str
    offer: str
    email: str | None = None
    phone: str | None = None
    url: str | None = None
    contact: str | None = None

    def how(self) -> str:
        """How to reach the service, as one piece of text ("email x, phone y, https://...")."""
        parts = [self.contact] if self.contact else []
        parts += [f"phone {self.phone}"] if self.phone else []
        parts += [self.email] if self.email else []
        parts += [self.url] if self.url else []
        return ", ".join(p for p in parts if p)


@dataclass(frozen=True, slots=True)
class Signpost:
    """What a feed row carries: the services as text, and how to reach each."""

    services: tuple[Service, ...]

    @property
    def text(self) -> str:
        return SEPARATOR.join(f"{s.name}: {s.offer}" for s in self.services)

    @property
    def contact(self) -> str:
        return SEPARATOR.join(f"{s.name}: {s.how()}" for s in self.services)


@dataclass(frozen=True, slots=True)
class SignpostingTable:
    trust_ods: str
    path: str
    services: dict[str, Service]
    rejection: dict[str, Signpost]
    closure: dict[str, Signpost]
    default: Signpost

    def for_outcome(self, status: str, code: str | None) -> Signpost | None:
        """The signposting for a referral status (`not_accepted` or `discharged`) and its MHSDS reason code; None
        for any other status."""
        table = {"not_accepted": self.rejection, "discharged": self.closure}.get(status)
        if table is None:
            return None
        return table.get(str(code), self.default) if code not in (None, "") else self.default


def signposting_dir() -> Path:
    return Path(os.environ.get("SCHOOLSLINK_SIGNPOSTING", agreements_dir() / "signposting"))


def _fail(path: Path, node: Any, message: str, key: str | None = None) -> SignpostingError:
    return SignpostingError(f"{path}:{line_of(node, key, 1)}: {message}")


def _text(path: Path, node: LDict, key: str, what: str) -> str:
    value = node.get(key)
    if not isinstance(value, str | int) or isinstance(value, bool) or not str(value).strip():
        raise _fail(path, node, f"{what}: {key} must be text", key)
    text = str(value).strip()
    if ";" in text or "\n" in text:
        raise _fail(path, node, f"{what}: {key} must not hold ';' or a line break (services are separated by '; ')",
                    key)
    return text


def _known_codes(table: str) -> set[str]:
    from schoolslink.mapping.engine import load_mappings

    return set(load_mappings().tables[table].codes)


def load_signposting(path: Path, expect_ods: str | None = None) -> SignpostingTable:
    """Load and check one signposting file (see the module docstring); `SignpostingError` names file and line."""
    try:
        doc = load_yaml(path)
    except MappingFileError as exc:
        raise SignpostingError(str(exc)) from None
    if not isinstance(doc, LDict):
        raise SignpostingError(f"{path}:1: a signposting file is a mapping of keys")
    unknown = sorted(set(doc) - _TOP_KEYS)
    if unknown:
        raise _fail(path, doc, f"unknown key(s): {', '.join(unknown)}; known: {', '.join(sorted(_TOP_KEYS))}",
                    unknown[0])
    for key in ("trust", "services", "default"):
        if key not in doc:
            raise _fail(path, doc, f"missing key: {key}")
    ods = str(doc["trust"])
    if ods != path.stem or (expect_ods is not None and ods != expect_ods):
        raise _fail(path, doc, f"trust {ods!r} must be the ODS code the file is named after ({path.stem})", "trust")

    raw = doc["services"]
    if not isinstance(raw, LDict) or not raw:
        raise _fail(path, doc, "services must map each service id to its name, offer and contact", "services")
    services: dict[str, Service] = {}
    for sid, spec in raw.items():
        if not _ID.match(sid):
            raise _fail(path, raw, f"service id {sid!r} must be lower-case letters, digits, '_' or '-'", sid)
        if not isinstance(spec, LDict):
            raise _fail(path, raw, f"service {sid}: give name, offer and a way to reach it", sid)
        bad = sorted(set(spec) - _SERVICE_KEYS)
        if bad:
            raise _fail(path, spec, f"service {sid}: unknown key(s) {', '.join(bad)}; known: "
                        f"{', '.join(sorted(_SERVICE_KEYS))}", bad[0])
        how = {k: _text(path, spec, k, f"service {sid}") for k in _HOW_KEYS if k in spec}
        if not how:
            raise _fail(path, spec, f"service {sid}: give at least one of {', '.join(_HOW_KEYS)}")
        if "email" in how and not _EMAIL.match(how["email"]):
            raise _fail(path, spec, f"service {sid}: email {how['email']!r} is not an email address", "email")
        if "url" in how and not how["url"].startswith("https://"):
            raise _fail(path, spec, f"service {sid}: url must start with https://", "url")
        services[sid] = Service(sid, _text(path, spec, "name", f"service {sid}"),
                                _text(path, spec, "offer", f"service {sid}"), **how)

    def entry(node: Any, parent: Any, key: str, what: str) -> Signpost:
        if not isinstance(node, LDict):
            raise _fail(path, parent, f"{what}: give services: [ids]", key)
        bad = sorted(set(node) - _ENTRY_KEYS)
        if bad:
            raise _fail(path, node, f"{what}: unknown key(s) {', '.join(bad)}; known: services", bad[0])
        ids = node.get("services")
        if not isinstance(ids, LList) or not ids:
            raise _fail(path, node, f"{what}: services must list at least one service id", "services")
        for sid in ids:
            if str(sid) not in services:
                raise _fail(path, node, f"{what}: unknown service {sid!r}; defined: {', '.join(sorted(services))}",
                            "services")
        return Signpost(tuple(services[str(s)] for s in ids))

    tables: dict[str, dict[str, Signpost]] = {}
    for section, table in (("rejection", REJECTION_TABLE), ("closure", CLOSURE_TABLE)):
        node = doc.get(section) or LDict()
        if not isinstance(node, LDict):
            raise _fail(path, doc, f"{section} must map MHSDS reason codes to entries", section)
        known = _known_codes(table)
        out: dict[str, Signpost] = {}
        for code, spec in node.items():
            if str(code) not in known:
                raise _fail(path, node, f"{section}: unknown MHSDS code {code!r} (code table {table} lists "
                            f"{', '.join(sorted(known))})", code)
            out[str(code)] = entry(spec, node, code, f"{section} {code}")
        tables[section] = out
    return SignpostingTable(ods, str(path), services, tables["rejection"], tables["closure"],
                            entry(doc["default"], doc, "default", "default"))


_CACHE: dict[Path, tuple[tuple[int, int], SignpostingTable]] = {}


def signposting_for(ods: str, folder: Path | None = None) -> SignpostingTable | None:
    """The trust's signposting table (None if it has no file), loaded once while the file is unchanged."""
    if not ods.isalnum():
        return None
    path = (folder or signposting_dir()) / f"{ods}.yaml"
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    sig = (st.st_mtime_ns, st.st_size)
    hit = _CACHE.get(path)
    if hit is not None and hit[0] == sig:
        return hit[1]
    table = load_signposting(path, ods)
    _CACHE[path] = (sig, table)
    return table


def check_for_agreement(agreement: Agreement, folder: Path | None = None) -> dict[str, SignpostingTable | None]:
    """For `schoolslink agreement check`: each of the agreement's trusts -> its signposting table (None: it has
    no file); raises `SignpostingError` naming the file and line if one is bad."""
    return {t.ods: signposting_for(t.ods, folder) for t in agreement.trusts}


def check_all(folder: Path | None = None) -> list[SignpostingTable]:
    """Load and check every signposting file in the folder (for CI and `agreement check`)."""
    folder = folder or signposting_dir()
    return [load_signposting(p) for p in sorted(folder.glob("*.yaml"))]
