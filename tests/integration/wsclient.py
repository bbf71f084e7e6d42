"""A blocking websocket client for the tests, on ``websockets.sync.client``, plus plain HTTP.

Frames are compared as exact text (PROTOCOL §4 is byte-exact), so ``recv`` returns the raw string.
Reads always carry a deadline: a missing frame fails the test instead of hanging it.
"""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

__all__ = [
    "Client",
    "Closed",
    "HttpResponse",
    "http_request",
    "subscribed",
    "unsubscribed",
]

TIMEOUT = 5.0


def _reply(message: str, streams: Iterable[str]) -> str:
    return json.dumps(
        {"success": {"message": message, "streams": list(streams)}}, separators=(",", ":")
    )


def subscribed(*streams: str) -> str:
    """The exact ``subscribed`` reply listing ``streams`` (PROTOCOL §4)."""
    return _reply("subscribed", streams)


def unsubscribed(*streams: str) -> str:
    return _reply("unsubscribed", streams)


@dataclass(frozen=True)
class Closed:
    """How the server closed a connection: the code and reason of its close frame, if any."""

    code: int | None
    reason: str


class Client:
    """One websocket connection to the server under test."""

    def __init__(
        self,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        max_queue: int | None = 64,
        sock: socket.socket | None = None,
        timeout: float = TIMEOUT,
    ) -> None:
        self.url = url
        self.ws: ClientConnection = connect(
            url,
            additional_headers=dict(headers or {}),
            sock=sock,
            open_timeout=timeout,
            close_timeout=timeout,
            compression=None,
            proxy=None,
            # The server pings (PROTOCOL §2); the client only answers.
            ping_interval=None,
            max_size=None,
            max_queue=max_queue,
            # A plain connection object, not a context manager: the fixtures close it.
            legacy=True,
        )

    def recv(self, timeout: float = TIMEOUT) -> str:
        """The next frame as text; fails if it does not come within ``timeout`` or is binary."""
        try:
            frame = self.ws.recv(timeout=timeout)
        except TimeoutError:
            raise AssertionError(f"no frame from the server within {timeout} s") from None
        except ConnectionClosed as closed:
            raise AssertionError(f"the server closed the connection: {closed}") from None
        assert isinstance(frame, str), f"expected a text frame, got binary {frame!r}"
        return frame

    def recv_many(self, count: int, timeout: float = TIMEOUT) -> list[str]:
        return [self.recv(timeout) for _ in range(count)]

    def send(self, message: str | bytes | Iterable[str]) -> None:
        """Send one message; an iterable of strings goes out as the fragments of one message."""
        self.ws.send(message)

    def request(self, message: str | bytes, timeout: float = TIMEOUT) -> str:
        """Send ``message`` and return the next frame."""
        self.send(message)
        return self.recv(timeout)

    def subscribe(self, *streams: str) -> str:
        return self.request(json.dumps({"event": "subscribe", "streams": list(streams)}))

    def unsubscribe(self, *streams: str) -> str:
        return self.request(json.dumps({"event": "unsubscribe", "streams": list(streams)}))

    def assert_alive(self) -> None:
        """The connection still answers: ``ping`` gets ``pong`` (PROTOCOL §4)."""
        assert self.request("ping") == "pong"

    def wait_closed(self, timeout: float = TIMEOUT) -> tuple[list[str], Closed]:
        """Read until the server closes; returns the frames read before, and the close."""
        frames: list[str] = []
        try:
            while True:
                frame = self.ws.recv(timeout=timeout)
                frames.append(frame if isinstance(frame, str) else frame.decode())
        except TimeoutError:
            raise AssertionError(f"the server did not close within {timeout} s") from None
        except ConnectionClosed as closed:
            received = closed.rcvd
            if received is None:
                return frames, Closed(None, "")
            return frames, Closed(received.code, received.reason)

    def close(self) -> None:
        self.ws.close()


@dataclass(frozen=True)
class HttpResponse:
    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> object:
        return json.loads(self.body)


def http_request(
    port: int,
    path: str,
    *,
    method: str = "GET",
    headers: Mapping[str, str] | None = None,
    timeout: float = TIMEOUT,
) -> HttpResponse:
    """One plain HTTP request to 127.0.0.1:``port``."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path, headers=dict(headers or {}))
        response = connection.getresponse()
        body = response.read()
        return HttpResponse(response.status, {k.lower(): v for k, v in response.getheaders()}, body)
    finally:
        connection.close()
