"""One worker's gateway: its parts built, handed to each other, started and stopped.

The one place that knows every part (Ruby Ranger's ``Peatio::Ranger.run``):

* :class:`~ranger_py.metrics.WorkerMetrics`, the worker's counters;
* :class:`~ranger_py.router.Router`, the subscriptions and the order-book cache;
* :class:`~ranger_py.clients.Clients`, the websockets, their flush and their timers;
* :class:`~ranger_py.fanout.Fanout`, the hot path from a broker message to its recipients;
* :class:`~ranger_py.consumer.Consumer`, the broker side, in a greenlet of its own; with
  ``RANGER_DEMO`` the same consumer reads :class:`~ranger_py.demo.WorkerFeed`'s in-memory feed;
* :class:`~ranger_py.app.App`, the WSGI callable gunicorn serves (:func:`create_app`).

Data path: socket → websocket → connection → router ← fanout ← consumer ← RabbitMQ. Everything
runs in one OS thread under gevent.
"""

from __future__ import annotations

import logging
import time
from functools import partial

import gevent

from ranger_py.app import App
from ranger_py.auth import Auth, Authenticator
from ranger_py.bindings import ALL_KEYS, Bindings, book_keys
from ranger_py.clients import Clients, Limits
from ranger_py.config import Config
from ranger_py.connection import Connection, Tokens
from ranger_py.consumer import Consumer
from ranger_py.demo import WorkerFeed
from ranger_py.errors import CloseCode
from ranger_py.fanout import Fanout, yield_every
from ranger_py.gevent_adapter import Watcher, hub_loop, repeating_timer, yield_to_loop
from ranger_py.metrics import WorkerMetrics
from ranger_py.protocol import StreamKind
from ranger_py.router import DROP_REASONS, RESYNC_REASONS, Router

__all__ = ["Gateway", "create_app"]

log = logging.getLogger(__name__)

_SWEEP_INTERVAL = 1.0
_SHUTDOWN_POLL = 0.05


class Gateway:
    """The parts of one worker, wired; what the app and the gunicorn worker act on."""

    def __init__(self, config: Config, authenticator: Authenticator) -> None:
        self.metrics = WorkerMetrics(drop_reasons=DROP_REASONS, resync_reasons=RESYNC_REASONS)
        # RANGER_BROKER_ROUTING=subscribed: the queue follows what the router's clients hold.
        self.bindings = Bindings(
            book_keys(config.broker_books) if config.broker_routing == "subscribed" else ALL_KEYS,
            config.broker_unbind_delay,
            on_unbound=self._unbound,
        )
        self.router = Router(
            config.rbac,
            max_streams=config.max_streams,
            max_increments=config.orderbook_max_increments,
            on_change=self._subscription_changed,
            # With "#" bound there is nothing to hold per subscription, nor anything to wait for.
            bindings=self.bindings if self.bindings.dynamic else None,
        )
        self.clients = Clients(Limits.from_config(config), hub_loop(), self.metrics)
        # RANGER_TOKEN_EXPIRY=ignore: no deadline is ever set, so the sweep finds nothing.
        deadlines = self.clients.deadlines if config.token_expiry == "close" else None
        self.tokens = Tokens(authenticator, deadlines)
        self.fanout = Fanout(
            self.router,
            self.clients.request_flush,
            self.metrics,
            every=yield_every(config.send_queue_size),
            pause=yield_to_loop,
            compress_from=config.compression_threshold if config.compression else None,
            deflating=lambda: self.clients.deflating,
        )
        # RANGER_DEMO: the same consumer, reading a synthetic feed from kombu's in-memory
        # transport instead of RabbitMQ.
        self.demo = WorkerFeed(config) if config.demo else None
        broker = config if self.demo is None else self.demo.broker
        self.consumer = Consumer.from_config(
            broker, self.fanout.on_broker_message, bindings=self.bindings
        )
        self.accepting = True
        self._sweeper: Watcher | None = None
        self._consumer_greenlet: gevent.Greenlet | None = None

    # -- what the app asks -------------------------------------------------------------------

    @property
    def full(self) -> bool:
        return self.clients.full

    @property
    def ready(self) -> bool:
        """Whether this worker would accept a websocket now (``/readyz``)."""
        return self.accepting and self.consumer.ready and not self.clients.full

    @property
    def received(self) -> int:
        """Broker messages this worker received since it started (the health answers)."""
        return self.metrics.received_total

    @property
    def status(self) -> str:
        if not self.accepting:
            return "shutting down"
        if self.clients.full:
            return "too many connections"
        return self.consumer.status

    def attach(
        self,
        fd: int,
        greeting: bytes,
        auth: Auth,
        path: str,
        streams: list[str],
        *,
        window_bits: int = 0,
    ) -> Connection:
        """Take over an upgraded socket as a gateway client; ``greeting`` is the 101 response,
        ``window_bits`` the permessage-deflate window it accepted (0: none)."""
        make = partial(
            Connection,
            auth=auth,
            path=path,
            router=self.router,
            metrics=self.metrics,
            tokens=self.tokens,
        )
        conn = self.clients.attach(fd, greeting, make, window_bits=window_bits)
        conn.open(streams)
        return conn

    def auth_failed(self, reason: str) -> None:
        self.metrics.auth_failure(reason)

    def _unbound(self, key: str) -> None:
        self.router.unbound(key)

    def _subscription_changed(self, kind: StreamKind, stream: str, delta: int) -> None:
        self.metrics.subscription(kind.value, stream, delta)

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._consumer_greenlet = gevent.spawn(self.consumer.run_forever)
        if self.demo is not None:
            gevent.spawn(self.demo.run_forever, lambda: self.consumer.ready)
        self._sweeper = repeating_timer(self.clients.loop, _SWEEP_INTERVAL, self._sweep)

    def shutdown(self, timeout: float) -> None:
        """Close every client with 1001 and stop consuming; returns within ``timeout``."""
        self.accepting = False
        if self.demo is not None:
            self.demo.stop()
        self.consumer.stop()
        self.clients.close_all(CloseCode.GOING_AWAY, "server shutdown")
        deadline = time.monotonic() + timeout
        while len(self.clients) and time.monotonic() < deadline:
            gevent.sleep(_SHUTDOWN_POLL)
        self.clients.abort_all("shutdown timeout")
        if self._sweeper is not None:
            self._sweeper.stop()
        if self._consumer_greenlet is not None:
            self._consumer_greenlet.join(timeout=max(0.0, deadline - time.monotonic()) + 1.0)

    def _sweep(self) -> None:
        consumer = self.consumer
        self.metrics.flush(
            consumer.ready,
            consumer.reconnects,
            consumer.redelivered,
            consumer.duplicates,
            len(self.bindings),
        )
        # Token expiry is wall-clock time (exp); the socket timers run on the monotonic clock.
        self.clients.expire(time.time())
        self.clients.tick(time.monotonic())


def create_app() -> App:
    """Build and start one worker's gateway; gunicorn calls this in each worker after gevent
    has patched the standard library (``wsgi_app`` in ranger_py.gunicorn_conf)."""
    config = Config.load()
    authenticator = Authenticator.from_config(config)
    if not authenticator.enabled:
        log.warning("JWT_PUBLIC_KEY is not set: /private answers 401 and every client is anonymous")
    gateway = Gateway(config, authenticator)
    gateway.start()
    return App(config, gateway, authenticator)
