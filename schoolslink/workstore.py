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
    root = work_dir().resolve()
    p = (root / key).resolve()
    if not p.is_relative_to(root):
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
