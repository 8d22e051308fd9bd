"""The work store: files a run's tasks hand each other by storage key, never through XCom.

Keys are relative paths under `SCHOOLSLINK_HOME/work/`; a task returns keys and counts only.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from schoolslink.settings import work_dir


def run_slug(run_id: str) -> str:
    """A filesystem-safe form of an Airflow run id."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", run_id).strip("_")[:120]


def path_for(key: str) -> Path:
    p = (work_dir() / key).resolve()
    if not str(p).startswith(str(work_dir().resolve())):
        raise ValueError("storage key escapes the work store")
    return p


def write_jsonl(key: str, rows: Iterable[dict[str, Any]]) -> int:
    p = path_for(key)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    n = 0
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, default=str, separators=(",", ":")))
            f.write("\n")
            n += 1
    os.replace(tmp, p)
    return n


def read_jsonl(key: str) -> Iterator[dict[str, Any]]:
    p = path_for(key)
    if not p.exists():
        return
    with p.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def write_json(key: str, doc: Any) -> None:
    p = path_for(key)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, default=str, indent=1), encoding="utf-8")
    os.replace(tmp, p)


def read_json(key: str) -> Any:
    return json.loads(path_for(key).read_text(encoding="utf-8"))


def remove(key: str) -> None:
    """Delete a work file (pupil data lives in the work store only for the run that needs it)."""
    path_for(key).unlink(missing_ok=True)


def purge_pupil_files(keep_run: str | None = None) -> int:
    """Remove the pupil-data files (*.jsonl) that earlier runs left behind, e.g. when a run failed."""
    root = work_dir()
    if not root.exists():
        return 0
    n = 0
    for p in root.glob("*/chunk-*/*.jsonl"):
        if keep_run is not None and p.parts[-3] == keep_run:
            continue
        p.unlink(missing_ok=True)
        n += 1
    return n
