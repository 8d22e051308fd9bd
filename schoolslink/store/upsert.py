"""Dialect-aware bulk upsert (INSERT ... ON CONFLICT DO UPDATE) for SQLite and PostgreSQL."""

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
    batch: int | None = None,
) -> int:
    if not rows:
        return 0
    dialect = conn.dialect.name
    ins_mod: Any = postgresql if dialect == "postgresql" else sqlite
    cols = list(rows[0])
    # SQLite allows 32,766 bound parameters a statement.
    batch = batch or max(1, 30000 // max(1, len(cols)))
    for i in range(0, len(rows), batch):
        part = rows[i : i + batch]
        stmt = ins_mod.insert(table).values(part)
        update_cols = {c: stmt.excluded[c] for c in cols if c not in keys}
        if update_cols:
            stmt = stmt.on_conflict_do_update(index_elements=list(keys), set_=update_cols)
        else:
            stmt = stmt.on_conflict_do_nothing(index_elements=list(keys))
        conn.execute(stmt)
    return len(rows)
