"""Queries over many keys, in chunks that stay under every backend's bound-parameter limit."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

from sqlalchemy import Connection, Table, select

T = TypeVar("T")
CHUNK = 900  # below SQLite's historical 999-parameter limit


def chunks(values: Sequence[T], n: int = CHUNK) -> Iterator[Sequence[T]]:
    for i in range(0, len(values), n):
        yield values[i : i + n]


def rows_by(conn: Connection, table: Table, col: str, values: Sequence[Any]) -> dict[Any, list[dict[str, Any]]]:
    """Every row of `table` whose `col` is one of `values`, grouped by that value."""
    out: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for part in chunks(sorted(set(values))):
        for r in conn.execute(select(table).where(table.c[col].in_(part))).mappings():
            out[r[col]].append(dict(r))
    return out
