"""The executions index in a local SQLite database: its rows and its tracking position.

The index lives beside the log (``x.db.readmodels`` for ``sqlite:///x.db``; an in-memory
SQLite database for ``memory://``) and is derived data: it can always be dropped and rebuilt
from the log. A *tracking* row holds the log position the rows reflect. Each batch of events
is folded into the rows and the tracking position is advanced **in the same transaction**,
after checking that the position is still the one the batch was read after: a batch is
applied exactly once even when several processes (workers, a CLI) follow the same log into
the same file, and a process killed mid-batch leaves nothing of that batch behind.

:class:`~stepsource.engine.readmodels.ReadModels` follows the log into it (PostgreSQL keeps
the same rows in its own database instead: :mod:`.readmodel_store`).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import orjson

from stepsource.aggregates import events as ev
from stepsource.engine import index_tally
from stepsource.engine.faults import kill_point
from stepsource.errors import BackendUnavailableError
from stepsource.projections.executions_index import (
    COLUMNS,
    INDEX_VERSION,
    STATUSES,
    IndexedExecution,
    IndexFilter,
    fold,
    from_row,
    to_row,
)
from stepsource.projections.summaries import (
    ExecutionSummary,
    Touched,
    Unreadable,
)

__all__ = ["NAME", "SCHEMA_VERSION", "ExecutionsIndex"]

T = TypeVar("T")

#: bumped when the rows change shape: an index of another version is dropped and rebuilt
SCHEMA_VERSION = INDEX_VERSION
NAME = "executions"
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS tracking (
        name TEXT PRIMARY KEY,
        position INTEGER NOT NULL)""",
    f"""CREATE TABLE IF NOT EXISTS executions (
        execution_id TEXT PRIMARY KEY,
        position INTEGER NOT NULL UNIQUE,
        step_id TEXT NOT NULL,
        step_version TEXT NOT NULL,
        flow_id TEXT,
        parent_execution_id TEXT,
        correlation_id TEXT,
        priority INTEGER NOT NULL,
        status TEXT NOT NULL CHECK (status IN {STATUSES!r}),
        attempt INTEGER NOT NULL,
        worker_id TEXT,
        created_at INTEGER NOT NULL,
        started_at INTEGER,
        updated_at INTEGER NOT NULL,
        completed_at INTEGER,
        last_error TEXT,
        version INTEGER NOT NULL,
        events INTEGER NOT NULL,
        key TEXT)""",
    "CREATE INDEX IF NOT EXISTS executions_by_status ON executions (status, position)",
    "CREATE INDEX IF NOT EXISTS executions_by_step ON executions (step_id, position)",
    "CREATE INDEX IF NOT EXISTS executions_by_flow ON executions (flow_id, position)",
    "CREATE INDEX IF NOT EXISTS executions_by_created ON executions (created_at)",
    "CREATE INDEX IF NOT EXISTS executions_by_key ON executions (key, position)",
    "CREATE INDEX IF NOT EXISTS executions_by_parent ON executions (parent_execution_id)",
    "CREATE INDEX IF NOT EXISTS executions_by_end ON executions (status, completed_at)",
)
_DROP = (
    "DROP TABLE IF EXISTS executions",
    "DROP TABLE IF EXISTS tracking",
    "DROP TABLE IF EXISTS meta",
)
_SELECT = f"SELECT {', '.join(COLUMNS)} FROM executions"
_INSERT = (
    f"INSERT OR REPLACE INTO executions ({', '.join(COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in COLUMNS)})"
)
# the executions a batch touches, as one JSON array parameter: one statement whatever their
# number (an IN list of N marks is a statement per N, and SQLite's statement cache keeps up to
# 128 of them per connection, several MB resident in a worker)
_SELECT_IDS = f"{_SELECT} WHERE execution_id IN (SELECT value FROM json_each(?))"


class ExecutionsIndex:
    """The executions table and its tracking position in one SQLite database.

    Every method is synchronous and runs in a worker thread (``ReadModels`` calls them with
    ``anyio.to_thread``); one connection per object, guarded by a lock.
    """

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.redact_errors = False
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        #: the stream id of the log's first event, once checked against the index's record
        self.checked_origin = False

    def __repr__(self) -> str:
        return f"ExecutionsIndex({self.path or ':memory:'!r})"

    # -- connection ------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        try:
            if self.path is None:
                conn = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
            else:
                conn = sqlite3.connect(
                    self.path, timeout=30.0, isolation_level=None, check_same_thread=False
                )
                conn.execute("PRAGMA busy_timeout = 30000")
                conn.execute("PRAGMA journal_mode = WAL")
                # derived data: a commit lost on power loss is lost with its tracking position
                # and simply folded again
                conn.execute("PRAGMA synchronous = NORMAL")
                conn.execute("PRAGMA cache_size = -256")  # KiB: a worker keeps it resident
            self._ensure_schema(conn)
        except sqlite3.Error as exc:
            raise self._unavailable(exc) from None
        return conn

    def _unavailable(self, exc: sqlite3.Error) -> BackendUnavailableError:
        return BackendUnavailableError(
            f"the read-model database {self.path or ':memory:'} cannot be used: {exc}",
            hint="It is derived data: delete the file and it is rebuilt from the log "
            "(`stepsource projections rebuild`)",
        )

    @staticmethod
    def _ensure_schema(conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            found = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
            ).fetchone()
            version = None
            if found:
                row = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
                version = None if row is None else row[0]
            if version != str(SCHEMA_VERSION):
                for sql in _DROP:
                    conn.execute(sql)
            for sql in _SCHEMA:
                conn.execute(sql)
            conn.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema', ?)",
                (str(SCHEMA_VERSION),),
            )
            conn.execute("INSERT OR IGNORE INTO tracking (name, position) VALUES (?, 0)", (NAME,))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _run(self, body: Callable[[sqlite3.Connection], T]) -> T:
        with self._lock:
            if self._conn is None:
                self._conn = self._connect()
            try:
                return body(self._conn)
            except sqlite3.Error as exc:
                raise self._unavailable(exc) from None

    def close(self) -> None:
        """Close the connection of a file index (an in-memory one lives as long as this)."""
        with self._lock:
            if self._conn is not None and self.path is not None:
                self._conn.close()
                self._conn = None
                self.checked_origin = False

    # -- tracking --------------------------------------------------------------------------
    def position(self) -> int:
        def query(conn: sqlite3.Connection) -> int:
            row = conn.execute("SELECT position FROM tracking WHERE name = ?", (NAME,)).fetchone()
            return 0 if row is None else int(row[0])

        return self._run(query)

    def origin(self) -> str | None:
        """The stream id of the first event of the log this index was built from."""

        def query(conn: sqlite3.Connection) -> str | None:
            row = conn.execute("SELECT value FROM meta WHERE key = 'origin'").fetchone()
            return None if row is None else str(row[0])

        return self._run(query)

    def reset(self) -> None:
        """Drop every row and start again from position 0 (one transaction)."""

        def body(conn: sqlite3.Connection) -> None:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute("DELETE FROM executions")
                conn.execute("DELETE FROM meta WHERE key = 'origin'")
                conn.execute("UPDATE tracking SET position = 0 WHERE name = ?", (NAME,))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

        self._run(body)
        self.checked_origin = False

    def apply(
        self,
        after: int,
        batch: Sequence[tuple[int, ev.ExecutionEvent | Touched | Unreadable]],
        origin: str | None,
    ) -> bool:
        """Fold a batch read after position ``after`` and advance the tracking position to
        its last event's, in one transaction; False (nothing written) if the index is no
        longer at ``after`` (another process applied it first)."""
        if not batch:
            return True
        last = batch[-1][0]
        ids = sorted({str(event.originator_id) for _, event in batch})

        def body(conn: sqlite3.Connection) -> bool:
            conn.execute("BEGIN IMMEDIATE")
            try:
                row = conn.execute(
                    "SELECT position FROM tracking WHERE name = ?", (NAME,)
                ).fetchone()
                if row is None or int(row[0]) != after:
                    conn.execute("ROLLBACK")
                    return False
                current: dict[str, IndexedExecution] = {}
                for found in conn.execute(_SELECT_IDS, (orjson.dumps(ids).decode(),)):
                    item = from_row(found)
                    current[item.summary.execution_id] = item
                changed = fold(current, batch)
                conn.executemany(
                    _INSERT,
                    [
                        to_row(changed[eid], redact_errors=self.redact_errors)
                        for eid in sorted(changed)
                    ],
                )
                if after == 0 and origin is not None:
                    conn.execute(
                        "INSERT OR REPLACE INTO meta (key, value) VALUES ('origin', ?)", (origin,)
                    )
                conn.execute("UPDATE tracking SET position = ? WHERE name = ?", (last, NAME))
                kill_point("readmodel-batch")  # tests: a SIGKILL here must leave nothing
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            return True

        return self._run(body)

    # -- queries ---------------------------------------------------------------------------
    def query(
        self, where: IndexFilter, *, limit: int, offset: int, cursor: str | None
    ) -> list[ExecutionSummary] | None:
        """Matching rows, newest (latest scheduled in the log) first; None for an unknown
        cursor."""
        equals, at_least = where.equals(), where.at_least()
        params: list[Any] = [*equals.values(), *at_least.values()]
        conditions = [f"{column} = ?" for column in equals]
        conditions += [f"{column} >= ?" for column in at_least]

        def body(conn: sqlite3.Connection) -> list[ExecutionSummary] | None:
            clauses, values = list(conditions), list(params)
            if cursor is not None:
                row = conn.execute(
                    "SELECT position FROM executions WHERE execution_id = ?", (cursor,)
                ).fetchone()
                if row is None:
                    return None
                clauses.append("position < ?")
                values.append(int(row[0]))
            sql = _SELECT
            if clauses:
                sql += " WHERE " + " AND ".join(clauses)
            sql += " ORDER BY position DESC LIMIT ? OFFSET ?"
            values.extend((limit, offset))
            return [from_row(found).summary for found in conn.execute(sql, values)]

        return self._run(body)

    def replace(self, summary: ExecutionSummary) -> None:
        """Write one execution's row again (a released quarantine), keeping its position."""

        def body(conn: sqlite3.Connection) -> None:
            found = conn.execute(
                f"{_SELECT} WHERE execution_id = ?", (summary.execution_id,)
            ).fetchone()
            if found is not None:
                row = IndexedExecution(from_row(found).position, summary)
                conn.execute(_INSERT, to_row(row, redact_errors=self.redact_errors))

        self._run(body)

    def tally(
        self,
        equals: Mapping[str, Any],
        at_least: Mapping[str, Any],
        by: str,
        bucket: tuple[int, int, int] | None = None,
    ) -> dict[Any, int]:
        """Rows per value (or bucket) of a column, counted by SQLite (``ReadModelStore.tally``)."""
        return self._run(lambda conn: index_tally.tally(conn, equals, at_least, by, bucket))

    def bounds(
        self, equals: Mapping[str, Any], at_least: Mapping[str, Any], column: str
    ) -> tuple[Any, Any] | None:
        return self._run(lambda conn: index_tally.bounds(conn, equals, at_least, column))

    def count(self) -> int:
        return self._run(
            lambda conn: int(conn.execute("SELECT count(*) FROM executions").fetchone()[0])
        )

    def dump(self) -> list[tuple[Any, ...]]:
        """Every row in storage form, oldest first (tests compare indexes with it)."""
        return self._run(
            lambda conn: [tuple(r) for r in conn.execute(f"{_SELECT} ORDER BY position")]
        )
