"""mis_ingest's first stage: pull from MIS APIs (Wonde) into the landing zone, sealed, by watermark.

Which schools are read through Wonde is configuration: `SCHOOLSLINK_WONDE_CONFIG`, default
`SCHOOLSLINK_HOME/config/wonde.yaml`:

    base_url: https://api.wonde.com/v1.0/
    token_file: secrets/wonde.token      # under SCHOOLSLINK_HOME; or the token in SCHOOLSLINK_WONDE_TOKEN
    schools:                             # URN: Wonde school id
      "100001": A1930499544

No file: nothing to pull. Each school's pull is landed sealed (it never rests in plain) and only then does
its watermark (`watermarks`, source `wonde:<school id>`) move to the time the pull began, so a failed pull
or a lost file is pulled again next run. The first pull (no watermark) is the whole roll; later ones are
changes, leavers and deletions since. One school's failure is recorded and the others go on.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from connectors.mis.errors import MisInputError
from connectors.storage.landing import LandingZone
from schoolslink.errors import ConfigurationError
from schoolslink.pipeline.common import landing_zone, quarantine_rows, store
from schoolslink.pipeline.sync import watermark
from schoolslink.settings import home
from schoolslink.store.schema import watermarks
from schoolslink.store.upsert import upsert

if TYPE_CHECKING:
    from connectors.mis.wonde import WondeClient

CONFIG_ENV = "SCHOOLSLINK_WONDE_CONFIG"
TOKEN_ENV = "SCHOOLSLINK_WONDE_TOKEN"  # noqa: S105 (the name of a variable, not a secret)


def wonde_config() -> dict[str, Any] | None:
    path = Path(os.environ.get(CONFIG_ENV) or home() / "config" / "wonde.yaml")
    if not path.exists():
        return None
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(doc, dict) or not isinstance(doc.get("base_url"), str) or not isinstance(
            doc.get("schools"), dict):
        raise ConfigurationError(f"{path}: needs base_url (text) and schools (URN: Wonde school id)")
    return doc


def _token(cfg: dict[str, Any]) -> str:
    env = os.environ.get(TOKEN_ENV)
    if env:
        return env.strip()
    if cfg.get("token_file"):
        p = Path(cfg["token_file"])
        p = p if p.is_absolute() else home() / p
        if p.exists():
            return p.read_text(encoding="utf-8").strip()
    raise ConfigurationError(f"no Wonde token: set {TOKEN_ENV} or token_file in the Wonde configuration")


def pull_sources(run_id: str, now: dt.datetime | None = None) -> dict[str, int]:
    """Pull every configured Wonde school; counts only (never pupil data)."""
    from connectors.mis.wonde import WondeClient

    cfg = wonde_config()
    counts = {"wonde_schools": 0, "wonde_pulls_landed": 0, "wonde_pulls_failed": 0}
    if cfg is None:
        return counts
    zone = landing_zone()
    with WondeClient(cfg["base_url"], _token(cfg)) as client:
        _pull_each(client, zone, cfg, run_id, now, counts)
    return counts


def _pull_each(client: WondeClient, zone: LandingZone, cfg: dict[str, Any], run_id: str, now: dt.datetime | None,
               counts: dict[str, int]) -> None:
    for urn, school_id in sorted((str(k), str(v)) for k, v in cfg["schools"].items()):
        counts["wonde_schools"] += 1
        source = f"wonde:{school_id}"
        with store().begin() as conn:
            mark = watermark(conn, source, "students")
        since = dt.datetime.fromisoformat(mark) if mark else None
        try:
            doc = client.pull(school_id, urn, since)
        except MisInputError as exc:
            counts["wonde_pulls_failed"] += 1
            with store().begin() as conn:
                quarantine_rows(conn, run_id, source, [(None, None, f"Wonde pull for school {urn} failed: {exc}; "
                                                        "its watermark stays, so the next run pulls again")])
            continue
        zone.land_bytes("mis", urn, "json", json.dumps(doc, separators=(",", ":")).encode(), now)
        with store().begin() as conn:
            upsert(conn, watermarks, [{"source": source, "resource_type": "students", "value": doc["pulled_at"]}],
                   ["source", "resource_type"])
        counts["wonde_pulls_landed"] += 1
