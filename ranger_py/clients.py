"""Every websocket of one worker: the registry, the once-per-turn flush, and the timers' sweep.

It also keeps the wall-clock deadlines some websockets have (a connection's token expiry with
``RANGER_TOKEN_EXPIRY=close``, PROTOCOL §3) in :class:`Deadlines`, so that only due ones are
touched.

A websocket queues its frames into a list of its own and puts itself on ``dirty``; one callback
per event-loop turn flushes every dirty socket, each with one ``send`` (websocket.py). This class
is the ``Owner`` websockets see: the bounds they enforce, the loop their watchers run on, the flush
request, and the notices of slow and closed sockets. What runs on a socket is the caller's choice
(``attach``'s ``make``): the gateway makes a :class:`~ranger_py.connection.Connection`.

Everything runs in one OS thread under gevent; state is plain sets and lists, no locks.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from gevent.monkey import get_original

from ranger_py.config import Config
from ranger_py.frames import DeflatedFrames
from ranger_py.gevent_adapter import callback_scheduler
from ranger_py.websocket import State, WebSocket

__all__ = ["Clients", "Deadlines", "Expiring", "Limits", "SlowClients"]

log = logging.getLogger(__name__)

# The unpatched socket class: websockets are driven by our own io watchers, not by gevent's
# cooperative socket wrapper (which would add a greenlet switch per blocking call).
_RawSocket: type[socket.socket] = get_original("socket", "socket")

W = TypeVar("W", bound=WebSocket)

# Bytes of compressed replay frames (and their payloads) a worker keeps: a few order books.
_DEFLATED_BUDGET = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Limits:
    """The per-client bounds and timers, as Config validated them (PROTOCOL §2)."""

    max_connections: int = 10000
    queue_frames: int = 256
    queue_bytes: int = 4 * 1024 * 1024
    max_message_size: int = 4096
    client_rate: float = 10.0
    client_burst: int = 100
    send_buffer: int = 262144
    ping_interval: float = 54.0
    pong_timeout: float = 60.0
    write_timeout: float = 10.0
    compression_threshold: int = 1024

    @classmethod
    def from_config(cls, config: Config) -> Limits:
        return cls(
            max_connections=config.max_connections,
            queue_frames=config.send_queue_size,
            queue_bytes=config.send_queue_bytes,
            max_message_size=config.max_message_size,
            client_rate=config.client_rate,
            client_burst=config.client_burst,
            send_buffer=config.send_buffer,
            ping_interval=config.ping_interval,
            pong_timeout=config.pong_timeout,
            write_timeout=config.write_timeout,
            compression_threshold=config.compression_threshold,
        )


class SlowClients(Protocol):
    """Where slow-client closes are counted (ranger_py.metrics.WorkerMetrics)."""

    def slow_client(self) -> None: ...


class Expiring(Protocol):
    """Something :class:`Deadlines` ends at a wall-clock time (a connection and its token)."""

    id: int

    @property
    def deadline(self) -> float | None: ...  # time.time() seconds; None: never

    def expired(self) -> None: ...  # its deadline has passed


class Deadlines:
    """Items ended once, when their ``deadline`` (``time.time()`` seconds) has passed.

    A heap of ``(deadline, id)`` with lazy deletion, not a compare per socket in the 1 s sweep:
    checking the top costs the same for 10 connections or 10,000, and only due items are touched;
    no socket has a timer object of its own. A moved deadline (a renewed token) pushes a new entry
    and a dropped one (a closed socket) only leaves ``_live``; the entry left behind is skipped
    when it comes up, since it no longer matches its item. The heap holds ids, never the items,
    so nothing closed is kept alive by it, and it is rebuilt from ``_live`` once stale entries
    outnumber live ones (amortised O(1)), so connection churn cannot grow it.
    """

    _SLACK = 64  # stale entries tolerated on top of the live count before a rebuild

    def __init__(self) -> None:
        self._heap: list[tuple[float, int]] = []
        self._live: dict[int, Expiring] = {}

    def __len__(self) -> int:
        return len(self._live)

    def set(self, item: Expiring) -> None:
        """End ``item`` at its ``deadline``; call again whenever that changes."""
        when = item.deadline
        if when is None:
            self.discard(item.id)
            return
        self._live[item.id] = item
        heapq.heappush(self._heap, (when, item.id))
        self._compact()

    def discard(self, item_id: int) -> None:
        """Forget item ``item_id``, if it has a deadline here."""
        if self._live.pop(item_id, None) is not None:
            self._compact()

    def due(self, now: float) -> list[Expiring]:
        """Remove and return every item whose deadline is before ``now``."""
        heap, live = self._heap, self._live
        found = []
        # Strictly before: a token is still accepted at exactly exp + leeway (auth.py).
        while heap and heap[0][0] < now:
            when, item_id = heapq.heappop(heap)
            item = live.get(item_id)
            if item is not None and item.deadline == when:
                del live[item_id]
                found.append(item)
        return found

    def _compact(self) -> None:
        if len(self._heap) > 2 * len(self._live) + self._SLACK:
            self._heap = [
                (when, item_id)
                for item_id, item in self._live.items()
                if (when := item.deadline) is not None
            ]
            heapq.heapify(self._heap)


class Clients:
    """The websockets of one worker and what they share: bounds, loop, flush, sweep."""

    def __init__(self, limits: Limits, loop: Any, metrics: SlowClients) -> None:
        self.limits = limits
        self.loop = loop
        self._metrics = metrics
        self._schedule = callback_scheduler(loop)
        self.connections: set[WebSocket] = set()
        self.deadlines = Deadlines()
        self.dirty: list[WebSocket] = []
        self._flush_pending = False
        self._ids = itertools.count(1)
        # Read by every websocket on its paths (websocket.Owner), so plain attributes.
        self.max_message_size = limits.max_message_size
        self.queue_frames = limits.queue_frames
        self.max_queue_bytes = limits.queue_bytes
        self.message_interval = 1.0 / limits.client_rate
        # Half a frame of slack, so float rounding never refuses the last frame of a burst.
        self.message_window = (limits.client_burst + 0.5) / limits.client_rate
        self.compress_from = limits.compression_threshold
        # Open websockets that negotiated permessage-deflate: while there are none, the fan-out
        # keeps to its plain loop even for long payloads.
        self.deflating = 0
        self.deflated = DeflatedFrames(_DEFLATED_BUDGET)

    def __len__(self) -> int:
        return len(self.connections)

    @property
    def full(self) -> bool:
        return len(self.connections) >= self.limits.max_connections

    # -- sockets in and out ------------------------------------------------------------------

    def attach(
        self,
        fd: int,
        greeting: bytes,
        make: Callable[[Clients, socket.socket, int], W],
        *,
        window_bits: int = 0,
    ) -> W:
        """Take over an upgraded socket: ``make`` builds its websocket, which is registered.

        ``greeting`` (the 101 response) is queued first and not flushed: the caller adds the
        first frames so that they leave in the same ``send``, then flushes. ``window_bits`` is
        the permessage-deflate window the greeting accepted (0: none).
        """
        ws = make(self, self._socket(fd), next(self._ids))
        ws.deflate = window_bits
        if window_bits:
            self.deflating += 1
        self.connections.add(ws)
        ws.queue(greeting)
        return ws

    def _socket(self, fd: int) -> socket.socket:
        sock = _RawSocket(fileno=fd)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.limits.send_buffer:
            # A fixed buffer turns off Linux's autotuning, which lets a stalled reader park
            # ~4 MB in the kernel before the send queue bound sees anything (bench: slow).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.limits.send_buffer)
        return sock

    def closed(self, ws: WebSocket, reason: str) -> None:
        """Called once by a websocket when its socket is gone."""
        self.connections.discard(ws)
        self.deadlines.discard(ws.id)
        if ws.deflate:
            self.deflating -= 1

    def slow(self, ws: WebSocket) -> None:
        self._metrics.slow_client()
        log.warning("connection %d: send queue full, closing slow client", ws.id)

    def close_all(self, code: int, reason: str) -> None:
        """Start the closing handshake of every websocket."""
        for ws in list(self.connections):
            ws.close(code, reason)

    def abort_all(self, reason: str) -> None:
        """Drop every socket still open, without waiting for anything."""
        for ws in list(self.connections):
            ws.abort(reason)

    # -- flushing ----------------------------------------------------------------------------

    def request_flush(self) -> None:
        """Flush every dirty websocket on the loop's next turn (once, however often asked)."""
        if not self._flush_pending:
            self._flush_pending = True
            self._schedule(self._flush)

    def _flush(self) -> None:
        self._flush_pending = False
        dirty, self.dirty = self.dirty, []
        for ws in dirty:
            try:
                ws.flush()
            except Exception:
                log.exception("connection %d: flush failed", ws.id)
                ws.abort("internal error")

    # -- timers ------------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """About once a second: pings, idle clients, stuck writes, close deadlines."""
        limits = self.limits
        for ws in list(self.connections):
            if ws.state is State.CLOSED:
                continue
            try:
                ws.tick(now, limits.ping_interval, limits.pong_timeout, limits.write_timeout)
            except Exception:
                log.exception("connection %d: timer failed", ws.id)
                ws.abort("internal error")

    def expire(self, now: float) -> None:
        """About once a second, with the wall clock: end what :attr:`deadlines` holds past due."""
        for item in self.deadlines.due(now):
            try:
                item.expired()
            except Exception:
                log.exception("connection %d: expiry failed", item.id)
