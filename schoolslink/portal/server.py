"""Serving the portal: `serve` (what `schoolslink portal` runs: uvicorn on one socket, optionally TLS) and
`PortalServer`, the portal as a child process on 127.0.0.1 for tests and demos (connectors/peer_process.py's
lifecycle: it prints `LISTENING <port>` once the socket listens and exits when its stdin closes)."""

from __future__ import annotations

import os
import socket
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from connectors.peer_process import REPO_ROOT, PeerProcess

SCRIPT: Final = Path(__file__).resolve().parents[1] / "portal_cli.py"


def serve(host: str, port: int, *, certfile: str | None = None, keyfile: str | None = None, announce: bool = False,
          exit_on_stdin_close: bool = False) -> None:
    """Serve the portal until interrupted. With a certificate it speaks TLS only, and its cookies and HSTS say so."""
    import uvicorn

    from schoolslink.portal.app import create_app
    from schoolslink.portal.config import PortalConfig

    app = create_app(PortalConfig.from_env(tls=certfile is not None))
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    config = uvicorn.Config(app, ssl_certfile=certfile, ssl_keyfile=keyfile, proxy_headers=False,
                            server_header=False, log_level="info", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    if exit_on_stdin_close:
        def watch() -> None:
            while sys.stdin.buffer.read(4096):
                pass
            server.should_exit = True

        threading.Thread(target=watch, name="stdin watch", daemon=True).start()
    if announce:
        print(f"LISTENING {sock.getsockname()[1]}", flush=True)
    server.run(sockets=[sock])


class PortalError(RuntimeError):
    """The portal process could not be started."""


class PortalServer(PeerProcess):
    """`schoolslink portal` as a child process on 127.0.0.1 (port 0: a free one). `env` sets its SCHOOLSLINK_*
    variables (home, database, OIDC); `tls` = (certificate, key) files serves HTTPS."""

    error = PortalError
    name = "school portal"
    script = SCRIPT
    cwd = REPO_ROOT
    log_prefix = "schoolslink-portal-"

    def __init__(self, env: Mapping[str, str] | None = None, *, port: int = 0,
                 log_path: str | os.PathLike[str] | None = None, tls: tuple[Path, Path] | None = None,
                 startup_timeout: float = 60.0) -> None:
        super().__init__(port=port, log_path=log_path, startup_timeout=startup_timeout, install=False, env=env)
        self.tls = tls

    @property
    def base_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def _command(self) -> list[str]:
        cmd = [sys.executable, "-m", "schoolslink.cli", "portal", "--host", "127.0.0.1", "--port",
               str(self.requested_port), "--announce", "--exit-on-stdin-close"]
        if self.tls:
            cmd += ["--tls-cert", str(self.tls[0]), "--tls-key", str(self.tls[1])]
        return cmd
