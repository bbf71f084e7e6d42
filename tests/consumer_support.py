"""Helpers shared by the consumer's unit tests (in-memory broker) and integration tests."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from ranger_py.consumer import Consumer, Timings
from testbed.waiting import wait_until

# Production's pauses cut short, for the unit tests: the consume loop wakes up, redials and
# restarts within a few hundredths of a second instead of whole seconds. The timeouts and the
# login warning's rate stay production's.
FAST_TIMINGS = Timings(
    safety_interval=0.05,
    retry_start=0.05,
    retry_step=0.05,
    retry_max=0.05,
    backoff_min=0.001,
    backoff_max=0.01,
)


def wait_for(condition: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    """:func:`wait_until` with the consumer tests' defaults: 5 s, polled every 10 ms."""
    wait_until(condition, timeout=timeout, what=what, interval=0.01)


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
