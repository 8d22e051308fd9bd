"""`schoolslink mis check FILE...`: read MIS exports as the pipeline would, send nothing, say what happened.

CTF XML through the hardened CTF reader (connectors/mis/ctf.py); anything else as a CSV export through
connectors/mis/csv.py, which recognises its layout from the header row among the column maps with a `layout:`
block (mappings/mis-in/), e.g. format "csv:census". The JSON shape is DESIGN.md's CLI contract. Reasons name
positions and fields, never pupil values. The school is not known here, so a CSV layout without a URN column
gives learners no school URN; only the pipeline knows the landing folder's school.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from connectors.mis.csv import CsvReader
from connectors.mis.ctf import CtfReader
from connectors.mis.errors import CsvRefused, MisInputError


def check_file(path: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"path": str(path), "status": "accepted", "reason": None, "format": None,
                           "version": None, "pupils": 0, "quarantined": []}
    try:
        with path.open("rb") as f:
            head = f.read(512).lstrip()
    except OSError as exc:
        return {**out, "status": "rejected", "reason": f"cannot read the file: {exc.strerror}"}
    if head.startswith(b"<") or path.suffix.lower() == ".xml":
        out["format"] = "ctf"
        try:
            result = CtfReader().read(path)
        except MisInputError as exc:
            return {**out, "status": "rejected", "reason": str(exc)}
        out["version"] = result.header.version
        out["pupils"] = len(result.learners)
        out["quarantined"] = [{"record": q.record, "reason": q.reason} for q in result.quarantined]
        return out
    return _check_csv(path, out)


def _check_csv(path: Path, out: dict[str, Any]) -> dict[str, Any]:
    out["format"] = "csv"
    try:
        export = CsvReader().read(path)
    except CsvRefused as exc:
        return {**out, "status": "rejected", "reason": exc.reason, "format": exc.format}
    except MisInputError as exc:
        return {**out, "status": "rejected", "reason": str(exc)}
    except OSError as exc:
        return {**out, "status": "rejected", "reason": f"cannot read the file: {exc.strerror}"}
    out["format"] = export.format
    out["version"] = export.version
    out["pupils"] = len(export.learners)
    out["quarantined"] = [{"record": q.record, "reason": q.reason} for q in export.quarantined]
    return out
