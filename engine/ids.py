"""Ids the engine derives from an operation's coordinates, never from a random source.

A child execution's id and a checkpoint's id are name-based UUIDs of the execution and the
coordinates ``(attempt, scope, seq)`` of the operation that made them. Any worker that runs
the operation again — in any process, whatever its engine's secret seed, after a crash that
dropped the buffered event or killed a parent between starting a child and recording it —
computes the same id: a child is never started twice, and a checkpoint id a handler saw (and
perhaps passed on) is the one the log keeps.
"""

from __future__ import annotations

import uuid

from stepsource.aggregates.execution import OpCoordinates

__all__ = [
    "CHECKPOINT_NAMESPACE",
    "CHILD_NAMESPACE",
    "KEY_NAMESPACE",
    "checkpoint_id_of",
    "child_execution_id",
    "execution_id_for_key",
]

#: children's ids are name-based UUIDs in this namespace
CHILD_NAMESPACE = uuid.UUID("5e0c7a2b-3d64-4e5f-9a1b-7c8d2e4f6a10")
#: checkpoints' ids are name-based UUIDs in this namespace
CHECKPOINT_NAMESPACE = uuid.UUID("9b1f6c3e-0d2a-4f7b-8e5c-4a6d1b3c2e70")
#: executions started with a business key: name-based UUIDs of the step and the key
KEY_NAMESPACE = uuid.UUID("3f6e1a9c-72b4-4d0e-9a53-8c1b7e2d4f05")


def _name(execution_id: str, op: OpCoordinates) -> str:
    attempt, scope, seq, _version = op
    return f"{execution_id}/{attempt}/{scope}/{seq}"


def child_execution_id(parent_execution_id: str, op: OpCoordinates) -> str:
    """The id of the child the operation ``op`` of ``parent_execution_id`` starts."""
    return str(uuid.uuid5(CHILD_NAMESPACE, _name(parent_execution_id, op)))


def checkpoint_id_of(execution_id: str, op: OpCoordinates) -> str:
    """The id of the checkpoint the operation ``op`` of ``execution_id`` creates."""
    return str(uuid.uuid5(CHECKPOINT_NAMESPACE, _name(execution_id, op)))


def execution_id_for_key(step_id: str, key: str) -> str:
    """The id of the one execution of ``step_id`` started with the business key ``key``: the
    log's own check that a new stream starts at version 1 makes "at most one per key" atomic
    on every backend, across processes."""
    return str(uuid.uuid5(KEY_NAMESPACE, f"{step_id}\x00{key}"))
