"""Start and stop the test/demo FHIR R4 peer (``peers/fhir-server``: Medplum's FhirRouter +
MemoryRepository behind a thin Node HTTP server on 127.0.0.1).

    with MedplumServer() as fhir:
        client = FhirClient(fhir.base_url)

The server holds everything in memory; each start is empty. It exits when stopped, and also
when the Python process that started it dies (it watches its stdin pipe).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import queue
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Final, NoReturn

__all__ = ["PEER_DIR", "SERVER_SCRIPT", "MedplumServer", "MedplumServerError", "ensure_npm_packages"]

REPO_ROOT: Final = Path(__file__).resolve().parents[2]
PEER_DIR: Final = REPO_ROOT / "peers" / "fhir-server"
SERVER_SCRIPT: Final = PEER_DIR / "server.mjs"
FHIR_BASE_PATH: Final = "/fhir/R4"
_READY_PREFIX: Final = "LISTENING "


class MedplumServerError(RuntimeError):
    """The FHIR peer could not be installed or started."""


def _node_executable() -> str:
    node = os.environ.get("SCHOOLSLINK_NODE") or shutil.which("node")
    if not node:
        raise MedplumServerError("node not found on PATH (Node 20+ is needed for the FHIR peer)")
    return node


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "<no log>"
    return "\n".join(text.splitlines()[-lines:]) or "<empty>"


def ensure_npm_packages(peer_dir: Path = PEER_DIR, timeout: float = 600.0) -> None:
    """Run ``npm ci --no-audit --no-fund`` in the peer's folder if its node_modules is missing.

    Serialised with a lock file so parallel test workers do not install over each other.
    """
    marker = peer_dir / "node_modules" / "@medplum" / "fhir-router" / "package.json"
    if marker.exists():
        return
    npm = shutil.which("npm")
    if not npm:
        raise MedplumServerError(f"{peer_dir / 'node_modules'} is missing and npm is not on PATH")
    lock_path = Path(tempfile.gettempdir()) / "schoolslink-fhir-server-npm.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if marker.exists():  # another process installed while we waited
                return
            try:
                done = subprocess.run(
                    [npm, "ci", "--no-audit", "--no-fund"],
                    cwd=peer_dir,
                    capture_output=True,
                    text=True,
                    timeout=timeout,
                    check=False,
                )
            except subprocess.TimeoutExpired as exc:
                raise MedplumServerError(f"npm ci in {peer_dir} timed out after {timeout:.0f}s") from exc
            if done.returncode != 0:
                tail = "\n".join((done.stdout + done.stderr).splitlines()[-30:])
                raise MedplumServerError(f"npm ci in {peer_dir} failed ({done.returncode}):\n{tail}")
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class MedplumServer:
    """The Node FHIR peer as a context manager.

    ``port`` 0 picks a free port. The server's stderr goes to ``log_path`` (default: a new temp
    file, kept after stop for post-mortems). ``validate=True`` makes the server check written
    resources with Medplum's structural validator (unknown elements, wrong JSON types, missing
    required elements -> 400, as HAPI would); it costs ~4x write throughput, so it is off by default
    and meant for tests, not benchmarks. ``install`` runs :func:`ensure_npm_packages` first.
    """

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
        self.requested_port = port
        if log_path is None:
            fd, name = tempfile.mkstemp(prefix="schoolslink-fhir-server-", suffix=".log")
            os.close(fd)
            log_path = name
        self.log_path = Path(log_path)
        self.startup_timeout = startup_timeout
        self.validate = validate
        self.install = install
        self._extra_env = dict(env or {})
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._port: int | None = None

    # -- properties -----------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise MedplumServerError("the FHIR server is not running")
        return self._port

    @property
    def base_url(self) -> str:
        """FHIR base, e.g. ``http://127.0.0.1:PORT/fhir/R4``."""
        return f"http://127.0.0.1:{self.port}{FHIR_BASE_PATH}"

    @property
    def healthz_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/healthz"

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise MedplumServerError("the FHIR server is not running")
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> MedplumServer:
        if self._proc is not None:
            raise MedplumServerError("the FHIR server is already started")
        if self.install:
            ensure_npm_packages()
        env = dict(os.environ)
        env.update(self._extra_env)
        env["FHIR_VALIDATE"] = "1" if self.validate else "0"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # closed in stop()
        self._proc = subprocess.Popen(
            [
                _node_executable(),
                "--experimental-websocket",  # @medplum/core needs the WebSocket global on Node 20
                "--max-semi-space-size=32",  # larger young generation: ~1.4x batch write throughput
                str(SERVER_SCRIPT),
                str(self.requested_port),
                "--exit-on-stdin-close",
            ],
            cwd=PEER_DIR,
            env=env,
            stdin=subprocess.PIPE,  # the server exits when this pipe closes (i.e. when we die)
            stdout=subprocess.PIPE,
            stderr=self._log,
        )
        lines: queue.Queue[str | None] = queue.Queue()
        assert self._proc.stdout is not None
        threading.Thread(
            target=self._pump_stdout, args=(self._proc.stdout, lines), name="fhir-server-stdout", daemon=True
        ).start()

        deadline = time.monotonic() + self.startup_timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._fail(f"did not report LISTENING within {self.startup_timeout:.0f}s")
            try:
                line = lines.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                if self._proc.poll() is not None:
                    self._fail(f"exited with status {self._proc.returncode} during start-up")
                continue
            if line is None:
                self._proc.wait(timeout=5)
                self._fail(f"exited with status {self._proc.returncode} during start-up")
            if line.startswith(_READY_PREFIX):
                self._port = int(line[len(_READY_PREFIX) :].strip())
                return self

    @staticmethod
    def _pump_stdout(stream: IO[bytes], lines: queue.Queue[str | None]) -> None:
        # Keeps draining after start-up so the server can never block on a full pipe.
        for raw in stream:
            lines.put(raw.decode("utf-8", errors="replace"))
        lines.put(None)

    def _fail(self, why: str) -> NoReturn:
        self.stop()
        raise MedplumServerError(
            f"FHIR server ({SERVER_SCRIPT.relative_to(REPO_ROOT)}) {why}; log {self.log_path}:\n{_tail(self.log_path)}"
        )

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate the server (SIGTERM, then SIGKILL after ``timeout``). Idempotent."""
        proc, self._proc = self._proc, None
        self._port = None
        if proc is not None:
            if proc.stdin is not None:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=timeout)
            if proc.stdout is not None:
                with contextlib.suppress(OSError):
                    proc.stdout.close()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> MedplumServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"port={self._port} pid={self._proc.pid}" if self._proc is not None else "stopped"
        return f"MedplumServer({state})"
