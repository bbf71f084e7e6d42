"""One exchange client (Ruby Ranger's ``Connection``): its identity and its client protocol.

The transport is ``WebSocket``; this class adds what the client says and hears (PROTOCOL §4):
``ping``, subscribe and unsubscribe requests answered through the router, error replies for
everything else, and the client's own bookkeeping: one log line when it opens and one when it
closes, its connection counts, and its subscriptions dropped from the router once it is gone.
The router keeps the subscriptions; the connection only carries ``auth``.
"""

from __future__ import annotations

import logging
import socket
from typing import Protocol

from ranger_py.auth import Auth
from ranger_py.errors import ClientError, UnparsableMessage
from ranger_py.protocol import PONG, parse_request
from ranger_py.router import Router
from ranger_py.websocket import Owner, WebSocket

__all__ = ["Connection", "ConnectionMetrics"]

log = logging.getLogger(__name__)


class ConnectionMetrics(Protocol):
    """Where connections are counted (ranger_py.metrics.WorkerMetrics)."""

    def connection_opened(self, authenticated: bool) -> None: ...

    def connection_closed(self, authenticated: bool) -> None: ...


class Connection(WebSocket):
    """A client of the gateway: authenticated (or not) once, at connect."""

    __slots__ = ("_metrics", "_router", "auth", "path")

    def __init__(
        self,
        owner: Owner,
        sock: socket.socket,
        conn_id: int,
        *,
        auth: Auth,
        path: str,
        router: Router,
        metrics: ConnectionMetrics,
    ) -> None:
        super().__init__(owner, sock, conn_id)
        self.auth = auth
        self.path = path
        self._router = router
        self._metrics = metrics

    def open(self, streams: list[str]) -> None:
        """Greet the client: its ``?stream=`` subscription's reply, flushed with the 101."""
        self._metrics.connection_opened(bool(self.auth.uid))
        log.info("connection %d open path=%s uid=%s", self.id, self.path, self.auth.uid or "-")
        # PROTOCOL §4: every connection first hears the reply to its ?stream= subscription.
        self.subscribe(streams)
        self.flush()

    def on_closed(self, reason: str) -> None:
        self._router.remove(self)
        self._metrics.connection_closed(bool(self.auth.uid))
        note = f" (close {self.close_note})" if self.close_note else ""
        log.info(
            "connection %d closed path=%s uid=%s: %s%s",
            self.id,
            self.path,
            self.auth.uid or "-",
            reason,
            note,
        )

    def subscribe(self, streams: list[str]) -> None:
        """Subscribe as a ``subscribe`` request would (the ``?stream=`` list at connect)."""
        try:
            self.send_many(self._router.subscribe(self, streams))
        except ClientError as exc:
            self.send(exc.reply)

    def on_message(self, data: str | bytes) -> None:
        # PROTOCOL §2: a binary frame is read as UTF-8 text.
        if isinstance(data, bytes):
            try:
                data = data.decode("utf-8")
            except UnicodeDecodeError:
                self.send(UnparsableMessage("message is not valid UTF-8").reply)
                return
        text = data.strip()
        if not text:
            return  # PROTOCOL §4: an empty message is ignored
        if text == "ping":
            self.send(PONG)
            return
        try:
            request = parse_request(text)
        except ClientError as exc:
            self.send(exc.reply)
            return
        if request.event == "subscribe":
            self.subscribe(list(request.streams))
        else:
            self.send(self._router.unsubscribe(self, request.streams))
