"""Losing the broker (PROTOCOL §5), faked by cutting a proxy: the shared broker keeps running.

Clients stay connected and subscribed, ``/readyz`` answers 503 while the broker is away and 200 once
the server has reconnected, and messages flow again to the same connections.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from .broker import Broker
from .harness import Connect, Server, StartServer, unique, wait_until
from .tcp_proxy import TcpProxy
from .wsclient import subscribed

RECONNECT_TIMEOUT = 60.0


@pytest.fixture
def proxy(broker: Broker) -> Iterator[TcpProxy]:
    proxy = TcpProxy(broker.host, broker.port)
    yield proxy
    proxy.close()


@pytest.fixture
def proxied_server(start_server: StartServer, proxy: TcpProxy) -> Server:
    return start_server(rabbitmq=("127.0.0.1", proxy.port), name="proxied")


def _readyz_status(server: Server) -> int | None:
    response = server.readyz()
    if response is None:
        return None
    json.loads(response.body)
    return response.status


def test_clients_survive_a_broker_outage(
    proxied_server: Server, proxy: TcpProxy, connect: Connect
) -> None:
    server = proxied_server
    stream = f"{unique()}.trades"
    client = connect(server, f"/public?stream={stream}")
    assert client.recv() == subscribed(stream)
    server.publish(f"public.{stream}", '{"n":1}')
    assert client.recv() == f'{{"{stream}":{{"n":1}}}}'

    proxy.cut()
    wait_until(lambda: _readyz_status(server) == 503, timeout=15, what="/readyz 503")
    # Still connected, still answering, still able to change subscriptions.
    client.assert_alive()
    other = f"{unique()}.trades"
    assert client.subscribe(other) == subscribed(stream, other)
    newcomer = connect(server, f"/?stream={stream}")
    assert newcomer.recv() == subscribed(stream)

    proxy.restore()
    wait_until(lambda: _readyz_status(server) == 200, timeout=RECONNECT_TIMEOUT, what="/readyz 200")
    server.publish(f"public.{stream}", '{"n":2}')
    server.publish(f"public.{other}", '{"n":3}')
    assert client.recv_many(2) == [f'{{"{stream}":{{"n":2}}}}', f'{{"{other}":{{"n":3}}}}']
    assert newcomer.recv() == f'{{"{stream}":{{"n":2}}}}'
    assert server.alive
