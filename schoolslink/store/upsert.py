"""Dialect-aware bulk upsert (INSERT ... ON CONFLICT DO UPDATE) for SQLite and PostgreSQL.

One statement compiled once and executed over the rows (SQLAlchemy batches them with its
"insertmanyvalues" mode), so cost stays linear in rows rather than in bound parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, Table
from sqlalchemy.dialects import postgresql, sqlite


def upsert(
    conn: Connection,
    table: Table,
    rows: Sequence[dict[str, Any]],
    keys: Sequence[str],
    batch: int = 5000,
    *,
    update: bool = True,
) -> int:
    """Insert rows; on a key conflict update the other columns (or, with update=False, keep what is there)."""
    if not rows:
        return 0
    ins_mod: Any = postgresql if conn.dialect.name == "postgresql" else sqlite
    cols = list(rows[0])
    stmt = ins_mod.insert(table)
    update_cols = {c: stmt.excluded[c] for c in cols if c not in keys} if update else {}
    if update_cols:
        stmt = stmt.on_conflict_do_update(index_elements=list(keys), set_=update_cols)
    else:
        stmt = stmt.on_conflict_do_nothing(index_elements=list(keys))
    for i in range(0, len(rows), batch):
        conn.execute(stmt, list(rows[i : i + batch]))
    return len(rows)
