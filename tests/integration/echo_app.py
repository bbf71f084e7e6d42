"""A test-only WSGI app for the RFC 6455 conformance suite: every path is an echo websocket.

It runs under ranger-py's own gunicorn settings and worker (``gunicorn -c gunicorn.conf.py
tests.integration.echo_app:create_app()``), and its sockets are ranger-py's ``WebSocket`` owned by
ranger-py's ``Clients``: the handshake, the hand-over and the transport are the production ones,
without the gateway's rules on top. permessage-deflate is negotiated by the production code too
(``RANGER_COMPRESSION``), and a client that negotiated it gets its echoes compressed (from
``RANGER_COMPRESSION_THRESHOLD`` bytes). ``/readyz`` answers 200 so the harness can wait for it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from ranger_py import gunicorn_adapter
from ranger_py.app import HANDED_OVER
from ranger_py.clients import Clients, Limits
from ranger_py.compression import negotiate
from ranger_py.config import Config
from ranger_py.errors import CloseCode, HandshakeError
from ranger_py.frames import (
    encode_binary,
    encode_binary_deflated,
    encode_text,
    encode_text_deflated,
)
from ranger_py.gevent_adapter import hub_loop, repeating_timer
from ranger_py.handshake import accept_key, switching_protocols
from ranger_py.websocket import WebSocket

COMMAND_APP = "tests.integration.echo_app:create_app()"


class EchoConnection(WebSocket):
    """Echoes every message back as it came: text as text, binary as binary."""

    __slots__ = ()

    def on_message(self, data: str | bytes) -> None:
        text = isinstance(data, str)
        payload = data.encode("utf-8") if isinstance(data, str) else data
        bits = self.deflate
        if bits and len(payload) >= self._owner.compress_from:
            deflated = encode_text_deflated if text else encode_binary_deflated
            self.queue(deflated(payload, bits))
        else:
            self.queue(encode_text(payload) if text else encode_binary(payload))
        self._owner.request_flush()


class _Uncounted:
    def slow_client(self) -> None:
        pass


class EchoApp:
    def __init__(self, clients: Clients, *, compression: bool) -> None:
        self.clients = clients
        self.compression = compression

    def __call__(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == "/readyz" and "HTTP_UPGRADE" not in environ:
            start_response("200 OK", [("Content-Type", "application/json")])
            return [b'{"status":"ready"}']
        try:
            accept = accept_key(environ)
        except HandshakeError as exc:
            start_response(f"{exc.status} Refused", [("Content-Type", "application/json")])
            return [exc.body]
        offer = environ.get("HTTP_SEC_WEBSOCKET_EXTENSIONS")
        deflate = negotiate(offer) if self.compression else None
        greeting = switching_protocols(accept, deflate.response if deflate else None)
        fd = gunicorn_adapter.detach_socket(environ)
        window_bits = deflate.window_bits if deflate else 0
        ws = self.clients.attach(fd, greeting, EchoConnection, window_bits=window_bits)
        ws.flush()
        return HANDED_OVER

    def close(self, timeout: float) -> None:
        self.clients.close_all(CloseCode.GOING_AWAY, "server shutdown")
        self.clients.abort_all("shutdown")


def create_app() -> EchoApp:
    config = Config.load()
    clients = Clients(Limits.from_config(config), hub_loop(), _Uncounted())
    repeating_timer(clients.loop, 1.0, lambda: clients.tick(time.monotonic()))
    return EchoApp(clients, compression=config.compression)
