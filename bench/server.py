"""The server under test and the broker it reads: started, probed, measured, stopped.

ranger-py is started as users start it: ``gunicorn -c gunicorn.conf.py`` from the repository root
with its settings in the environment. Any other gateway is started from the command line the
user gives, with the same environment (Rango's and Ranger's variable names are the same ones),
and ``{port}``, ``{metrics_port}``, ``{amqp_url}``, ``{vhost}`` filled in.

The benchmark works in a RabbitMQ vhost of its own on the shared broker, created with
``rabbitmqctl`` and deleted at the end; the broker itself is never reconfigured or stopped.
A server counts as ready when a message published to the exchange reaches a websocket client
(and, with several workers, when every worker consumes its own queue), so the check works for
any gateway, not only for ranger-py's ``/readyz``. The process itself (environment, ports,
process group, stop, log) is testbed.server's, shared with the integration tests.
"""

from __future__ import annotations

import contextlib
import re
import secrets
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import amqp
from websockets.sync.client import connect as ws_connect

from bench import procs
from testbed.rabbitmq import BrokerUnavailable, VhostAdmin
from testbed.server import REPO, ServerFailed, ServerProcess, free_port

__all__ = [
    "EXCHANGE",
    "REPO",
    "Broker",
    "BrokerUnavailable",
    "Server",
    "ServerFailed",
    "ServerSpec",
    "free_port",
]

EXCHANGE = "peatio.events.ranger"
READY_TIMEOUT = 60.0
_PROBE_STREAM = "benchprobe.ready"

_PROBLEM = re.compile(
    r"\b(ERROR|CRITICAL|FATAL|Traceback)\b|\bpanic:|\"level\":\"(error|fatal|panic)\"",
)


class Broker(VhostAdmin):
    """A vhost on the broker at ``host:port``: our own (created and deleted) unless given."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 5672,
        user: str = "guest",
        password: str = "guest",
        vhost: str | None = None,
    ) -> None:
        super().__init__(
            vhost or f"ranger-bench-{secrets.token_hex(4)}",
            host=host,
            port=port,
            user=user,
            password=password,
        )
        self.own = vhost is None
        self.created = False

    @property
    def amqp_url(self) -> str:
        return (
            f"amqp://{quote(self.user, safe='')}:{quote(self.password, safe='')}"
            f"@{self.host}:{self.port}/{quote(self.vhost, safe='')}"
        )

    def setup(self) -> None:
        self.check_reachable()
        if self.own:
            self.ctl("add_vhost", self.vhost)
            self.created = True
            self.ctl("set_permissions", "-p", self.vhost, self.user, ".*", ".*", ".*")

    def teardown(self) -> None:
        if self.created:
            self.delete_vhost()
            self.created = False

    def consumed_bindings(self, exchange: str) -> dict[str, set[str]]:
        """Queue name -> its routing keys on ``exchange``, for the queues that have a consumer
        now: a stopped server's queues outlive it until they expire."""
        consumed = {
            row["name"]
            for row in self._list("list_queues", "name", "consumers")
            if int(row["consumers"]) > 0
        }
        return {name: keys for name, keys in self.bindings(exchange).items() if name in consumed}

    def version(self) -> str | None:
        with contextlib.suppress(BrokerUnavailable, subprocess.TimeoutExpired):
            return self.ctl("version", timeout=20).strip() or None
        return None

    def publish_once(self, routing_key: str, body: bytes) -> None:
        with amqp.Connection(
            host=f"{self.host}:{self.port}",
            userid=self.user,
            password=self.password,
            virtual_host=self.vhost,
            connect_timeout=5,
        ) as connection:
            channel = connection.channel()
            channel.exchange_declare(EXCHANGE, "topic", durable=False, auto_delete=False)
            channel.basic_publish(amqp.Message(body), exchange=EXCHANGE, routing_key=routing_key)


@dataclass(frozen=True)
class ServerSpec:
    """What to benchmark: ranger-py (``command`` None) or another gateway's start command."""

    label: str
    url: str = "ws://127.0.0.1:{port}"
    command: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)

    @property
    def builtin(self) -> bool:
        return self.command is None

    def describe(self) -> str:
        return "gunicorn -c gunicorn.conf.py" if self.command is None else self.command


def _gunicorn() -> list[str]:
    script = Path(sys.executable).with_name("gunicorn")
    if script.exists():
        return [str(script), "-c", "gunicorn.conf.py"]
    return [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py"]


class Server(ServerProcess):
    """One running instance of a :class:`ServerSpec`."""

    broker: Broker
    stop_timeout = 40.0  # gunicorn.conf.py gives workers a 30 s graceful timeout
    tail_lines = 40

    def __init__(
        self,
        spec: ServerSpec,
        broker: Broker,
        *,
        log_path: Path,
        jwt_public_key: str,
        workers: int = 1,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(spec.label, broker=broker, log_path=log_path)
        self.spec = spec
        self.workers = workers
        fill = {
            "port": str(self.port),
            "metrics_port": str(self.metrics_port),
            "amqp_url": broker.amqp_url,
            "vhost": broker.vhost,
        }
        self.base_url = spec.url.format(**fill).rstrip("/")
        parts = urllib.parse.urlsplit(self.base_url)
        self.host = parts.hostname or "127.0.0.1"
        self.url_port = parts.port or self.port
        if spec.command is None:
            self.command = _gunicorn()
        else:
            self.command = ["sh", "-c", spec.command.format(**fill)]
        self.env.update(
            {
                "PORT": str(self.port),
                "RABBITMQ_USER": broker.user,
                "RABBITMQ_PASSWORD": broker.password,
                "JWT_PUBLIC_KEY": jwt_public_key,
                "WEB_CONCURRENCY": str(workers),
                **spec.env,
                **(extra_env or {}),
            }
        )
        self.started_pids: set[int] = set()

    def url(self, path: str) -> str:
        return self.base_url + path

    # lifecycle

    def start(self) -> Server:
        self.launch()
        self.wait_ready()
        self.started_pids = set(self.pids())
        return self

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout

        def port_open() -> bool:
            with contextlib.suppress(OSError):
                socket.create_connection((self.host, self.url_port), timeout=1).close()
                return True
            return False

        self.wait_while_alive(
            port_open, timeout=timeout, what=f"{self.name} to open port {self.url_port}"
        )
        if self.workers > 1:
            self.wait_consuming(
                EXCHANGE, self.workers, timeout=deadline - time.monotonic(), interval=0.3
            )
        self._probe(deadline)

    def _probe(self, deadline: float) -> None:
        """A message published to the exchange reaches a websocket client."""
        url = self.url(f"/public?stream={_PROBE_STREAM}")
        last_error = "no attempt"
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                with ws_connect(url, open_timeout=5, close_timeout=1) as ws:
                    for n in range(50):
                        self.broker.publish_once(f"public.{_PROBE_STREAM}", b'{"probe":%d}' % n)
                        with contextlib.suppress(TimeoutError):
                            while True:
                                if '"probe":' in str(ws.recv(timeout=0.2)):
                                    return
                        if time.monotonic() > deadline:
                            break
            except Exception as exc:  # refused, reset, handshake or broker trouble: retry
                last_error = f"{type(exc).__name__}: {exc}"
                time.sleep(0.2)
        raise ServerFailed(
            f"{self.name}: a published message never reached a client ({last_error}); "
            f"log:\n{self.log_tail()}"
        )

    def stop_report(self) -> dict[str, Any]:
        """:meth:`stop`, and how it went, for the report."""
        stopped = self.stop()
        if stopped is None:
            return {}
        if stopped.seconds is None:
            return {"exit_code": stopped.exit_code, "crashed": True}
        return {
            "exit_code": stopped.exit_code,
            "stop_s": round(stopped.seconds, 2),
            "killed": stopped.killed,
        }

    # measuring

    def pids(self) -> list[int]:
        return procs.tree(self.process.pid) if self.process is not None else []

    def sample(self, *, sockets: bool = False) -> procs.Sample:
        return procs.sample(self.pids(), sockets=sockets)

    def problems(self) -> list[str]:
        """What went wrong so far: exit, replaced workers, error lines in the log."""
        found = []
        if self.process is not None and self.process.poll() is not None and self.stopped is None:
            found.append(f"server exited with {self.process.returncode} during the run")
        now = set(self.pids())
        if self.alive and self.started_pids and not self.started_pids <= now:
            found.append(f"worker processes replaced: {sorted(self.started_pids - now)} gone")
        errors: dict[str, int] = {}
        for line in self.log_text().splitlines():
            if _PROBLEM.search(line):
                key = re.sub(r"^\S+ \S+ \[\d+\] ", "", line)[:160]
                errors[key] = errors.get(key, 0) + 1
        found.extend(f"log ({n}x): {text}" for text, n in list(errors.items())[:8])
        return found
