"""The tables of the SQLite backend's file, and the limits its queries share.

Every statement is ``IF NOT EXISTS``: opening a file from an older release adds the tables it
lacks in place (:meth:`~stepsource.adapters.sqlite.connection.SQLiteConnection.open`).
"""

from __future__ import annotations

import re

__all__ = ["EVENT_COLUMNS", "NO_LIMIT", "SCHEMA", "SCHEMA_NAMES"]

# Each commit writes a page of every B-tree it changes to the WAL, so the hot tables hold no
# B-tree they do not need: ``position`` is the rowid without AUTOINCREMENT (events are never
# deleted, so the next rowid is always the largest plus one, as AUTOINCREMENT would give,
# without its sqlite_sequence row written at every commit), and the queue lives in its
# primary key's B-tree (WITHOUT ROWID: no separate rowid table beside the key's index). A
# file made by an earlier release keeps its tables (AUTOINCREMENT, a rowid queue): the
# statements are the same on both.
SCHEMA = (
    """CREATE TABLE IF NOT EXISTS events (
        position INTEGER PRIMARY KEY,
        stream_id TEXT NOT NULL,
        version INTEGER NOT NULL,
        topic TEXT NOT NULL,
        data BLOB NOT NULL,
        UNIQUE (stream_id, version))""",
    """CREATE TABLE IF NOT EXISTS queue (
        stream_id TEXT PRIMARY KEY,
        step_id TEXT NOT NULL,
        priority INTEGER NOT NULL,
        due_ms INTEGER NOT NULL,
        lease_owner TEXT,
        lease_expires_ms INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS queue_by_step ON queue (step_id, due_ms)",
    """CREATE TABLE IF NOT EXISTS snapshots (
        stream_id TEXT PRIMARY KEY,
        version INTEGER NOT NULL,
        topic TEXT NOT NULL,
        data BLOB NOT NULL)""",
    # added after the first release: IF NOT EXISTS upgrades older files in place
    """CREATE TABLE IF NOT EXISTS inbox (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        stream_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        name TEXT NOT NULL,
        data BLOB NOT NULL,
        posted_ms INTEGER NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS inbox_by_stream ON inbox (stream_id)",
    """CREATE TABLE IF NOT EXISTS definitions (
        step_id TEXT PRIMARY KEY,
        version TEXT NOT NULL,
        data BLOB NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS kv (
        key TEXT PRIMARY KEY,
        data BLOB NOT NULL,
        revision INTEGER NOT NULL,
        expires_ms INTEGER)""",
    "CREATE INDEX IF NOT EXISTS kv_by_expiry ON kv (expires_ms) WHERE expires_ms IS NOT NULL",
    """CREATE TABLE IF NOT EXISTS kv_sequence (
        id INTEGER PRIMARY KEY CHECK (id = 0),
        revision INTEGER NOT NULL)""",
)
#: the tables and indexes a file needs: any one missing makes opening it run :data:`SCHEMA`
SCHEMA_NAMES = frozenset(re.findall(r"IF NOT EXISTS (\w+)", "\n".join(SCHEMA)))
#: the columns of ``events`` in the order of :class:`~stepsource.adapters.ports.RecordedEvent`
EVENT_COLUMNS = "stream_id, version, topic, data, position"
#: the largest SQLite integer: "no upper bound" in a query's parameters
NO_LIMIT = 2**63 - 1
