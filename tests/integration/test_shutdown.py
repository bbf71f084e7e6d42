"""SIGTERM to gunicorn closes every client with 1001 and the server exits cleanly (PROTOCOL §2)."""

from __future__ import annotations

import signal

from .harness import Connect, StartServer, unique
from .tokens import SigningKey
from .wsclient import subscribed


def test_sigterm_closes_clients_with_1001(
    start_server: StartServer, connect: Connect, rsa: SigningKey
) -> None:
    server = start_server(
        {"WEB_CONCURRENCY": "2", "JWT_PUBLIC_KEY": rsa.public_env}, name="sigterm"
    )
    stream = f"{unique()}.trades"
    private = connect(server, "/private?stream=order", headers={"Authorization": rsa.bearer()})
    assert private.recv() == subscribed("order")
    clients = [private, *(connect(server, f"/?stream={stream}") for _ in range(5))]
    for client in clients[1:]:
        assert client.recv() == subscribed(stream)
    server.signal(signal.SIGTERM)
    for client in clients:
        frames, closed = client.wait_closed(timeout=20)
        assert frames == []
        assert closed.code == 1001, closed
    assert server.wait_exit(timeout=30) == 0
