"""Counting rows of the local SQLite executions index in the database: the SQL of
``tally`` (rows per value, or per bucket of an integer column) and ``bounds`` (a column's
lowest and highest value), with the same meaning as the
:class:`~stepsource.adapters.ports.ReadModelStore` methods of those names."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from stepsource.projections.executions_index import COLUMNS

__all__ = ["bounds_query", "tally_query"]


def _where(
    equals: Mapping[str, Any], at_least: Mapping[str, Any], not_null: str
) -> tuple[str, list[Any]]:
    for column in (not_null, *equals, *at_least):
        if column not in COLUMNS:  # the engine names columns: never user text in the SQL
            raise ValueError(f"no column {column!r} in the executions index")
    clauses = [f"{not_null} IS NOT NULL"]
    clauses += [f"{column} = ?" for column in equals]
    clauses += [f"{column} >= ?" for column in at_least]
    return " WHERE " + " AND ".join(clauses), [*equals.values(), *at_least.values()]


def tally_query(
    equals: Mapping[str, Any],
    at_least: Mapping[str, Any],
    by: str,
    bucket: tuple[int, int] | None = None,
) -> tuple[str, list[Any]]:
    """``SELECT value, count`` grouped by the column ``by`` (or its bucket number)."""
    where, values = _where(equals, at_least, by)
    group = by
    if bucket is not None:
        group = f"({by} - ?) / ?"  # integer division: the bucket's number
        values = [*bucket, *values]
    return f"SELECT {group} AS g, count(*) FROM executions{where} GROUP BY g", values


def bounds_query(
    equals: Mapping[str, Any], at_least: Mapping[str, Any], column: str
) -> tuple[str, list[Any]]:
    """``SELECT min, max`` of the column among the matching rows."""
    where, values = _where(equals, at_least, column)
    return f"SELECT min({column}), max({column}) FROM executions{where}", values
