"""Noticing a step that no worker runs.

``engine.start`` succeeds for a step that is registered here but run by no worker: the
execution waits in the queue until a worker that registers the step starts. That is right
(a client may start work before the workers are deployed) but silent, so a start logs one
warning when no worker has published the step to the backend, and a ``result()`` that times
out says so in its message. Workers publish the definitions they run when they start (see
:mod:`stepsource.engine.published`); a published definition stays published, so a step seen
published once is not looked up again.
"""

from __future__ import annotations

import logging
import weakref

from stepsource.adapters.ports import Backend
from stepsource.errors import BackendUnavailableError

__all__ = ["unattended_hint", "warn_if_unattended"]

_logger = logging.getLogger("stepsource.engine")

#: per backend, the step ids some worker has published (they never become unpublished)
_seen: weakref.WeakKeyDictionary[Backend, set[str]] = weakref.WeakKeyDictionary()


async def _published(backend: Backend, step_id: str) -> bool:
    """Whether some worker published ``step_id``; True when the backend cannot tell (the
    check is advice: it never turns a start that succeeded into an error)."""
    seen = _seen.setdefault(backend, set())
    if step_id in seen:
        return True
    try:
        found = await backend.published_definition(step_id)
    except BackendUnavailableError:
        return True
    if found is None:
        return False
    seen.add(step_id)
    return True


def _advice(step_id: str) -> str:
    return (
        f"no worker has published step {step_id!r} to this backend: nothing runs the "
        "execution until a worker that registers the step starts (`stepsource worker "
        "MODULE:ENGINE`, or `async with engine` on an Engine with workers > 0)"
    )


async def warn_if_unattended(backend: Backend, step_id: str, execution_id: str) -> None:
    """Log a warning when no worker has ever published ``step_id`` to ``backend``."""
    if not await _published(backend, step_id):
        _logger.warning(
            "started execution %s, but %s",
            execution_id,
            _advice(step_id),
            extra={"execution_id": execution_id, "step_id": step_id},
        )


async def unattended_hint(backend: Backend, step_id: str | None) -> str | None:
    """The explanation for a ``result()`` timeout when no worker runs the step, else None."""
    if step_id is None or await _published(backend, step_id):
        return None
    return _advice(step_id)
