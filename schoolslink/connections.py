"""Airflow Connections as the core reads them: through Airflow inside a task, from the environment elsewhere.

`lookup(conn_id)` returns a plain dict (host, login, password, schema, port, extra, form) or None. Outside
Airflow it reads `AIRFLOW_CONN_<ID>` in either of Airflow's forms (JSON or URI), so the CLI and tests see what a
task sees; the Airflow layer (`schoolslink/airflow_glue.py`) switches it to Airflow's own lookup (metadata
database, secrets backends) at the start of every task. Values hold secrets: never log them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from schoolslink.errors import ConfigurationError

__all__ = ["ConnectionLookup", "env_connection", "lookup", "use_lookup"]

ConnectionLookup = Callable[[str], "dict[str, Any] | None"]


def env_connection(conn_id: str) -> dict[str, Any] | None:
    """`AIRFLOW_CONN_<ID>`, JSON or URI form, read without Airflow (`form` says which)."""
    name = f"AIRFLOW_CONN_{conn_id.upper()}"
    raw = os.environ.get(name)
    if not raw:
        return None
    if not raw.lstrip().startswith("{"):
        u = urlsplit(raw)
        return {"host": u.hostname, "login": unquote(u.username or ""), "password": unquote(u.password or ""),
                "schema": u.path.lstrip("/") or None, "port": u.port, "extra": dict(parse_qsl(u.query)),
                "form": "uri"}
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError:
        raise ConfigurationError(f"{name} is not valid JSON") from None
    if not isinstance(doc, dict):
        raise ConfigurationError(f"{name} must be a JSON object")
    extra = doc.get("extra") or {}
    if isinstance(extra, str):
        extra = json.loads(extra) if extra else {}
    return {"host": doc.get("host"), "login": doc.get("login"), "password": doc.get("password"),
            "schema": doc.get("schema"), "port": doc.get("port"), "extra": extra, "form": "json"}


_lookup: ConnectionLookup = env_connection


def use_lookup(fn: ConnectionLookup | None) -> None:
    """Look Connections up with `fn` from now on (the Airflow layer's); None restores the environment lookup."""
    global _lookup
    _lookup = fn or env_connection


def lookup(conn_id: str) -> dict[str, Any] | None:
    return _lookup(conn_id)
