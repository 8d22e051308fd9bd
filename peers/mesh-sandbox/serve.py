"""Run NHS England's mesh-sandbox under uvicorn, with our mailboxes and workflows, until stdin closes.

Run with this folder's own environment (``peers/mesh-sandbox/.venv/bin/python``), never the main one:
mesh-sandbox pins a FastAPI newer than Airflow allows. Started by ``connectors/mesh/sandbox.py``:

    .venv/bin/python serve.py mesh_sandbox.api:app --host 127.0.0.1 --port 0 --ssl-... (any uvicorn option)

Why a launcher rather than the ``uvicorn`` command itself:

* mesh-sandbox reads its mailboxes and workflows (``mailboxes.jsonl``, ``workflows.jsonl``) only from its
  own package folder (``CannedStore._canned_data_dir`` is fixed to ``mesh_sandbox/store/data``; no
  environment variable moves it). ``MESH_SANDBOX_CONFIG_DIR`` names a folder holding those two files; this
  launcher points the store at it before the app is built, so tests and the demo use their own workflows
  without editing the installed package.
* The server must not outlive the process that started it: it exits when its stdin pipe closes (the parent
  closed it, or died), as the FHIR peer does.

Everything else (``STORE_MODE``, ``MAILBOXES_DATA_DIR``, ``SHARED_KEY``, ``AUTH_MODE``) is mesh-sandbox's own
environment; every command-line option is uvicorn's.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

CONFIG_DIR_ENV = "MESH_SANDBOX_CONFIG_DIR"


def _exit_when_stdin_closes() -> None:
    try:
        while sys.stdin.buffer.read(65536):
            pass
    except (OSError, ValueError):
        pass
    os.kill(os.getpid(), signal.SIGTERM)  # uvicorn's graceful shutdown
    # ... and if that hangs (a stuck connection), go anyway.
    threading.Timer(10.0, lambda: os._exit(1)).start()


def _use_config_dir(config_dir: str) -> None:
    for name in ("mailboxes.jsonl", "workflows.jsonl"):
        if not os.path.isfile(os.path.join(config_dir, name)):
            raise SystemExit(f"{CONFIG_DIR_ENV}={config_dir} has no {name}")
    from mesh_sandbox.store import canned_store

    original = canned_store.CannedStore.initialise

    def initialise(self: canned_store.CannedStore) -> None:
        self._canned_data_dir = config_dir
        original(self)

    canned_store.CannedStore.initialise = initialise  # type: ignore[method-assign]


def main() -> None:
    threading.Thread(target=_exit_when_stdin_closes, name="stdin-watch", daemon=True).start()
    config_dir = os.environ.get(CONFIG_DIR_ENV)
    if config_dir:
        _use_config_dir(config_dir)
    from uvicorn.main import main as uvicorn_main

    uvicorn_main(prog_name="uvicorn")


if __name__ == "__main__":
    main()
