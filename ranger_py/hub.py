"""The per-worker hub: connections, fan-out, flushing, timers, the consumer greenlet, shutdown.

Data path: consumer greenlet → ``on_broker_message`` → router → one encoded frame → each
recipient's pending list → one ``flush`` per loop turn, each socket's frames joined into one
``send``. The fan-out never waits on a client and never switches greenlets mid-loop, so the
router's sets can be iterated as they are.

Everything runs in one OS thread under gevent; state is plain dicts and lists, no locks.
"""

from __future__ import annotations

import itertools
import logging
import socket
import time
from time import perf_counter
from typing import Any

import gevent
from gevent.monkey import get_original

from ranger_py.auth import Auth
from ranger_py.config import Config
from ranger_py.connection import Connection, EchoConnection
from ranger_py.consumer import Consumer
from ranger_py.demo import WorkerFeed
from ranger_py.errors import CloseCode
from ranger_py.frames import encode_text
from ranger_py.gevent_adapter import Watcher, callback_scheduler, hub_loop, repeating_timer
from ranger_py.metrics import WorkerMetrics
from ranger_py.protocol import StreamKind
from ranger_py.router import Delivery, Router
from ranger_py.websocket import State, WebSocket

__all__ = ["Hub"]

log = logging.getLogger(__name__)

# The unpatched socket class: connections are driven by our own io watchers, not by gevent's
# cooperative socket wrapper (which would add a greenlet switch per blocking call).
_RawSocket: type[socket.socket] = get_original("socket", "socket")

# Yield to the event loop after this many broker messages in a row, so a backlog drain cannot
# starve websocket I/O (stalls of 1.4 s were measured without it). Between yields the
# frames of up to this many messages are coalesced per client; never more than half a send
# queue, or a burst would overflow clients that read as fast as they can before any write.
_YIELD_EVERY = 64
_SWEEP_INTERVAL = 1.0


class Hub:
    """Owns every websocket of this worker and the consumer that feeds them."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.metrics = WorkerMetrics()
        self.router = Router(
            config.rbac,
            max_streams=config.max_streams,
            max_increments=config.orderbook_max_increments,
            on_change=self._subscription_changed,
        )
        self.loop: Any = hub_loop()
        self._schedule = callback_scheduler(self.loop)
        self.connections: set[WebSocket] = set()
        self.dirty: list[WebSocket] = []
        self.max_message_size = config.max_message_size
        self.max_queue_bytes = config.send_queue_bytes
        self.message_interval = 1.0 / config.client_rate
        # Half a frame of slack, so float rounding never refuses the last frame of a burst.
        self.message_window = (config.client_burst + 0.5) / config.client_rate
        # RANGER_DEMO: the same consumer, reading a synthetic feed from kombu's in-memory
        # transport instead of RabbitMQ.
        self.demo = WorkerFeed(config) if config.demo else None
        broker = config if self.demo is None else self.demo.broker
        self.consumer = Consumer.from_config(broker, self.on_broker_message)
        self._flush_pending = False
        self._since_yield = 0
        self._yield_every = max(1, min(_YIELD_EVERY, config.send_queue_size // 2))
        self._ids = itertools.count(1)
        self._sweeper: Watcher | None = None
        self._consumer_greenlet: gevent.Greenlet | None = None
        self.accepting = True

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._consumer_greenlet = gevent.spawn(self.consumer.run_forever)
        if self.demo is not None:
            gevent.spawn(self.demo.run_forever, lambda: self.consumer.ready)
        self._sweeper = repeating_timer(self.loop, _SWEEP_INTERVAL, self._sweep)

    def shutdown(self, timeout: float) -> None:
        """Close every client with 1001 and stop consuming; returns within ``timeout``."""
        self.accepting = False
        if self.demo is not None:
            self.demo.stop()
        self.consumer.stop()
        for ws in list(self.connections):
            ws.close(CloseCode.GOING_AWAY, "server shutdown")
        deadline = time.monotonic() + timeout
        while self.connections and time.monotonic() < deadline:
            gevent.sleep(0.05)
        for ws in list(self.connections):
            ws.abort("shutdown timeout")
        if self._sweeper is not None:
            self._sweeper.stop()
        if self._consumer_greenlet is not None:
            self._consumer_greenlet.join(timeout=max(0.0, deadline - time.monotonic()) + 1.0)

    @property
    def ready(self) -> bool:
        """Whether this worker would accept a websocket now (``/readyz``)."""
        return self.accepting and self.consumer.ready and not self.full

    @property
    def status(self) -> str:
        if not self.accepting:
            return "shutting down"
        if self.full:
            return "too many connections"
        return self.consumer.status

    @property
    def full(self) -> bool:
        return len(self.connections) >= self.config.max_connections

    # -- connections -------------------------------------------------------------------------

    def attach(
        self, fd: int, greeting: bytes, auth: Auth, path: str, streams: list[str]
    ) -> Connection:
        """Take over an upgraded socket as a gateway client; ``greeting`` is the 101 response."""
        conn = Connection(
            self,
            self._socket(fd),
            next(self._ids),
            auth=auth,
            path=path,
            queue_limit=self.config.send_queue_size,
        )
        self.connections.add(conn)
        self.metrics.connection_opened(bool(auth.uid))
        log.info("connection %d open path=%s uid=%s", conn.id, path, auth.uid or "-")
        conn.queue(greeting)
        # PROTOCOL §4: every connection first hears the reply to its ?stream= subscription.
        conn.subscribe(streams)
        conn.flush()
        return conn

    def attach_echo(self, fd: int, greeting: bytes) -> EchoConnection:
        ws = EchoConnection(
            self,
            self._socket(fd),
            next(self._ids),
            queue_limit=self.config.send_queue_size,
        )
        self.connections.add(ws)
        ws.queue(greeting)
        ws.flush()
        return ws

    def _socket(self, fd: int) -> socket.socket:
        sock = _RawSocket(fileno=fd)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.config.send_buffer:
            # A fixed buffer turns off Linux's autotuning, which lets a stalled reader park
            # ~4 MB in the kernel before the send queue bound sees anything (bench: slow).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.config.send_buffer)
        return sock

    def closed(self, ws: WebSocket, reason: str) -> None:
        """Called once by a websocket when its socket is gone."""
        self.connections.discard(ws)
        if isinstance(ws, Connection):
            self.router.remove(ws)
            self.metrics.connection_closed(bool(ws.auth.uid))
            note = f" (close {ws.close_note})" if ws.close_note else ""
            log.info(
                "connection %d closed path=%s uid=%s: %s%s",
                ws.id,
                ws.path,
                ws.auth.uid or "-",
                reason,
                note,
            )

    def slow(self, ws: WebSocket) -> None:
        self.metrics.slow_clients.inc()
        log.warning("connection %d: send queue full, closing slow client", ws.id)

    def _subscription_changed(self, kind: StreamKind, stream: str, delta: int) -> None:
        self.metrics.subscription(kind.value, stream, delta)

    # -- fan-out -----------------------------------------------------------------------------

    def on_broker_message(self, routing_key: str, body: bytes) -> None:
        """Hot path: route one broker message and queue its frame for every recipient."""
        metrics = self.metrics
        metrics.received += 1
        outcome = self.router.route(routing_key, body)
        if type(outcome) is Delivery:
            recipients = outcome.recipients
            if recipients:
                start = perf_counter()
                frame = encode_text(outcome.payload)  # once, whatever the number of recipients
                for ws in recipients:
                    ws.queue(frame)  # type: ignore[attr-defined]
                metrics.delivered += len(recipients)
                metrics.observe_fanout(perf_counter() - start)
                if self.dirty and not self._flush_pending:
                    self._flush_pending = True
                    self._schedule(self._flush)
        else:
            reason = outcome.reason  # type: ignore[union-attr]
            metrics.dropped[reason] = metrics.dropped.get(reason, 0) + 1
        self._since_yield += 1
        if self._since_yield >= self._yield_every:
            self._since_yield = 0
            gevent.sleep(0)

    def request_flush(self) -> None:
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

    def _sweep(self) -> None:
        self.metrics.flush(self.consumer.ready, self.consumer.reconnects)
        now = time.monotonic()
        config = self.config
        for ws in list(self.connections):
            if ws.state is State.CLOSED:
                continue
            try:
                ws.tick(now, config.ping_interval, config.pong_timeout, config.write_timeout)
            except Exception:
                log.exception("connection %d: timer failed", ws.id)
                ws.abort("internal error")
