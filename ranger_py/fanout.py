"""The hot path from the broker to the clients: one broker message, one frame, every recipient.

``on_broker_message`` is the consumer's callback. The router says who gets the message; its frame
is encoded once, whatever the number of recipients, and appended to each recipient's pending list;
the registry flushes them all on the loop's next turn, each socket's frames joined into one
``send``. The loop over recipients never waits on a client and never switches greenlets, so the
router's sets can be iterated as they are.

With permessage-deflate, a payload of at least ``compress_from`` bytes is also compressed, once,
the first time a recipient that negotiated compression comes up (once per window size in use,
normally one): compression keeps no context between messages, so one compressed frame serves
every such client. Smaller payloads, and every payload while no client of the worker negotiated
compression, take the plain loop, with no test per recipient.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Collection
from time import perf_counter
from typing import Protocol

from ranger_py.frames import encode_text, encode_text_deflated
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
        compress_from: int | None = None,
        deflating: Callable[[], int] = lambda: 0,
    ) -> None:
        self._route = router.route
        # None: compression is off, and no payload is ever long enough.
        self._compress_from = sys.maxsize if compress_from is None else compress_from
        self._deflating = deflating  # how many clients negotiated compression
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
            payload = outcome.payload
            frame = encode_text(payload)  # once, whatever the number of recipients
            if len(payload) < self._compress_from or not self._deflating():
                for ws in recipients:
                    ws.queue(frame)  # type: ignore[attr-defined]
            else:
                _queue_either(recipients, payload, frame)
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


def _queue_either(recipients: Collection[object], payload: bytes, frame: bytes) -> None:
    """Queue the compressed frame to the clients that negotiated it, ``frame`` to the others.

    Each compressed frame is built when its window size first comes up, then shared.
    """
    deflated: dict[int, bytes] = {}
    for ws in recipients:
        bits = ws.deflate  # type: ignore[attr-defined]
        if bits:
            compressed = deflated.get(bits)
            if compressed is None:
                compressed = deflated[bits] = encode_text_deflated(payload, bits)
            ws.queue(compressed)  # type: ignore[attr-defined]
        else:
            ws.queue(frame)  # type: ignore[attr-defined]
