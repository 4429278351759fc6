"""The error tree every user-facing failure belongs to.

This module is a leaf: it imports nothing of ours, so every layer (aggregates, projections,
adapters, engine) may raise these. Messages are built here from the facts, always naming the
execution and the step when there is one, and saying what to do.
"""

from __future__ import annotations

import re
from typing import Self

__all__ = [
    "BackendUnavailableError",
    "ChildFailedError",
    "CompensationError",
    "CorruptLogError",
    "InputValidationError",
    "LimitExceededError",
    "NonDeterminismError",
    "OutputValidationError",
    "ResultTimeout",
    "StateValueError",
    "StepCancelledError",
    "StepFailedError",
    "StepsourceError",
    "SubStepFailedError",
    "SubStepTimeoutError",
    "UnknownCheckpointError",
    "UnknownEventError",
    "UnknownExecutionError",
    "UnknownQueryError",
    "UnknownServiceError",
    "UnknownStepError",
    "UpdateFailedError",
    "UsageError",
    "VersionConflictError",
    "WaitTimeout",
    "mask_credentials",
]

#: ``//userinfo@``: anything up to the first ``@`` (a password may hold an unencoded ``/``,
#: ``?`` or ``#``), but not a path (``sqlite:///dir@x/f.db``: a ``/`` right after ``//``)
_USERINFO = re.compile(r"(?<!/)(//)((?!/)[^@\s'\"]*)@")
_SECRET_OPTION = re.compile(
    r"([?&;](?:token|password|pass|secret|auth_token|nkey|jwt)=)[^&#\s'\"]*", re.IGNORECASE
)


def mask_credentials(text: str) -> str:
    """``text`` (a backend URL, or a message quoting one) with its credentials masked: the
    password of ``//user:password@``, a ``//token@``, and ``token=``-like options. Used by
    every repr, log line and error that shows a URL, even a malformed one."""

    def userinfo(match: re.Match[str]) -> str:
        name, colon, _ = match.group(2).partition(":")
        return f"{match.group(1)}{name}:***@" if colon else f"{match.group(1)}***@"

    return _SECRET_OPTION.sub(r"\1***", _USERINFO.sub(userinfo, text))


class StepsourceError(Exception):
    """Root of every error stepsource raises for something a user can cause or must handle.

    ``execution_id`` and ``step_id`` say where it happened (None when it is not about one
    execution); ``hint`` says what to do. ``str(error)`` joins them into one message.
    """

    def __init__(
        self,
        message: str,
        *,
        execution_id: str | None = None,
        step_id: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.reason = message
        self.execution_id = execution_id
        self.step_id = step_id
        self.hint = hint
        super().__init__(self.describe())

    def about(self, subject: str) -> Self:
        """This error with its reason prefixed by what it concerns (``"schedule
        'nightly'"``), for a caller that knows more than the code that raised it."""
        self.reason = f"{subject}: {self.reason}"
        self.args = (self.describe(),)
        return self

    def describe(self, *, where: bool = True) -> str:
        """The message: the reason, where it happened (unless ``where`` is false: a record
        of the execution it names says so already) and the hint. ``str(error)`` is
        ``describe()``."""
        places = []
        if where and self.step_id is not None:
            places.append(f"step {self.step_id!r}")
        if where and self.execution_id is not None:
            places.append(f"execution {self.execution_id}")
        text = self.reason
        if places:
            text = f"{text} ({', '.join(places)})"
        if self.hint:
            text = f"{text}. {self.hint}"
        return text


class UsageError(StepsourceError, ValueError):
    """An API was called in a way it does not support (wrong place, wrong time, bad URL)."""


class StateValueError(StepsourceError, TypeError):
    """A value is not strict JSON (RFC 8259): nothing was recorded."""


class InputValidationError(StepsourceError, ValueError):
    """A step's input failed validation against its handler's signature: nothing was started."""


class OutputValidationError(StepsourceError, ValueError):
    """A recorded output does not validate into the type asked for (``result(type=...)``)."""


class LimitExceededError(StepsourceError, ValueError):
    """A payload, nesting depth or key length is over its limit: nothing was recorded."""


class UnknownStepError(StepsourceError, LookupError):
    """No step is registered or published under that id."""


class UnknownExecutionError(StepsourceError, LookupError):
    """No execution exists with that id in this backend."""


class UnknownServiceError(StepsourceError, LookupError):
    """No service is registered under that name on the engine."""


class UnknownQueryError(StepsourceError, LookupError):
    """The execution's handler registered no query handler with that name."""


class UpdateFailedError(StepsourceError):
    """An update's handler raised (or none was registered); its failure is recorded."""


class UnknownCheckpointError(StepsourceError, LookupError):
    """The execution has no checkpoint with that id: nothing was recorded."""


class UnknownEventError(StepsourceError, LookupError):
    """The log holds an event this code cannot read (unknown topic or undecodable data)."""


class CorruptLogError(StepsourceError):
    """The log is damaged (a gap in versions, a truncated file): it is not served silently."""


class VersionConflictError(StepsourceError):
    """Another writer appended to the execution first; this writer's commit was refused."""


class NonDeterminismError(StepsourceError):
    """The handler did something other than what the log recorded at that point."""


class StepFailedError(StepsourceError):
    """The step failed for good: ``ctx.fail()`` was called or retries are exhausted."""


class SubStepFailedError(StepsourceError):
    """A ``ctx.do`` body raised; the failure is recorded and raised the same way on replay.

    ``error_type`` and ``error_message`` describe what the body raised (live, the original
    exception is also the ``__cause__``).
    """

    def __init__(
        self,
        name: str,
        error_type: str,
        error_message: str,
        *,
        execution_id: str | None = None,
        step_id: str | None = None,
        tries: int = 1,
    ) -> None:
        self.name = name
        self.error_type = error_type
        self.error_message = error_message
        #: how many times the body ran in this attempt (more than 1 with a retry policy)
        self.tries = tries
        after = f" after {tries} tries" if tries > 1 else ""
        super().__init__(
            f"ctx.do({name!r}) failed{after} with {error_type}: {error_message}",
            execution_id=execution_id,
            step_id=step_id,
        )


class ChildFailedError(StepsourceError):
    """A child execution (``ctx.run_step``, a DAG node) failed or was cancelled."""


class CompensationError(StepsourceError):
    """A saga's compensation failed. ``saga`` names the saga; ``failed`` maps each step whose
    compensation failed to that failure. The other compensations ran; the exception that
    started the compensation is the ``__cause__``."""

    def __init__(
        self,
        saga: str,
        failed: dict[str, str],
        *,
        trigger: str | None = None,
        execution_id: str | None = None,
        step_id: str | None = None,
    ) -> None:
        self.saga = saga
        self.failed = dict(failed)
        #: the failure that made the saga compensate, as text (None when compensate() was
        #: called without one)
        self.trigger = trigger
        after = "" if trigger is None else f" after {trigger}"
        super().__init__(
            f"saga {saga!r} could not undo {', '.join(repr(s) for s in failed)}{after}: "
            + "; ".join(failed.values()),
            execution_id=execution_id,
            step_id=step_id,
            hint="Its other compensations ran. If a retry of the step fails again, the failed "
            "ones run again; otherwise undo those steps by hand",
        )


class StepCancelledError(StepsourceError):
    """The execution was cancelled before it finished."""


class SubStepTimeoutError(StepsourceError, TimeoutError):
    """A try of ``ctx.do(name, fn, timeout=...)`` ran longer than its timeout. An async body
    is cancelled at the deadline; a sync body (a thread cannot be interrupted) is waited for
    and its result discarded. Retried like any error unless the policy names it
    non-retryable."""

    def __init__(
        self,
        name: str,
        timeout: float,
        *,
        execution_id: str | None = None,
        step_id: str | None = None,
    ) -> None:
        self.name = name
        self.timeout = timeout
        super().__init__(
            f"a try of ctx.do({name!r}) ran longer than its timeout of {timeout} s",
            execution_id=execution_id,
            step_id=step_id,
            hint="Raise the timeout, or make the body finish (or time out) sooner",
        )


class ResultTimeout(StepsourceError, TimeoutError):
    """``handle.result(timeout=...)`` ran out of time before the execution finished."""


class WaitTimeout(StepsourceError, TimeoutError):
    """A wait inside a handler timed out; the timeout is recorded before this is raised."""


class BackendUnavailableError(StepsourceError, ConnectionError):
    """The storage backend cannot be reached or opened."""
