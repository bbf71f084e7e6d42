"""The RabbitMQ side of the integration tests: a vhost on the shared broker, and a publisher.

Never stops or reconfigures the shared broker: each test session works in its own vhost
(``ranger-test-<random>``), deleted at the end. The publisher speaks plain AMQP like Peatio does
(PROTOCOL §5): a topic exchange declared non-durable, raw bodies, no message properties.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import shutil
import socket
import subprocess
from typing import Any

import amqp

__all__ = ["START_HINT", "Broker", "BrokerUnavailable", "Publisher"]

START_HINT = (
    "start it with `rabbitmq-server -detached && rabbitmqctl await_startup` "
    "(install it with `apt-get install rabbitmq-server`)"
)


class BrokerUnavailable(Exception):
    """RabbitMQ cannot be used; the message says how to fix it."""


class Broker:
    """A vhost of its own on the broker at ``host:port``, administered with ``rabbitmqctl``."""

    def __init__(self, host: str = "127.0.0.1", port: int = 5672) -> None:
        self.host = host
        self.port = port
        self.user = "guest"
        self.password = "guest"
        self.vhost = f"ranger-test-{secrets.token_hex(4)}"
        ctl = shutil.which("rabbitmqctl")
        if ctl is None:
            raise BrokerUnavailable(f"rabbitmqctl is not installed; {START_HINT}")
        self._ctl = ctl

    def check_reachable(self) -> None:
        try:
            socket.create_connection((self.host, self.port), timeout=3).close()
        except OSError as exc:
            raise BrokerUnavailable(
                f"RabbitMQ is not reachable on {self.host}:{self.port} ({exc}); {START_HINT}"
            ) from exc

    def ctl(self, *args: str) -> str:
        result = subprocess.run(
            [self._ctl, "-q", *args], capture_output=True, text=True, timeout=60, check=False
        )
        if result.returncode != 0:
            raise BrokerUnavailable(
                f"rabbitmqctl {' '.join(args)} failed ({result.returncode}): "
                f"{result.stderr.strip() or result.stdout.strip()}"
            )
        return result.stdout

    def create_vhost(self) -> None:
        self.ctl("add_vhost", self.vhost)
        self.ctl("set_permissions", "-p", self.vhost, self.user, ".*", ".*", ".*")

    def delete_vhost(self) -> None:
        self.ctl("delete_vhost", self.vhost)

    def _list(self, *args: str) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = json.loads(
            self.ctl(*args, "-p", self.vhost, "--formatter", "json") or "[]"
        )
        return rows

    def consuming_queues(self, exchange: str) -> int:
        """Queues bound to ``exchange`` that have a consumer: one per ready server worker."""
        bound = {
            row["destination_name"]
            for row in self._list(
                "list_bindings", "source_name", "destination_name", "destination_kind"
            )
            if row["source_name"] == exchange and row["destination_kind"] == "queue"
        }
        return sum(
            1
            for row in self._list("list_queues", "name", "consumers")
            if row["name"] in bound and int(row["consumers"]) > 0
        )

    def publisher(self) -> Publisher:
        return Publisher(self)


class Publisher:
    """Publishes raw bodies to a topic exchange of the test vhost, with publisher confirms.

    Confirms make ``publish`` return only once the broker has routed the message, so a test can
    rely on the order of what it published.
    """

    def __init__(self, broker: Broker) -> None:
        self._broker = broker
        self._connection: amqp.Connection | None = None
        self._channel: amqp.Channel | None = None
        self._declared: set[str] = set()

    def _open(self) -> amqp.Channel:
        if self._channel is None:
            broker = self._broker
            self._connection = amqp.Connection(
                host=f"{broker.host}:{broker.port}",
                userid=broker.user,
                password=broker.password,
                virtual_host=broker.vhost,
                connect_timeout=5,
                confirm_publish=True,
            )
            self._connection.connect()
            self._channel = self._connection.channel()
            self._declared.clear()
        return self._channel

    def _publish_once(self, exchange: str, routing_key: str, body: bytes) -> None:
        channel = self._open()
        if exchange not in self._declared:
            # As Peatio declares it: topic, non-durable, not auto-delete (PROTOCOL §5).
            channel.exchange_declare(exchange, "topic", durable=False, auto_delete=False)
            self._declared.add(exchange)
        channel.basic_publish(amqp.Message(body), exchange=exchange, routing_key=routing_key)

    def publish(self, exchange: str, routing_key: str, body: bytes | str) -> None:
        raw = body.encode() if isinstance(body, str) else body
        try:
            self._publish_once(exchange, routing_key, raw)
        except (amqp.exceptions.ConnectionError, OSError):
            # Another user of the shared broker may close every connection (rabbitmqctl
            # close_all_connections): reconnect once rather than fail an unrelated test.
            self.close()
            self._publish_once(exchange, routing_key, raw)

    def close(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None:
            with contextlib.suppress(amqp.exceptions.AMQPError, OSError):
                connection.close()
