"""Shared fixtures: a throwaway SCHOOLSLINK_HOME, state stores on SQLite and PostgreSQL, the FHIR peer."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, text

try:
    from tests.integration.conftest_fhir import medplum  # noqa: F401  (session fixture: the real FHIR peer)
except ImportError:  # pragma: no cover
    pass
try:
    from tests.integration.conftest_mesh import mesh, mesh_peer  # noqa: F401  (the real MESH peer, over mTLS)
except ImportError:  # pragma: no cover
    pass

PG_ADMIN_URL = os.environ.get("SCHOOLSLINK_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@pytest.fixture()
def sl_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("SCHOOLSLINK_HOME", str(home))
    monkeypatch.setenv("SCHOOLSLINK_KEY", "test-key-not-secret")
    monkeypatch.delenv("SCHOOLSLINK_DB_URL", raising=False)
    return home


def _pg_available() -> bool:
    try:
        eng = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with eng.connect() as conn:
            conn.execute(text("select 1"))
        eng.dispose()
        return True
    except Exception:  # noqa: BLE001 - any failure to connect means no PostgreSQL here
        return False


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh, empty state store on each backend (PostgreSQL: a database of its own, dropped after)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'state.db'}"
        monkeypatch.setenv("SCHOOLSLINK_DB_URL", url)
        yield url
        return
    if not _pg_available():
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL at 127.0.0.1:5432 is required in CI")
        pytest.skip("no PostgreSQL at 127.0.0.1:5432")
    name = f"sl_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    monkeypatch.setenv("SCHOOLSLINK_DB_URL", url)
    try:
        yield url
    finally:
        from schoolslink.store.db import engine_for

        engine_for(url).dispose()
        engine_for.cache_clear()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture()
def store(store_url: str, sl_home: Path, monkeypatch: pytest.MonkeyPatch) -> Engine:
    monkeypatch.setenv("SCHOOLSLINK_DB_URL", store_url)
    from schoolslink.store.db import migrate

    return migrate(store_url)
