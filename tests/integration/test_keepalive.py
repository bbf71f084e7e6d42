"""Server pings and the idle timeout (PROTOCOL §2): a client from which nothing arrives is closed;
one that answers the pings (any client library does) stays."""

from __future__ import annotations

import socket
import time

from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Event,
    Ping,
    Request,
    TextMessage,
)

from .harness import Connect, StartServer
from .wsclient import subscribed

PING_INTERVAL = 0.5
PONG_TIMEOUT = 2.0


def _events(sock: socket.socket, ws: WSConnection, deadline: float) -> list[Event]:
    """Everything the server sends until it closes (answering nothing, not even pings)."""
    events: list[Event] = []
    while time.monotonic() < deadline:
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        data = sock.recv(65536)
        ws.receive_data(data or None)
        for event in ws.events():
            events.append(event)
            if isinstance(event, CloseConnection):
                return events
        if not data:
            return events
    raise AssertionError(f"not closed within the deadline; got {events}")


def test_silent_client_is_closed_and_answering_client_stays(
    start_server: StartServer, connect: Connect
) -> None:
    server = start_server(
        {"RANGER_PING_INTERVAL": str(PING_INTERVAL), "RANGER_PONG_TIMEOUT": str(PONG_TIMEOUT)},
        name="keepalive",
    )
    answering = connect(server)  # websockets answers every ping with a pong
    assert answering.recv() == subscribed()

    silent = WSConnection(ConnectionType.CLIENT)
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(silent.send(Request(host=f"127.0.0.1:{server.port}", target="/public")))
        events = _events(sock, silent, time.monotonic() + PONG_TIMEOUT + 10)
    assert isinstance(events[0], AcceptConnection)
    assert isinstance(events[1], TextMessage) and events[1].data == subscribed()
    assert any(isinstance(event, Ping) for event in events), events
    close = events[-1]
    assert isinstance(close, CloseConnection), events
    assert close.code == 1001  # going away: errors.CloseCode documents it for idle clients

    # It was connected for as long as the silent one, and is still open.
    answering.assert_alive()
