"""The tables the PostgreSQL backend creates in its schema (``CREATE ... IF NOT EXISTS``).

Text columns that are sorted or compared use the ``"C"`` collation, so their order is the
code-point order Python (and the memory reference) uses, whatever the database's locale.
``events.position`` is assigned by the writer under the events table lock (the last position
+ 1), so positions are dense and committed in order: a reader paging by position never skips
an event that commits later. ``{s}`` is replaced by the (validated) schema name.

Appends go through server-side functions (:mod:`.append_function`) whose names carry the
layout version: :data:`LAYOUT_CHECK` tells whether a schema has every table *and* this
release's newest function, and a schema made by an earlier release (tables, no function, or
not the newest one) migrates by running :func:`statements` again (every statement is
idempotent; the tables are unchanged).
"""

from __future__ import annotations

from stepsource.adapters.postgres.append_function import (
    APPEND_FUNCTION,
    APPEND_ONE_DDL,
    APPEND_SIGNATURE,
    PREVIOUS_DDL,
)
from stepsource.adapters.postgres.append_function import DDL as APPEND_DDL

__all__ = ["CHANNEL", "LAYOUT_CHECK", "SCHEMA_LOCK", "TABLES", "layout_check", "statements"]

#: the ``LISTEN/NOTIFY`` channel of wake-ups (:mod:`.wakeups`); the payload is the schema
CHANNEL = "stepsource_wake"

#: the advisory lock key that serialises schema creation between processes
SCHEMA_LOCK = 0x5354_4550_5352_43

TABLES = ("events", "queue", "inbox", "definitions", "snapshots", "kv")

_DDL = (
    "CREATE SCHEMA IF NOT EXISTS {s}",
    """CREATE TABLE IF NOT EXISTS {s}.events (
        position BIGINT PRIMARY KEY,
        stream_id TEXT COLLATE "C" NOT NULL,
        version BIGINT NOT NULL,
        topic TEXT NOT NULL,
        data BYTEA NOT NULL,
        UNIQUE (stream_id, version))""",
    """CREATE TABLE IF NOT EXISTS {s}.queue (
        stream_id TEXT COLLATE "C" PRIMARY KEY,
        step_id TEXT COLLATE "C" NOT NULL,
        priority BIGINT NOT NULL,
        due_ms BIGINT NOT NULL,
        lease_owner TEXT,
        lease_expires_ms BIGINT NOT NULL DEFAULT 0)""",
    "CREATE INDEX IF NOT EXISTS queue_by_step ON {s}.queue (step_id, due_ms)",
    """CREATE TABLE IF NOT EXISTS {s}.inbox (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        stream_id TEXT COLLATE "C" NOT NULL,
        kind TEXT NOT NULL,
        name TEXT NOT NULL,
        data BYTEA NOT NULL,
        posted_ms BIGINT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS inbox_by_stream ON {s}.inbox (stream_id, id)",
    """CREATE TABLE IF NOT EXISTS {s}.definitions (
        step_id TEXT COLLATE "C" PRIMARY KEY,
        version TEXT NOT NULL,
        data BYTEA NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS {s}.snapshots (
        stream_id TEXT COLLATE "C" PRIMARY KEY,
        version BIGINT NOT NULL,
        topic TEXT NOT NULL,
        data BYTEA NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS {s}.kv (
        key TEXT COLLATE "C" PRIMARY KEY,
        data BYTEA NOT NULL,
        revision BIGINT NOT NULL,
        expires_ms BIGINT)""",
    "CREATE INDEX IF NOT EXISTS kv_by_expiry ON {s}.kv (expires_ms) WHERE expires_ms IS NOT NULL",
    "CREATE SEQUENCE IF NOT EXISTS {s}.kv_revision",
    PREVIOUS_DDL,  # for processes of the previous release (a rolling upgrade)
    APPEND_ONE_DDL,
    APPEND_DDL,  # the newest function last: the layout check looks for it
)

#: one row: how many of :data:`TABLES` the schema (first parameter) has, and whether it has
#: this release's newest append function (its regprocedure name, second parameter), which
#: the statements create after the others
LAYOUT_CHECK = (
    "SELECT (SELECT count(*) FROM pg_tables WHERE schemaname = %s AND tablename = ANY(%s)), "
    "to_regprocedure(%s) IS NOT NULL"
)


def layout_check(schema: str) -> tuple[str, list[str], str]:
    """The parameters of :data:`LAYOUT_CHECK` for one schema."""
    return schema, list(TABLES), f"{schema}.{APPEND_FUNCTION}({APPEND_SIGNATURE})"


def statements(schema: str) -> list[str]:
    """The DDL for one schema, in order (each idempotent: run again, it migrates)."""
    return [sql.format(s=schema, channel=CHANNEL) for sql in _DDL]
