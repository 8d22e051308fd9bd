"""What the local test peers share: install on first use, start as a child process, wait until it
listens, stop.

:class:`PeerProcess` is the lifecycle of one peer (``connectors/fhir/server.py``,
``connectors/fhir/oidc_peer.py``, ``connectors/mesh/sandbox.py``): it starts the peer with its stdin
as a pipe (the peer exits when the pipe closes, i.e. when the Python process that started it dies),
waits for it to report its port, fails with the tail of its log, stops it with SIGTERM then SIGKILL,
and is a context manager. :func:`ensure_installed` installs a peer's packages if they are missing,
serialised by a lock file.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import queue
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, ClassVar, Final, NoReturn, Self

__all__ = ["PeerProcess", "ensure_installed", "ensure_npm_installed", "log_tail", "node_executable"]

REPO_ROOT: Final = Path(__file__).resolve().parents[1]
_READY_PREFIX: Final = "LISTENING "


def log_tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a log, for error messages."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "<no log>"
    return "\n".join(text.splitlines()[-lines:]) or "<empty>"


def node_executable(error: type[Exception], needed: str) -> str:
    """``$SCHOOLSLINK_NODE``, else ``node`` on PATH; ``needed`` says which Node the peer needs."""
    node = os.environ.get("SCHOOLSLINK_NODE") or shutil.which("node")
    if not node:
        raise error(f"node not found on PATH ({needed})")
    return node


def ensure_installed(
    marker: Path | Callable[[], bool],
    command: Sequence[str] | Callable[[], Sequence[str]],
    cwd: Path,
    lock_name: str,
    timeout: float,
    error: type[Exception],
    *,
    what: str | None = None,
) -> None:
    """Run ``command`` in ``cwd`` unless ``marker`` (a file, or a check) says the packages are there.

    Serialised with the lock file ``lock_name`` in the temp folder, so parallel test workers do not
    install over each other. ``command`` may be a function, called only when an install is needed.
    Failures (a non-zero exit, a timeout, or the marker still missing afterwards) raise ``error``,
    naming ``what`` (default: the command) and ending with the tail of its output.
    """
    installed = marker if callable(marker) else marker.exists
    if installed():
        return
    cmd = list(command() if callable(command) else command)
    what = what or " ".join(cmd)
    with open(Path(tempfile.gettempdir()) / lock_name, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if installed():  # another process installed while we waited
                return
            try:
                done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)
            except subprocess.TimeoutExpired as exc:
                raise error(f"{what} timed out after {timeout:.0f}s") from exc
            if done.returncode != 0 or not installed():
                tail = "\n".join((done.stdout + done.stderr).splitlines()[-30:])
                raise error(f"{what} failed ({done.returncode}):\n{tail}")
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def ensure_npm_installed(peer_dir: Path, marker: Path, lock_name: str, timeout: float, error: type[Exception]) -> None:
    """``npm ci --no-audit --no-fund`` in ``peer_dir`` if ``marker`` (a file in node_modules) is missing."""

    def npm_ci() -> list[str]:
        npm = shutil.which("npm")
        if not npm:
            raise error(f"{peer_dir / 'node_modules'} is missing and npm is not on PATH")
        return [npm, "ci", "--no-audit", "--no-fund"]

    ensure_installed(marker, npm_ci, peer_dir, lock_name, timeout, error, what=f"npm ci in {peer_dir}")


class PeerProcess:
    """A local peer run as a child process, as a context manager.

    A subclass sets the class attributes and provides :meth:`_command` (and, if it needs to install
    or write files first, :meth:`_prepare`). By default the peer's stdout is read on a thread until
    it prints ``LISTENING <port>``, and its stderr goes to ``log_path``; with ``ready_in_log`` set,
    both go to ``log_path`` and the port is the ``port`` group of the first match in the log.
    """

    error: ClassVar[type[Exception]] = RuntimeError
    """Raised for every failure (install, start, use while stopped)."""
    name: ClassVar[str] = "peer"
    """How messages name the peer: ``the {name} is not running``."""
    script: ClassVar[Path]
    """The peer's entry point, named (relative to the repository) when start-up fails."""
    cwd: ClassVar[Path]
    log_prefix: ClassVar[str] = "schoolslink-peer-"
    """Prefix of the default log file's name (a new temp file)."""
    ready_in_log: ClassVar[re.Pattern[str] | None] = None
    env_drop: ClassVar[tuple[str, ...]] = ()
    """Variables of our own environment the peer must not inherit."""

    def __init__(
        self,
        *,
        port: int,
        log_path: str | os.PathLike[str] | None,
        startup_timeout: float,
        install: bool,
        env: Mapping[str, str] | None,
    ) -> None:
        self.requested_port = port
        if log_path is None:
            fd, name = tempfile.mkstemp(prefix=self.log_prefix, suffix=".log")
            os.close(fd)
            log_path = name
        self.log_path = Path(log_path)
        self.startup_timeout = startup_timeout
        self.install = install
        self._extra_env = dict(env or {})
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._port: int | None = None

    # -- what subclasses provide ----------------------------------------------------------------

    def _prepare(self) -> Mapping[str, str]:
        """Install what is missing and write what the peer reads; return variables to add to its
        environment (after ``env``). Runs at the start of :meth:`start`."""
        return {}

    def _command(self) -> list[str]:
        """The command line that starts the peer (called once the log is open)."""
        raise NotImplementedError

    # -- properties -----------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise self.error(f"the {self.name} is not running")
        return self._port

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise self.error(f"the {self.name} is not running")
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> Self:
        if self._proc is not None:
            raise self.error(f"the {self.name} is already started")
        added = self._prepare()
        env = {key: value for key, value in os.environ.items() if key not in self.env_drop}
        env.update(self._extra_env)
        env.update(added)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._log = open(self.log_path, "ab")  # closed in stop()
        to_log = self.ready_in_log is not None
        self._proc = proc = subprocess.Popen(
            self._command(),
            cwd=self.cwd,
            env=env,
            stdin=subprocess.PIPE,  # the peer exits when this pipe closes (i.e. when we die)
            stdout=self._log if to_log else subprocess.PIPE,
            stderr=subprocess.STDOUT if to_log else self._log,
        )
        self._port = self._port_from_log(proc, log_offset) if to_log else self._port_from_stdout(proc)
        return self

    def _port_from_stdout(self, proc: subprocess.Popen[bytes]) -> int:
        lines: queue.Queue[str | None] = queue.Queue()
        assert proc.stdout is not None
        threading.Thread(
            target=self._pump_stdout, args=(proc.stdout, lines), name=f"{self.name} stdout", daemon=True
        ).start()
        deadline = time.monotonic() + self.startup_timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._fail(f"did not report LISTENING within {self.startup_timeout:.0f}s")
            try:
                line = lines.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                if proc.poll() is not None:
                    self._fail(f"exited with status {proc.returncode} during start-up")
                continue
            if line is None:
                proc.wait(timeout=5)
                self._fail(f"exited with status {proc.returncode} during start-up")
            if line.startswith(_READY_PREFIX):
                return int(line[len(_READY_PREFIX) :].strip())

    @staticmethod
    def _pump_stdout(stream: IO[bytes], lines: queue.Queue[str | None]) -> None:
        # Keeps draining after start-up so the peer can never block on a full pipe.
        for raw in stream:
            lines.put(raw.decode("utf-8", errors="replace"))
        lines.put(None)

    def _port_from_log(self, proc: subprocess.Popen[bytes], offset: int) -> int:
        assert self.ready_in_log is not None
        deadline = time.monotonic() + self.startup_timeout
        while True:
            match = self.ready_in_log.search(self._log_since(offset))
            if match:
                return int(match.group("port"))
            if proc.poll() is not None:
                self._fail(f"exited with status {proc.returncode} during start-up")
            if time.monotonic() > deadline:
                self._fail(f"did not report that it was listening within {self.startup_timeout:.0f}s")
            time.sleep(0.05)

    def _log_since(self, offset: int) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                return f.read().decode("utf-8", errors="replace")
        except OSError:
            return ""

    def _fail(self, why: str) -> NoReturn:
        self.stop()
        script = self.script.relative_to(REPO_ROOT)
        raise self.error(f"{self.name} ({script}) {why}; log {self.log_path}:\n{log_tail(self.log_path)}")

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate the peer (close its stdin, SIGTERM, then SIGKILL after ``timeout``). Idempotent."""
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

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def _state(self) -> str:
        return f"port={self._port} pid={self._proc.pid}" if self._proc is not None else "stopped"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._state()})"
