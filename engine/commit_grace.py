"""The grace a commit gets: shielded from cancellation, but not past :data:`COMMIT_GRACE`.

A recorder's commit runs in a shielded cancel scope, so a step timeout, a lost lease or
SIGTERM never interrupts it midway; a backend that hangs must still not hold the worker
forever, so the scope is cancelled once the commit has waited :data:`COMMIT_GRACE` seconds
(the recorder is then *in doubt*, :mod:`.recorder`).

A deadline on every commit's scope costs a timer armed and cancelled per commit, about half
of the scope's price. While a worker pool runs, one :class:`CommitGrace` task bounds all of
its actors' commits instead: it wakes every tenth of the grace and cancels the scopes that
opened more than the grace ago (so a hung commit ends between one and one and a tenth
graces). Outside a running pool (and once its watcher stops, at shutdown) each scope
carries its own deadline as before.
"""

from __future__ import annotations

import time

import anyio

__all__ = ["COMMIT_GRACE", "CommitGrace"]

#: seconds a commit may wait for the backend before it is abandoned (in doubt)
COMMIT_GRACE = 5.0


class CommitGrace:
    """The commits in flight of one runtime's actors, each bounded by the grace."""

    def __init__(self) -> None:
        #: a watcher runs (:meth:`watch`): scopes are bounded by it, not by a deadline each
        self.watching = False
        #: open commit scopes -> when each opened (time.monotonic())
        self.open: dict[anyio.CancelScope, float] = {}

    def scope(self) -> anyio.CancelScope:
        """A shielded scope for one commit, cancelled once it has waited the grace; give it
        back with :meth:`closed`."""
        if not self.watching:
            return anyio.CancelScope(shield=True, deadline=anyio.current_time() + COMMIT_GRACE)
        scope = anyio.CancelScope(shield=True)
        self.open[scope] = time.monotonic()
        return scope

    def closed(self, scope: anyio.CancelScope) -> None:
        """The commit of ``scope`` ended (either way)."""
        self.open.pop(scope, None)

    async def watch(self) -> None:
        """Cancel the commits that outlive the grace, until cancelled; then hand each open
        one a deadline of its own for the rest of its grace (a pool stopping must not leave
        a hung commit unbounded)."""
        self.watching = True
        try:
            while True:
                await anyio.sleep(COMMIT_GRACE / 10)
                self.expire(time.monotonic())
        finally:
            self.watching = False
            now, loop_now = time.monotonic(), anyio.current_time()
            for scope, opened in self.open.items():
                scope.deadline = loop_now + max(opened + COMMIT_GRACE - now, 0.0)

    def expire(self, now: float) -> None:
        """Cancel each open scope that opened the grace or more before ``now``."""
        limit = now - COMMIT_GRACE
        for scope, opened in list(self.open.items()):
            if opened <= limit:
                scope.cancel()
