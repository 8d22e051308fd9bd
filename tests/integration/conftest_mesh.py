"""Session fixture: the real MESH peer (NHS England's mesh-sandbox under uvicorn) behind mutual TLS on 127.0.0.1.

Imported by ``tests/conftest.py``. One sandbox per test session, started with:

* a throwaway CA made for the session, a server certificate for 127.0.0.1 and a client certificate it signed
  (uvicorn *requires* a client certificate from that CA), plus a second, unrelated CA with its own client
  certificate, for the refusal tests;
* the mailboxes of the shared corpus (``../shared/corpora/nhs/mesh-sandbox/mailboxes.jsonl``: X26ABC1,
  X26ABC2 (ODS X26), X26ABC3 (ODS X27), password ``password``), read from there at test time;
* our own workflows (SCHOOLSLINK_CONTEXT from X26ABC1 to X26ABC2/X26ABC3, SCHOOLSLINK_CONTEXT_ACK back).

The ``mesh`` fixture empties every mailbox before each test, so tests sharing the sandbox do not see each
other's messages.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from connectors.mesh.client import WORKFLOW_CONTEXT, WORKFLOW_CONTEXT_ACK, MeshConfig, MeshConnector
from connectors.mesh.sandbox import MeshSandbox, SandboxTls, ThrowawayPki, make_throwaway_pki
from tests.paths import CORPORA

MAILBOXES = CORPORA / "nhs" / "mesh-sandbox" / "mailboxes.jsonl"
PASSWORD = "password"  # the corpus's mailboxes' password
SHARED_KEY = "schoolslink-test-shared-key"  # the sandbox's, for this session only
SCHOOL_SIDE = "X26ABC1"  # our mailbox in these tests
TRUST_SIDE = "X26ABC2"  # a CYPMHS trust's (ODS X26)
OTHER_TRUST = "X26ABC3"  # another trust's (ODS X27)
WORKFLOWS = [
    {"workflow_id": WORKFLOW_CONTEXT, "senders": [SCHOOL_SIDE], "receivers": [TRUST_SIDE, OTHER_TRUST]},
    {"workflow_id": WORKFLOW_CONTEXT_ACK, "senders": [TRUST_SIDE, OTHER_TRUST], "receivers": [SCHOOL_SIDE]},
]


@dataclass
class MeshPeer:
    """The running sandbox and the certificates that reach it (``pki``) or do not (``rogue``: another CA)."""

    sandbox: MeshSandbox
    pki: ThrowawayPki
    rogue: ThrowawayPki

    def settings(self, mailbox: str, **overrides: Any) -> dict[str, Any]:
        """A mesh.json document for ``mailbox`` (paths as text), with any key replaced."""
        doc: dict[str, Any] = {
            "url": self.sandbox.base_url,
            "mailbox": mailbox,
            "password": PASSWORD,
            "shared_key": SHARED_KEY,
            "client_cert": str(self.pki.client.cert),
            "client_key": str(self.pki.client.key),
            "ca_bundle": str(self.pki.ca_cert),
        }
        doc.update(overrides)
        return doc

    def config(self, mailbox: str, **overrides: Any) -> MeshConfig:
        return MeshConfig.from_mapping(self.settings(mailbox, **overrides))

    def connector(self, mailbox: str, *, sleep: Any = None, **overrides: Any) -> MeshConnector:
        """A connector for ``mailbox``; back-off waits are skipped unless ``sleep`` is given."""
        return MeshConnector(self.config(mailbox, **overrides), sleep=sleep or (lambda _s: None))


@pytest.fixture(scope="session")
def mesh_peer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeshPeer]:
    if not MAILBOXES.exists():
        pytest.skip(f"the MESH sandbox mailboxes are not at {MAILBOXES}")
    root = tmp_path_factory.mktemp("mesh-peer")
    pki = make_throwaway_pki(root / "pki", client_name=SCHOOL_SIDE)
    rogue = make_throwaway_pki(root / "rogue-pki", ca_name="some other CA", client_name=SCHOOL_SIDE)
    with MeshSandbox(mailboxes=MAILBOXES, workflows=WORKFLOWS, shared_key=SHARED_KEY, tls=SandboxTls.mutual(pki),
                     data_dir=root / "data", log_path=root / "mesh-sandbox.log") as sandbox:
        yield MeshPeer(sandbox, pki, rogue)


@pytest.fixture()
def mesh(mesh_peer: MeshPeer) -> MeshPeer:
    """The session's sandbox with every mailbox emptied."""
    mesh_peer.sandbox.reset()
    return mesh_peer


def sandbox_log(peer: MeshPeer) -> str:
    return Path(peer.sandbox.log_path).read_text(encoding="utf-8", errors="replace")
