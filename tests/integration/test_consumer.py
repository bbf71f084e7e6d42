"""The consumer against the real RabbitMQ, in a vhost of its own (deleted afterwards).

Byte-exact bodies whatever their properties, an exchange declared with other flags, the bounded
queue that outlives its connection, a broker-side close, and heartbeats under steady traffic.
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from kombu.connection import Connection
from kombu.entity import Exchange

from ranger_py.consumer import Consumer
from tests.consumer_support import Recorder, running, wait_for

LOGGER = "ranger_py.consumer"
RABBITMQ = ("127.0.0.1", 5672)
START_RABBITMQ = "start it with `rabbitmq-server -detached && rabbitmqctl await_startup`"


# real RabbitMQ


def rabbitmqctl(*args: str) -> str:
    done = subprocess.run(
        ["rabbitmqctl", *args], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, f"rabbitmqctl {' '.join(args)}: {done.stderr.strip()}"
    return done.stdout


@pytest.fixture(scope="module")
def vhost() -> Iterator[str]:
    try:
        socket.create_connection(RABBITMQ, timeout=2).close()
    except OSError as exc:
        pytest.fail(f"RabbitMQ is not reachable at 127.0.0.1:5672 ({exc}); {START_RABBITMQ}")
    if shutil.which("rabbitmqctl") is None:
        pytest.fail(f"rabbitmqctl is not on PATH; it comes with rabbitmq-server ({START_RABBITMQ})")
    name = f"ranger-test-consumer-{uuid.uuid4().hex[:12]}"
    rabbitmqctl("add_vhost", name)
    try:
        rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        yield name
    finally:
        rabbitmqctl("delete_vhost", name)


def amqp_url(vhost: str) -> str:
    return f"amqp://guest:guest@127.0.0.1:5672/{vhost}"


def connection(vhost: str) -> Connection:
    """A kombu connection to ``vhost``, as the test's publisher."""
    return Connection(amqp_url(vhost))  # type: ignore[no-untyped-call]


def publish_raw(vhost: str, exchange: str, routing_key: str, body: bytes, **props: Any) -> None:
    """Publish on a bare AMQP channel with exactly the properties given (Peatio sets none)."""
    with connection(vhost) as conn:
        channel = conn.default_channel
        message = channel.prepare_message(body, **props)
        channel.basic_publish(message, exchange=exchange, routing_key=routing_key)


def rabbit_consumer(vhost: str, on_message: Callable[[str, bytes], None], **kw: Any) -> Consumer:
    return Consumer(amqp_url(vhost), f"test.{uuid.uuid4().hex}", on_message, **kw)


def test_rabbitmq_forwards_bodies_byte_for_byte(vhost: str) -> None:
    received = Recorder()
    consumer = rabbit_consumer(vhost, received)
    json_body = '{"price":"1.10","name":"\u00e9"}'.encode()
    latin1_body = b'{"name":"\xe9"}'
    with running(consumer):
        wait_for(lambda: consumer.ready, what="ready")
        publish_raw(vhost, consumer.exchange_name, "public.btcusd.trades", json_body)
        publish_raw(
            vhost,
            consumer.exchange_name,
            "private.IDABC.order",
            json_body,
            content_type="application/json",
            content_encoding="utf-8",
        )
        # py-amqp would decode this to str; re-encoding as UTF-8 would change the bytes.
        publish_raw(
            vhost, consumer.exchange_name, "global.tickers", latin1_body, content_encoding="latin-1"
        )
        calls = received.wait_for_count(3)
    assert calls == [
        ("public.btcusd.trades", json_body),
        ("private.IDABC.order", json_body),
        ("global.tickers", latin1_body),
    ]


def test_rabbitmq_exchange_with_other_flags_is_used_as_it_is(
    vhost: str, caplog: pytest.LogCaptureFixture
) -> None:
    received = Recorder()
    consumer = rabbit_consumer(vhost, received)
    with connection(vhost) as conn:
        durable = Exchange(  # type: ignore[no-untyped-call]
            consumer.exchange_name, type="topic", durable=True
        )
        durable.declare(channel=conn.default_channel)  # type: ignore[no-untyped-call]
    with caplog.at_level(logging.WARNING, logger=LOGGER), running(consumer):
        wait_for(lambda: consumer.ready, what="ready")
        publish_raw(vhost, consumer.exchange_name, "public.btcusd.trades", b"{}")
        received.wait_for_count(1)
    warnings = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(warnings) == 1
    assert "using it as it is" in warnings[0]
    assert "PRECONDITION_FAILED" in warnings[0]


def test_rabbitmq_queue_outlives_its_connection_and_is_bounded(vhost: str) -> None:
    consumer = rabbit_consumer(vhost, Recorder(), queue_max_length=77)
    with running(consumer):
        wait_for(lambda: consumer.ready, what="ready")
        listing = rabbitmqctl(
            "list_queues", "-p", vhost, "name", "arguments", "exclusive", "auto_delete",
            "durable", "--formatter", "json", "--quiet",
        )  # fmt: skip
        bindings = rabbitmqctl(
            "list_bindings", "-p", vhost, "source_name", "destination_name", "routing_key",
            "--formatter", "json", "--quiet",
        )  # fmt: skip
    # Other tests of this vhost leave queues of their own behind until they expire.
    [queue] = [row for row in json.loads(listing) if row["name"] == consumer.queue_name]
    assert (queue["exclusive"], queue["auto_delete"], queue["durable"]) == (False, False, False)
    arguments = {name: value for name, _type, value in queue["arguments"]}
    assert arguments == {
        "x-max-length": 77,
        "x-overflow": "drop-head",
        "x-expires": 60000,
        "x-single-active-consumer": True,
    }
    binding = {
        "source_name": consumer.exchange_name,
        "destination_name": consumer.queue_name,
        "routing_key": "#",
    }
    assert binding in json.loads(bindings)
    # Stopped, the worker's queue stays (until x-expires) and keeps what is published meanwhile.
    publish_raw(vhost, consumer.exchange_name, "public.a.b", b'{"n":1}')
    received = Recorder()
    again = rabbit_consumer(vhost, received, queue_max_length=77)
    again.queue_name = consumer.queue_name  # the same worker, consuming again
    with running(again):
        assert received.wait_for_count(1) == [("public.a.b", b'{"n":1}')]


def test_rabbitmq_closing_the_connection_is_survived(vhost: str) -> None:
    received = Recorder()
    consumer = rabbit_consumer(vhost, received)
    with running(consumer):
        wait_for(lambda: consumer.ready, what="ready")
        # list_connections lists every vhost: close only the connections of ours (the shared
        # broker serves other people's tests too).
        listing = rabbitmqctl("list_connections", "vhost", "pid", "--quiet").splitlines()
        ours = [line.split("\t")[1] for line in listing if line.split("\t")[0] == vhost]
        assert len(ours) == 1
        rabbitmqctl("close_connection", ours[0], "closed by test")
        wait_for(lambda: not consumer.ready, what="the loss")
        assert "closed by test" in consumer.status
        wait_for(lambda: consumer.ready, timeout=10, what="ready again")
        assert consumer.reconnects == 1
        publish_raw(vhost, consumer.exchange_name, "public.a.b", b"{}")
        received.wait_for_count(1)


def test_rabbitmq_heartbeats_are_sent_under_steady_traffic(vhost: str) -> None:
    # kombu checks heartbeats only when a drain times out; with a message every 0.25 s it never
    # does, and RabbitMQ drops a silent client after about 3 heartbeat intervals (9 s here).
    received = Recorder()
    consumer = rabbit_consumer(vhost, received, heartbeat=3)
    sent = 0
    with running(consumer):
        wait_for(lambda: consumer.ready, what="ready")
        with connection(vhost) as conn:
            channel = conn.default_channel
            deadline = time.monotonic() + 12
            while time.monotonic() < deadline:
                channel.basic_publish(
                    channel.prepare_message(b"{}"),
                    exchange=consumer.exchange_name,
                    routing_key="public.a.b",
                )
                sent += 1
                time.sleep(0.25)  # the publishing pace under test, not a wait for a condition
        received.wait_for_count(sent)
        assert consumer.reconnects == 0
        assert consumer.ready
