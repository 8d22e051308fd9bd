"""TLS verification for every connection to a trust: always on; a private CA is given, never a switch-off."""

from __future__ import annotations

import os
import ssl
from pathlib import Path

__all__ = ["tls_verify"]


def tls_verify(verify: object) -> bool | ssl.SSLContext:
    """Turn ``verify`` into what httpx takes: True (the system's CAs), a CA bundle file or folder (as an
    SSLContext; httpx 0.28 deprecates ``verify=<str>``), or an SSLContext that checks certificates and
    host names. Anything that would switch verification off raises ValueError."""
    if verify is True:
        return True
    if verify is False or verify is None:
        raise ValueError("TLS verification cannot be turned off: pass True or a CA bundle path / ssl.SSLContext")
    if isinstance(verify, ssl.SSLContext):
        if verify.verify_mode == ssl.CERT_NONE or not verify.check_hostname:
            raise ValueError("the ssl.SSLContext passed as verify does not verify certificates and host names")
        return verify
    if isinstance(verify, str | os.PathLike):
        path = Path(verify)
        if path.is_dir():
            return ssl.create_default_context(capath=str(path))
        if path.is_file():
            return ssl.create_default_context(cafile=str(path))
        raise ValueError(f"CA bundle {path} does not exist")
    raise ValueError("verify must be True, a CA bundle path or an ssl.SSLContext")
