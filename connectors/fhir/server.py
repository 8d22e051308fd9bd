"""Start and stop the test/demo FHIR R4 peer (``peers/fhir-server``: Medplum's FhirRouter +
MemoryRepository behind a thin Node HTTP server on 127.0.0.1).

    with MedplumServer() as fhir:
        client = FhirClient(fhir.base_url)

The server holds everything in memory; each start is empty. It exits when stopped, and also
when the Python process that started it dies (it watches its stdin pipe).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from connectors.peer_process import PeerProcess, ensure_npm_installed, node_executable

__all__ = ["PEER_DIR", "SERVER_SCRIPT", "MedplumServer", "MedplumServerError", "ensure_npm_packages"]

REPO_ROOT: Final = Path(__file__).resolve().parents[2]
PEER_DIR: Final = REPO_ROOT / "peers" / "fhir-server"
SERVER_SCRIPT: Final = PEER_DIR / "server.mjs"
FHIR_BASE_PATH: Final = "/fhir/R4"


class MedplumServerError(RuntimeError):
    """The FHIR peer could not be installed or started."""


def ensure_npm_packages(peer_dir: Path = PEER_DIR, timeout: float = 600.0) -> None:
    """Run ``npm ci --no-audit --no-fund`` in the peer's folder if its node_modules is missing.

    Serialised with a lock file so parallel test workers do not install over each other.
    """
    ensure_npm_installed(
        peer_dir,
        peer_dir / "node_modules" / "@medplum" / "fhir-router" / "package.json",
        "schoolslink-fhir-server-npm.lock",
        timeout,
        MedplumServerError,
    )


class MedplumServer(PeerProcess):
    """The Node FHIR peer as a context manager.

    ``port`` 0 picks a free port. The server's stderr goes to ``log_path`` (default: a new temp
    file, kept after stop for post-mortems). ``validate=True`` makes the server check written
    resources with Medplum's structural validator (unknown elements, wrong JSON types, missing
    required elements -> 400, as HAPI would); it costs ~4x write throughput, so it is off by default
    and meant for tests, not benchmarks. ``install`` runs :func:`ensure_npm_packages` first.
    """

    error = MedplumServerError
    name = "FHIR server"
    script = SERVER_SCRIPT
    cwd = PEER_DIR
    log_prefix = "schoolslink-fhir-server-"

    def __init__(
        self,
        port: int = 0,
        log_path: str | os.PathLike[str] | None = None,
        *,
        startup_timeout: float = 60.0,
        validate: bool = False,
        install: bool = True,
        env: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(port=port, log_path=log_path, startup_timeout=startup_timeout, install=install, env=env)
        self.validate = validate

    @property
    def base_url(self) -> str:
        """FHIR base, e.g. ``http://127.0.0.1:PORT/fhir/R4``."""
        return f"http://127.0.0.1:{self.port}{FHIR_BASE_PATH}"

    @property
    def healthz_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/healthz"

    def _prepare(self) -> Mapping[str, str]:
        if self.install:
            ensure_npm_packages()
        return {"FHIR_VALIDATE": "1" if self.validate else "0"}

    def _command(self) -> list[str]:
        return [
            node_executable(MedplumServerError, "Node 20+ is needed for the FHIR peer"),
            "--experimental-websocket",  # @medplum/core needs the WebSocket global on Node 20
            "--max-semi-space-size=32",  # larger young generation: ~1.4x batch write throughput
            str(SERVER_SCRIPT),
            str(self.requested_port),
            "--exit-on-stdin-close",
        ]
