"""`schoolslink mis check FILE...`: read MIS exports as the pipeline would, send nothing, say what happened.

Every format the pipeline reads, through the same readers (connectors/mis/read.py): CTF XML through the
hardened CTF reader; a landed Wonde pull (JSON); anything else as a CSV export, whose layout is recognised
from the header row among the column maps with a `layout:` block (mappings/mis-in/), e.g. "csv:census".
A sealed file from the landing zone (e.g. one moved aside to `landing/refused/`) is read through its
decrypting stream, with the seal key of this installation. The JSON shape is DESIGN.md's CLI contract.
Reasons name positions and fields, never pupil values. The school is not known here, so a CSV layout
without a URN column gives learners no school URN; only the pipeline knows the landing folder's school.
"""

from __future__ import annotations

from pathlib import Path
from typing import IO, Any

from connectors.mis.errors import CsvRefused, MisInputError
from connectors.mis.read import read_export, sniff
from connectors.storage.sealed import SealedFileError, is_sealed, open_sealed

_FORMAT_OF_SNIFF = {"ctf": "ctf", "wonde": "wonde", "csv": "csv"}


def check_file(path: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"path": str(path), "status": "accepted", "reason": None, "format": None,
                           "version": None, "pupils": 0, "quarantined": []}
    name = path.name.removesuffix(".sealed")
    try:
        f: IO[bytes] = open_sealed(path) if is_sealed(path) else path.open("rb")
    except OSError as exc:
        return {**out, "status": "rejected", "reason": f"cannot read the file: {exc.strerror}"}
    except SealedFileError as exc:
        return {**out, "status": "rejected", "reason": str(exc)}
    with f:
        try:
            head = f.read(512)
            out["format"] = _FORMAT_OF_SNIFF[sniff(head, name)]
            if out["format"] == "csv" and name.lower().endswith(".xml"):
                out["format"] = "ctf"
            export = read_export(f, name=name)
        except CsvRefused as exc:
            return {**out, "status": "rejected", "reason": exc.reason, "format": exc.format}
        except (MisInputError, SealedFileError) as exc:
            return {**out, "status": "rejected", "reason": str(exc)}
        except OSError as exc:
            return {**out, "status": "rejected", "reason": f"cannot read the file: {exc.strerror}"}
    out["format"] = export.format
    out["version"] = export.version
    out["pupils"] = len(export.learners)
    out["quarantined"] = [{"record": q.record, "reason": q.reason} for q in export.quarantined]
    return out
