"""A server in a subprocess, started as users start it and stopped whatever state it is in.

:class:`ServerProcess` runs a command (by default ``python -m gunicorn -c gunicorn.conf.py``)
from the repository root in a process group of its own, its output appended to a log file. Its
environment is the inherited one scrubbed of every variable that would change the server's
behaviour, then free loopback ports and the broker's vhost, then what the caller states. The
tests and the benchmark subclass it with their own readiness and their own ways to use it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TypeVar

from testbed.rabbitmq import VhostAdmin
from testbed.waiting import TimedOut, wait_until

__all__ = [
    "GUNICORN",
    "REPO",
    "ServerFailed",
    "ServerProcess",
    "Stopped",
    "free_port",
    "scrubbed_environment",
]

REPO = Path(__file__).resolve().parents[1]
GUNICORN = (sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py")

# Inherited variables that would change the server's behaviour; the caller states its own.
_CONFIG_PREFIXES = ("RANGER_", "RABBITMQ_", "JWT_", "RANGO_RBAC_", "METRICS_", "API_CORS_")
_CONFIG_NAMES = {"PORT", "WEB_CONCURRENCY", "LOG_LEVEL", "CLOUDAMQP_URL", "AMQP_URL"}

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def scrubbed_environment() -> dict[str, str]:
    return {
        key: value
        for key, value in os.environ.items()
        if key not in _CONFIG_NAMES and not key.startswith(_CONFIG_PREFIXES)
    }


class ServerFailed(Exception):
    """The server exited or never became ready; the message carries its log tail."""


@dataclass(frozen=True)
class Stopped:
    """How :meth:`ServerProcess.stop` went; ``seconds`` is None if the server had already exited."""

    exit_code: int | None
    seconds: float | None
    killed: bool


class ServerProcess:
    """One server command (a gunicorn master and its workers, or another gateway) and its log."""

    stop_timeout = 20.0  # past it, stop() kills the whole group
    tail_lines = 200  # of the log, in failure messages

    def __init__(
        self,
        name: str,
        *,
        broker: VhostAdmin,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        rabbitmq: tuple[str, int] | None = None,
    ) -> None:
        """``rabbitmq`` is where the server connects, if not to ``broker`` (a proxy, say)."""
        self.name = name
        self.broker = broker
        self.log_path = log_path
        self.port = free_port()
        self.metrics_port = free_port()
        rabbit_host, rabbit_port = rabbitmq or (broker.host, broker.port)
        self.env = {
            **scrubbed_environment(),
            "PYTHONUNBUFFERED": "1",
            "RANGER_HOST": "127.0.0.1",
            "RANGER_PORT": str(self.port),
            "METRICS_HOST": "127.0.0.1",
            "METRICS_PORT": str(self.metrics_port),
            "RABBITMQ_HOST": rabbit_host,
            "RABBITMQ_PORT": str(rabbit_port),
            "RABBITMQ_VHOST": broker.vhost,
            **(env or {}),
        }
        self.command = list(GUNICORN)
        self.cwd = REPO
        self.process: subprocess.Popen[bytes] | None = None
        self.stopped: Stopped | None = None
        self._log: IO[bytes] | None = None

    # lifecycle

    def launch(self) -> None:
        """Start the command without waiting for anything."""
        self.stopped = None
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.command,
            cwd=self.cwd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            # Its own process group, so a stuck server can be killed with its workers.
            start_new_session=True,
        )

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def check_alive(self) -> None:
        if not self.alive:
            code = None if self.process is None else self.process.returncode
            raise ServerFailed(f"{self.name} exited with {code}; log:\n{self.log_tail()}")

    def wait_while_alive(
        self,
        condition: Callable[[], T | None],
        *,
        timeout: float,
        what: str,
        interval: float = 0.05,
    ) -> T:
        """:func:`wait_until`, failing at once if the server exits; both fail with its log."""

        def alive_and() -> T | None:
            self.check_alive()
            return condition()

        try:
            return wait_until(alive_and, timeout=timeout, what=what, interval=interval)
        except TimedOut as exc:
            raise ServerFailed(f"{exc}; log:\n{self.log_tail()}") from None

    def wait_consuming(
        self, exchange: str, workers: int, *, timeout: float, interval: float = 0.2
    ) -> None:
        """Wait until ``workers`` queues bound to ``exchange`` have a consumer.

        A readiness answer speaks for the one worker that gave it: with several, only the
        broker can tell that every worker consumes.
        """
        self.wait_while_alive(
            lambda: self.broker.consuming_queues(exchange) >= workers,
            timeout=timeout,
            what=f"{workers} consuming queues on {exchange}",
            interval=interval,
        )

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def worker_pids(self) -> list[int]:
        """The gunicorn workers now running: the master's child processes."""
        self.check_alive()
        assert self.process is not None
        pid = self.process.pid
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text()
        return [int(child) for child in children.split()]

    def wait_exit(self, timeout: float | None = None) -> int:
        assert self.process is not None
        return self.process.wait(timeout=self.stop_timeout if timeout is None else timeout)

    def terminate(self) -> None:
        """Ask the server to stop (SIGTERM, a graceful shutdown) without waiting."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def stop(self, timeout: float | None = None) -> Stopped | None:
        """SIGTERM, then SIGKILL to the whole group past ``timeout``; None if never started."""
        if self.process is None:
            return None
        if self.stopped is None:
            timeout = self.stop_timeout if timeout is None else timeout
            if self.process.poll() is None:
                started = time.monotonic()
                killed = False
                self.terminate()
                try:
                    self.process.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    killed = True
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(self.process.pid, signal.SIGKILL)
                    self.process.wait(timeout=timeout)
                self.stopped = Stopped(self.process.returncode, time.monotonic() - started, killed)
            else:
                self.stopped = Stopped(self.process.returncode, None, killed=False)
            self._kill_leftovers()
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.stopped

    def _kill_leftovers(self) -> None:
        """SIGKILL to whatever is left in the group of the (reaped) master.

        The kernel gives no new process the number of a group that still has members, so a
        process that now has the master's pid is a newcomer, and the group is not ours.
        """
        assert self.process is not None
        pid = self.process.pid
        if not Path(f"/proc/{pid}").exists():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)

    # logs

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def log_text(self, offset: int = 0) -> str:
        try:
            with self.log_path.open("rb") as log:
                log.seek(offset)
                return log.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def log_tail(self, offset: int = 0, lines: int | None = None) -> str:
        kept = self.tail_lines if lines is None else lines
        return "\n".join(self.log_text(offset).splitlines()[-kept:])
