"""One exchange client (Ruby Ranger's ``Connection``): its identity and its client protocol.

The transport is ``WebSocket``; this class adds what the client says and hears (PROTOCOL §4):
``ping``, subscribe and unsubscribe requests answered through the router, error replies for
everything else. The router keeps the subscriptions; the connection only carries ``auth``.
"""

from __future__ import annotations

import socket
from typing import Protocol, cast

from ranger_py.auth import Auth
from ranger_py.errors import ClientError, UnparsableMessage
from ranger_py.frames import encode_binary, encode_text
from ranger_py.protocol import PONG, parse_request
from ranger_py.router import Router
from ranger_py.websocket import Owner, WebSocket

__all__ = ["Connection", "EchoConnection", "Hub"]


class Hub(Owner, Protocol):
    router: Router


class Connection(WebSocket):
    """A client of the gateway: authenticated (or not) once, at connect."""

    __slots__ = ("auth", "path")

    def __init__(
        self,
        hub: Hub,
        sock: socket.socket,
        conn_id: int,
        *,
        auth: Auth,
        path: str,
        queue_limit: int,
    ) -> None:
        super().__init__(hub, sock, conn_id, queue_limit=queue_limit)
        self.auth = auth
        self.path = path

    @property
    def _router(self) -> Router:
        return cast(Hub, self._owner).router

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


class EchoConnection(WebSocket):
    """Echoes every message back as it came (text as text, binary as binary).

    Only for the RFC 6455 conformance suite (``RANGER_ECHO_PATH``): it exercises the transport
    without the gateway's rules on top.
    """

    __slots__ = ()

    def on_message(self, data: str | bytes) -> None:
        if isinstance(data, str):
            self.queue(encode_text(data.encode("utf-8")))
        else:
            self.queue(encode_binary(data))
        self._owner.request_flush()
