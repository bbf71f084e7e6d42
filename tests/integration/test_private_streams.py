"""Private streams and JWT authentication end to end (PROTOCOL §3-§5), Ruby spec cases 13-16."""

from __future__ import annotations

import pytest
from websockets.exceptions import InvalidStatus

from .harness import Connect, Server, ServerPool, unique
from .tokens import SigningKey, ed25519_key, rsa_key
from .wsclient import Client, subscribed


@pytest.fixture(scope="module")
def ed25519_spki() -> SigningKey:
    return ed25519_key()


@pytest.fixture(scope="module")
def ed25519_rango() -> SigningKey:
    return ed25519_key(rango_form=True)


@pytest.fixture(params=["RS256", "EdDSA-SPKI", "EdDSA-Rango"])
def keyed(
    request: pytest.FixtureRequest, server: Server, rsa: SigningKey, pool: ServerPool
) -> tuple[Server, SigningKey]:
    """A server and the key its JWT_PUBLIC_KEY verifies, for each accepted key form."""
    if request.param == "RS256":
        return server, rsa
    key_fixture = "ed25519_spki" if request.param == "EdDSA-SPKI" else "ed25519_rango"
    key: SigningKey = request.getfixturevalue(key_fixture)
    return pool.shared({"JWT_PUBLIC_KEY": key.public_env}), key


def _auth(key: SigningKey, uid: str | None, role: str = "member") -> dict[str, str]:
    return {"Authorization": key.bearer(uid, role)}


def test_private_messages_reach_their_user(
    keyed: tuple[Server, SigningKey], connect: Connect
) -> None:
    server, key = keyed
    uid = unique("ID")
    client = connect(server, "/private", headers=_auth(key, uid))
    assert client.recv() == subscribed()
    assert client.subscribe("order", "trade") == subscribed("order", "trade")
    order = '{"id":1,"market":"btcusd","kind":"bid","side":"buy","price":"1000.0","state":"wait"}'
    server.publish(f"private.{uid}.order", order)
    server.publish(f"private.{uid}.trade", '{"id":7,"price":"1000.0","order_id":1}')
    assert client.recv_many(2) == [
        f'{{"order":{order}}}',
        '{"trade":{"id":7,"price":"1000.0","order_id":1}}',
    ]


@pytest.mark.parametrize("other", ["RS256", "EdDSA"])
def test_token_from_another_key_is_refused(keyed: tuple[Server, SigningKey], other: str) -> None:
    server, _ = keyed
    stranger = ed25519_key() if other == "EdDSA" else rsa_key()  # never the server's key
    with pytest.raises(InvalidStatus) as refused:
        Client(server.url("/private"), headers={"Authorization": stranger.bearer()})
    assert refused.value.response.status_code == 401


def test_ruby_case_13_token_with_empty_payload_is_refused(server: Server) -> None:
    with pytest.raises(InvalidStatus) as refused:
        Client(server.url("/private"), headers={"Authorization": "Bearer "})
    assert refused.value.response.status_code == 401


def test_ruby_case_16_query_streams_with_token(
    server: Server, rsa: SigningKey, connect: Connect
) -> None:
    uid, someone_else = unique("ID"), unique("ID")
    client = connect(server, "/?stream=stream_1&stream=stream_2", headers=_auth(rsa, uid))
    assert client.recv() == subscribed("stream_1", "stream_2")
    server.publish(f"private.{uid}.stream_1", '{"key":"stream_1_user_1"}')
    server.publish(f"private.{someone_else}.stream_1", '{"key":"stream_1_user_2"}')
    server.publish(f"private.{uid}.stream_2", '{"key":"stream_2_user_1"}')
    server.publish(f"private.{someone_else}.stream_2", '{"key":"stream_2_user_2"}')
    server.publish(f"private.{uid}.stream_3", '{"key":"stream_3_user_1"}')
    server.publish(f"private.{uid}.stream_2", '{"key":"stream_2_user_1_message_2"}')
    assert client.recv_many(3) == [
        '{"stream_1":{"key":"stream_1_user_1"}}',
        '{"stream_2":{"key":"stream_2_user_1"}}',
        '{"stream_2":{"key":"stream_2_user_1_message_2"}}',
    ]


def test_another_users_data_is_never_received(
    server: Server, rsa: SigningKey, connect: Connect
) -> None:
    alice, bob = unique("ID"), unique("ID")
    alice_client = connect(server, "/private?stream=order", headers=_auth(rsa, alice))
    bob_client = connect(server, "/private?stream=order", headers=_auth(rsa, bob))
    assert alice_client.recv() == subscribed("order")
    assert bob_client.recv() == subscribed("order")
    server.publish(f"private.{bob}.order", '{"owner":"bob"}')
    server.publish(f"private.{alice}.order", '{"owner":"alice"}')
    server.publish(f"private.{bob}.order", '{"owner":"bob","n":2}')
    assert alice_client.recv() == '{"order":{"owner":"alice"}}'
    assert bob_client.recv_many(2) == [
        '{"order":{"owner":"bob"}}',
        '{"order":{"owner":"bob","n":2}}',
    ]
    server.publish(f"private.{alice}.order", '{"owner":"alice","n":2}')
    assert alice_client.recv() == '{"order":{"owner":"alice","n":2}}'


def test_every_connection_of_a_user_receives(
    server: Server, rsa: SigningKey, connect: Connect
) -> None:
    uid = unique("ID")
    clients = [
        connect(server, path, headers=_auth(rsa, uid)) for path in ("/private", "/public", "/")
    ]
    for client in clients:
        assert client.recv() == subscribed()
        assert client.subscribe("order") == subscribed("order")
    server.publish(f"private.{uid}.order", '{"id":42}')
    for client in clients:
        assert client.recv() == '{"order":{"id":42}}'


def test_anonymous_private_subscribe_is_silently_ignored(server: Server, connect: Connect) -> None:
    market, uid = unique(), unique("ID")
    client = connect(server, "/public?stream=order")
    assert client.recv() == subscribed()
    assert client.subscribe("order", f"{market}.trades", "trade") == subscribed(f"{market}.trades")
    server.publish(f"private.{uid}.order", '{"id":1}')
    # An empty uid must not match anonymous connections.
    server.publish("private..order", '{"id":2}')
    server.publish(f"public.{market}.trades", '{"sentinel":true}')
    assert client.recv() == f'{{"{market}.trades":{{"sentinel":true}}}}'


def test_valid_token_without_uid_is_anonymous_for_private_streams(
    server: Server, rsa: SigningKey, connect: Connect
) -> None:
    client = connect(server, "/private", headers=_auth(rsa, None))
    assert client.recv() == subscribed()
    assert client.subscribe("order") == subscribed()
