"""The work store: files a run's tasks hand each other by storage key, never through XCom.

Keys are relative paths under `SCHOOLSLINK_HOME/work/`; a task returns keys and counts only. The files
carry pupil data for the length of a run, so they are sealed (AES-256-GCM, connectors/storage/sealed.py)
like the landing zone: nothing a task hands another rests on disk in plain.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from connectors.storage.sealed import SealWriter, open_text_sealed
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
    w = SealWriter(p, {"kind": "work"})
    n = 0
    buf: list[str] = []
    try:
        for row in rows:
            buf.append(json.dumps(row, default=str, separators=(",", ":")))
            n += 1
            if len(buf) >= 512:
                w.write(("\n".join(buf) + "\n").encode())
                buf.clear()
        if buf:
            w.write(("\n".join(buf) + "\n").encode())
    except BaseException:
        w.abort()
        raise
    w.close()
    return n


def read_jsonl(key: str) -> Iterator[dict[str, Any]]:
    p = path_for(key)
    if not p.exists():
        return
    with open_text_sealed(p) as f:
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
