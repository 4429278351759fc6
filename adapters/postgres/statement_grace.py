"""How long a call of the PostgreSQL backend is kept from a cancellation.

A cancellation that reaches psycopg in the middle of a statement makes it ask the server to
cancel the statement and wait for the answer; under anyio, which cancels again while psycopg
waits, it gives that up, logs a warning ("query cancellation interrupted") and closes the
connection, and the server may still run the statement to the end. So every call of the pool
runs shielded: a worker shutting down, or a step's timeout, lets the statement in flight end
(they are short) and keeps its connection, and the cancellation takes effect as soon as the
call returns. A server that does not answer must not hold a shutdown forever: once a call has
waited :data:`STATEMENT_GRACE` seconds its shield lapses, and a cancellation that came or comes
interrupts it as it would have at once.

One timer per event loop looks at the open calls while there are any, a fifth of the grace
apart, instead of a timer armed and cancelled for every statement. The object keeps no
reference to its loop (the pool keeps it under the loop as a weak key, so that a loop that
ends lets its connections close).
"""

from __future__ import annotations

import asyncio

import anyio

__all__ = ["STATEMENT_GRACE", "StatementGrace"]

#: seconds a call in flight is shielded from cancellation before its shield lapses
STATEMENT_GRACE = 5.0


class StatementGrace:
    """The shielded calls in flight on one event loop."""

    def __init__(self) -> None:
        #: open calls' scopes -> when each opened (the loop's clock)
        self.open: dict[anyio.CancelScope, float] = {}
        self._armed = False

    def scope(self) -> anyio.CancelScope:
        """A shielded scope for one call; give it back with :meth:`closed`."""
        loop = asyncio.get_running_loop()
        scope = anyio.CancelScope(shield=True)
        self.open[scope] = loop.time()
        if not self._armed:
            self._armed = True
            loop.call_later(STATEMENT_GRACE / 5, self._lapse)
        return scope

    def closed(self, scope: anyio.CancelScope) -> None:
        """The call of ``scope`` ended (either way)."""
        self.open.pop(scope, None)

    def _lapse(self) -> None:
        """Unshield the calls open for the grace or longer; look again while any is open."""
        loop = asyncio.get_running_loop()  # a callback of the loop
        limit = loop.time() - STATEMENT_GRACE
        for scope, opened in list(self.open.items()):
            if opened <= limit:
                del self.open[scope]
                scope.shield = False  # a pending cancellation goes on from here
        self._armed = bool(self.open)
        if self._armed:
            loop.call_later(STATEMENT_GRACE / 5, self._lapse)
