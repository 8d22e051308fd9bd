"""Run records: what each DAG run read, refused, quarantined and delivered (counts and reasons only).

`finish`, which every DAG's last task calls, also makes the run's ledger checkpoint (schoolslink.ledger.checkpoint):
the Merkle tree head over the whole ledger, in the database and in the external checkpoint store.
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime
from typing import Any

from sqlalchemy import func, select

from schoolslink import ledger
from schoolslink.pipeline.common import store
from schoolslink.store.schema import quarantine, runs
from schoolslink.store.upsert import upsert


def finish(run_id: str, dag_id: str, started: datetime, finished: datetime, summary: dict[str, Any]) -> dict[str, Any]:
    eng = store()
    with eng.begin() as conn:
        reasons: Counter[str] = Counter()
        for reason, n in conn.execute(
            select(quarantine.c.reason, func.count()).where(quarantine.c.run_id == run_id).group_by(quarantine.c.reason)
        ):
            reasons[_generalise(reason)] += n
        summary = {**summary, "quarantine_reasons": dict(reasons.most_common(20))}
        upsert(conn, runs, [{"run_id": run_id, "dag_id": dag_id, "started_at": started,
                             "finished_at": finished, "summary": summary}], ["run_id"])
    checkpoint(run_id)
    return summary


def checkpoint(run_id: str) -> ledger.Checkpoint:
    """The run's ledger checkpoint, in its own transaction after the run record (so a checkpoint store that is
    down fails the task, to be retried, without losing the run record; a retry makes no second checkpoint)."""
    with store().begin() as conn:
        return ledger.checkpoint(conn, run_id)


def _generalise(reason: str) -> str:
    """Group reasons that differ only by position numbers."""
    import re

    return re.sub(r"#\d+", "#N", re.sub(r"\(pupils? #[\d, #and]+\)", "", reason)).strip()


def latest(dag_id: str) -> dict[str, Any] | None:
    eng = store()
    with eng.connect() as conn:
        row = conn.execute(
            select(runs).where(runs.c.dag_id == dag_id).order_by(runs.c.finished_at.desc()).limit(1)
        ).mappings().first()
    return dict(row) if row else None


def merge_counts(parts: list[dict[str, Any]]) -> dict[str, int]:
    total: Counter[str] = Counter()
    for p in parts:
        for k, v in p.items():
            if isinstance(v, bool) or not isinstance(v, int) or k == "chunk":
                continue
            total[k] += v
    return dict(total)
