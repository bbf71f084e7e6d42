"""One websocket after the handshake: non-blocking reads and writes driven by the event loop.

There is no greenlet per connection (a parked greenlet costs ~8 KB):
a libev io watcher calls ``_on_readable`` in gevent's event loop when bytes arrive, and frames are
written straight from the fan-out into a per-connection list that the owner flushes once per
loop turn, all pending frames joined into one ``send``. A socket that cannot take everything
gets a write watcher; until it drains, frames queue up to the owner's ``queue_frames`` frames or
``max_queue_bytes`` bytes, and then the client is closed with 1008 so it can never hold back the
others (PROTOCOL §2). The bound counts every byte queued for the client, whatever produced it:
broadcast frames, replies, pongs, pings. A client that makes the server write faster than it reads
(pings or subscribes sent without reading the answers) is a slow client like any other.

What a client can make the server do is bounded too: every frame it sends spends from a
per-connection budget of ``message_rate`` frames a second with bursts of ``message_burst``
(a GCRA, one float per connection); past it the client is closed with 1008.

Every method here runs in gevent's event loop or in a greenlet that never switches while it runs
them, so the state needs no locks; nothing here may block.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from enum import IntEnum
from typing import Any, Protocol

from ranger_py.errors import CloseCode, CloseConnection
from ranger_py.frames import (
    PING,
    Close,
    DeflatedFrames,
    FrameReader,
    Message,
    Ping,
    encode_close,
    encode_pong,
    encode_text,
    encode_text_deflated,
)
from ranger_py.gevent_adapter import Watcher, close_watcher, read_watcher, write_watcher

__all__ = ["Owner", "State", "WebSocket"]

log = logging.getLogger(__name__)

_RECV_SIZE = 65536
# How long a closing socket waits for the peer's close frame once ours is out (RFC 6455 §7.1.1
# lets the server drop TCP after that).
_CLOSE_TIMEOUT = 5.0


class State(IntEnum):
    OPEN = 1
    CLOSING = 2  # our close frame is queued or sent; waiting for the peer's
    CLOSED = 3


class Owner(Protocol):
    """What a websocket needs from the registry that owns it (ranger_py.clients.Clients)."""

    dirty: list[WebSocket]  # sockets with frames to flush this loop turn
    loop: Any  # gevent's event loop, for io watchers
    max_message_size: int  # inbound limit per message (close 1009 past it)
    queue_frames: int  # outbound frames queued per client (close 1008 past it)
    max_queue_bytes: int  # outbound bytes queued per client (close 1008 past it)
    message_interval: float  # seconds of budget one inbound frame costs (1 / rate)
    message_window: float  # the burst: seconds of budget a client may run ahead
    compress_from: int  # payloads from this many bytes are compressed, where negotiated
    deflated: DeflatedFrames  # compressed replay frames, shared by the owner's sockets

    def request_flush(self) -> None: ...

    def slow(self, ws: WebSocket) -> None: ...  # ws is being closed with 1008

    def closed(self, ws: WebSocket, reason: str) -> None: ...


class WebSocket:
    """A server-side websocket on a non-blocking socket. Subclasses implement ``on_message``."""

    __slots__ = (
        "_blocked_since",
        "_close_deadline",
        "_limit",
        "_out",
        "_owner",
        "_partial",
        "_peer_closed",
        "_queued",
        "_read_watcher",
        "_reader",
        "_tat",
        "_write_watcher",
        "close_note",
        "deflate",
        "id",
        "last_ping",
        "last_seen",
        "sock",
        "state",
    )

    def __init__(
        self,
        owner: Owner,
        sock: socket.socket,
        conn_id: int,
    ) -> None:
        self._owner = owner
        self.sock = sock
        self.id = conn_id
        self.state = State.OPEN
        self.close_note = ""  # the close frame we sent or answered, for the log line
        # permessage-deflate: the window bits of this client's compressed frames, 0 when it
        # negotiated none (the owner sets it before the first frame). One int, no zlib state.
        self.deflate = 0
        # Made on the first bytes and dropped whenever idle: most clients send a subscribe now
        # and then, and a parser kept per connection would double an idle connection's memory.
        self._reader: FrameReader | None = None
        self._out: list[bytes] = []
        self._limit = owner.queue_frames
        self._queued = 0  # bytes in _out, the unsent tail of a partial frame included
        # GCRA's theoretical arrival time of the next inbound frame: the client is within its
        # rate while this stays less than message_window ahead of the clock.
        self._tat = 0.0
        # True while _out[0] is the unsent tail of a frame that has partly gone out.
        self._partial = False
        self._peer_closed = False
        self._blocked_since = 0.0
        self._close_deadline = 0.0
        self.last_seen = self.last_ping = time.monotonic()
        self._write_watcher: Watcher | None = None
        self._read_watcher = read_watcher(owner.loop, sock.fileno(), self._on_readable)

    # -- inbound -----------------------------------------------------------------------------

    def on_message(self, data: str | bytes) -> None:
        raise NotImplementedError

    def on_closed(self, reason: str) -> None:
        """Called once, when the socket is gone: a subclass's own bookkeeping."""

    def _on_readable(self) -> None:
        try:
            data = self.sock.recv(_RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.abort(f"read error: {exc.strerror}")
            return
        if not data:
            self.abort("peer closed" if self._peer_closed else "connection lost")
            return
        now = self.last_seen = time.monotonic()
        owner = self._owner
        reader = self._reader
        if reader is None:
            reader = self._reader = FrameReader(owner.max_message_size, inflate=bool(self.deflate))
        try:
            for event in reader.feed(data):
                if self.state is State.CLOSED:
                    return
                if type(event) is Close:
                    self._on_close_frame(event)
                    continue
                if self.state is not State.OPEN:
                    continue  # closing: only the peer's close frame matters now
                # Every other frame spends from the client's budget (a ping costs a pong, a
                # message a parse and a reply); a client past it is closed, not slowed down.
                tat = max(self._tat, now) + owner.message_interval
                if tat - now > owner.message_window:
                    # What was answered before still goes out, within the byte bound. The
                    # parser is kept: frames that follow are read (and ignored) until the peer's
                    # close frame, never buffered.
                    self.close(CloseCode.POLICY_VIOLATION, "too many messages")
                    continue
                self._tat = tat
                if type(event) is Message:
                    self.on_message(event.data)
                elif type(event) is Ping:
                    self.queue(encode_pong(event.payload))
                    owner.request_flush()
                # A Pong only proves the peer is alive: last_seen is already updated.
            if reader.idle:
                self._reader = None
        except CloseConnection as exc:
            # RFC 6455 §7.1.7: after failing the connection there is no close frame to wait
            # for; TCP is dropped as soon as ours is out.
            self._peer_closed = True
            self.close(exc.code, exc.reason)
        except Exception:
            log.exception("connection %s: unexpected error", self.id)
            self.close(CloseCode.INTERNAL_ERROR)

    def _on_close_frame(self, event: Close) -> None:
        self._peer_closed = True
        if self.state is State.OPEN:
            # RFC 6455 §5.5.1: answer with a close frame, echoing the peer's status code.
            code = CloseCode.NORMAL if event.code == 1005 else event.code
            self.close(code, "")
        elif not self._out:
            self._finish("closed")

    # -- outbound ----------------------------------------------------------------------------

    def queue(self, frame: bytes) -> None:
        """Hot path: add bytes to write (one encoded frame); the owner flushes once per turn.

        Every outbound byte comes through here (the close frame excepted), so the bound holds
        whatever produced it.
        """
        out = self._out
        n = len(out)
        queued = self._queued + len(frame)
        # _limit is 0 once closing, so nothing follows the close frame.
        if n >= self._limit or queued > self._owner.max_queue_bytes:
            if self.state is State.OPEN:
                self.close(CloseCode.POLICY_VIOLATION, "slow client", drop_pending=True)
                self._owner.slow(self)
            return
        if not n:
            self._owner.dirty.append(self)
        out.append(frame)
        self._queued = queued

    def send(self, payload: bytes) -> None:
        """Queue one text message built for this client only, and get it flushed soon.

        Compressed when this client negotiated it and the payload reaches the threshold.
        """
        bits = self.deflate
        if bits and len(payload) >= self._owner.compress_from:
            self.queue(encode_text_deflated(payload, bits))
        else:
            self.queue(encode_text(payload))
        self._owner.request_flush()

    def send_many(self, payloads: list[bytes]) -> None:
        """Queue several text messages as one entry: an order-book replay is one queue slot.

        Compressed frames come from the owner's cache: the same snapshot and increments are
        replayed to every late subscriber, and each is compressed once.
        """
        if not payloads:
            return
        bits = self.deflate
        if bits:
            owner = self._owner
            threshold = owner.compress_from
            frame = owner.deflated.frame
            self.queue(
                b"".join(
                    frame(p, bits) if len(p) >= threshold else encode_text(p) for p in payloads
                )
            )
        else:
            self.queue(b"".join(encode_text(p) for p in payloads))
        self._owner.request_flush()

    def flush(self) -> None:
        """Write whatever is pending in one ``send``; park the rest behind a write watcher.

        Hot path (once per recipient per loop turn): the common case is one check, one send and
        a clear. A closed socket always has an empty list, so it needs no state check.
        """
        out = self._out
        if not out or self._write_watcher is not None:
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self.abort(f"write error: {exc.strerror}")
            return
        if sent == len(data):
            out.clear()
            self._queued = 0
            if self._blocked_since or self._limit == 0:  # a stall is over, or we are closing
                self._drained()
            return
        self._keep_unsent(sent)
        # The write deadline counts time without progress, not the age of the backlog.
        if sent or not self._blocked_since:
            self._blocked_since = time.monotonic()
        self._write_watcher = write_watcher(self._owner.loop, self.sock.fileno(), self._on_writable)

    def _drained(self) -> None:
        self._partial = False
        self._blocked_since = 0.0
        if self.state is State.CLOSING:
            self._after_close_sent()

    def _keep_unsent(self, sent: int) -> None:
        # Drop the frames that went out whole; keep the tail of the one cut short. The queue
        # still counts frames, so the slow-client bound means the same thing after a short write.
        out = self._out
        self._queued -= sent
        i = 0
        while sent >= len(out[i]):
            sent -= len(out[i])
            i += 1
        del out[:i]
        if sent:
            out[0] = out[0][sent:]
            self._partial = True

    def _on_writable(self) -> None:
        watcher, self._write_watcher = self._write_watcher, None
        if watcher is not None:
            close_watcher(watcher)
        self.flush()

    # -- closing -----------------------------------------------------------------------------

    def close(self, code: int, reason: str = "", *, drop_pending: bool = False) -> None:
        """Start the closing handshake (RFC 6455 §7.1.2); the socket closes once it completes."""
        if self.state is not State.OPEN:
            return
        self.state = State.CLOSING
        self.close_note = f"{int(code)} {reason}".rstrip()
        self._limit = 0
        out = self._out
        if drop_pending:
            # A slow client is not owed its backlog; a frame already half-sent must be completed,
            # or the close frame would land in the middle of it.
            del out[1 if self._partial else 0 :]
        if not out:
            self._owner.dirty.append(self)
        # The close frame is the one write past the bound: at most 125 bytes, once.
        out.append(encode_close(code, reason))
        self._queued = sum(map(len, out))
        self._close_deadline = time.monotonic() + _CLOSE_TIMEOUT
        self._owner.request_flush()

    def _after_close_sent(self) -> None:
        if self._peer_closed:
            self._finish("closed")
        else:
            # Tell the peer we are done writing; its close frame or EOF finishes us.
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                self._finish("connection lost")

    def abort(self, reason: str) -> None:
        """Drop the connection without a closing handshake (peer gone or stuck)."""
        self._finish(reason)

    def _finish(self, reason: str) -> None:
        if self.state is State.CLOSED:
            return
        self.state = State.CLOSED
        self._limit = 0
        for watcher in (self._read_watcher, self._write_watcher):
            if watcher is not None:
                close_watcher(watcher)
        self._write_watcher = None
        self._out.clear()
        self._queued = 0
        with contextlib.suppress(OSError):
            self.sock.close()
        self._owner.closed(self, reason)
        self.on_closed(reason)

    # -- timers ------------------------------------------------------------------------------

    def tick(
        self, now: float, ping_interval: float, idle_timeout: float, write_timeout: float
    ) -> None:
        """Called about once a second by the owner: pings, idle clients, stuck writes."""
        if self.state is State.CLOSED:
            return
        if self._blocked_since and now - self._blocked_since > write_timeout:
            self.abort("write timeout")
        elif self.state is State.CLOSING:
            if now > self._close_deadline and not self._blocked_since:
                self._finish("close timeout")
        elif now - self.last_seen > idle_timeout:
            self.close(CloseCode.GOING_AWAY, "ping timeout")
        elif now - self.last_ping >= ping_interval:
            self.last_ping = now
            self.queue(PING)
            self._owner.request_flush()
