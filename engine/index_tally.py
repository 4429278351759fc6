"""Counting rows of the local SQLite executions index in the database: ``tally`` (rows per
value of a column, or per bucket of an integer column) and ``bounds`` (a column's lowest and
highest value), with the meaning of the :class:`~stepsource.adapters.ports.ReadModelStore`
methods of those names.

Written for SQLite's planner: a count per value walks an index in order (no temporary
B-tree), buckets are counted as ranges of an index (one statement, a sub-select each) rather
than grouped by a computed expression (which SQLite sorts), and ``min``/``max`` are
separate statements so each is one seek in an index.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from typing import Any

from stepsource.projections.executions_index import COLUMNS

__all__ = ["bounds", "tally"]


def _where(
    equals: Mapping[str, Any], at_least: Mapping[str, Any], *also: str
) -> tuple[list[str], list[Any]]:
    for column in (*also, *equals, *at_least):
        if column not in COLUMNS:  # the engine names columns: never user text in the SQL
            raise ValueError(f"no column {column!r} in the executions index")
    clauses = [f"{column} = ?" for column in equals]
    clauses += [f"{column} >= ?" for column in at_least]
    return clauses, [*equals.values(), *at_least.values()]


def tally(
    conn: sqlite3.Connection,
    equals: Mapping[str, Any],
    at_least: Mapping[str, Any],
    by: str,
    bucket: tuple[int, int, int] | None = None,
) -> dict[Any, int]:
    """Matching rows per value of ``by`` (nulls left out), or with ``bucket=(start, width,
    count)`` per bucket ``min((value - start) // width, count - 1)`` of the values >= start."""
    clauses, values = _where(equals, at_least, by)
    if bucket is None:
        where = " AND ".join([f"{by} IS NOT NULL", *clauses])
        sql = f"SELECT {by}, count(*) FROM executions WHERE {where} GROUP BY {by}"
        return {value: int(n) for value, n in conn.execute(sql, values)}
    start, width, count = bucket
    parts: list[str] = []
    params: list[Any] = []
    for number in range(count):
        low = start + number * width
        ranged = [*clauses, f"{by} >= ?"] + ([f"{by} < ?"] if number < count - 1 else [])
        parts.append(f"(SELECT count(*) FROM executions WHERE {' AND '.join(ranged)})")
        params += [*values, low] + ([low + width] if number < count - 1 else [])
    row = conn.execute(f"SELECT {', '.join(parts)}", params).fetchone()
    return {number: int(n) for number, n in enumerate(row) if n}


def bounds(
    conn: sqlite3.Connection, equals: Mapping[str, Any], at_least: Mapping[str, Any], column: str
) -> tuple[Any, Any] | None:
    """The lowest and highest non-null value of ``column`` among the matching rows."""
    clauses, values = _where(equals, at_least, column)
    where = " WHERE " + " AND ".join(clauses) if clauses else ""
    low = conn.execute(f"SELECT min({column}) FROM executions{where}", values).fetchone()[0]
    if low is None:
        return None
    high = conn.execute(f"SELECT max({column}) FROM executions{where}", values).fetchone()[0]
    return low, high
