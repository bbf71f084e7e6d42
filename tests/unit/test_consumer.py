"""Tests for ranger_py.consumer.

These run on kombu's in-memory transport; tests/integration/test_consumer.py covers the real
broker. Consumers run in threads here; gevent is the worker's business, not the consumer's.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import pytest
from kombu.connection import Connection
from kombu.entity import Exchange

from ranger_py.bindings import STATIC_KEYS, Bindings
from ranger_py.config import MIN_BROKER_HEARTBEAT
from ranger_py.consumer import TIMINGS, Consumer, Timings
from tests.consumer_support import FAST_TIMINGS, Recorder, running, wait_for

LOGGER = "ranger_py.consumer"
RABBITMQ = ("127.0.0.1", 5672)
START_RABBITMQ = "start it with `rabbitmq-server -detached && rabbitmqctl await_startup`"


def memory_consumer(
    on_message: Callable[[str, bytes], None], cls: type[Consumer] = Consumer, **kwargs: Any
) -> Consumer:
    # A unique exchange per test: the in-memory broker state is shared by the whole process.
    kwargs.setdefault("timings", FAST_TIMINGS)
    return cls("memory://", f"test.{uuid.uuid4().hex}", on_message, **kwargs)


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


def test_the_lowest_heartbeat_still_lets_the_loop_wake_up() -> None:
    # config.MIN_BROKER_HEARTBEAT's reason: the broker's heartbeats must come less often than
    # the consume loop's wake-ups, or draining them would keep it from ever waking up.
    assert TIMINGS.safety_interval < MIN_BROKER_HEARTBEAT / 2


def test_from_config_reads_the_broker_fields() -> None:
    @dataclass(frozen=True)
    class Settings:
        amqp_url: str = "amqp://user:secret@broker.example:5673/vh"
        exchange: str = "my.exchange"
        queue_max_length: int = 42
        broker_heartbeat: int = 7
        queue_expires: int = 90
        broker_prefetch: int = 200

    consumer = Consumer.from_config(Settings(), Recorder())
    assert consumer.exchange_name == "my.exchange"
    assert consumer.queue_max_length == 42
    assert (consumer.queue_expires, consumer.prefetch) == (90, 200)
    assert consumer.connection.hostname == "broker.example"
    assert consumer.connection.port == 5673
    assert consumer.connection.virtual_host == "vh"
    assert consumer.connection.heartbeat == 7
    assert (consumer.ready, consumer.status) == (False, "connecting")
    assert consumer.timings is TIMINGS
    assert consumer.connection.connect_timeout == TIMINGS.connect_timeout
    fast = Consumer.from_config(Settings(), Recorder(), timings=FAST_TIMINGS)
    assert fast.timings is FAST_TIMINGS


def test_timings_reach_the_connection() -> None:
    timings = Timings(connect_timeout=1.5, memory_poll_interval=0.005)
    amqp = Consumer("amqp://guest:guest@127.0.0.1:5672//", "ex", Recorder(), timings=timings)
    assert amqp.connection.connect_timeout == 1.5
    assert "polling_interval" not in (amqp.connection.transport_options or {})
    memory = Consumer("memory://", "ex", Recorder(), timings=timings)
    assert (memory.connection.transport_options or {})["polling_interval"] == 0.005


def test_queue_outlives_its_connection_is_found_again_and_is_bounded() -> None:
    consumer = Consumer(
        "memory://", "ex", Recorder(), queue_max_length=123, queue_expires=45, prefetch=80
    )
    made: list[dict[str, Any]] = []

    def make_consumer(**kwargs: Any) -> object:
        made.append(kwargs)
        return object()

    consumer.get_consumers(make_consumer, object())
    consumer.get_consumers(make_consumer, object())  # a reconnect
    first, second = made
    assert (first["no_ack"], first["prefetch_count"]) == (False, 80)
    [queue] = first["queues"]
    [again] = second["queues"]
    assert queue.name == again.name == consumer.queue_name
    assert queue.name.startswith("ranger-py.")
    assert (queue.exclusive, queue.auto_delete, queue.durable) == (False, False, False)
    # By default bound to everything, as Ranger and Rango (RANGER_BROKER_ROUTING=all).
    assert [(b.exchange.name, b.routing_key) for b in queue.bindings] == [("ex", "#")]
    assert queue.queue_arguments == {
        "x-max-length": 123,
        "x-overflow": "drop-head",
        "x-expires": 45000,
        "x-single-active-consumer": True,
    }


def test_every_worker_has_a_queue_of_its_own() -> None:
    names = {Consumer("memory://", "ex", Recorder()).queue_name for _ in range(50)}
    assert len(names) == 50


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
    # Within one wake-up of the consume loop, with a second to spare for a loaded machine.
    assert time.monotonic() - started < FAST_TIMINGS.safety_interval + 1.0


def test_an_unexpected_error_is_logged_and_consuming_restarts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    restart = threading.Event()

    class FlakyConsumer(Consumer):
        failures = 1

        def get_consumers(self, make_consumer: Callable[..., Any], channel: Any) -> list[Any]:
            if self.failures:
                self.failures -= 1
                raise RuntimeError("bug in a declaration")
            # The pause before the restart is short here: hold the restart until the test has
            # seen the failure.
            restart.wait(5)
            return super().get_consumers(make_consumer, channel)

    received = Recorder()
    consumer = memory_consumer(received, FlakyConsumer)
    with caplog.at_level(logging.WARNING, logger=LOGGER), running(consumer):
        wait_for(lambda: consumer.status.startswith("consumer error:"), what="error status")
        assert not consumer.ready
        restart.set()
        wait_for(lambda: consumer.ready, what="ready after the restart")
        memory_publish(consumer.exchange_name, ("public.a.b", b"{}"))
        received.wait_for_count(1)
    ours = [r for r in caplog.records if r.name == LOGGER]
    failures = [r for r in ours if r.exc_info]
    assert len(failures) == 1
    assert not [r for r in ours if r.levelno == logging.WARNING]  # logged once, with the traceback
    assert isinstance(failures[0].exc_info[1], RuntimeError)  # type: ignore[index]
    assert consumer.reconnects == 0  # it had never consumed: nothing was lost


def test_stop_cuts_the_pause_after_a_failed_session_short() -> None:
    class BrokenConsumer(Consumer):
        def get_consumers(self, make_consumer: Callable[..., Any], channel: Any) -> list[Any]:
            raise RuntimeError("bug in a declaration")

    pause = replace(FAST_TIMINGS, backoff_min=60.0, backoff_max=60.0)
    consumer = memory_consumer(Recorder(), BrokenConsumer, timings=pause)
    with running(consumer, stop_within=3.0):  # far less than the pause
        wait_for(lambda: consumer.status.startswith("consumer error:"), what="error status")


def test_a_lost_connection_is_re_established_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    reconnect = threading.Event()

    class DroppingConsumer(Consumer):
        drops = 0
        sessions = 0

        def on_iteration(self) -> None:
            if self.drops:
                self.drops -= 1
                raise self.connection.connection_errors[0]("connection reset")
            super().on_iteration()

        def get_consumers(self, make_consumer: Callable[..., Any], channel: Any) -> list[Any]:
            self.sessions += 1
            if self.sessions > 1:
                # The pause before reconnecting is short here: hold the new session until the
                # test has seen the loss.
                reconnect.wait(5)
            return super().get_consumers(make_consumer, channel)

    received = Recorder()
    consumer = memory_consumer(received, DroppingConsumer)
    assert isinstance(consumer, DroppingConsumer)
    with caplog.at_level(logging.INFO, logger=LOGGER), running(consumer):
        wait_for(lambda: consumer.ready, what="ready")
        consumer.drops = 1
        wait_for(lambda: not consumer.ready, what="the loss")
        assert consumer.status == "broker connection lost: connection reset"
        reconnect.set()
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
    url = f"amqp://guest:guest@127.0.0.1:{closed_port()}//"
    consumer = Consumer(url, "ex", Recorder(), timings=FAST_TIMINGS)
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


# acknowledgements and redeliveries, on messages shaped as kombu delivers them


class Delivered:
    """What the consumer reads of a kombu message: delivery_info, body, ack(multiple)."""

    acks: list[tuple[int, bool]]

    def __init__(self, tag: int, key: str, body: bytes, *, redelivered: bool = False) -> None:
        self.delivery_tag = tag
        self.delivery_info = {"routing_key": key, "redelivered": redelivered}
        self.body = body

    def ack(self, multiple: bool = False) -> None:
        Delivered.acks.append((self.delivery_tag, multiple))


@pytest.fixture
def acks() -> list[tuple[int, bool]]:
    Delivered.acks = []
    return Delivered.acks


def test_messages_are_acknowledged_in_batches_after_their_fan_out(
    acks: list[tuple[int, bool]],
) -> None:
    order: list[str] = []

    def handler(key: str, body: bytes) -> None:
        order.append(f"fanout {body.decode()}")

    now = [100.0]
    consumer = Consumer(
        "memory://", "ex", handler, prefetch=8, clock=lambda: now[0]
    )  # batches of 2, or whatever waited FAST_TIMINGS.ack_interval
    for tag in range(1, 6):
        consumer._deliver(Delivered(tag, "public.a.b", b"%d" % tag))
        order.append(f"acks {acks[-1:]}")
        consumer.on_iteration()  # kombu calls it before reading the next message
    assert acks == [(2, True), (4, True)]
    assert order[:4] == ["fanout 1", "acks []", "fanout 2", "acks [(2, True)]"]
    now[0] += FAST_TIMINGS.ack_interval * 0.9
    consumer.on_iteration()  # not yet: a steady stream is not acknowledged message by message
    assert len(acks) == 2
    now[0] += FAST_TIMINGS.ack_interval * 0.2
    consumer.on_iteration()  # the oldest unacknowledged is ack_interval old: the rest goes
    assert acks == [(2, True), (4, True), (5, True)]
    now[0] += 10.0
    consumer.on_iteration()
    assert len(acks) == 3  # nothing left to acknowledge
    consumer._deliver(Delivered(6, "public.a.b", b"6"))
    consumer.on_iteration()  # a new batch's clock starts at its first message, not the last ack
    assert len(acks) == 3


def test_a_redelivered_message_already_fanned_out_is_dropped_and_counted(
    acks: list[tuple[int, bool]],
) -> None:
    received = Recorder()
    now = [100.0]
    consumer = Consumer("memory://", "ex", received, prefetch=100, clock=lambda: now[0])
    consumer._deliver(Delivered(1, "public.a.b", b'{"n":1}'))
    consumer._deliver(Delivered(2, "public.a.b", b'{"n":2}'))
    # The connection died before the acknowledgement: the broker pushes both again, then 3,
    # which the old connection had received but never handed over.
    consumer._deliver(Delivered(1, "public.a.b", b'{"n":1}', redelivered=True))
    consumer._deliver(Delivered(2, "public.a.b", b'{"n":2}', redelivered=True))
    consumer._deliver(Delivered(3, "public.a.b", b'{"n":3}', redelivered=True))
    assert [body for _, body in received.calls] == [b'{"n":1}', b'{"n":2}', b'{"n":3}']
    assert (consumer.redelivered, consumer.duplicates) == (3, 2)
    now[0] += 2 * FAST_TIMINGS.ack_interval
    consumer.on_iteration()
    assert acks[-1] == (3, True)  # the dropped ones are acknowledged too


def test_a_message_that_is_not_redelivered_is_never_dropped(
    acks: list[tuple[int, bool]],
) -> None:
    received = Recorder()
    consumer = Consumer("memory://", "ex", received, prefetch=100)
    for tag in (1, 2):
        consumer._deliver(Delivered(tag, "public.a.b", b'{"same":true}'))
    assert len(received.calls) == 2
    assert consumer.duplicates == 0


def test_a_message_the_handler_fails_on_is_acknowledged_all_the_same(
    acks: list[tuple[int, bool]],
) -> None:
    consumer = Consumer("memory://", "ex", Recorder(fail_on="public.bad.x"), prefetch=8)
    consumer._deliver(Delivered(1, "public.bad.x", b"{}"))
    consumer._deliver(Delivered(2, "public.a.b", b"{}"))
    assert acks == [(2, True)]


# bindings (ranger_py.bindings): what the consumer sends, on kombu's in-memory transport


def test_the_queue_is_bound_to_what_is_held_and_unbound_when_it_is_let_go() -> None:
    clock = [0.0]
    bindings = Bindings(STATIC_KEYS, unbind_delay=5.0, clock=lambda: clock[0])
    received = Recorder()
    consumer = memory_consumer(received, bindings=bindings)
    exchange = consumer.exchange_name
    with running(consumer):
        wait_for(lambda: consumer.ready, what="consuming")
        assert len(bindings) == len(STATIC_KEYS)
        bindings.hold("*.m.trades")
        wait_for(lambda: not bindings.missing(["*.m.trades"]), what="the binding")
        memory_publish(
            exchange,
            ("public.other.trades", "0"),  # bound by nobody: never arrives
            ("public.m.trades", "1"),
            ("public.any.ob-inc", "2"),  # the order books' keys are always bound
        )
        assert received.wait_for_count(2) == [
            ("public.m.trades", b"1"),
            ("public.any.ob-inc", b"2"),
        ]
        bindings.release("*.m.trades")
        clock[0] += 5.0  # the unbind delay passes; expiry is checked once per safety interval
        wait_for(lambda: len(bindings) == len(STATIC_KEYS), what="the unbinding")
        memory_publish(exchange, ("public.m.trades", "3"), ("public.any.ob-snap", "4"))
        assert received.wait_for_count(3)[-1] == ("public.any.ob-snap", b"4")
    assert ("public.m.trades", b"3") not in received.calls
    assert ("public.other.trades", b"0") not in received.calls
