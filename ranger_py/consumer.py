"""The broker side (PROTOCOL §5): one kombu consumer per worker process, feeding a callback.

Owns the AMQP connection, the declarations (Peatio's exchange, a private bounded queue),
reconnects and the ready/status pair that /readyz reports. It is the server's only importer of
kombu (demo.py's feed and the ``ranger-py publish`` tool publish with it too). It knows nothing of
routing or greenlets: each message becomes one ``on_message(routing_key, body)`` call, and
yielding to other greenlets is the callback's business. Blocking calls go through the standard
library (sockets, ``time.sleep``, ``threading.Event``), which gevent has patched by the time a
worker runs this.

``memory://`` (RANGER_DEMO) is kombu's in-memory transport: the same consumer, with no socket,
no heartbeats and no queue arguments (ignored there), reading what demo.py publishes.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from kombu.connection import Connection
from kombu.entity import Exchange, Queue, binding
from kombu.exceptions import OperationalError
from kombu.mixins import ConsumerMixin

from ranger_py.amqp_adapter import (
    ACCESS_REFUSED,
    keep_bodies_raw,
    listen_for_binding_replies,
    reply_code,
    send_binding,
    set_socket_timeout,
)
from ranger_py.bindings import ALL_KEYS, Bindings
from ranger_py.recent import RecentMessages

__all__ = ["TIMINGS", "BrokerSettings", "Consumer", "MessageHandler", "Timings"]

log = logging.getLogger(__name__)

MessageHandler = Callable[[str, bytes], None]


@dataclass(frozen=True)
class Timings:
    """How long the consumer waits, in seconds; the defaults are production's (``TIMINGS``).

    Tests pass shorter ones so that they do not sleep through production's pauses.
    """

    # How often heartbeats are checked. config.MIN_BROKER_HEARTBEAT relies on it being at most 1 s.
    safety_interval: float = 1.0
    # With RANGER_BROKER_ROUTING=subscribed, the consume loop's longest wait for the next frame
    # (else safety_interval): how late an idle worker sends the binding that a subscribe request
    # waits for.
    idle_wakeup: float = 0.05
    # A connection attempt (TCP connect, then each step of the AMQP handshake) gives up after this
    # long, so stop() is not held up for long by a broker that accepts TCP but never answers.
    connect_timeout: float = 3.0
    # Once connected, no broker reply (declare-ok, cancel-ok, close-ok) is awaited longer than this.
    # Without it a TCP path that dies silently during declaration or shutdown blocks forever, since
    # heartbeats are only checked by the consume loop.
    reply_timeout: float = 5.0
    # The same bound for the three replies of a polite goodbye after stop() (cancel, close channel,
    # close connection), so a dead path cannot hold up shutdown for long.
    goodbye_timeout: float = 0.5
    # Connection attempts during an outage: 1 s, 2 s, ... then every 5 s (Rango redials every 5 s).
    retry_start: float = 1.0
    retry_step: float = 1.0
    retry_max: float = 5.0
    # Pause after a consume session that failed before it started consuming (refused declaration,
    # unexpected error): doubles up to the cap so nothing loops hot.
    backoff_min: float = 1.0
    backoff_max: float = 30.0
    # A broker that refuses our credentials goes on refusing them until someone fixes them: unlike
    # an outage, this is said at warning level for as long as it lasts, at most once per this long.
    login_warning_interval: float = 60.0
    # Acknowledgements wait for a full batch (a quarter of the prefetch window) or this long, so
    # a steady stream costs one basic.ack per batch rather than one per message; what is left when
    # the stream stops goes by the next wake-up (at most idle_wakeup or safety_interval later).
    ack_interval: float = 0.05
    # kombu's virtual transports poll their queues, once a second by default: too slow for the
    # in-memory transport of RANGER_DEMO, whose messages should arrive as fast as RabbitMQ's.
    memory_poll_interval: float = 0.02


TIMINGS = Timings()


def _transport_options(amqp_url: str, timings: Timings) -> dict[str, Any]:
    if amqp_url.startswith("memory://"):
        return {"polling_interval": timings.memory_poll_interval}
    return {}


def _queue_name() -> str:
    return f"ranger-py.{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(4)}"


class BrokerSettings(Protocol):
    """The part of ``config.Config`` the consumer reads."""

    @property
    def amqp_url(self) -> str: ...

    @property
    def exchange(self) -> str: ...

    @property
    def queue_max_length(self) -> int: ...

    @property
    def broker_heartbeat(self) -> int: ...

    @property
    def queue_expires(self) -> int: ...

    @property
    def broker_prefetch(self) -> int: ...


class _StopRequestedError(Exception):
    """Raised inside kombu's connection retry loop to abandon it once stop() was called."""


class _LoginRefusedError(Exception):
    """The broker answered the connection attempt by refusing our user or password."""


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _access_refused(exc: BaseException) -> bool:
    """Whether ``exc``, or an error it was raised from, is the broker's ACCESS_REFUSED.

    py-amqp raises AccessRefused (reply code 403); a library wrapping it may keep only its text.
    """
    seen: BaseException | None = exc
    for _ in range(5):  # a short chain: a cycle must not loop
        if seen is None:
            return False
        if reply_code(seen) == ACCESS_REFUSED or "ACCESS_REFUSED" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _bound_replies(conn: Any, seconds: float) -> None:
    """Make blocking reads on the connection's socket give up after ``seconds``.

    py-amqp waits for a reply with no timeout of its own; its timed drains set and restore the
    socket timeout around themselves, so they are unaffected. Virtual transports have no socket.
    """
    set_socket_timeout(conn, seconds)


class Consumer(ConsumerMixin):
    """Consume every message of a topic exchange into ``on_message`` until :meth:`stop`."""

    def __init__(
        self,
        amqp_url: str,
        exchange: str,
        on_message: MessageHandler,
        queue_max_length: int = 100000,
        heartbeat: float = 10.0,
        *,
        queue_expires: float = 60.0,
        prefetch: int = 1000,
        timings: Timings = TIMINGS,
        clock: Callable[[], float] = time.monotonic,
        bindings: Bindings | None = None,
    ) -> None:
        """Set up the connection; nothing is opened before :meth:`run_forever`.

        ``bindings`` are the queue's (ranger_py.bindings); by default ``#`` alone.

        ``queue_max_length``, ``heartbeat``, ``queue_expires`` (seconds) and ``prefetch`` are taken
        as ``config.Config`` checked them.
        ``clock`` is the monotonic clock that outages, heartbeat checks and the login warning's
        rate are measured with.
        """
        # AMQP negotiates the heartbeat in whole seconds.
        heartbeat_s = math.ceil(heartbeat)
        self.connection = Connection(  # type: ignore[no-untyped-call]
            amqp_url,
            heartbeat=heartbeat_s,
            connect_timeout=timings.connect_timeout,
            transport_options=_transport_options(amqp_url, timings),
        )
        self.exchange_name = exchange
        self.queue_max_length = queue_max_length
        # One name for the life of the worker process, so that a new connection finds the queue
        # that kept filling while the old one was down; unique, so no two workers share one.
        self.queue_name = _queue_name()
        self.queue_expires = queue_expires
        self.prefetch = prefetch
        self.bindings = Bindings(ALL_KEYS, 0.0) if bindings is None else bindings
        self._declared: list[str] = []  # the keys bound by the last queue declaration
        self._channel: Any = None  # the consuming channel, for binding changes
        # Acknowledged in batches (basic.ack with multiple): a quarter of the window at a time, so
        # the broker always has room to push more before the ack arrives.
        self._ack_every = max(1, prefetch // 4)
        self._unacked: Any = None  # the newest message not acknowledged yet
        self._unacked_count = 0
        self._unacked_since = 0.0  # when the oldest of them was fanned out
        self._recent = RecentMessages(2 * prefetch)
        self.redelivered = 0  # messages the broker marked redelivered
        self.duplicates = 0  # of those, the ones already fanned out: dropped
        self.timings = timings
        self.reconnects = 0
        self._handler = on_message
        self._uri: str = self.connection.as_uri()  # password masked
        info = self.connection.info()  # type: ignore[no-untyped-call]  # kombu's defaults filled in
        self._login = (
            f"user {info['userid']} at {info['hostname']}:{info['port']}/{info['virtual_host']}"
        )
        self._clock = clock
        self._login_warned_at: float | None = None
        self._state: tuple[bool, str] = (False, "connecting")
        self._stop_event = threading.Event()
        self._exchange = self._peatio_exchange()
        self._exchange_warned = False
        self._live: Any = None  # the kombu connection while consuming, for heartbeat checks
        self._next_heartbeat = 0.0
        self._has_consumed = False
        self._session_consumed = False
        self._outage_since: float | None = None

    @classmethod
    def from_config(
        cls,
        config: BrokerSettings,
        on_message: MessageHandler,
        *,
        timings: Timings = TIMINGS,
        bindings: Bindings | None = None,
    ) -> Consumer:
        return cls(
            config.amqp_url,
            config.exchange,
            on_message,
            queue_max_length=config.queue_max_length,
            heartbeat=config.broker_heartbeat,
            queue_expires=config.queue_expires,
            prefetch=config.broker_prefetch,
            timings=timings,
            bindings=bindings,
        )

    @property
    def ready(self) -> bool:
        """True only while connected and consuming."""
        return self._state[0]

    @property
    def status(self) -> str:
        """Why the consumer is not ready (or "consuming" when it is)."""
        return self._state[1]

    def stop(self) -> None:
        self.should_stop = True
        self._stop_event.set()

    def run_forever(self) -> None:
        """Consume until :meth:`stop`; connection losses and our own bugs only pause it."""
        log.info("consumer starting: exchange %r at %s", self.exchange_name, self._uri)
        timings = self.timings
        backoff = timings.backoff_min
        # Only bindings that change while consuming need the quick wake-up.
        wakeup = timings.idle_wakeup if self.bindings.dynamic else timings.safety_interval
        while not self.should_stop:
            self._session_consumed = False
            try:
                for _ in self.consume(limit=None, safety_interval=wakeup):  # type: ignore[no-untyped-call]
                    pass
            except _StopRequestedError:
                break
            except _LoginRefusedError as exc:
                self._login_refused(exc.__cause__ or exc)
            except (*self.connection.connection_errors, OperationalError) as exc:
                self._failed("broker connection lost", exc)
            except self.connection.channel_errors as exc:
                self._failed("broker refused", exc)
            except Exception as exc:
                # A bug of ours or of kombu's: the consumer must outlive it.
                log.exception("consumer failed; restarting in %.0f s", backoff)
                self._failed("consumer error", exc, logged=True)
            self._channel = None
            self.bindings.lost()  # nothing is confirmed now; waiting subscriptions go ahead
            if self._session_consumed:
                backoff = timings.backoff_min
            if not self.should_stop:
                self._stop_event.wait(backoff)
                backoff = min(backoff * 2, timings.backoff_max)
        self._live = None
        self._state = (False, "stopped")
        log.info("consumer stopped")

    def _login_refused(self, exc: BaseException) -> None:
        self._live = None
        self._state = (False, f"broker refused the login for {self._login}")
        if self._outage_since is None:
            self._outage_since = self._clock()
        # The broker's text is not expected to carry the password; make sure it never does.
        password = self.connection.info()["password"]  # type: ignore[no-untyped-call]
        reason = _describe(exc)
        if password:
            reason = reason.replace(password, "****")
        now = self._clock()
        interval = self.timings.login_warning_interval
        if self._login_warned_at is None or now - self._login_warned_at >= interval:
            self._login_warned_at = now
            log.warning(
                "broker refused the login for %s (check RABBITMQ_USER/RABBITMQ_PASSWORD or "
                "RABBITMQ_URL): %s; retrying",
                self._login,
                reason,
            )
        else:
            log.debug("broker still refuses the login for %s: %s", self._login, reason)

    def _failed(self, what: str, exc: BaseException, logged: bool = False) -> None:
        self._live = None
        self._state = (False, f"{what}: {_describe(exc)}")
        # One warning per outage; the failed attempts that follow are debug noise.
        if self._outage_since is None:
            self._outage_since = self._clock()
            if not logged:
                log.warning("%s: %s; reconnecting", what, _describe(exc))
        elif not logged:
            log.debug("%s: %s", what, _describe(exc))

    # kombu ConsumerMixin hooks

    # Replaces kombu's own, which consume() opens every connection through (relied on as of
    # kombu 5.7.0; see amqp_adapter and its test).
    @contextmanager
    def establish_connection(self) -> Iterator[Any]:
        conn = self.create_connection()  # type: ignore[no-untyped-call]
        broken = True
        try:
            try:
                conn.ensure_connection(
                    self.on_connection_error,
                    self.connect_max_retries,
                    interval_start=self.timings.retry_start,
                    interval_step=self.timings.retry_step,
                    interval_max=self.timings.retry_max,
                    callback=self._abandon_if_stopping,
                )
            except Exception as exc:
                # kombu does not retry a refused login (py-amqp's AccessRefused is not a
                # recoverable error): it comes out of ensure_connection at once, on_connection_error
                # never sees it, and run_forever's backoff paces the next attempts.
                if _access_refused(exc):
                    raise _LoginRefusedError(_describe(exc)) from exc
                raise
            _bound_replies(conn, self.timings.reply_timeout)
            self._exchange = self._usable_exchange(conn)
            yield conn
            broken = False
        except conn.channel_errors:
            broken = False  # the connection itself is fine and can be closed politely
            raise
        finally:
            if broken:
                # No close handshake on a connection that may be dead: it could never finish.
                conn.collect()
            else:
                conn.release()

    @contextmanager
    def extra_context(self, connection: Any, channel: Any) -> Iterator[None]:
        yield
        # Reached on a clean exit only (stop() was called): the goodbye follows.
        _bound_replies(connection, self.timings.goodbye_timeout)

    def on_connection_error(self, exc: BaseException, interval: float) -> None:
        # kombu calls this for every failed connection attempt.
        if self._outage_since is None:
            self._outage_since = self._clock()
            self._state = (False, f"cannot connect to broker: {_describe(exc)}")
            log.warning("cannot connect to broker at %s: %s; retrying", self._uri, _describe(exc))
        else:
            log.debug("broker unreachable (%s); next attempt in %.0f s", _describe(exc), interval)

    def get_consumers(self, make_consumer: Callable[..., Any], channel: Any) -> list[Any]:
        # py-amqp decodes bodies that carry a content_encoding into str; PROTOCOL §5 forwards
        # bodies as published, so keep them as the bytes that arrived.
        keep_bodies_raw(channel)
        self._unacked, self._unacked_count = None, 0  # a new channel: its tags start over
        # Not exclusive nor auto-deleted: the queue outlives a broken connection and goes on
        # collecting what Peatio publishes; the broker removes it once it has had no consumer
        # for x-expires. x-max-length bounds that backlog, dropping the oldest message. A single
        # active consumer: after a silent loss, the broker may still hold the dead connection's
        # consumer for a few heartbeats; ours waits until that one is gone and its unacknowledged
        # messages are back in the queue, so everything arrives in order.
        # Bound to what the worker's clients hold now (and the order books'), or to "#".
        self._declared = self.bindings.declared()
        queue = Queue(  # type: ignore[no-untyped-call]
            self.queue_name,
            bindings=[binding(self._exchange, routing_key=key) for key in self._declared],  # type: ignore[no-untyped-call]
            exclusive=False,
            auto_delete=False,
            durable=False,
            queue_arguments={
                "x-max-length": self.queue_max_length,
                "x-overflow": "drop-head",
                "x-expires": int(self.queue_expires * 1000),
                "x-single-active-consumer": True,
            },
        )
        return [
            make_consumer(
                queues=[queue],
                on_message=self._deliver,
                no_ack=False,
                prefetch_count=self.prefetch,
            )
        ]

    def on_consume_ready(
        self, connection: Any, channel: Any, consumers: Any, **kwargs: Any
    ) -> None:
        self._live = connection
        if self.bindings.dynamic:  # with "#" alone nothing is ever bound while consuming
            self._channel = channel
            listen_for_binding_replies(channel, self.bindings.confirmed)
        self.bindings.consuming(self._declared)
        self._session_consumed = True
        self._state = (True, "consuming")
        self._login_warned_at = None  # a later refusal is news again
        if self._outage_since is not None:
            down = self._clock() - self._outage_since
            self._outage_since = None
            if self._has_consumed:
                self.reconnects += 1
                log.info("broker connection re-established after %.1f s", down)
            else:
                log.info("connected to broker after %.1f s", down)
        self._has_consumed = True

    def on_consume_end(self, connection: Any, channel: Any) -> None:
        self._live = None
        self._state = (False, "stopping")

    def on_iteration(self) -> None:
        # Called before each wait for the next frame: kombu reads one message at a time.
        now = self._clock()
        channel = self._channel
        if channel is not None:
            self._send_bindings(channel)  # what a subscribe request waits for goes out first
        if self._unacked is not None and now - self._unacked_since >= self.timings.ack_interval:
            # A batch that has not filled up is acknowledged once its oldest is ack_interval old.
            self._ack()
        # kombu only checks heartbeats when a drain times out, so a steady stream of messages
        # would keep us from ever sending one and the broker would drop us; check once per safety
        # interval.
        conn = self._live
        if conn is not None and now >= self._next_heartbeat:
            self._next_heartbeat = now + self.timings.safety_interval
            conn.heartbeat_check()
            self.bindings.expire()  # the unbindings due go out with the next iteration

    # internals

    def _send_bindings(self, channel: Any) -> None:
        """Send the bindings changed since the last iteration; their replies come as they come."""
        bindings = self.bindings
        for bind, key in bindings.pending():
            if send_binding(channel, bind, self.queue_name, self.exchange_name, key):
                bindings.confirmed()  # a virtual channel binds in place

    def _abandon_if_stopping(self) -> None:
        if self.should_stop:
            raise _StopRequestedError

    def _peatio_exchange(self) -> Exchange:
        # Peatio's flags; kombu's default durable=True gets a 406 against Peatio's exchange.
        return Exchange(  # type: ignore[no-untyped-call]
            self.exchange_name, type="topic", durable=False, auto_delete=False
        )

    def _usable_exchange(self, conn: Any) -> Exchange:
        """Declare the exchange with Peatio's flags, or settle for it as it already exists.

        A declaration that does not match an existing exchange closes its channel (406), so it
        is tried on a channel of its own. The queue then binds without re-declaring it.
        """
        ours = self._peatio_exchange()
        channel = conn.channel()
        try:
            ours.declare(channel=channel)  # type: ignore[no-untyped-call]
        except conn.channel_errors as exc:
            # PROTOCOL §5: use an exchange declared with other flags as it is, and say so.
            if not self._exchange_warned:
                self._exchange_warned = True
                log.warning(
                    "exchange %r exists with flags other than Peatio's (%s); using it as it is",
                    self.exchange_name,
                    _describe(exc),
                )
        finally:
            conn.maybe_close_channel(channel)
        return Exchange(self.exchange_name, type="topic", no_declare=True)  # type: ignore[no-untyped-call]

    def _deliver(self, message: Any) -> None:
        info = message.delivery_info
        routing_key: str = info.get("routing_key") or ""
        body = message.body
        if body is None:
            body = b""
        elif isinstance(body, str):
            body = body.encode("utf-8")
        digest = RecentMessages.digest(routing_key, body)
        if info.get("redelivered"):
            # Pushed to a connection that died before its acknowledgement reached the broker:
            # fanned out already if it is among the last messages fanned out.
            self.redelivered += 1
            if digest in self._recent:
                self.duplicates += 1
                self._acknowledge(message)
                return
        try:
            self._handler(routing_key, body)
        except Exception:
            # A message the handler chokes on is dropped; the consumer carries on.
            log.exception("message handler failed on %r; message dropped", routing_key)
        self._recent.add(digest)
        self._acknowledge(message)

    def _acknowledge(self, message: Any) -> None:
        """Count ``message`` as done; acknowledge the batch when it is full."""
        if not self._unacked_count:
            self._unacked_since = self._clock()
        self._unacked = message
        self._unacked_count += 1
        if self._unacked_count >= self._ack_every:
            self._ack()

    def _ack(self) -> None:
        message, self._unacked, self._unacked_count = self._unacked, None, 0
        # basic.ack with multiple: every message of this channel up to this one.
        message.ack(multiple=True)
