"""The server under test: ``gunicorn -c gunicorn.conf.py`` in a subprocess, as users start it.

A :class:`ServerPool` starts servers on free ports in the session's vhost, each with its own
exchange (unless a test asks for Peatio's default one) so servers running side by side never see
each other's messages. Servers with the same environment are shared across the session; a test
that kills or disturbs its server starts a dedicated one. Readiness is a condition, never a
sleep: ``/readyz`` answers 200 and, with several workers, every worker's queue is consumed.
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, TypeVar

from .broker import Broker, Publisher
from .scrape import Scrape
from .wsclient import Client, HttpResponse, http_request

__all__ = [
    "DEFAULT_EXCHANGE",
    "REPO",
    "Connect",
    "Server",
    "ServerPool",
    "StartServer",
    "free_port",
    "unique",
    "wait_until",
]

REPO = Path(__file__).resolve().parents[2]
DEFAULT_EXCHANGE = "peatio.events.ranger"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0
LOG_TAIL_LINES = 200

# Inherited variables that would change the server's behaviour; every test states its own.
_CONFIG_PREFIXES = ("RANGER_", "RABBITMQ_", "JWT_", "RANGO_RBAC_", "METRICS_", "API_CORS_")
_CONFIG_NAMES = {"PORT", "WEB_CONCURRENCY", "LOG_LEVEL", "CLOUDAMQP_URL", "AMQP_URL"}

T = TypeVar("T")

# The ``connect`` fixture: ``connect(server, path="/public", **client_options) -> Client``.
Connect = Callable[..., Client]
# The ``start_server`` fixture: ``start_server(env, **ServerPool.new options) -> Server``.
StartServer = Callable[..., "Server"]


def wait_until(
    condition: Callable[[], T], *, timeout: float, what: str, interval: float = 0.05
) -> T:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def unique(prefix: str = "m") -> str:
    """A fresh market-like name, so tests sharing a server never share a stream."""
    return f"{prefix}{secrets.token_hex(4)}"


def _inherited_environment() -> dict[str, str]:
    return {
        key: value
        for key, value in os.environ.items()
        if key not in _CONFIG_NAMES and not key.startswith(_CONFIG_PREFIXES)
    }


class ServerFailed(Exception):
    """The server exited or never became ready; the message carries its log."""


class Server:
    """One gunicorn master (and its workers) running ranger-py."""

    def __init__(
        self,
        name: str,
        env: Mapping[str, str],
        *,
        broker: Broker,
        publisher: Publisher,
        log_path: Path,
        exchange: str,
        rabbitmq: tuple[str, int] | None = None,
    ) -> None:
        self.name = name
        self.exchange = exchange
        self.port = free_port()
        self.metrics_port = free_port()
        self.workers = int(env.get("WEB_CONCURRENCY", "1"))
        self.log_path = log_path
        self._broker = broker
        self._publisher = publisher
        rabbit_host, rabbit_port = rabbitmq or (broker.host, broker.port)
        self.env = {
            **_inherited_environment(),
            "PYTHONUNBUFFERED": "1",
            "RANGER_HOST": "127.0.0.1",
            "RANGER_PORT": str(self.port),
            "METRICS_HOST": "127.0.0.1",
            "METRICS_PORT": str(self.metrics_port),
            "RABBITMQ_HOST": rabbit_host,
            "RABBITMQ_PORT": str(rabbit_port),
            "RABBITMQ_VHOST": broker.vhost,
            "LOG_LEVEL": "debug",
            **({} if exchange == DEFAULT_EXCHANGE else {"RANGER_EXCHANGE": exchange}),
            **env,
        }
        # How users start it; a test may run the Procfile's command instead.
        self.command = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py"]
        self._log: IO[bytes] | None = None
        self.process: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"<Server {self.name} :{self.port}>"

    # lifecycle

    def start(self, *, wait: bool = True) -> Server:
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.command,
            cwd=REPO,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            # Its own process group, so a stuck server can be killed with its workers.
            start_new_session=True,
        )
        if wait:
            self.wait_ready()
        return self

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _check_alive(self) -> None:
        if not self.alive:
            code = None if self.process is None else self.process.returncode
            raise ServerFailed(f"{self.name} exited with {code}; log:\n{self.log_tail()}")

    def readyz(self) -> HttpResponse | None:
        try:
            return http_request(self.port, "/readyz", timeout=2)
        except OSError:
            return None

    def _all_workers_consuming(self) -> bool:
        self._check_alive()
        return self._broker.consuming_queues(self.exchange) >= self.workers

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout

        def ready() -> bool:
            self._check_alive()
            response = self.readyz()
            return response is not None and response.status == 200

        try:
            wait_until(ready, timeout=timeout, what=f"{self.name} /readyz 200")
            if self.workers > 1:
                # /readyz answers for one worker only: wait for every worker's queue.
                wait_until(
                    self._all_workers_consuming,
                    timeout=max(deadline - time.monotonic(), 5.0),
                    what=f"{self.workers} consuming queues on {self.exchange}",
                    interval=0.2,
                )
        except AssertionError as exc:
            raise ServerFailed(f"{exc}; log:\n{self.log_tail()}") from None

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def worker_pids(self) -> list[int]:
        """The gunicorn workers now running: the master's child processes."""
        self._check_alive()
        assert self.process is not None
        pid = self.process.pid
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text()
        return [int(child) for child in children.split()]

    def wait_exit(self, timeout: float = STOP_TIMEOUT) -> int:
        assert self.process is not None
        return self.process.wait(timeout=timeout)

    def terminate(self) -> None:
        """Ask the server to stop (SIGTERM, gunicorn's graceful shutdown) without waiting."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, then SIGKILL to the whole group past ``timeout``; returns the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=timeout)
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.process.returncode

    # logs

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def log_text(self, offset: int = 0) -> str:
        try:
            with self.log_path.open("rb") as log:
                log.seek(offset)
                return log.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, offset: int = 0, lines: int = LOG_TAIL_LINES) -> str:
        return "\n".join(self.log_text(offset).splitlines()[-lines:])

    # talking to it

    def url(self, path: str = "/public") -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    def connect(self, path: str = "/public", **kwargs: object) -> Client:
        return Client(self.url(path), **kwargs)  # type: ignore[arg-type]

    def http(self, path: str, **kwargs: object) -> HttpResponse:
        return http_request(self.port, path, **kwargs)  # type: ignore[arg-type]

    def scrape(self, path: str = "/metrics") -> Scrape:
        """One scrape of the metrics endpoint (PROTOCOL §7)."""
        response = http_request(self.metrics_port, path)
        assert response.status == 200, (path, response)
        return Scrape.parse(response.body.decode())

    def publish(self, routing_key: str, body: bytes | str | object) -> None:
        """Publish ``body`` (raw if bytes/str, else compact JSON) to this server's exchange."""
        if not isinstance(body, bytes | str):
            body = json.dumps(body, separators=(",", ":"))
        self._publisher.publish(self.exchange, routing_key, body)

    def sync(self) -> None:
        """Return once the (single) worker has consumed everything published before the call.

        The worker's queue is FIFO and consumed in order, so a marker seen by a probe client
        means every earlier message was routed.
        """
        stream = f"{unique('sync')}.barrier"
        probe = self.connect(f"/?stream={stream}")
        try:
            probe.recv()
            self.publish(f"public.{stream}", '"marker"')
            assert probe.recv() == f'{{"{stream}":"marker"}}'
        finally:
            probe.close()


class ServerPool:
    """Starts servers for the session; shares those whose environment is the same."""

    def __init__(self, broker: Broker, publisher: Publisher, log_dir: Path) -> None:
        self._broker = broker
        self._publisher = publisher
        self._log_dir = log_dir
        self._counter = itertools.count(1)
        self._shared: dict[tuple[tuple[str, str], ...], Server] = {}
        self.servers: list[Server] = []

    def new(
        self,
        env: Mapping[str, str] | None = None,
        *,
        exchange: str | None = None,
        rabbitmq: tuple[str, int] | None = None,
        name: str = "server",
    ) -> Server:
        """A server that is not started yet; ``exchange`` None means one of its own."""
        number = next(self._counter)
        server = Server(
            f"{name}-{number}",
            dict(env or {}),
            broker=self._broker,
            publisher=self._publisher,
            log_path=self._log_dir / f"{name}-{number}.log",
            exchange=exchange or f"ranger.test.{number}.{secrets.token_hex(2)}",
            rabbitmq=rabbitmq,
        )
        self.servers.append(server)
        return server

    def shared(
        self, env: Mapping[str, str] | None = None, *, exchange: str | None = None
    ) -> Server:
        """A running server with exactly this environment, started on first use."""
        key = (*sorted((env or {}).items()), ("exchange", exchange or ""))
        server = self._shared.get(key)
        if server is None or not server.alive:
            server = self.new(env, exchange=exchange, name="shared").start()
            self._shared[key] = server
        return server

    def stop_all(self) -> None:
        for server in self.servers:  # all at once: each graceful shutdown takes a moment
            server.terminate()
        for server in self.servers:
            server.stop()
