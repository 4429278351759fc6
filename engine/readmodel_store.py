"""The executions index kept by the backend in its own database (PostgreSQL).

:class:`StoredExecutionsIndex` has the surface of the local SQLite
:class:`~stepsource.engine.index_file.ExecutionsIndex` and keeps the rows through the
backend's :class:`~stepsource.adapters.ports.ReadModelStore`: the fold of a batch runs
inside the store's transaction (the rows read, folded and written, and the tracking
position moved, together), so every process following the log applies each batch once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from stepsource.adapters.ports import ReadModelRow, ReadModelStore, ReadModelTable
from stepsource.aggregates import events as ev
from stepsource.engine.faults import kill_point
from stepsource.projections.executions_index import (
    COLUMNS,
    INDEX_VERSION,
    IndexedExecution,
    IndexFilter,
    fold,
    from_row,
    to_row,
)
from stepsource.projections.summaries import ExecutionSummary, Touched, Unreadable

__all__ = ["EXECUTIONS_TABLE", "StoredExecutionsIndex"]

_KINDS = {
    "position": "int",
    "priority": "int",
    "attempt": "int",
    "created_at": "int",
    "started_at": "int?",
    "updated_at": "int",
    "completed_at": "int?",
    "version": "int",
    "events": "int",
    "flow_id": "text?",
    "parent_execution_id": "text?",
    "correlation_id": "text?",
    "worker_id": "text?",
    "last_error": "text?",
    "key": "text?",
}

#: the executions index as a table of the backend's database (the same version as the
#: SQLite index's: rows of another shape are dropped and folded again)
EXECUTIONS_TABLE = ReadModelTable(
    name="executions",
    version=INDEX_VERSION,
    columns=tuple((column, _KINDS.get(column, "text")) for column in COLUMNS),
    order="position",
    indexes=(
        ("status", "position"),
        ("step_id", "position"),
        ("flow_id", "position"),
        ("created_at",),
        ("key", "position"),
        ("parent_execution_id",),
        ("status", "completed_at"),
    ),
)


class StoredExecutionsIndex:
    """The executions index in a backend's :class:`ReadModelStore` (synchronous, like the
    SQLite one: ``ReadModels`` calls it from worker threads)."""

    def __init__(self, store: ReadModelStore) -> None:
        self.store = store
        self.path: str | None = store.where
        self.redact_errors = False
        self.checked_origin = False

    def __repr__(self) -> str:
        return f"ExecutionsIndex({self.store.where!r})"

    def close(self) -> None:
        self.store.close()
        self.checked_origin = False

    def position(self) -> int:
        return self.store.position()

    def origin(self) -> str | None:
        return self.store.origin()

    def reset(self) -> None:
        self.store.reset()
        self.checked_origin = False

    def apply(
        self,
        after: int,
        batch: Sequence[tuple[int, ev.ExecutionEvent | Touched | Unreadable]],
        origin: str | None,
    ) -> bool:
        """Fold a batch read after position ``after`` in one transaction of the store; False
        if another process applied it first."""
        if not batch:
            return True
        ids = sorted({str(event.originator_id) for _, event in batch})

        def fold_rows(rows: list[ReadModelRow]) -> list[ReadModelRow]:
            current = {item.summary.execution_id: item for item in map(from_row, rows)}
            changed = fold(current, batch)
            return [
                to_row(changed[eid], redact_errors=self.redact_errors) for eid in sorted(changed)
            ]

        def before_commit() -> None:
            kill_point("readmodel-batch")  # tests: a SIGKILL here must leave nothing

        return self.store.apply(
            after, batch[-1][0], ids, fold_rows, origin if after == 0 else None, before_commit
        )

    def query(
        self, where: IndexFilter, *, limit: int, offset: int, cursor: str | None
    ) -> list[ExecutionSummary] | None:
        rows = self.store.select(where.equals(), where.at_least(), cursor, limit, offset)
        return None if rows is None else [from_row(row).summary for row in rows]

    def replace(self, summary: ExecutionSummary) -> None:
        def update(row: ReadModelRow) -> ReadModelRow:
            item = IndexedExecution(from_row(row).position, summary)
            return to_row(item, redact_errors=self.redact_errors)

        self.store.replace(summary.execution_id, update)

    def tally(
        self,
        equals: Mapping[str, Any],
        at_least: Mapping[str, Any],
        by: str,
        bucket: tuple[int, int, int] | None = None,
    ) -> dict[Any, int]:
        return self.store.tally(equals, at_least, by, bucket)

    def bounds(
        self, equals: Mapping[str, Any], at_least: Mapping[str, Any], column: str
    ) -> tuple[Any, Any] | None:
        return self.store.bounds(equals, at_least, column)

    def count(self) -> int:
        return self.store.count()

    def dump(self) -> list[tuple[Any, ...]]:
        return self.store.dump()
