"""`schoolslink mis check FILE...`: read MIS exports as the pipeline would, send nothing, say what happened.

CTF XML through the hardened CTF reader; census-style CSV through the `census-csv-learner` column map
and the UPN check letter. Reasons name positions and fields, never pupil values.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from connectors.mis.ctf import CtfReader
from connectors.mis.errors import MisInputError
from schoolslink.identifiers import is_valid_upn
from schoolslink.mapping.engine import MappingError, load_mappings


def check_file(path: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"path": str(path), "status": "accepted", "reason": None, "format": None,
                           "version": None, "pupils": 0, "quarantined": []}
    try:
        head = path.open("rb").read(512).lstrip()
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
    out["format"] = "csv:census"
    return _check_census_csv(path, out)


def _check_census_csv(path: Path, out: dict[str, Any]) -> dict[str, Any]:
    cm = load_mappings().compile("census-csv-learner")
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            needed = {"UPN", "Surname", "Forename", "Sex", "DOB"}
            missing = needed - set(reader.fieldnames or ())
            if missing:
                return {**out, "status": "rejected",
                        "reason": f"not a census-style CSV: no column(s) {', '.join(sorted(missing))}"}
            seen: dict[str, int] = {}
            for n, row in enumerate(reader, start=2):
                where = f"row#{n}"
                try:
                    learner = cm.run(row, record_key=where)
                except MappingError as exc:
                    out["quarantined"].append({"record": where, "reason": exc.reason})
                    continue
                upn = learner["upn"]
                problem = None
                if not is_valid_upn(upn):
                    problem = "UPN check letter is wrong or UPN malformed"
                elif upn in seen:
                    problem = f"duplicate UPN: the same as row#{seen[upn]}"
                if problem:
                    out["quarantined"].append({"record": where, "reason": problem})
                    continue
                seen[upn] = n
                out["pupils"] += 1
    except (UnicodeDecodeError, csv.Error):
        return {**out, "status": "rejected", "reason": "not a readable UTF-8 CSV file"}
    return out
