"""A DAG flow run by real ``stepsource worker flow_app:engine`` processes (test_flow_process.py).

``order.flow`` is a diamond with an extra branch::

    validate -> {reserve, charge} -> ship -> close
    validate -> notify -----------------------^

Each node is a child execution of the flow. Every node appends one line with its node name
to the file named by the flow's ``effects`` input when its handler runs (a plain side effect,
not a ``ctx.do``: a node whose handler runs again writes its line again), so a test can count
how often each node ran. The diamond's siblings ``reserve`` and ``charge`` rendezvous through
marker files in the ``markers`` directory: each writes its own marker, then waits, bounded by
``rendezvous_timeout``, for the other's; a timeout fails the node and so the flow. The flow
can therefore only complete if the two siblings run at the same time.

The worker subprocesses import this module from the tests directory (on their PYTHONPATH);
the test process imports it too, to start the flow with the same registrations.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio

import stepsource as ss

__all__ = ["FLOW", "NODES", "engine", "expected_output"]

#: URL, worker count and lease are overridden by ``stepsource worker``; constructing does no I/O
engine = ss.Engine("memory://", workers=4, lease_seconds=1.0, poll_interval=0.05)

FLOW = "order.flow"
NODES = ("validate", "reserve", "charge", "notify", "ship", "close")
#: how often a sibling looks for the other's marker
_MARKER_POLL = 0.02


def effect(path: str, line: str) -> None:
    """Append one line to the side-effect file (closed at once: a SIGKILL loses nothing)."""
    with open(path, "a", encoding="utf-8") as file:
        file.write(line + "\n")


async def rendezvous(markers: str, me: str, other: str, timeout: float) -> None:
    """Leave my marker, then wait (bounded) for the other sibling's: passes only if the
    other one runs while this one waits (or ran before; a marker outlives a crash)."""
    Path(markers, me).touch()
    with anyio.fail_after(timeout):  # TimeoutError: the node's attempt fails, and the flow
        while not Path(markers, other).exists():
            await anyio.sleep(_MARKER_POLL)


@engine.step("order.validate")
async def validate(ctx: ss.StepContext, effects: str, order_id: str) -> dict[str, Any]:
    effect(effects, "validate")
    return {"order_id": order_id, "valid": True}


@engine.step("stock.reserve")
async def reserve(
    ctx: ss.StepContext, effects: str, markers: str, rendezvous_timeout: float
) -> dict[str, Any]:
    effect(effects, "reserve")
    await rendezvous(markers, "reserve", "charge", rendezvous_timeout)
    return {"reserved": ctx.get_dependency_field("validate", "order_id")}


@engine.step("payment.charge")
async def charge(
    ctx: ss.StepContext, effects: str, markers: str, amount: int, rendezvous_timeout: float
) -> dict[str, Any]:
    effect(effects, "charge")
    await rendezvous(markers, "charge", "reserve", rendezvous_timeout)
    multiplier = ctx.get_config("multiplier")
    assert isinstance(multiplier, int)
    return {"charged": amount * multiplier}


@engine.step("customer.notify")
async def notify(ctx: ss.StepContext, effects: str, order_id: str) -> dict[str, Any]:
    effect(effects, "notify")
    return {"notified": order_id}


@engine.step("shipping.schedule")
async def ship(ctx: ss.StepContext, effects: str) -> dict[str, Any]:
    effect(effects, "ship")
    return {
        "stock": ctx.get_dependency_result("reserve"),
        "paid": ctx.get_dependency_field("charge", "charged"),
    }


@engine.step("order.close")
async def close(ctx: ss.StepContext, effects: str) -> dict[str, Any]:
    effect(effects, "close")
    return {
        "shipped": ctx.get_dependency_field("ship", "paid") is not None,
        "notified": ctx.get_dependency_field("notify", "notified"),
    }


engine.dag(
    FLOW,
    {
        "validate": ss.Node("order.validate"),
        "reserve": ss.Node("stock.reserve", depends_on=["validate"]),
        "charge": ss.Node("payment.charge", depends_on=["validate"], config={"multiplier": 3}),
        "notify": ss.Node("customer.notify", depends_on=["validate"]),
        "ship": ss.Node("shipping.schedule", depends_on=["reserve", "charge"]),
        "close": ss.Node("order.close", depends_on=["ship", "notify"]),
    },
)


def expected_output(order_id: str, amount: int) -> dict[str, Any]:
    """The flow's output, ``{node: result}``, for an uninterrupted or a resumed run."""
    return {
        "validate": {"order_id": order_id, "valid": True},
        "reserve": {"reserved": order_id},
        "charge": {"charged": amount * 3},
        "notify": {"notified": order_id},
        "ship": {"stock": {"reserved": order_id}, "paid": amount * 3},
        "close": {"shipped": True, "notified": order_id},
    }
