"""The RabbitMQ side of the integration tests: a vhost on the shared broker, and a publisher.

Never stops or reconfigures the shared broker: each test session works in its own vhost
(``ranger-test-<random>``), deleted at the end. The publisher speaks plain AMQP like Peatio does
(PROTOCOL §5): a topic exchange declared non-durable, raw bodies, no message properties.
"""

from __future__ import annotations

import contextlib
import secrets

import amqp

from testbed.rabbitmq import START_HINT, BrokerUnavailable, VhostAdmin

__all__ = ["START_HINT", "Broker", "BrokerUnavailable", "Publisher"]


class Broker(VhostAdmin):
    """A vhost of its own (``ranger-test-<random>``) on the broker at ``host:port``, as guest."""

    def __init__(self, host: str = "127.0.0.1", port: int = 5672) -> None:
        super().__init__(f"ranger-test-{secrets.token_hex(4)}", host=host, port=port)

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
