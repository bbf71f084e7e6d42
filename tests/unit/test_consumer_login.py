"""A broker that refuses the consumer's login: a warning for as long as it lasts, rate-limited.

The broker is faked at the connection the consumer creates, so a clock of the test's own can
stand in for minutes of retries; tests/integration/test_broker_login.py checks the real broker.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
from amqp.exceptions import AccessRefused, ChannelError, NotAllowed
from kombu.exceptions import OperationalError

from ranger_py.consumer import Consumer, _access_refused
from tests.consumer_support import FAST_TIMINGS, Recorder

LOGGER = "ranger_py.consumer"
PASSWORD = "s3cret-Pw"
URL = f"amqp://ranger:{PASSWORD}@broker.example:5673/exchange-vh"
REFUSAL = (
    "ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN. "
    "For details see the broker logfile."
)
LOGIN = "user ranger at broker.example:5673/exchange-vh"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class RefusingBroker:
    """Stands in for the connection kombu would open: every attempt is refused, as py-amqp does.

    Each attempt moves the clock on by ``step`` seconds; the consumer is stopped after ``attempts``.
    """

    channel_errors = (ChannelError,)

    def __init__(self, consumer: Consumer, clock: Clock, step: float, attempts: int) -> None:
        self.consumer = consumer
        self.clock = clock
        self.step = step
        self.left = attempts
        self.made = 0
        self.reply_text = REFUSAL

    def ensure_connection(self, *args: Any, **kwargs: Any) -> None:
        self.made += 1
        self.left -= 1
        if self.left <= 0:
            self.consumer.stop()
        if self.made > 1:
            self.clock.now += self.step
        raise AccessRefused(self.reply_text, (0, 0))

    def collect(self) -> None:
        pass

    def release(self) -> None:
        pass


class RefusedConsumer(Consumer):
    broker: RefusingBroker

    def create_connection(self) -> RefusingBroker:
        return self.broker


def refused(step: float, attempts: int) -> tuple[RefusedConsumer, RefusingBroker]:
    # run_forever pauses between failed sessions (briefly with these timings); the fake clock
    # is what the warning's rate is measured with.
    clock = Clock()
    consumer = RefusedConsumer(URL, "ex", Recorder(), timings=FAST_TIMINGS, clock=clock)
    consumer.broker = RefusingBroker(consumer, clock, step, attempts)
    return consumer, consumer.broker


def login_lines(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == LOGGER and record.levelno == level and "login" in record.getMessage()
    ]


def test_a_refused_login_is_a_warning_at_most_once_a_minute_for_as_long_as_it_lasts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    consumer, broker = refused(step=25.0, attempts=7)  # attempts at 0, 25, ..., 150 s
    consumer.run_forever()
    assert broker.made == 7
    warnings = login_lines(caplog, logging.WARNING)
    # 0 s, then 75 s (the first attempt 60 s or more after it), then 150 s.
    assert (
        warnings
        == [
            f"broker refused the login for {LOGIN} (check RABBITMQ_USER/RABBITMQ_PASSWORD or "
            f"RABBITMQ_URL): (0, 0): (403) {REFUSAL}; retrying"
        ]
        * 3
    )
    assert len(login_lines(caplog, logging.DEBUG)) == 4
    # Not reported as an outage: no "reconnecting" line, no other warning.
    others = [
        record.getMessage()
        for record in caplog.records
        if record.levelno >= logging.WARNING and "login" not in record.getMessage()
    ]
    assert others == []
    assert PASSWORD not in caplog.text
    assert (consumer.ready, consumer.status) == (False, "stopped")


def test_a_refusal_every_minute_or_more_is_a_warning_each_time(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    consumer, _ = refused(step=FAST_TIMINGS.login_warning_interval, attempts=3)
    consumer.run_forever()
    assert len(login_lines(caplog, logging.WARNING)) == 3
    assert login_lines(caplog, logging.DEBUG) == []


def test_readyz_reason_names_the_login_and_never_the_password(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    consumer, broker = refused(step=1.0, attempts=2)
    broker.reply_text = f"ACCESS_REFUSED - no such login ranger/{PASSWORD}"  # a careless broker
    seen: list[tuple[bool, str]] = []
    original = consumer._login_refused

    def record_state(exc: BaseException) -> None:
        original(exc)
        seen.append((consumer.ready, consumer.status))

    consumer._login_refused = record_state  # type: ignore[method-assign]
    consumer.run_forever()
    assert seen[0] == (False, f"broker refused the login for {LOGIN}")
    assert PASSWORD not in caplog.text
    assert "ranger/****" in caplog.text


def test_after_a_good_session_the_next_refusal_is_news_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    consumer, _ = refused(step=1.0, attempts=1)
    consumer.run_forever()
    consumer.on_consume_ready(None, None, None)  # credentials fixed on the broker, consuming
    consumer.should_stop = False
    consumer._stop_event.clear()
    consumer.broker.left = 1
    consumer.run_forever()  # refused again 1 s later: still said at once
    assert len(login_lines(caplog, logging.WARNING)) == 2


def test_what_counts_as_a_refused_login() -> None:
    assert _access_refused(AccessRefused(REFUSAL, (0, 0)))
    # Wrapped by a library that kept the original as the cause, or only its text.
    try:
        try:
            raise AccessRefused(REFUSAL, (0, 0))
        except AccessRefused as exc:
            raise OperationalError(str(exc)) from exc
    except OperationalError as wrapped:
        assert _access_refused(wrapped)
    assert _access_refused(ConnectionError(f"(0, 0): (403) {REFUSAL}"))
    assert not _access_refused(NotAllowed("NOT_ALLOWED - vhost x not found", (10, 40)))
    assert not _access_refused(ConnectionRefusedError(111, "Connection refused"))
    assert not _access_refused(OperationalError("Socket closed"))
