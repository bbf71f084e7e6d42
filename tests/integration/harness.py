"""The server under test: ``gunicorn -c gunicorn.conf.py`` in a subprocess, as users start it.

A :class:`ServerPool` starts servers on free ports in the session's vhost, each with its own
exchange (unless a test asks for Peatio's default one) so servers running side by side never see
each other's messages. Servers with the same environment are shared across the session; a test
that kills or disturbs its server starts a dedicated one. Readiness is a condition, never a
sleep: ``/readyz`` answers 200 and, with several workers, every worker's queue is consumed.
Starting, stopping and reading the log are testbed.server's, shared with the benchmark.
"""

from __future__ import annotations

import itertools
import json
import secrets
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from testbed.server import REPO, ServerFailed, ServerProcess, free_port
from testbed.waiting import wait_until

from .broker import Broker, Publisher
from .scrape import Scrape
from .wsclient import Client, HttpResponse, http_request

__all__ = [
    "DEFAULT_EXCHANGE",
    "REPO",
    "Connect",
    "Server",
    "ServerFailed",
    "ServerPool",
    "StartServer",
    "free_port",
    "unique",
    "wait_until",
]

DEFAULT_EXCHANGE = "peatio.events.ranger"
START_TIMEOUT = 30.0

# The ``connect`` fixture: ``connect(server, path="/public", **client_options) -> Client``.
Connect = Callable[..., Client]
# The ``start_server`` fixture: ``start_server(env, **ServerPool.new options) -> Server``.
StartServer = Callable[..., "Server"]


def unique(prefix: str = "m") -> str:
    """A fresh market-like name, so tests sharing a server never share a stream."""
    return f"{prefix}{secrets.token_hex(4)}"


class Server(ServerProcess):
    """One gunicorn master (and its workers) running ranger-py, with debug logs.

    Started with ``python -m gunicorn``, as users start it; a test may set ``command`` to the
    Procfile's instead, or ``cwd`` to run an installed copy outside the checkout.
    """

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
        super().__init__(
            name,
            broker=broker,
            log_path=log_path,
            rabbitmq=rabbitmq,
            env={
                "LOG_LEVEL": "debug",
                **({} if exchange == DEFAULT_EXCHANGE else {"RANGER_EXCHANGE": exchange}),
                **env,
            },
        )
        self.exchange = exchange
        self.workers = int(env.get("WEB_CONCURRENCY", "1"))
        self._publisher = publisher

    def __repr__(self) -> str:
        return f"<Server {self.name} :{self.port}>"

    def start(self, *, wait: bool = True) -> Server:
        self.launch()
        if wait:
            self.wait_ready()
        return self

    def readyz(self) -> HttpResponse | None:
        try:
            return http_request(self.port, "/readyz", timeout=2)
        except OSError:
            return None

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout

        def ready() -> bool:
            response = self.readyz()
            return response is not None and response.status == 200

        self.wait_while_alive(ready, timeout=timeout, what=f"{self.name} /readyz 200")
        if self.workers > 1:
            self.wait_all_consuming(timeout=max(deadline - time.monotonic(), 5.0))

    def wait_all_consuming(self, timeout: float) -> None:
        """Every worker's queue on this server's exchange has its consumer."""
        self.wait_consuming(self.exchange, self.workers, timeout=timeout)

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
