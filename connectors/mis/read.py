"""One entry point for every MIS export format: sniff what a file is and read it with the right reader.

CTF XML (connectors.mis.ctf), a CSV layout described by a column-map mapping (connectors.mis.csv), or a
landed Wonde pull (connectors.mis.wonde). The source is a path or an open, seekable binary stream (a sealed
file from the landing zone). Raises connectors.mis.errors.FileRefused for a file that must not be used.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO

from connectors.mis.base import MisExport
from connectors.mis.errors import FileRefused


def sniff(head: bytes, name: str = "") -> str:
    """'ctf', 'wonde' or 'csv', from the first bytes (and, only to break a tie, the name)."""
    h = head.lstrip(b"\xef\xbb\xbf").lstrip()
    if h.startswith(b"<") or h.startswith(b"\xff\xfe") or h.startswith(b"\xfe\xff"):
        return "ctf"
    if h.startswith(b"{"):
        return "wonde"
    if name.lower().endswith(".xml"):
        return "ctf"  # the CTF reader says what is wrong with it (empty, not XML) better than a CSV reader
    return "csv"


def read_export(source: str | os.PathLike[str] | IO[bytes], *, school_urn: str | None = None,
                name: str = "") -> MisExport:
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        with path.open("rb") as f:
            return read_export(f, school_urn=school_urn, name=name or path.name)
    source.seek(0)
    kind = sniff(source.read(512), name)
    source.seek(0)
    if kind == "ctf":
        from connectors.mis.ctf import CtfReader

        return CtfReader().read_export(source)
    if kind == "wonde":
        from connectors.mis.wonde import read_wonde

        return read_wonde(source)
    from connectors.mis.csv import CsvReader

    return CsvReader().read(source, school_urn=school_urn)


__all__ = ["FileRefused", "read_export", "sniff"]
