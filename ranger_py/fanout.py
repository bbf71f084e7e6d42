"""The hot path from the broker to the clients: one broker message, one frame, every recipient.

``on_broker_message`` is the consumer's callback. The router says who gets the message; its frame
is encoded once, whatever the number of recipients, and appended to each recipient's pending list;
the registry flushes them all on the loop's next turn, each socket's frames joined into one
``send``. The loop over recipients never waits on a client and never switches greenlets, so the
router's sets can be iterated as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from time import perf_counter
from typing import Protocol

from ranger_py.frames import encode_text
from ranger_py.router import Delivery, Dropped, Resync, Router

__all__ = ["Fanout", "FanoutMetrics", "yield_every"]

# Yield to the event loop after this many broker messages in a row, so a backlog drain cannot
# starve websocket I/O (stalls of 1.4 s were measured without it). Between yields the frames of up
# to this many messages are coalesced per client; never more than half a send queue, or a burst
# would overflow clients that read as fast as they can before any write.
_YIELD_EVERY = 64

# What a drop leaves to deliver: the common path (a Delivery) then needs no branch of its own.
_NOTHING = Delivery(b"", ())


def yield_every(queue_frames: int) -> int:
    """Messages handled between two yields, for clients that queue up to ``queue_frames``."""
    return max(1, min(_YIELD_EVERY, queue_frames // 2))


class FanoutMetrics(Protocol):
    """The hot path's counters (ranger_py.metrics.WorkerMetrics): plain ints and dicts."""

    received: int
    delivered: int
    dropped: dict[str, int]
    resyncs: dict[str, int]

    def observe_fanout(self, seconds: float) -> None: ...


class Fanout:
    """Routes broker messages and queues their frames; yields every ``every`` messages."""

    def __init__(
        self,
        router: Router,
        request_flush: Callable[[], None],
        metrics: FanoutMetrics,
        *,
        every: int,
        pause: Callable[[], None],
    ) -> None:
        self._route = router.route
        self._request_flush = request_flush
        self._metrics = metrics
        self._every = every
        self._pause = pause
        self._since_pause = 0

    def on_broker_message(self, routing_key: str, body: bytes) -> None:
        """Hot path: route one broker message and queue its frame for every recipient."""
        metrics = self._metrics
        metrics.received += 1
        outcome = self._route(routing_key, body)
        if type(outcome) is not Delivery:
            outcome = self._count(outcome)
        recipients = outcome.recipients
        if recipients:
            start = perf_counter()
            frame = encode_text(outcome.payload)  # once, whatever the number of recipients
            for ws in recipients:
                ws.queue(frame)  # type: ignore[attr-defined]
            metrics.delivered += len(recipients)
            metrics.observe_fanout(perf_counter() - start)
            self._request_flush()
        self._since_pause += 1
        if self._since_pause >= self._every:
            self._since_pause = 0
            self._pause()

    def _count(self, outcome: Delivery | Dropped) -> Delivery:
        """The rare outcomes, counted: what is left to deliver of a drop (nothing) or a resync."""
        metrics = self._metrics
        if isinstance(outcome, Dropped):
            reason = outcome.reason
            metrics.dropped[reason] = metrics.dropped.get(reason, 0) + 1
            return _NOTHING
        if isinstance(outcome, Resync):
            reason = outcome.reason
            metrics.resyncs[reason] = metrics.resyncs.get(reason, 0) + 1
        return outcome
