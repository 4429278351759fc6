"""Transactional steps: the user's rows and the step's record in one database transaction.

``ctx.transaction(name, body)`` opens a transaction of the backend's own database (only
PostgreSQL has one to give), runs ``body(conn)`` with its connection inside a savepoint,
records the result as the sub-step ``name`` (a ``ctx.do`` record: ``SubStepCompleted``),
and appends that record, with whatever the handler buffered before it, **in the same
transaction** before committing it. So the user's rows and the result are durable together
or not at all: a crash before the commit leaves neither (the body runs again on resume), a
crash after it leaves both (a replay returns the recorded result without running the body).

The append checks the lease as every append does: a worker that lost its lease has its
append refused, and the user's rows are rolled back with it. A body that raises has its
savepoint rolled back (its rows are gone) and its failure recorded and committed, and the
handler gets the SubStepFailedError ``ctx.do`` raises. On replay the transaction opened
around the recorded result is empty.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from stepsource.engine.faults import kill_point
from stepsource.engine.recorder import Recorder
from stepsource.engine.store import UNCOMMITTED
from stepsource.errors import StepsourceError, SubStepFailedError, UsageError

__all__ = ["run_transaction"]

T = TypeVar("T")


async def run_transaction(
    recorder: Recorder,
    do: Callable[[str, Callable[[], Awaitable[T]]], Awaitable[T]],
    name: str,
    body: Callable[[Any], Awaitable[T]],
) -> T:
    """Run ``body(conn)`` and record its result as the sub-step ``name`` in one transaction
    (``do`` is the context's ``ctx.do``)."""
    where = recorder.where()
    backend = recorder.runtime.store.backend
    scope = backend.joined_transaction(f"run the transactional step {name!r}")
    if scope is None:
        raise UsageError(
            f"ctx.transaction({name!r}) needs a backend with a database of its own to commit "
            f"the step's rows in, and {type(backend).__name__} has none",
            hint="Run it on a postgresql:// backend, or use ctx.do with ctx.idempotency_key "
            "(at-least-once) on this one",
            **where,
        )
    failed: SubStepFailedError | None = None
    uncommitted = UNCOMMITTED.set(True)  # its appends take their positions at the commit
    try:
        async with scope as conn:

            async def in_savepoint() -> T:
                async with conn.transaction():  # a savepoint: a failing body leaves no rows
                    return await body(conn)

            try:
                result = await do(name, in_savepoint)
            except SubStepFailedError as error:  # its record is in this transaction: commit it
                failed = error
    except StepsourceError:
        # the commit itself failed: what the recorder holds may not be in the log
        recorder.in_doubt = True
        raise
    finally:
        UNCOMMITTED.reset(uncommitted)
    kill_point("after-transaction")  # tests: rows and record are durable, nothing more
    if failed is not None:
        raise failed
    return result
