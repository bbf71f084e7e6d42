"""The server under test and the broker it reads: started, probed, measured, stopped.

ranger-py is started as users start it: ``gunicorn -c gunicorn.conf.py`` from the repository root
with its settings in the environment. Any other gateway is started from the command line the
user gives, with the same environment (Rango's and Ranger's variable names are the same ones),
and ``{port}``, ``{metrics_port}``, ``{amqp_url}``, ``{vhost}`` filled in.

The benchmark works in a RabbitMQ vhost of its own on the shared broker, created with
``rabbitmqctl`` and deleted at the end; the broker itself is never reconfigured or stopped.
A server counts as ready when a message published to the exchange reaches a websocket client
(and, with several workers, when every worker consumes its own queue), so the check works for
any gateway, not only for ranger-py's ``/readyz``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

import amqp
from websockets.sync.client import connect as ws_connect

from bench import procs

__all__ = [
    "EXCHANGE",
    "REPO",
    "Broker",
    "BrokerError",
    "Server",
    "ServerFailed",
    "ServerSpec",
    "free_port",
]

REPO = Path(__file__).resolve().parents[1]
EXCHANGE = "peatio.events.ranger"
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 40.0  # gunicorn.conf.py gives workers a 30 s graceful timeout
_PROBE_STREAM = "benchprobe.ready"

# Inherited variables that would change the server's behaviour; the benchmark states its own.
_CONFIG_PREFIXES = ("RANGER_", "RABBITMQ_", "JWT_", "RANGO_RBAC_", "METRICS_", "API_CORS_")
_CONFIG_NAMES = {"PORT", "WEB_CONCURRENCY", "LOG_LEVEL", "CLOUDAMQP_URL", "AMQP_URL"}
_PROBLEM = re.compile(
    r"\b(ERROR|CRITICAL|FATAL|Traceback)\b|\bpanic:|\"level\":\"(error|fatal|panic)\"",
)


class BrokerError(Exception):
    """RabbitMQ cannot be used; the message says how to fix it."""


class ServerFailed(Exception):
    """The server exited or never became ready; the message carries its log tail."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Broker:
    """A vhost on the broker at ``host:port``: our own (created and deleted) unless given."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 5672,
        user: str = "guest",
        password: str = "guest",
        vhost: str | None = None,
    ) -> None:
        self.host, self.port, self.user, self.password = host, port, user, password
        self.own = vhost is None
        self.vhost = vhost or f"ranger-bench-{secrets.token_hex(4)}"
        self.created = False
        self._ctl = shutil.which("rabbitmqctl")

    @property
    def amqp_url(self) -> str:
        return (
            f"amqp://{quote(self.user, safe='')}:{quote(self.password, safe='')}"
            f"@{self.host}:{self.port}/{quote(self.vhost, safe='')}"
        )

    def ctl(self, *args: str, timeout: float = 60.0) -> str:
        if self._ctl is None:
            raise BrokerError("rabbitmqctl is not installed (apt-get install rabbitmq-server)")
        result = subprocess.run(
            [self._ctl, "-q", *args], capture_output=True, text=True, timeout=timeout, check=False
        )
        if result.returncode != 0:
            raise BrokerError(
                f"rabbitmqctl {' '.join(args)} failed ({result.returncode}): "
                f"{(result.stderr or result.stdout).strip()}"
            )
        return result.stdout

    def check_reachable(self) -> None:
        try:
            socket.create_connection((self.host, self.port), timeout=3).close()
        except OSError as exc:
            raise BrokerError(
                f"RabbitMQ is not reachable on {self.host}:{self.port} ({exc}); start it with "
                "`rabbitmq-server -detached && rabbitmqctl await_startup`"
            ) from exc

    def setup(self) -> None:
        self.check_reachable()
        if self.own:
            self.ctl("add_vhost", self.vhost)
            self.created = True
            self.ctl("set_permissions", "-p", self.vhost, self.user, ".*", ".*", ".*")

    def teardown(self) -> None:
        if self.created:
            self.ctl("delete_vhost", self.vhost)
            self.created = False

    def version(self) -> str | None:
        with contextlib.suppress(BrokerError, subprocess.TimeoutExpired):
            return self.ctl("version", timeout=20).strip() or None
        return None

    def consuming_queues(self, exchange: str) -> int:
        """Queues bound to ``exchange`` that have a consumer: one per ready server worker."""

        def rows(*args: str) -> list[dict[str, Any]]:
            out = self.ctl(*args, "-p", self.vhost, "--formatter", "json")
            parsed: list[dict[str, Any]] = json.loads(out or "[]")
            return parsed

        bound = {
            row["destination_name"]
            for row in rows("list_bindings", "source_name", "destination_name", "destination_kind")
            if row["source_name"] == exchange and row["destination_kind"] == "queue"
        }
        return sum(
            1
            for row in rows("list_queues", "name", "consumers")
            if row["name"] in bound and int(row["consumers"]) > 0
        )

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


def _inherited_environment() -> dict[str, str]:
    return {
        key: value
        for key, value in os.environ.items()
        if key not in _CONFIG_NAMES and not key.startswith(_CONFIG_PREFIXES)
    }


def _gunicorn() -> list[str]:
    script = Path(sys.executable).with_name("gunicorn")
    if script.exists():
        return [str(script), "-c", "gunicorn.conf.py"]
    return [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py"]


class Server:
    """One running instance of a :class:`ServerSpec`."""

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
        self.spec = spec
        self.broker = broker
        self.workers = workers
        self.log_path = log_path
        self.port = free_port()
        self.metrics_port = free_port()
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
        self.command = (
            _gunicorn() if spec.command is None else ["sh", "-c", spec.command.format(**fill)]
        )
        self.env = {
            **_inherited_environment(),
            "PYTHONUNBUFFERED": "1",
            "RANGER_HOST": "127.0.0.1",
            "RANGER_PORT": str(self.port),
            "PORT": str(self.port),
            "METRICS_HOST": "127.0.0.1",
            "METRICS_PORT": str(self.metrics_port),
            "RABBITMQ_HOST": broker.host,
            "RABBITMQ_PORT": str(broker.port),
            "RABBITMQ_USER": broker.user,
            "RABBITMQ_PASSWORD": broker.password,
            "RABBITMQ_VHOST": broker.vhost,
            "JWT_PUBLIC_KEY": jwt_public_key,
            "WEB_CONCURRENCY": str(workers),
            **spec.env,
            **(extra_env or {}),
        }
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._log_offset = 0
        self.started_pids: set[int] = set()
        self.stop_result: dict[str, Any] = {}

    def url(self, path: str) -> str:
        return self.base_url + path

    # lifecycle

    def start(self) -> Server:
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.command,
            cwd=REPO,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: killed with its workers if stuck
        )
        self.wait_ready()
        self.started_pids = set(self.pids())
        return self

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _check_alive(self) -> None:
        if not self.alive:
            code = None if self.process is None else self.process.returncode
            raise ServerFailed(f"{self.spec.label} exited with {code}; log:\n{self.log_tail()}")

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            with contextlib.suppress(OSError):
                socket.create_connection((self.host, self.url_port), timeout=1).close()
                break
            if time.monotonic() > deadline:
                raise ServerFailed(f"{self.spec.label}: port {self.port} never opened")
            time.sleep(0.05)
        while self.workers > 1 and self.broker.consuming_queues(EXCHANGE) < self.workers:
            self._check_alive()
            if time.monotonic() > deadline:
                raise ServerFailed(f"{self.spec.label}: fewer than {self.workers} queues consumed")
            time.sleep(0.3)
        self._probe(deadline)

    def _probe(self, deadline: float) -> None:
        """A message published to the exchange reaches a websocket client."""
        url = self.url(f"/public?stream={_PROBE_STREAM}")
        last_error = "no attempt"
        while time.monotonic() < deadline:
            self._check_alive()
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
            f"{self.spec.label}: a published message never reached a client ({last_error}); "
            f"log:\n{self.log_tail()}"
        )

    def stop(self, timeout: float = STOP_TIMEOUT) -> dict[str, Any]:
        """SIGTERM, then SIGKILL to the whole group past ``timeout``; says how it went."""
        if self.process is None:
            return {}
        if self.process.poll() is None:
            start = time.monotonic()
            killed = False
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                killed = True
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=timeout)
            self.stop_result = {
                "exit_code": self.process.returncode,
                "stop_s": round(time.monotonic() - start, 2),
                "killed": killed,
            }
        else:
            self.stop_result = {"exit_code": self.process.returncode, "crashed": True}
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)  # anything left behind in its group
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.stop_result

    # measuring

    def pids(self) -> list[int]:
        return procs.tree(self.process.pid) if self.process is not None else []

    def sample(self, *, sockets: bool = False) -> procs.Sample:
        return procs.sample(self.pids(), sockets=sockets)

    def problems(self) -> list[str]:
        """What went wrong so far: exit, replaced workers, error lines in the log."""
        found = []
        if self.process is not None and self.process.poll() is not None and not self.stop_result:
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

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])
