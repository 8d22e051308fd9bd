"""Session fixture: the real FHIR R4 peer (Medplum's FhirRouter + MemoryRepository under Node).

Imported by ``tests/conftest.py``. One server per test session; it starts empty, so tests that
share it keep to their own resource ids (e.g. a uuid prefix) rather than assume an empty server.
Validation is on, so structurally invalid resources are refused (400) as HAPI would.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from connectors.fhir.server import MedplumServer


@pytest.fixture(scope="session")
def medplum(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MedplumServer]:
    log_path = tmp_path_factory.mktemp("fhir-peer") / "fhir-server.log"
    with MedplumServer(log_path=log_path, validate=True) as server:
        yield server
