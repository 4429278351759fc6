"""What every server the tests start (nats-server, redis-server, PostgreSQL) has in common: one
subprocess writing a log file, read back in errors, killed or stopped, and a context manager.
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path
from types import TracebackType

__all__ = ["ServerProcess"]


class ServerProcess:
    """A server's subprocess (``process``, once started) and its log file (``log_path``)."""

    process: subprocess.Popen[bytes] | None
    #: the signal of a graceful stop
    stop_signal = signal.SIGTERM

    @property
    def log_path(self) -> Path:
        """Where the server writes its log."""
        raise NotImplementedError

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the server's log ("" if it cannot be read)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def kill(self) -> None:
        """SIGKILL the process (no shutdown, no flush) and reap it."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the process gracefully (``stop_signal``), killing it if it does not exit in
        time."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(self.stop_signal)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
