"""Tests for ranger_py.consumer.

Most run on kombu's in-memory transport; the ones marked ``rabbitmq`` need the local broker
(127.0.0.1:5672, guest/guest) and work in a vhost of their own. Consumers run in threads here;
gevent is the worker's business, not the consumer's.
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from kombu import Connection, Exchange

from ranger_py.consumer import Consumer

LOGGER = "ranger_py.consumer"
RABBITMQ = ("127.0.0.1", 5672)
START_RABBITMQ = "start it with `rabbitmq-server -detached && rabbitmqctl await_startup`"


def wait_for(condition: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


class Recorder:
    """An on_message callback that remembers what it got and can be told to raise."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.fail_on = fail_on
        self.calls: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()

    def __call__(self, routing_key: str, body: bytes) -> None:
        with self.lock:
            self.calls.append((routing_key, body))
        if routing_key == self.fail_on:
            raise RuntimeError("handler bug")

    def keys(self) -> list[str]:
        with self.lock:
            return [key for key, _ in self.calls]

    def wait_for_count(self, n: int, timeout: float = 5.0) -> list[tuple[str, bytes]]:
        wait_for(lambda: len(self.calls) >= n, timeout, f"{n} messages (got {self.keys()})")
        with self.lock:
            return list(self.calls)


@contextmanager
def running(consumer: Consumer, stop_within: float = 3.0) -> Iterator[threading.Thread]:
    thread = threading.Thread(target=consumer.run_forever, daemon=True)
    thread.start()
    try:
        yield thread
    finally:
        consumer.stop()
        thread.join(stop_within)
        assert not thread.is_alive(), f"run_forever still running {stop_within} s after stop()"


def memory_consumer(
    on_message: Callable[[str, bytes], None], cls: type[Consumer] = Consumer, **kwargs: Any
) -> Consumer:
    # A unique exchange per test: the in-memory broker state is shared by the whole process.
    consumer = cls("memory://", f"test.{uuid.uuid4().hex}", on_message, **kwargs)
    # The virtual transport polls once a second by default; tests need no such latency.
    consumer.connection.transport_options["polling_interval"] = 0.01
    return consumer


def memory_publish(exchange: str, *messages: tuple[str, bytes | str]) -> None:
    with Connection("memory://") as conn:
        producer = conn.Producer()
        for routing_key, body in messages:
            producer.publish(body, exchange=exchange, routing_key=routing_key)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# construction


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="queue_max_length"):
        Consumer("memory://", "x", Recorder(), queue_max_length=0)
    with pytest.raises(ValueError, match="heartbeat"):
        Consumer("memory://", "x", Recorder(), heartbeat=1.0)


def test_from_config_reads_the_broker_fields() -> None:
    @dataclass(frozen=True)
    class Settings:
        amqp_url: str = "amqp://user:secret@broker.example:5673/vh"
        exchange: str = "my.exchange"
        queue_max_length: int = 42

    consumer = Consumer.from_config(Settings(), Recorder())
    assert consumer.exchange_name == "my.exchange"
    assert consumer.queue_max_length == 42
    assert consumer.connection.hostname == "broker.example"
    assert consumer.connection.port == 5673
    assert consumer.connection.virtual_host == "vh"
    assert consumer.connection.heartbeat == 10
    assert (consumer.ready, consumer.status) == (False, "connecting")


def test_queue_is_server_named_exclusive_and_bounded() -> None:
    consumer = Consumer("memory://", "ex", Recorder(), queue_max_length=123)
    made: list[dict[str, Any]] = []

    def make_consumer(**kwargs: Any) -> object:
        made.append(kwargs)
        return object()

    consumer.get_consumers(make_consumer, object())
    [kwargs] = made
    assert kwargs["no_ack"] is True
    [queue] = kwargs["queues"]
    assert queue.name == ""
    assert (queue.exclusive, queue.auto_delete, queue.durable) == (True, True, False)
    assert queue.routing_key == "#"
    assert queue.exchange.name == "ex"
    assert queue.queue_arguments["x-max-length"] == 123
    assert queue.queue_arguments["x-overflow"] == "drop-head"


# in-memory transport


def test_ready_once_consuming_and_not_after_stop() -> None:
    consumer = memory_consumer(Recorder())
    assert not consumer.ready
    with running(consumer):
        wait_for(lambda: consumer.ready, what="ready")
        assert consumer.status == "consuming"
    assert (consumer.ready, consumer.status) == (False, "stopped")
    assert consumer.reconnects == 0


def test_every_routing_key_arrives_as_routing_key_and_bytes() -> None:
    received = Recorder()
    consumer = memory_consumer(received)
    with running(consumer):
        wait_for(lambda: consumer.ready, what="ready")
        memory_publish(
            consumer.exchange_name,
            ("public.btcusd.trades", b'{"trades":[{"price":"1.10"}]}'),
            ("private.IDABC123.order", b"\xff\x00not utf-8"),
            ("global.tickers", '{"name":"\u00e9"}'),
        )
        calls = received.wait_for_count(3)
    assert calls == [
        ("public.btcusd.trades", b'{"trades":[{"price":"1.10"}]}'),
        ("private.IDABC123.order", b"\xff\x00not utf-8"),
        ("global.tickers", '{"name":"\u00e9"}'.encode()),
    ]
    assert all(type(body) is bytes for _, body in calls)


def test_messages_of_other_exchanges_are_not_consumed() -> None:
    received = Recorder()
    consumer = memory_consumer(received)
    other = f"other.{uuid.uuid4().hex}"
    with Connection("memory://") as conn:
        Exchange(other, type="topic", durable=False).declare(channel=conn.default_channel)
    with running(consumer):
        wait_for(lambda: consumer.ready, what="ready")
        memory_publish(other, ("public.btcusd.trades", b"{}"))
        memory_publish(consumer.exchange_name, ("public.btcusd.ob-inc", b"{}"))
        received.wait_for_count(1)
    assert received.keys() == ["public.btcusd.ob-inc"]


def test_a_failing_callback_does_not_stop_consumption(caplog: pytest.LogCaptureFixture) -> None:
    received = Recorder(fail_on="public.boom.x")
    consumer = memory_consumer(received)
    with caplog.at_level(logging.ERROR, logger=LOGGER), running(consumer):
        wait_for(lambda: consumer.ready, what="ready")
        memory_publish(consumer.exchange_name, ("public.boom.x", b"{}"), ("public.ok.x", b"{}"))
        received.wait_for_count(2)
        assert consumer.ready
    [record] = [r for r in caplog.records if r.name == LOGGER]
    assert "public.boom.x" in record.getMessage()
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], RuntimeError)


def test_stop_ends_run_forever_promptly() -> None:
    consumer = memory_consumer(Recorder())
    thread = threading.Thread(target=consumer.run_forever, daemon=True)
    thread.start()
    wait_for(lambda: consumer.ready, what="ready")
    started = time.monotonic()
    consumer.stop()
    thread.join(5)
    assert not thread.is_alive()
    assert time.monotonic() - started < 2.0


def test_an_unexpected_error_is_logged_and_consuming_restarts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class FlakyConsumer(Consumer):
        failures = 1

        def get_consumers(self, make_consumer: Callable[..., Any], channel: Any) -> list[Any]:
            if self.failures:
                self.failures -= 1
                raise RuntimeError("bug in a declaration")
            return super().get_consumers(make_consumer, channel)

    received = Recorder()
    consumer = memory_consumer(received, FlakyConsumer)
    with caplog.at_level(logging.WARNING, logger=LOGGER), running(consumer):
        wait_for(lambda: consumer.status.startswith("consumer error:"), what="error status")
        assert not consumer.ready
        wait_for(lambda: consumer.ready, what="ready after the restart")
        memory_publish(consumer.exchange_name, ("public.a.b", b"{}"))
        received.wait_for_count(1)
    ours = [r for r in caplog.records if r.name == LOGGER]
    failures = [r for r in ours if r.exc_info]
    assert len(failures) == 1
    assert not [r for r in ours if r.levelno == logging.WARNING]  # logged once, with the traceback
    assert isinstance(failures[0].exc_info[1], RuntimeError)  # type: ignore[index]
    assert consumer.reconnects == 0  # it had never consumed: nothing was lost


def test_a_lost_connection_is_re_established_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class DroppingConsumer(Consumer):
        drops = 0

        def on_iteration(self) -> None:
            if self.drops:
                self.drops -= 1
                raise self.connection.connection_errors[0]("connection reset")
            super().on_iteration()

    received = Recorder()
    consumer = memory_consumer(received, DroppingConsumer)
    with caplog.at_level(logging.INFO, logger=LOGGER), running(consumer):
        wait_for(lambda: consumer.ready, what="ready")
        consumer.drops = 1
        wait_for(lambda: not consumer.ready, what="the loss")
        assert consumer.status == "broker connection lost: connection reset"
        wait_for(lambda: consumer.ready, what="ready again")
        assert consumer.reconnects == 1
        memory_publish(consumer.exchange_name, ("public.a.b", b"{}"))
        received.wait_for_count(1)
    ours = [r for r in caplog.records if r.name == LOGGER]
    assert [r.getMessage() for r in ours if r.levelno == logging.WARNING] == [
        "broker connection lost: connection reset; reconnecting"
    ]
    assert sum("re-established" in r.getMessage() for r in ours if r.levelno == logging.INFO) == 1


def test_unreachable_broker_is_reported_and_stop_still_works(
    caplog: pytest.LogCaptureFixture,
) -> None:
    consumer = Consumer(f"amqp://guest:guest@127.0.0.1:{closed_port()}//", "ex", Recorder())
    with caplog.at_level(logging.DEBUG, logger=LOGGER), running(consumer, stop_within=2.5):
        wait_for(lambda: consumer.status.startswith("cannot connect"), what="connect failure")
        assert not consumer.ready
        wait_for(
            lambda: any("next attempt" in r.getMessage() for r in caplog.records),
            what="a second attempt",
        )
    warnings = [r for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert "guest:guest" not in caplog.text  # the password never reaches the log


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


def publish_raw(vhost: str, exchange: str, routing_key: str, body: bytes, **props: Any) -> None:
    """Publish on a bare AMQP channel with exactly the properties given (Peatio sets none)."""
    with Connection(amqp_url(vhost)) as conn:
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
    with Connection(amqp_url(vhost)) as conn:
        durable = Exchange(consumer.exchange_name, type="topic", durable=True)
        durable.declare(channel=conn.default_channel)
    with caplog.at_level(logging.WARNING, logger=LOGGER), running(consumer):
        wait_for(lambda: consumer.ready, what="ready")
        publish_raw(vhost, consumer.exchange_name, "public.btcusd.trades", b"{}")
        received.wait_for_count(1)
    warnings = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(warnings) == 1
    assert "using it as it is" in warnings[0]
    assert "PRECONDITION_FAILED" in warnings[0]


def test_rabbitmq_queue_is_bounded_and_exclusive(vhost: str) -> None:
    consumer = rabbit_consumer(vhost, Recorder(), queue_max_length=77)
    with running(consumer):
        wait_for(lambda: consumer.ready, what="ready")
        listing = rabbitmqctl(
            "list_queues", "-p", vhost, "name", "arguments", "exclusive", "auto_delete",
            "durable", "--formatter", "json", "--quiet",
        )  # fmt: skip
        bindings = rabbitmqctl(
            "list_bindings", "-p", vhost, "source_name", "routing_key",
            "--formatter", "json", "--quiet",
        )  # fmt: skip
    [queue] = json.loads(listing)
    assert queue["name"].startswith("amq.gen-")
    assert (queue["exclusive"], queue["auto_delete"], queue["durable"]) == (True, True, False)
    arguments = {name: value for name, _type, value in queue["arguments"]}
    assert arguments == {"x-max-length": 77, "x-overflow": "drop-head"}
    assert {"source_name": consumer.exchange_name, "routing_key": "#"} in json.loads(bindings)


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
        with Connection(amqp_url(vhost)) as conn:
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
