"""Where a trust's FHIR server is and how to reach it: an Airflow Connection first, then local config."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from schoolslink import endpoints
from schoolslink.errors import ConfigurationError

SECRET = "s3cr3t-value-never-printed"


def _conn(monkeypatch: pytest.MonkeyPatch, ods: str, **doc: Any) -> None:
    monkeypatch.setenv(f"AIRFLOW_CONN_SCHOOLSLINK_FHIR_{ods}", json.dumps(doc))


def test_an_airflow_connection_gives_base_auth_and_knobs(sl_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _conn(monkeypatch, "R9X", conn_type="http", host="https://fhir.trust.example.nhs.uk/R4", login="schoolslink",
          password=SECRET, extra={"auth": "client_credentials", "token_url": "https://auth.trust.example/token",
                                  "scope": "system/Observation.write", "bundle_size": 500, "page_size": 200,
                                  "overlap_seconds": 30, "write_mode": "conditional", "max_retries": 0})
    ep = endpoints.fhir_endpoint("R9X")
    assert ep is not None
    assert ep.base_url == "https://fhir.trust.example.nhs.uk/R4"
    assert (ep.bundle_size, ep.page_size, ep.overlap.total_seconds(), ep.max_retries) == (500, 200, 30, 0)
    assert ep.conditional_writes
    assert dict(ep.auth) == {"auth": "client_credentials", "client_id": "schoolslink", "client_secret": SECRET,
                             "token_url": "https://auth.trust.example/token", "scope": "system/Observation.write"}
    assert SECRET not in repr(ep) and SECRET not in str(ep)


def test_a_private_key_jwt_connection_takes_the_key_from_the_password(
    sl_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _conn(monkeypatch, "RXA", host="fhir.trust.example.nhs.uk", port=8443, schema="fhir/R4", login="client-1",
          password="-----BEGIN PRIVATE KEY-----\n...", extra={"auth": "private_key_jwt", "kid": "key-2026",
                                                             "alg": "RS512", "token_url": "https://auth/t"})
    ep = endpoints.fhir_endpoint("RXA")
    assert ep is not None and ep.base_url == "https://fhir.trust.example.nhs.uk:8443/fhir/R4"
    assert ep.auth["private_key"].startswith("-----BEGIN") and ep.auth["kid"] == "key-2026"
    assert "client_secret" not in ep.auth


@pytest.mark.parametrize(("extra", "message"), [
    ({"write_mode": "post"}, "write_mode must be one of put, conditional"),
    ({"bundle_size": "lots"}, "bundle_size must be a whole number"),
    ({"bundle_size": 0}, "bundle_size must be at least 1"),
    ({"overlap_seconds": "a while"}, "overlap_seconds and timeout must be numbers"),
])
def test_bad_settings_are_named_without_their_values(
    sl_home: Path, monkeypatch: pytest.MonkeyPatch, extra: dict[str, Any], message: str
) -> None:
    _conn(monkeypatch, "R9X", host="https://fhir.example/R4", password=SECRET, extra=extra)
    with pytest.raises(ConfigurationError, match=message) as err:
        endpoints.fhir_endpoint("R9X")
    assert "schoolslink_fhir_r9x" in str(err.value) and SECRET not in str(err.value)


def test_a_connection_that_is_not_json_is_refused_clearly(sl_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_SCHOOLSLINK_FHIR_R9X", f"https://user:{SECRET}@fhir.example/R4")
    with pytest.raises(ConfigurationError, match="Airflow's JSON connection form") as err:
        endpoints.fhir_endpoint("R9X")
    assert SECRET not in str(err.value)


def test_without_a_connection_env_then_endpoints_json(sl_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert endpoints.fhir_endpoint("R9X") is None
    endpoints.write_endpoints({"R9X": "http://127.0.0.1:8080/fhir/R4"})
    ep = endpoints.fhir_endpoint("R9X")
    assert ep is not None and ep.base_url == "http://127.0.0.1:8080/fhir/R4" and not ep.auth
    monkeypatch.setenv("SCHOOLSLINK_FHIR_BASE_R9X", "http://127.0.0.1:9999/fhir/R4")
    assert endpoints.fhir_base("R9X") == "http://127.0.0.1:9999/fhir/R4"


def test_the_airflow_layer_can_take_over_the_lookup(sl_home: Path) -> None:
    asked: list[str] = []

    def lookup(conn_id: str) -> dict[str, Any] | None:
        asked.append(conn_id)
        return {"host": "https://fhir.example/R4", "extra": {}}

    endpoints.use_connection_lookup(lookup)
    try:
        ep = endpoints.fhir_endpoint("RAB")
    finally:
        endpoints.use_connection_lookup(None)
    assert asked == ["schoolslink_fhir_rab"] and ep is not None and ep.base_url == "https://fhir.example/R4"
