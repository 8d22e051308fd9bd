"""school_feeds stages: which schools get a feed tonight, and building them chunk by chunk."""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

from sqlalchemy import select

from schoolslink.feeds import build_school_feeds
from schoolslink.governance.agreement import load_agreements
from schoolslink.pipeline.common import chunked, store
from schoolslink.store.schema import learners


def plan(max_chunks: int) -> list[dict[str, Any]]:
    """Every school on a roll that an agreement covers."""
    agreements = load_agreements()
    with store().connect() as conn:
        urns = [r[0] for r in conn.execute(select(learners.c.school_urn).distinct())]
    urns = sorted(u for u in urns if any(a.covers_school(u) for a in agreements))
    return [{"chunk": i, "schools": part} for i, part in enumerate(chunked(urns, max_chunks))]


def build(run_id: str, chunk: dict[str, Any], feed_date: date, at: datetime) -> dict[str, Any]:
    c = build_school_feeds(run_id, chunk["schools"], feed_date, at)
    return {"chunk": chunk["chunk"], "feeds_written": c.schools, "feed_rows": c.rows,
            "feed_refused_by_consent": c.refused_by_consent, "feed_no_agreement": c.no_agreement,
            "feed_corrections": c.corrections}
