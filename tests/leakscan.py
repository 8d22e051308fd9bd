"""Scanning what a run leaves behind for pupil identities (tests/integration: the end-to-end demo, no personal data).

Where pupil data may legitimately rest is not scanned here: the state store's plain learner data for consented
pupils, the sealed landing zone, the feeds delivered to schools, the FHIR server's resources. What is scanned is
where it must never be: logs, the Airflow metadata database (XCom included), GX results, run reports and summaries,
the state store's run summaries, quarantine reasons, review reasons, outbox errors and MESH dead letters.
"""

from __future__ import annotations

import json
import re
import sqlite3
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

# state store tables that hold no pupil values by design (reasons, errors, summaries, pseudonymous keys only)
STATE_TABLES_WITHOUT_PUPIL_DATA = ("runs", "quarantine", "review_queue", "outbox", "mesh_messages", "ledger",
                                   "watermarks", "match_candidates")


PHONE_ITEMS = ("contact_phone", "phone")


def renderings(value: str, item: str) -> set[str]:
    """The ways a value is written: as is, upper, lower, without spaces; an NHS number also 3-3-4 spaced or hyphenated;
    an ISO date also dd/mm/yyyy and yyyymmdd (HL7); a UK phone number also hyphenated and international (+44)."""
    v = value.strip()
    forms = {v, v.upper(), v.lower(), v.replace(" ", "")}
    if re.fullmatch(r"\d{10}", v):  # NHS number, as people and systems write it
        forms |= {f"{v[:3]} {v[3:6]} {v[6:]}", f"{v[:3]}-{v[3:6]}-{v[6:]}"}
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", v):
        forms |= {f"{v[8:]}/{v[5:7]}/{v[:4]}"}
    if item in PHONE_ITEMS and re.fullmatch(r"0[\d ]{9,12}", v):
        national = v.replace(" ", "")
        forms |= {v.replace(" ", "-"), f"+44 {v[1:]}", f"+44{national[1:]}", f"+44 (0){v[1:]}"}
    return {f for f in forms if len(f) >= 4}


def identity_needles(manifest: Mapping[str, Any], postcodes: Iterable[str] = (), phones: Iterable[str] = (),
                     emails: Iterable[str] = ()) -> dict[str, str]:
    """Every rendering of every synthetic identity (UPN, NHS number, names alone and as SURNAME^FORENAME, DOB, and
    the FHIR and CSV forms of the identifiers), every marker (addresses and the workers' phones among them), and the
    postcodes, phone numbers and email addresses given, each mapped to what it is."""
    needles: dict[str, str] = dict.fromkeys(
        {f for mk in manifest["markers"] for f in renderings(mk["value"], mk["item"])}, "marker")
    for c in manifest["cases"]:
        for item in ("upn", "nhs_number", "surname", "forename", "dob"):
            for form in renderings(c[item], item):
                needles[form] = item
        needles[f"{c['surname'].upper()}^{c['forename'].upper()}"] = "name (HL7)"
        needles[f'"value": "{c["nhs_number"]}"'] = "nhs_number (FHIR)"
        needles[f',{c["upn"]},'] = "upn (CSV)"
    for pc in postcodes:
        for form in {pc, pc.replace(" ", "")}:
            needles[form] = "postcode"
    for phone in phones:
        for form in renderings(phone, "phone"):
            needles[form] = "phone"
    for email in emails:
        for form in renderings(email, "email"):
            needles[form] = "email"
    return needles


def texts(paths: Iterable[Path]) -> dict[str, str]:
    return {str(p): p.read_bytes().decode("utf-8", "replace") for p in paths if p.is_file()}


def find(haystacks: Mapping[str, str], needles: Mapping[str, str]) -> list[str]:
    hits = []
    for name, text in haystacks.items():
        for form, what in needles.items():
            if form in text:
                hits.append(f"{what} {form!r} found in {name}")
    return hits


def _cell_text(v: Any) -> str:
    if isinstance(v, bytes):
        try:
            return zlib.decompress(v).decode("utf-8", "replace")
        except zlib.error:
            return v.decode("utf-8", "replace")
    return str(v)


def sqlite_tables(db: Path, tables: Iterable[str] | None = None) -> dict[str, str]:
    """Each table of a SQLite file (all of them by default) as text, one row per line; compressed cells inflated."""
    out: dict[str, str] = {}
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        names = [n for (n,) in con.execute("select name from sqlite_master where type='table'")]
        for name in names if tables is None else [t for t in tables if t in names]:
            rows = con.execute(f'select * from "{name}"').fetchall()
            out[f"{db.name}:{name}"] = "\n".join(" | ".join(_cell_text(v) for v in row) for row in rows)
    finally:
        con.close()
    return out


def airflow_db(af_home: Path) -> dict[str, str]:
    """The Airflow metadata database: every table (XCom, task instances, rendered fields, ...) and the raw file."""
    db = af_home / "airflow.db"
    out = sqlite_tables(db)
    out[str(db)] = db.read_bytes().decode("latin-1")
    return out


def xcom_values(af_home: Path) -> list[Any]:
    con = sqlite3.connect(f"file:{af_home / 'airflow.db'}?mode=ro", uri=True)
    try:
        return [json.loads(v) if isinstance(v, str) else v for (v,) in con.execute("select value from xcom")]
    finally:
        con.close()


def places_without_pupil_data(home: Path, extra_logs: Iterable[Path] = ()) -> dict[str, dict[str, str]]:
    """What a demo under `home` wrote where pupil data must never be, by kind."""
    out_dir = home / "out"
    return {
        "logs": texts(sorted((home / "logs").rglob("*")) + sorted((home / "airflow").rglob("*.log"))
                      + sorted((home / "airflow" / "logs").rglob("*")) + list(extra_logs)),
        "airflow db": airflow_db(home / "airflow"),
        "gx": texts(sorted((home / "work").rglob("gx/*"))),
        "reports": texts(p for p in sorted(out_dir.rglob("*")) if "feeds" not in p.relative_to(out_dir).parts),
        "state store": sqlite_tables(home / "state.db", STATE_TABLES_WITHOUT_PUPIL_DATA),
    }
