"""A test-only WSGI app for the RFC 6455 conformance suite: every path is an echo websocket.

It runs under ranger-py's own gunicorn settings and worker (``gunicorn -c gunicorn.conf.py
tests.integration.echo_app:create_app()``), and its sockets are ranger-py's ``WebSocket`` owned by
ranger-py's ``Clients``: the handshake, the hand-over and the transport are the production ones,
without the gateway's rules on top. ``/readyz`` answers 200 so the harness can wait for it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from ranger_py import gunicorn_adapter
from ranger_py.app import HANDED_OVER
from ranger_py.clients import Clients, Limits
from ranger_py.config import Config
from ranger_py.errors import CloseCode, HandshakeError
from ranger_py.frames import encode_binary, encode_text
from ranger_py.gevent_adapter import hub_loop, repeating_timer
from ranger_py.handshake import accept_key, switching_protocols
from ranger_py.websocket import WebSocket

COMMAND_APP = "tests.integration.echo_app:create_app()"


class EchoConnection(WebSocket):
    """Echoes every message back as it came: text as text, binary as binary."""

    __slots__ = ()

    def on_message(self, data: str | bytes) -> None:
        if isinstance(data, str):
            self.queue(encode_text(data.encode("utf-8")))
        else:
            self.queue(encode_binary(data))
        self._owner.request_flush()


class _Uncounted:
    def slow_client(self) -> None:
        pass


class EchoApp:
    def __init__(self, clients: Clients) -> None:
        self.clients = clients

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
        fd = gunicorn_adapter.detach_socket(environ)
        ws = self.clients.attach(fd, switching_protocols(accept), EchoConnection)
        ws.flush()
        return HANDED_OVER

    def close(self, timeout: float) -> None:
        self.clients.close_all(CloseCode.GOING_AWAY, "server shutdown")
        self.clients.abort_all("shutdown")


def create_app() -> EchoApp:
    clients = Clients(Limits.from_config(Config.load()), hub_loop(), _Uncounted())
    repeating_timer(clients.loop, 1.0, lambda: clients.tick(time.monotonic()))
    return EchoApp(clients)
