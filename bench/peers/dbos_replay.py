"""DBOS replay of memoized steps: a crash, then recovery by another process.

``python -m bench.peers.dbos_replay crash DB N ID``: runs workflow ID of N+1 steps under
executor ``crashed`` and kills the process (``os._exit``) before the last step: the workflow
stays PENDING with N recorded steps.
``python -m bench.peers.dbos_replay recover DB N ID``: launches DBOS as another executor (so
launch recovers nothing by itself), then times ``DBOS._recover_pending_workflows(["crashed"])``
until the workflow's result: the workflow function runs again, its N recorded steps return
their outputs from the system database and the last step runs. The time printed
(``SECONDS x``) is the function's own, from its start to the end of the N recorded steps
(the recovery's dispatch and the result's polling are not counted).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from dbos import DBOS, SetWorkflowID

from bench.peers.dbos_peer import make_engine

CRASH_AT: int | None = None
MARKS: list[float] = []  # perf_counter at the workflow function's start and after its loop


@DBOS.step()
def record(i: int) -> int:
    return i


@DBOS.workflow()
def memoized(n: int) -> int:
    MARKS.append(time.perf_counter())
    total = 0
    for i in range(n):
        total += record(i)
    MARKS.append(time.perf_counter())
    if CRASH_AT is not None:
        os._exit(0)  # the process dies with the workflow PENDING
    return total + record(n)


def launch(path: Path, executor: str) -> None:
    DBOS(
        config={
            "name": "stepsource-bench-replay",
            "system_database_url": f"sqlite:///{path}",
            "system_database_engine": make_engine(path),
            "log_level": "WARNING",
            "executor_id": executor,
        }
    )
    DBOS.launch()


def main() -> None:
    global CRASH_AT
    mode, path, n, workflow_id = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    if mode == "crash":
        CRASH_AT = n
        launch(path, "crashed")
        with SetWorkflowID(workflow_id):
            memoized(n)
        raise SystemExit("the workflow was expected to crash")
    launch(path, "recovering")
    try:
        # DBOS recovers pending workflows at launch; this is how its own tests recover them on
        # demand, so the replay is timed alone
        handles = DBOS._recover_pending_workflows(["crashed"])  # noqa: SLF001
        results = [handle.get_result() for handle in handles]
        seconds = MARKS[-1] - MARKS[0]
        if [h.get_workflow_id() for h in handles] != [workflow_id] or results != [
            sum(range(n + 1))
        ]:
            raise SystemExit(f"unexpected recovery: {handles} {results}")
        sys.stdout.write(f"SECONDS {seconds}\n")
    finally:
        DBOS.destroy()


if __name__ == "__main__":
    main()
