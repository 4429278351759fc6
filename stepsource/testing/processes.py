"""Real ``python -m stepsource --url URL worker MODULE:engine`` processes for tests.

:class:`WorkerProcesses` spawns them with a cleaned environment and kills the leftovers;
a :class:`WorkerProcess` waits until it runs or ends; :func:`eventually` polls a condition
against a deadline and fails with the watched processes' output.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import anyio

__all__ = ["DEADLINE", "KILL_AT_ENV", "WorkerProcess", "WorkerProcesses", "eventually"]

#: a generous bound for one process to start, lease, run or stop on a loaded 2-core machine
DEADLINE = 30.0
#: the engine's kill hook: the process SIGKILLs itself at this named point (``point:N``)
KILL_AT_ENV = "STEPSOURCE_TEST_KILL_AT"


async def eventually(
    what: str,
    probe: Callable[[], Awaitable[bool]],
    *watched: WorkerProcess,
    timeout: float = DEADLINE,
) -> None:
    """Poll ``probe`` until it is true; fail after ``timeout`` with the workers' output."""
    deadline = time.monotonic() + timeout
    while not await probe():
        if time.monotonic() > deadline:
            logs = "\n".join(w.output() for w in watched)
            raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{logs}")
        await anyio.sleep(0.02)


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


@dataclass
class WorkerProcess:
    """One ``stepsource worker`` process and the files its stdout and stderr go to."""

    name: str
    proc: subprocess.Popen[bytes]
    stdout: Path
    stderr: Path
    #: the kill point it was spawned with (``STEPSOURCE_TEST_KILL_AT``), if any
    kill_at: str | None = None
    spawned_at: float = field(default_factory=time.monotonic)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        """Everything the process printed so far (for assertions and failure messages)."""
        out, err = _read(self.stdout), _read(self.stderr)
        return f"--- {self.name} (pid {self.pid}) stdout:\n{out}--- stderr:\n{err}"

    def stdout_text(self) -> str:
        return _read(self.stdout)

    def stderr_text(self) -> str:
        return _read(self.stderr)

    def running(self) -> bool:
        """It printed the one line ``stepsource worker`` prints once it is running."""
        return any(
            line.startswith("stepsource worker ") and " running " in line
            for line in _read(self.stdout).splitlines()
        )

    async def ready(self, timeout: float = DEADLINE) -> None:
        """Wait until :meth:`running`."""

        async def printed() -> bool:
            return self.running()

        await eventually(f"{self.name} to be running", printed, self, timeout=timeout)

    async def exited(self, timeout: float = DEADLINE) -> int:
        """Wait for the process to end; its return code (negative: killed by that signal)."""

        async def ended() -> bool:
            return self.proc.poll() is not None

        await eventually(f"{self.name} to exit", ended, self, timeout=timeout)
        assert self.proc.returncode is not None
        return self.proc.returncode

    async def terminate(self, timeout: float = DEADLINE) -> int:
        """SIGTERM, then the return code once the process has ended."""
        self.proc.send_signal(signal.SIGTERM)
        return await self.exited(timeout=timeout)


@dataclass
class WorkerProcesses:
    """Spawns ``stepsource worker`` processes running ``app`` (``module:engine``) on ``url``."""

    #: the processes' working directory, where their ``NAME.out`` and ``NAME.err`` files go
    folder: Path
    url: str
    app: str
    #: put before the inherited ``PYTHONPATH`` (the folder of ``app``'s module, say)
    pythonpath: Sequence[str | os.PathLike[str]] = ()
    #: inherited variables left out: these names, and every name with one of these prefixes
    drop: Collection[str] = ()
    drop_prefixes: Collection[str] = ()
    #: variables every process gets (a spawn's own ``env`` comes on top)
    env: Mapping[str, str] = field(default_factory=dict)
    workers: int = 2
    lease_seconds: float = 1
    spawned: list[WorkerProcess] = field(default_factory=list)

    def environment(self, env: Mapping[str, str] | None = None) -> dict[str, str]:
        environment = {
            k: v
            for k, v in os.environ.items()
            if k not in self.drop and not k.startswith(tuple(self.drop_prefixes))
        }
        paths = [*map(str, self.pythonpath), environment.get("PYTHONPATH")]
        environment["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
        environment["PYTHONUNBUFFERED"] = "1"
        return {**environment, **self.env, **(env or {})}

    def spawn(
        self,
        name: str,
        *,
        kill_at: str | None = None,
        lease_seconds: float | None = None,
        env: Mapping[str, str] | None = None,
        files: str | None = None,
        args: Sequence[str] = (),
    ) -> WorkerProcess:
        """Start one; its output goes to ``FILES.out`` and ``FILES.err`` (``files``: ``name``).

        ``kill_at`` arms the engine's kill hook; ``lease_seconds`` overrides the pool's;
        ``args`` are more ``stepsource worker`` options (``--metrics-port``...).
        """
        armed = {} if kill_at is None else {KILL_AT_ENV: kill_at}
        environment = self.environment({**(env or {}), **armed})
        lease = self.lease_seconds if lease_seconds is None else lease_seconds
        command = [
            sys.executable,
            "-m",
            "stepsource",
            "--url",  # before the subcommand: the worker subparser has no --url of its own
            self.url,
            "worker",
            self.app,
            "--workers",
            str(self.workers),
            "--lease-seconds",
            str(lease),
            *args,
        ]
        stem = files or name
        stdout, stderr = self.folder / f"{stem}.out", self.folder / f"{stem}.err"
        with stdout.open("wb") as out, stderr.open("wb") as err:
            proc = subprocess.Popen(
                command, cwd=self.folder, env=environment, stdout=out, stderr=err
            )
        worker = WorkerProcess(name, proc, stdout, stderr, kill_at)
        self.spawned.append(worker)
        return worker

    def kill_all(self) -> None:
        """SIGKILL every process still alive (a SIGSTOPped one too) and reap them all."""
        for worker in self.spawned:
            if worker.proc.poll() is None:
                worker.proc.kill()
            worker.proc.wait(timeout=DEADLINE)

    def __enter__(self) -> WorkerProcesses:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill_all()
