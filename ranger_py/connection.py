"""One exchange client (Ruby Ranger's ``Connection``): its identity and its client protocol.

The transport is ``WebSocket``; this class adds what the client says and hears (PROTOCOL §4):
``ping``, subscribe and unsubscribe requests answered through the router, ``auth`` requests that
renew its token (PROTOCOL §3), error replies for everything else, and the client's own
bookkeeping: one log line when it opens and one when it closes, its connection counts, and its
subscriptions dropped from the router once it is gone. The router keeps the subscriptions; the
connection only carries ``auth``. With ``RANGER_TOKEN_EXPIRY=close`` it hands its token's
deadline to the worker's shared :class:`~ranger_py.clients.Deadlines` and closes with 4001 when
that passes.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from typing import Protocol

from ranger_py.auth import Auth, Authenticator
from ranger_py.clients import Deadlines
from ranger_py.errors import AuthError, ClientError, CloseCode, TokenRefused, UnparsableMessage
from ranger_py.protocol import AUTHENTICATED, PONG, AuthRequest, parse_request
from ranger_py.router import Router
from ranger_py.websocket import Owner, State, WebSocket

__all__ = ["Connection", "ConnectionMetrics", "Tokens"]

log = logging.getLogger(__name__)

# Requests a client may send while its subscribe request waits for the broker (a few ms): as
# many as RANGER_CLIENT_BURST's default lets through at once (a frontend subscribing stream by
# stream without waiting), at most 4 KiB each; more is a flood, closed with 1008.
_MAX_HELD = 100


class ConnectionMetrics(Protocol):
    """Where connections are counted (ranger_py.metrics.WorkerMetrics)."""

    def connection_opened(self, authenticated: bool) -> None: ...

    def connection_closed(self, authenticated: bool) -> None: ...

    def auth_failure(self, reason: str) -> None: ...

    def token_expired(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Tokens:
    """What every connection of a worker shares for its token: one slot per connection for both.

    ``deadlines`` is None with ``RANGER_TOKEN_EXPIRY=ignore``: ``auth`` requests are then
    answered all the same (a client need not know the mode), but nothing is ever closed.
    """

    authenticator: Authenticator
    deadlines: Deadlines | None


class Connection(WebSocket):
    """A client of the gateway: authenticated (or not) at connect, renewed by ``auth``."""

    __slots__ = ("_held", "_metrics", "_router", "_tokens", "auth", "path")

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
        tokens: Tokens,
    ) -> None:
        super().__init__(owner, sock, conn_id)
        self.auth = auth
        self.path = path
        self._router = router
        self._metrics = metrics
        self._tokens = tokens
        # While a subscribe request waits for its bindings: the client's later messages, to be
        # answered in order once it is.
        self._held: list[str | bytes] | None = None

    def open(self, streams: list[str]) -> None:
        """Greet the client: its ``?stream=`` subscription's reply, flushed with the 101."""
        self._metrics.connection_opened(bool(self.auth.uid))
        log.info("connection %d open path=%s uid=%s", self.id, self.path, self.auth.uid or "-")
        self._watch_expiry()
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
        """Subscribe as a ``subscribe`` request would (the ``?stream=`` list at connect).

        A stream whose messages the worker's queue is not bound to yet is subscribed (and the
        request answered) once the broker has confirmed the binding: PROTOCOL §5's promise
        that what is published after the reply arrives.
        """
        router = self._router
        keys = router.unbound_keys(self, streams)
        if keys:
            self._held = []
            router.when_bound(keys, lambda: self._bound(streams))
            return
        self._subscribe_now(streams)

    def _bound(self, streams: list[str]) -> None:
        """The bindings of a waiting subscribe request are in place: answer it, then the rest."""
        held, self._held = self._held or [], None
        if self.state is not State.OPEN:
            return  # closed meanwhile: the router must not take it back
        self._subscribe_now(streams)
        for index, data in enumerate(held):
            if self._held is not None:  # waits again
                self._held.extend(held[index:])
                break
            self.on_message(data)

    def _subscribe_now(self, streams: list[str]) -> None:
        try:
            self.send_many(self._router.subscribe(self, streams))
        except ClientError as exc:
            self.send(exc.reply)

    def on_message(self, data: str | bytes) -> None:
        held = self._held
        if held is not None:
            if len(held) >= _MAX_HELD:
                self.close(CloseCode.POLICY_VIOLATION, "too many requests awaiting a subscription")
                return
            held.append(data)
            return
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
        if isinstance(request, AuthRequest):
            self.renew(request.token)
        elif request.event == "subscribe":
            self.subscribe(list(request.streams))
        else:
            self.send(self._router.unsubscribe(self, request.streams))

    # -- the token (PROTOCOL §3) -------------------------------------------------------------

    def renew(self, token: str) -> None:
        """Take ``token`` in place of the connection's own, by Authenticator.renew's rules."""
        try:
            self.auth = self._tokens.authenticator.renew(self.auth, token)
        except AuthError as exc:
            self._metrics.auth_failure(exc.reason)
            log.debug("connection %d: token renewal refused: %s", self.id, exc.reason)
            self.send(TokenRefused(exc.reason).reply)
            return
        self._watch_expiry()
        log.debug("connection %d: token renewed", self.id)
        self.send(AUTHENTICATED)

    @property
    def deadline(self) -> float | None:
        """When the token stops being accepted, for the worker's Deadlines."""
        return self.auth.expires

    def expired(self) -> None:
        """Called by the worker's Deadlines once the token's expiry has passed unrenewed."""
        if self.state is State.OPEN:
            self._metrics.token_expired()
            self.close(CloseCode.TOKEN_EXPIRED, "token expired")

    def _watch_expiry(self) -> None:
        deadlines = self._tokens.deadlines
        if deadlines is not None:
            deadlines.set(self)  # a token without exp sets nothing
