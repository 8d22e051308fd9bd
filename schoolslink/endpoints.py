"""Where each trust's FHIR server is and how to reach it: an Airflow Connection per trust, or local config.

Looked up at task run time, never when a DAG file is parsed, in this order:

1. The Airflow Connection ``schoolslink_fhir_<ods>`` (lower case), e.g. ``schoolslink_fhir_r9x``. Its
   ``host`` is the FHIR base URL (or ``extra.base_url``), ``login`` the OAuth client id, ``password`` the
   client secret (``client_credentials``) or the PEM private key (``private_key_jwt``); ``extra`` holds
   ``auth``, ``token_url``, ``kid``, ``alg``, ``scope``, ``ca_bundle``, ``bundle_size``, ``page_size``,
   ``overlap_seconds``, ``timeout``, ``max_retries``, ``write_mode`` (``put`` by id, the default, or
   ``conditional`` for servers that assign their own ids) and ``mesh_mailbox`` (a trust that takes our
   writes as files: each delivery goes as one FHIR batch Bundle over MESH to that mailbox). Inside Airflow
   the lookup goes through Airflow (metadata database, secrets backends); outside it, through
   ``AIRFLOW_CONN_SCHOOLSLINK_FHIR_<ODS>`` (Airflow's JSON form), so the CLI and tests see the same thing.
2. ``SCHOOLSLINK_FHIR_BASE_<ODS>``: a base URL, no auth (a loopback test server).
3. ``SCHOOLSLINK_HOME/config/endpoints.json``: ``{"trusts": {"<ODS>": {"fhir_base": ..., <extra keys>}}}``.

Secrets never reach a log, an error message or an XCom: only the keys' names do.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from connectors.fhir.client import FhirClient
from connectors.fhir.pull import DEFAULT_OVERLAP
from schoolslink import connections
from schoolslink.connections import ConnectionLookup
from schoolslink.errors import ConfigurationError
from schoolslink.settings import home

__all__ = ["FhirEndpoint", "connection_id", "fhir_base", "fhir_endpoint", "use_connection_lookup",
           "write_endpoints"]

WRITE_MODES = ("put", "conditional")


def connection_id(trust_ods: str) -> str:
    return f"schoolslink_fhir_{trust_ods.lower()}"


def use_connection_lookup(fn: ConnectionLookup | None) -> None:
    """Called by the Airflow layer so lookups go through Airflow; None restores the environment lookup."""
    connections.use_lookup(fn)


@dataclass(frozen=True)
class FhirEndpoint:
    """One trust's FHIR server: base URL, auth and the knobs of reading and writing it."""

    trust_ods: str
    base_url: str
    auth: Mapping[str, Any] = field(default_factory=dict, repr=False)  # holds secrets: never printed
    ca_bundle: str | None = None
    bundle_size: int = 2000
    page_size: int = 1000
    overlap: timedelta = DEFAULT_OVERLAP
    timeout: float = 60.0
    max_retries: int = 4
    write_mode: str = "put"
    mesh_mailbox: str | None = None  # set: this trust takes our writes as files over MESH, to this mailbox

    @property
    def conditional_writes(self) -> bool:
        return self.write_mode == "conditional"

    def client(self) -> FhirClient:
        """A client for this endpoint, its OAuth token cached for the client's life."""
        from connectors.fhir.auth import auth_from_config

        auth = auth_from_config({**self.auth, "ca_bundle": self.ca_bundle}) if self.auth else None
        return FhirClient(self.base_url, timeout=self.timeout, bundle_size=self.bundle_size,
                          max_retries=self.max_retries, auth=auth, verify=self.ca_bundle or True)


def _int(extra: Mapping[str, Any], key: str, default: int, where: str) -> int:
    value = extra.get(key, default)
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ConfigurationError(f"{where}: {key} must be a whole number") from None
    if n < 1:
        raise ConfigurationError(f"{where}: {key} must be at least 1")
    return n


def _endpoint(trust_ods: str, base: str, extra: Mapping[str, Any], auth: dict[str, Any], where: str) -> FhirEndpoint:
    mode = str(extra.get("write_mode", "put"))
    if mode not in WRITE_MODES:
        raise ConfigurationError(f"{where}: write_mode must be one of {', '.join(WRITE_MODES)}")
    try:
        overlap = timedelta(seconds=float(extra.get("overlap_seconds", DEFAULT_OVERLAP.total_seconds())))
        timeout = float(extra.get("timeout", 60))
    except (TypeError, ValueError):
        raise ConfigurationError(f"{where}: overlap_seconds and timeout must be numbers") from None
    if not base.startswith(("https://", "http://")):
        raise ConfigurationError(f"{where}: the FHIR base must be an http(s) URL")
    ca = extra.get("ca_bundle")
    try:
        retries = int(extra.get("max_retries", 4))
    except (TypeError, ValueError):
        raise ConfigurationError(f"{where}: max_retries must be a whole number") from None
    return FhirEndpoint(
        trust_ods=trust_ods, base_url=base.rstrip("/"), auth=auth, ca_bundle=str(ca) if ca else None,
        bundle_size=_int(extra, "bundle_size", 2000, where), page_size=_int(extra, "page_size", 1000, where),
        overlap=overlap, timeout=timeout, max_retries=max(0, retries), write_mode=mode,
        mesh_mailbox=str(extra["mesh_mailbox"]).upper() if extra.get("mesh_mailbox") else None)


def _from_connection(trust_ods: str, conn: Mapping[str, Any]) -> FhirEndpoint:
    cid = connection_id(trust_ods)
    where = f"Airflow connection {cid}"
    extra = dict(conn.get("extra") or {})
    host = str(extra.get("base_url") or conn.get("host") or "")
    if host and "://" not in host:
        port = f":{conn['port']}" if conn.get("port") else ""
        path = f"/{str(conn['schema']).strip('/')}" if conn.get("schema") else ""
        host = f"https://{host}{port}{path}"
    if not host:
        raise ConfigurationError(f"{where}: no host (the FHIR base URL)")
    method = str(extra.get("auth", "none"))
    auth: dict[str, Any] = {}
    if method != "none":
        auth = {k: extra[k] for k in ("token_url", "kid", "alg", "scope", "private_key_path", "audience")
                if extra.get(k) is not None}
        auth["auth"] = method
        auth["client_id"] = conn.get("login") or extra.get("client_id")
        secret = conn.get("password")
        if method == "private_key_jwt":
            auth["private_key"] = extra.get("private_key") or secret
        else:
            auth["client_secret"] = secret or extra.get("client_secret")
        auth = {k: v for k, v in auth.items() if v}
    return _endpoint(trust_ods, host, extra, auth, where)


def fhir_endpoint(trust_ods: str) -> FhirEndpoint | None:
    """The trust's endpoint, or None when none is configured (its records wait, quarantined with a reason)."""
    conn = connections.lookup(connection_id(trust_ods))
    if conn is not None and conn.get("form") == "uri":  # a URL inside a URL: ambiguous, so refused
        raise ConfigurationError(f"AIRFLOW_CONN_{connection_id(trust_ods).upper()} is not Airflow's JSON connection "
                                 "form; write it as JSON with host, login, password and extra")
    if conn is not None:
        return _from_connection(trust_ods, conn)
    env = os.environ.get(f"SCHOOLSLINK_FHIR_BASE_{trust_ods}")
    if env:
        return _endpoint(trust_ods, env, {}, {}, f"SCHOOLSLINK_FHIR_BASE_{trust_ods}")
    p = home() / "config" / "endpoints.json"
    if not p.exists():
        return None
    try:
        doc = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigurationError(f"{p}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    entry = doc.get("trusts", {}).get(trust_ods)
    if not entry or not entry.get("fhir_base"):
        return None
    auth = dict(entry.get("auth") or {})
    return _endpoint(trust_ods, str(entry["fhir_base"]), entry, auth, f"{p} (trust {trust_ods})")


def fhir_base(trust_ods: str) -> str | None:
    endpoint = fhir_endpoint(trust_ods)
    return endpoint.base_url if endpoint else None


def write_endpoints(trusts: dict[str, str]) -> None:
    p = home() / "config" / "endpoints.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps({"trusts": {k: {"fhir_base": v} for k, v in trusts.items()}}, indent=1))
