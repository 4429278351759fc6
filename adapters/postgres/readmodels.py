"""Read models in the PostgreSQL database itself: every process queries the same rows.

Each read model is a table named for it in the backend's schema (``stepsource.executions``
for the executions index) and a row of ``readmodels`` (name, version, position, origin):
its *tracking position*. :meth:`PostgresReadModelStore.apply` locks that row
(``SELECT ... FOR UPDATE``), checks the position is the one the batch was read after, writes
the batch's rows and moves the position, in one transaction: two processes folding the same
batch serialise on the lock and the second finds the position moved and writes nothing; a
process killed mid-batch leaves nothing of it (the server rolls the transaction back).

The store uses one synchronous psycopg connection of its own (the engine calls it from
worker threads, as it does the local SQLite read-model files), so it works whatever the
event loop. A table of another version is dropped and created again: it is derived data,
rebuilt from the log.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import psycopg
from psycopg.conninfo import make_conninfo

from stepsource.adapters.ports import ReadModelRow, ReadModelStore, ReadModelTable
from stepsource.adapters.postgres.options import PostgresOptions
from stepsource.adapters.postgres.schema import SCHEMA_LOCK
from stepsource.errors import StepsourceError

__all__ = ["PostgresReadModelStore"]

T = TypeVar("T")
SyncConn = psycopg.Connection[tuple[Any, ...]]

_KINDS = {"text": 'TEXT COLLATE "C" NOT NULL', "int": "BIGINT NOT NULL"}
_KINDS.update({"text?": 'TEXT COLLATE "C"', "int?": "BIGINT"})


class PostgresReadModelStore(ReadModelStore):
    """One read model's table and tracking row in one PostgreSQL schema."""

    def __init__(
        self,
        options: PostgresOptions,
        table: ReadModelTable,
        translate: Callable[[BaseException, str], StepsourceError],
    ) -> None:
        self.options = options
        self.table = table
        self.where = f"PostgreSQL {options.where()} table {table.name}"
        self._translate = translate
        self._conn: SyncConn | None = None
        self._lock = threading.Lock()
        s, names = options.schema, table.names
        self._name = f"{s}.{table.name}"
        self._key = names[0]
        self._select = f"SELECT {', '.join(names)} FROM {self._name}"
        updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in names[1:])
        self._upsert = (
            f"INSERT INTO {self._name} ({', '.join(names)}) "
            f"VALUES ({', '.join('%s' for _ in names)}) "
            f"ON CONFLICT ({self._key}) DO UPDATE SET {updates}"
        )

    def __repr__(self) -> str:
        return f"PostgresReadModelStore({self.where!r})"

    # -- connection -------------------------------------------------------------------------
    def _connect(self) -> SyncConn:
        conninfo = make_conninfo("", **self.options.connect_kwargs())
        conn = psycopg.Connection.connect(conninfo, autocommit=True)
        try:
            self._ensure_schema(conn)
        except BaseException:
            conn.close()
            raise
        weakref.finalize(self, conn.close)  # a store dropped unclosed closes its connection
        return conn

    def _ensure_schema(self, conn: SyncConn) -> None:
        s, table = self.options.schema, self.table
        columns = ", ".join(f"{name} {_KINDS[kind]}" for name, kind in table.columns)
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            conn.execute(f"CREATE SCHEMA IF NOT EXISTS {s}")
            conn.execute(
                f"""CREATE TABLE IF NOT EXISTS {s}.readmodels (
                    name TEXT COLLATE "C" PRIMARY KEY,
                    version BIGINT NOT NULL,
                    position BIGINT NOT NULL,
                    origin TEXT)"""
            )
            row = conn.execute(
                f"SELECT version FROM {s}.readmodels WHERE name = %s", (table.name,)
            ).fetchone()
            if row is None or row[0] != table.version:
                conn.execute(f"DROP TABLE IF EXISTS {self._name}")
                conn.execute(f"DELETE FROM {s}.readmodels WHERE name = %s", (table.name,))
                conn.execute(
                    f"INSERT INTO {s}.readmodels (name, version, position) VALUES (%s, %s, 0)",
                    (table.name, table.version),
                )
            conn.execute(
                f"CREATE TABLE IF NOT EXISTS {self._name} ({columns}, "
                f"PRIMARY KEY ({self._key}), UNIQUE ({table.order}))"
            )
            for n, index in enumerate(table.indexes):
                conn.execute(
                    f"CREATE INDEX IF NOT EXISTS {table.name}_by_{n} "
                    f"ON {self._name} ({', '.join(index)})"
                )

    def _run(self, body: Callable[[SyncConn], T], what: str) -> T:
        with self._lock:
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = self._connect()
                return body(self._conn)
            except (psycopg.Error, UnicodeEncodeError) as exc:
                if self._conn is not None and (
                    self._conn.closed or isinstance(exc, psycopg.OperationalError)
                ):
                    self._conn.close()
                    self._conn = None
                raise self._translate(exc, f"{what} the read model {self.table.name}") from None

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # -- tracking ---------------------------------------------------------------------------
    def _tracking(self, conn: SyncConn, column: str, *, lock: bool = False) -> Any:
        sql = f"SELECT {column} FROM {self.options.schema}.readmodels WHERE name = %s"
        row = conn.execute(sql + (" FOR UPDATE" if lock else ""), (self.table.name,)).fetchone()
        return None if row is None else row[0]

    def position(self) -> int:
        return self._run(lambda conn: int(self._tracking(conn, "position") or 0), "read")

    def origin(self) -> str | None:
        def query(conn: SyncConn) -> str | None:
            found = self._tracking(conn, "origin")
            return None if found is None else str(found)

        return self._run(query, "read")

    def reset(self) -> None:
        def body(conn: SyncConn) -> None:
            with conn.transaction():
                self._tracking(conn, "position", lock=True)
                conn.execute(f"DELETE FROM {self._name}")
                conn.execute(
                    f"UPDATE {self.options.schema}.readmodels SET position = 0, origin = NULL "
                    "WHERE name = %s",
                    (self.table.name,),
                )

        self._run(body, "reset")

    def apply(
        self,
        after: int,
        last: int,
        keys: Sequence[str],
        fold: Callable[[list[ReadModelRow]], Sequence[ReadModelRow]],
        origin: str | None,
        before_commit: Callable[[], None] | None = None,
    ) -> bool:
        def body(conn: SyncConn) -> bool:
            with conn.transaction():
                if self._tracking(conn, "position", lock=True) != after:
                    return False
                current = conn.execute(
                    f"{self._select} WHERE {self._key} = ANY(%s)", (list(keys),)
                ).fetchall()
                rows = fold([tuple(row) for row in current])
                if rows:
                    with conn.cursor() as cursor:
                        cursor.executemany(self._upsert, rows)
                conn.execute(
                    f"UPDATE {self.options.schema}.readmodels SET position = %s, "
                    "origin = COALESCE(%s, origin) WHERE name = %s",
                    (last, origin, self.table.name),
                )
                if before_commit is not None:
                    before_commit()
            return True

        return self._run(body, "update")

    # -- queries ----------------------------------------------------------------------------
    def select(
        self,
        equals: Mapping[str, Any],
        at_least: Mapping[str, Any],
        cursor: str | None,
        limit: int,
        offset: int,
    ) -> list[ReadModelRow] | None:
        names = set(self.table.names)
        clauses: list[str] = []
        values: list[Any] = []
        for column, value in equals.items():
            _check_column(column, names)
            clauses.append(f"{column} = %s")
            values.append(value)
        for column, value in at_least.items():
            _check_column(column, names)
            clauses.append(f"{column} >= %s")
            values.append(value)
        order = self.table.order

        def body(conn: SyncConn) -> list[ReadModelRow] | None:
            where, params = list(clauses), list(values)
            if cursor is not None:
                found = conn.execute(
                    f"SELECT {order} FROM {self._name} WHERE {self._key} = %s", (cursor,)
                ).fetchone()
                if found is None:
                    return None
                where.append(f"{order} < %s")
                params.append(found[0])
            sql = self._select + (" WHERE " + " AND ".join(where) if where else "")
            sql += f" ORDER BY {order} DESC LIMIT %s OFFSET %s"
            params.extend((limit, offset))
            return [tuple(row) for row in conn.execute(sql, params).fetchall()]

        return self._run(body, "query")

    def _where(
        self, equals: Mapping[str, Any], at_least: Mapping[str, Any], not_null: str
    ) -> tuple[str, list[Any]]:
        names = set(self.table.names)
        _check_column(not_null, names)
        clauses, values = [f"{not_null} IS NOT NULL"], []
        for column, value in equals.items():
            _check_column(column, names)
            clauses.append(f"{column} = %s")
            values.append(value)
        for column, value in at_least.items():
            _check_column(column, names)
            clauses.append(f"{column} >= %s")
            values.append(value)
        return " WHERE " + " AND ".join(clauses), values

    def tally(
        self,
        equals: Mapping[str, Any],
        at_least: Mapping[str, Any],
        by: str,
        bucket: tuple[int, int, int] | None = None,
    ) -> dict[Any, int]:
        where, values = self._where(equals, at_least, by)
        group = by
        if bucket is not None:  # BIGINT division: the bucket's number
            group = f"least(({by} - %s) / %s, %s)"
            where += f" AND {by} >= %s"
            values = [bucket[0], bucket[1], bucket[2] - 1, *values, bucket[0]]
        sql = f"SELECT {group} AS g, count(*) FROM {self._name}{where} GROUP BY g"
        return self._run(
            lambda conn: {value: int(n) for value, n in conn.execute(sql, values).fetchall()},
            "query",
        )

    def bounds(
        self, equals: Mapping[str, Any], at_least: Mapping[str, Any], column: str
    ) -> tuple[Any, Any] | None:
        where, values = self._where(equals, at_least, column)
        sql = f"SELECT min({column}), max({column}) FROM {self._name}{where}"

        def query(conn: SyncConn) -> tuple[Any, Any] | None:
            row = conn.execute(sql, values).fetchone()
            return None if row is None or row[0] is None else (row[0], row[1])

        return self._run(query, "query")

    def replace(self, key: str, update: Callable[[ReadModelRow], ReadModelRow]) -> None:
        def body(conn: SyncConn) -> None:
            with conn.transaction():
                found = conn.execute(
                    f"{self._select} WHERE {self._key} = %s FOR UPDATE", (key,)
                ).fetchone()
                if found is not None:
                    conn.execute(self._upsert, update(tuple(found)))

        self._run(body, "update")

    def count(self) -> int:
        def query(conn: SyncConn) -> int:
            row = conn.execute(f"SELECT count(*) FROM {self._name}").fetchone()
            return 0 if row is None else int(row[0])

        return self._run(query, "read")

    def dump(self) -> list[ReadModelRow]:
        return self._run(
            lambda conn: [
                tuple(row)
                for row in conn.execute(f"{self._select} ORDER BY {self.table.order}").fetchall()
            ],
            "read",
        )


def _check_column(column: str, names: set[str]) -> None:
    if column not in names:  # the engine names columns: never user text in the SQL
        raise ValueError(f"no column {column!r} in the read model")
