"""Scale-out: two separate instances on one exchange and vhost, each with its own ports.

Every worker of every instance binds its own queue, so each instance delivers every public message
to its own clients, and a private message reaches the user's connections on whichever instance
they are, and nobody else's (PROTOCOL §5).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest

from .harness import Connect, Server, ServerPool, unique
from .tokens import SigningKey
from .wsclient import Client, subscribed

MESSAGES = 5


@pytest.fixture(scope="module")
def instances(pool: ServerPool, rsa: SigningKey) -> Iterator[tuple[Server, Server]]:
    exchange = f"ranger.test.scale-out.{secrets.token_hex(2)}"
    env = {"JWT_PUBLIC_KEY": rsa.public_env}
    east, west = (pool.new(env, exchange=exchange, name=name) for name in ("east", "west"))
    try:
        # Side by side, as a deploy would start them: each has its own ports.
        for server in (east, west):
            server.start(wait=False)
        for server in (east, west):
            server.wait_ready()
        assert east.port != west.port and east.metrics_port != west.metrics_port
        yield east, west
    finally:
        for server in (east, west):
            server.terminate()
        for server in (east, west):
            server.stop()


def test_every_public_message_reaches_the_clients_of_both_instances(
    instances: tuple[Server, Server], connect: Connect
) -> None:
    stream = f"{unique()}.trades"
    clients = [connect(server, f"/?stream={stream}") for server in instances for _ in range(2)]
    for client in clients:
        assert client.recv() == subscribed(stream)
    publisher = instances[0]  # either: they share the exchange
    for n in range(MESSAGES):
        publisher.publish(f"public.{stream}", f'{{"n":{n}}}')
    publisher.publish(f"public.{stream}", '"end"')
    expected = [f'{{"{stream}":{{"n":{n}}}}}' for n in range(MESSAGES)]
    for client in clients:
        # Each once, in order: the end marker comes right after the last one.
        assert client.recv_many(MESSAGES + 1) == [*expected, f'{{"{stream}":"end"}}']


def test_a_private_message_reaches_its_user_on_both_instances_and_nobody_else(
    instances: tuple[Server, Server], connect: Connect, rsa: SigningKey
) -> None:
    alice, bob = unique("ID"), unique("ID")

    def trader(server: Server, uid: str) -> Client:
        client = connect(
            server, "/private?stream=order", headers={"Authorization": rsa.bearer(uid)}
        )
        assert client.recv() == subscribed("order")
        return client

    alices = [trader(server, alice) for server in instances]
    bobs = [trader(server, bob) for server in instances]
    anonymous = [connect(server, "/?stream=order") for server in instances]
    for client in anonymous:
        assert client.recv() == subscribed()
        assert client.subscribe("order", "global.tickers") == subscribed("global.tickers")

    server = instances[1]
    server.publish(f"private.{alice}.order", '{"id":1}')
    server.publish(f"private.{bob}.order", '{"id":2}')
    server.publish(f"private.{alice}.order", '{"id":3}')
    server.publish("global.tickers", '{"last":"1.0"}')
    # Each instance consumes in publishing order: what a client gets next proves what it did not.
    for client in alices:
        assert client.recv_many(2) == ['{"order":{"id":1}}', '{"order":{"id":3}}']
    for client in bobs:
        assert client.recv() == '{"order":{"id":2}}'
    for client in anonymous:
        assert client.recv() == '{"global.tickers":{"last":"1.0"}}'
    server.publish(f"private.{bob}.order", '{"id":4}')
    server.publish(f"private.{alice}.order", '{"id":5}')
    for client in bobs:
        assert client.recv() == '{"order":{"id":4}}'
    for client in alices:
        assert client.recv() == '{"order":{"id":5}}'
