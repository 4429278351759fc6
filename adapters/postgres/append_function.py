"""The server-side append: one PL/pgSQL function writes a whole group commit in one round trip.

``{s}.append_v4(...)`` is created by the schema setup (:mod:`.schema`). Called as one
statement on an autocommit connection it is its own transaction, so a commit of the group
costs one round trip and one WAL flush, where the same work sent statement by statement
took seven (BEGIN, the table lock, two head reads, the last position, the insert, COMMIT).

What it does, in order (the design of :mod:`.commits`, moved to the server):

1. ``LOCK TABLE events IN EXCLUSIVE MODE``: plain reads go on beside it, other appends wait,
   so the checks below cannot be raced and positions are handed out in commit order (a
   reader paging by position never skips an event that commits later).
2. The queue rows of every stream of the batch are locked ``FOR UPDATE`` in stream order
   (the order ``renew`` locks them in; a batch of one commit locks its row as it reads the
   lease holder): a ``lease`` elsewhere skips them until this commits, so a takeover cannot
   slip between the lease check and the append.
3. Each commit, in order: its stream's last version (from the ``(stream_id, version)``
   index) must be its expected version, else it is refused as a version conflict; if it
   names a lease owner, the queue row must be leased to that owner, else it is refused as a
   lease conflict. A refused commit writes nothing and does not affect the others. An
   accepted one inserts its events at the next positions, deletes its consumed inbox items,
   posts its outbox items (waking their streams' queue rows) and applies its queue update.
   A later commit of the same stream in the batch sees what the earlier one wrote.
4. ``pg_notify`` wakes the schema's listeners (:mod:`.wakeups`) if a commit changed the
   queue or posted to an inbox; PostgreSQL delivers it only if the transaction commits. The
   payload is the schema when a commit may have made work runnable (an inbox post, an
   execution queued or suspended), else ``<schema>:change`` (a start leased by its own
   worker, an execution ended): that wakes observers, not workers, which would find nothing
   to lease.

It returns three arrays, one element per commit: the outcome kind (0 accepted, 1 version
conflict, 2 lease conflict), the value (the commit's last position — or the stream's last
position for an empty commit — or the stream's current version for a version conflict) and
the lease holder (for a lease conflict; NULL if no worker holds it).

**One event.** The most common commit by far (a ``ctx.do`` result, a state change: one
event, no queue update, consumed item or outbox post) has a function of its own,
``{s}.append_one_v3(stream, expected, owner, topic, data)``, which does for it exactly what
``append_v4`` does for a group of that one commit (the table lock, the version check, the
queue row locked ``FOR UPDATE`` and the lease check, the insert) on scalars, returning one
outcome as three scalars: about a sixth less server time per call than the general function,
which loops over arrays and builds arrays of outcomes.

**Versions.** The function's name carries the layout version. A layout change creates a new
function beside the old one (``CREATE OR REPLACE`` never changes the one an older release
calls), so processes of the previous release keep appending during a rolling upgrade, and a
database made by a previous release gains the function the first time this release opens it
(:meth:`~stepsource.adapters.postgres.pool.Pool.open`). The tables of the earlier layouts
are unchanged: layout 1 had no function, layout 2 ``append_v2`` only, layout 3 adds
``append_one_v3``, layout 4 replaces ``append_v2`` by ``append_v4``, which tells a start or
an end apart from new work in its wake-up (the schema check looks for it).
"""

from __future__ import annotations

__all__ = [
    "APPEND_FUNCTION",
    "APPEND_ONE_DDL",
    "APPEND_ONE_FUNCTION",
    "APPEND_ONE_SIGNATURE",
    "APPEND_SIGNATURE",
    "ARGUMENT_TYPES",
    "DDL",
    "PREVIOUS_DDL",
    "PREVIOUS_FUNCTION",
]

#: the function's name in its schema (the layout version is part of it)
APPEND_FUNCTION = "append_v4"

#: the SQL types of its 21 array parameters, in order (the call is built by
#: :func:`~stepsource.adapters.postgres.commits.apply_commits`)
ARGUMENT_TYPES = (
    "text", "bigint", "text", "integer", "text", "bytea",
    "text", "text", "bigint", "bigint", "bigint", "text", "bigint",
    "integer", "bigint",
    "integer", "text", "text", "text", "bytea", "bigint",
)  # fmt: skip

#: its argument types, as ``to_regprocedure`` names them
APPEND_SIGNATURE = ", ".join(f"{name}[]" for name in ARGUMENT_TYPES)

# ``{s}`` is replaced by the validated schema name (a plain lower-case identifier), which is
# also the wake-up's payload, and ``{channel}`` by the wake-up channel; no other braces.
_GROUP = """(
    c_stream TEXT[], c_expected BIGINT[], c_owner TEXT[], c_events INT[],
    e_topic TEXT[], e_data BYTEA[],
    q_kind TEXT[], q_step TEXT[], q_priority BIGINT[], q_due BIGINT[], q_now BIGINT[],
    q_owner TEXT[], q_expires BIGINT[],
    x_commit INT[], x_id BIGINT[],
    o_commit INT[], o_stream TEXT[], o_kind TEXT[], o_name TEXT[], o_data BYTEA[],
    o_now BIGINT[],
    OUT kinds SMALLINT[], OUT vals BIGINT[], OUT holders TEXT[])
LANGUAGE plpgsql AS $append$
DECLARE
    n INT := coalesce(array_length(c_stream, 1), 0);
    pos BIGINT;
    head_version BIGINT;
    head_position BIGINT;
    holder TEXT;
    first_event INT := 1;
    cnt INT;
    due BIGINT;
    work BOOLEAN := false;
    changed BOOLEAN := false;
    j INT;
BEGIN
    kinds := ARRAY[]::SMALLINT[];
    vals := ARRAY[]::BIGINT[];
    holders := ARRAY[]::TEXT[];
    LOCK TABLE {s}.events IN EXCLUSIVE MODE;
    IF n > 1 THEN  -- in stream order, as renew locks them (one commit: locked just below)
        PERFORM 1 FROM {s}.queue WHERE stream_id = ANY(c_stream) ORDER BY stream_id
            FOR UPDATE;
    END IF;
    SELECT coalesce(max(position), 0) INTO pos FROM {s}.events;
    FOR i IN 1..n LOOP
        cnt := c_events[i];
        SELECT e.version, e.position INTO head_version, head_position FROM {s}.events AS e
            WHERE e.stream_id = c_stream[i] ORDER BY e.version DESC LIMIT 1;
        IF NOT FOUND THEN
            head_version := 0;
            head_position := 0;
        END IF;
        holder := NULL;
        SELECT q.lease_owner INTO holder FROM {s}.queue AS q WHERE q.stream_id = c_stream[i]
            FOR UPDATE;
        IF head_version <> c_expected[i] THEN
            kinds := array_append(kinds, 1::SMALLINT);
            vals := array_append(vals, head_version);
            holders := array_append(holders, NULL::TEXT);
        ELSIF c_owner[i] IS NOT NULL AND holder IS DISTINCT FROM c_owner[i] THEN
            kinds := array_append(kinds, 2::SMALLINT);
            vals := array_append(vals, 0::BIGINT);
            holders := array_append(holders, holder);
        ELSE
            IF cnt = 1 THEN  -- the most common commit: a plain insert is the cheapest
                INSERT INTO {s}.events (position, stream_id, version, topic, data)
                    VALUES (pos + 1, c_stream[i], c_expected[i] + 1, e_topic[first_event],
                            e_data[first_event]);
            ELSIF cnt > 1 THEN
                INSERT INTO {s}.events (position, stream_id, version, topic, data)
                    SELECT pos + k, c_stream[i], c_expected[i] + k,
                           e_topic[first_event + k - 1], e_data[first_event + k - 1]
                    FROM generate_series(1, cnt) AS k;
            END IF;
            IF cnt > 0 THEN
                pos := pos + cnt;
                head_position := pos;
            END IF;
            IF i = ANY(x_commit) THEN
                DELETE FROM {s}.inbox WHERE stream_id = c_stream[i] AND id = ANY(
                    ARRAY(SELECT x_id[g] FROM generate_subscripts(x_commit, 1) AS g
                          WHERE x_commit[g] = i));
            END IF;
            IF i = ANY(o_commit) THEN
                FOR j IN SELECT g FROM generate_subscripts(o_commit, 1) AS g
                         WHERE o_commit[g] = i ORDER BY g LOOP
                    INSERT INTO {s}.inbox (stream_id, kind, name, data, posted_ms)
                        VALUES (o_stream[j], o_kind[j], o_name[j], o_data[j], o_now[j]);
                    UPDATE {s}.queue SET due_ms = LEAST(due_ms, o_now[j])
                        WHERE stream_id = o_stream[j];
                END LOOP;
                work := true;
            END IF;
            IF q_kind[i] = 'done' THEN
                DELETE FROM {s}.queue WHERE stream_id = c_stream[i];
                changed := true;
            ELSIF q_kind[i] IS NOT NULL THEN
                due := q_due[i];
                IF q_kind[i] = 'suspend' AND EXISTS (
                        SELECT 1 FROM {s}.inbox WHERE stream_id = c_stream[i]) THEN
                    due := LEAST(due, q_now[i]);
                END IF;
                INSERT INTO {s}.queue (stream_id, step_id, priority, due_ms, lease_owner,
                                       lease_expires_ms)
                    VALUES (c_stream[i], q_step[i], q_priority[i], due,
                            CASE WHEN q_kind[i] = 'lease' THEN q_owner[i] END,
                            CASE WHEN q_kind[i] = 'lease' THEN q_expires[i] ELSE 0 END)
                    ON CONFLICT (stream_id) DO UPDATE SET step_id = excluded.step_id,
                        priority = excluded.priority, due_ms = excluded.due_ms,
                        lease_owner = excluded.lease_owner,
                        lease_expires_ms = excluded.lease_expires_ms;
                IF q_kind[i] = 'suspend' THEN
                    -- again, now that this transaction holds the row: an item posted while
                    -- the statement above ran (its snapshot could not see it) found the row
                    -- leased and left its due time alone; this statement's new snapshot sees
                    -- it, and a post still to come finds the row suspended and wakes it
                    UPDATE {s}.queue SET due_ms = LEAST(due_ms, q_now[i])
                        WHERE stream_id = c_stream[i] AND EXISTS (
                            SELECT 1 FROM {s}.inbox WHERE stream_id = c_stream[i]);
                END IF;
                IF q_kind[i] = 'lease' THEN
                    changed := true;  -- it takes work: nothing new to lease
                ELSE
                    work := true;
                END IF;
            END IF;
            kinds := array_append(kinds, 0::SMALLINT);
            vals := array_append(vals, head_position);
            holders := array_append(holders, NULL::TEXT);
        END IF;
        first_event := first_event + cnt;
    END LOOP;
    NOTIFY_HERE
END
$append$"""

#: the group function of this layout: a start or an end wakes observers only
DDL = (
    "CREATE OR REPLACE FUNCTION {s}."
    + APPEND_FUNCTION
    + _GROUP.replace(
        "NOTIFY_HERE",
        "IF work THEN\n        PERFORM pg_notify('{channel}', '{s}');\n"
        "    ELSIF changed THEN\n        PERFORM pg_notify('{channel}', '{s}:change');\n"
        "    END IF;",
    )
)

#: the group function of layouts 2 and 3, which processes of those releases call: kept
#: beside the new one (in a schema this release creates, too) so that they go on appending
#: during a rolling upgrade; it wakes every listener for a start or an end as well
PREVIOUS_FUNCTION = "append_v2"
PREVIOUS_DDL = (
    "CREATE OR REPLACE FUNCTION {s}."
    + PREVIOUS_FUNCTION
    + _GROUP.replace(
        "NOTIFY_HERE",
        "IF work OR changed THEN\n        PERFORM pg_notify('{channel}', '{s}');\n    END IF;",
    )
)


#: the one-event function's name (the layout that added it is part of it)
APPEND_ONE_FUNCTION = "append_one_v3"

#: its argument types, as ``to_regprocedure`` names them
APPEND_ONE_SIGNATURE = "text, bigint, text, text, bytea"

# the same checks and writes as ``append_v4`` for a group of this one commit, in that order
APPEND_ONE_DDL = (
    "CREATE OR REPLACE FUNCTION {s}."
    + APPEND_ONE_FUNCTION
    + """(
    c_stream TEXT, c_expected BIGINT, c_owner TEXT, e_topic TEXT, e_data BYTEA,
    OUT kind SMALLINT, OUT val BIGINT, OUT holder TEXT)
LANGUAGE plpgsql AS $append$
DECLARE
    pos BIGINT;
    head_version BIGINT;
BEGIN
    LOCK TABLE {s}.events IN EXCLUSIVE MODE;
    SELECT coalesce(max(position), 0) INTO pos FROM {s}.events;
    SELECT e.version INTO head_version FROM {s}.events AS e
        WHERE e.stream_id = c_stream ORDER BY e.version DESC LIMIT 1;
    IF NOT FOUND THEN
        head_version := 0;
    END IF;
    SELECT q.lease_owner INTO holder FROM {s}.queue AS q WHERE q.stream_id = c_stream
        FOR UPDATE;
    IF head_version <> c_expected THEN
        kind := 1;
        val := head_version;
        holder := NULL;
    ELSIF c_owner IS NOT NULL AND holder IS DISTINCT FROM c_owner THEN
        kind := 2;
        val := 0;
    ELSE
        INSERT INTO {s}.events (position, stream_id, version, topic, data)
            VALUES (pos + 1, c_stream, c_expected + 1, e_topic, e_data);
        kind := 0;
        val := pos + 1;
        holder := NULL;
    END IF;
END
$append$"""
)
