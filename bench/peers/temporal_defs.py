"""Workflows and the activity of the Temporal peer (a module of their own: the workflow
sandbox re-imports the module that defines a workflow)."""

from __future__ import annotations

from datetime import timedelta

from temporalio import activity, workflow

TIMEOUT = timedelta(seconds=60)


@activity.defn
async def noop(i: int) -> int:
    return i


@workflow.defn
class SequentialActivities:
    @workflow.run
    async def run(self, n: int) -> int:
        total = 0
        for i in range(n):
            total += await workflow.execute_activity(noop, i, start_to_close_timeout=TIMEOUT)
        return total


@workflow.defn
class SequentialLocalActivities:
    @workflow.run
    async def run(self, n: int) -> int:
        total = 0
        for i in range(n):
            total += await workflow.execute_local_activity(noop, i, start_to_close_timeout=TIMEOUT)
        return total


@workflow.defn
class OneActivity:
    @workflow.run
    async def run(self) -> int:
        return await workflow.execute_activity(noop, 1, start_to_close_timeout=TIMEOUT)


WORKFLOWS = [SequentialActivities, SequentialLocalActivities, OneActivity]
