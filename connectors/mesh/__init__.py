"""MESH (NHS Message Exchange for Social care and Health): the connector and its test peer.

`client` wraps mesh_client with our errors, retries and TLS rules; `sandbox` starts NHS England's mesh-sandbox
on 127.0.0.1 for tests and the demo. See docs/mesh.md.
"""

from connectors.mesh.client import (
    WORKFLOW_CONTEXT,
    WORKFLOW_CONTEXT_ACK,
    MeshConfig,
    MeshConnector,
    ReceivedMessage,
    TrackingInfo,
)
from connectors.mesh.errors import MeshAuthError, MeshError, MeshPermanentError, MeshTransientError

__all__ = [
    "WORKFLOW_CONTEXT",
    "WORKFLOW_CONTEXT_ACK",
    "MeshAuthError",
    "MeshConfig",
    "MeshConnector",
    "MeshError",
    "MeshPermanentError",
    "MeshTransientError",
    "ReceivedMessage",
    "TrackingInfo",
]
