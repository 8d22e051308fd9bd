"""Where each trust's systems are: `SCHOOLSLINK_HOME/config/endpoints.json` or SCHOOLSLINK_FHIR_BASE_<ODS>.

Read at task run time, never when a DAG file is parsed. The NHS connectors issue moves credentials to
Airflow Connections.
"""

from __future__ import annotations

import json
import os

from schoolslink.errors import ConfigurationError
from schoolslink.settings import home


def fhir_base(trust_ods: str) -> str | None:
    env = os.environ.get(f"SCHOOLSLINK_FHIR_BASE_{trust_ods}")
    if env:
        return env
    p = home() / "config" / "endpoints.json"
    if p.exists():
        try:
            doc = json.loads(p.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigurationError(f"{p}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        base = doc.get("trusts", {}).get(trust_ods, {}).get("fhir_base")
        return str(base) if base else None
    return None


def write_endpoints(trusts: dict[str, str]) -> None:
    p = home() / "config" / "endpoints.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps({"trusts": {k: {"fhir_base": v} for k, v in trusts.items()}}, indent=1))
