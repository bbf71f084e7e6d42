"""Prefixed streams and RBAC end to end (PROTOCOL §4-§5): ``admin.<m>.<e>`` with RANGO_RBAC_ADMIN.

The shared server allows the roles ``admin`` and ``superadmin`` on the ``admin`` prefix (written
with spaces in the variable, which must be trimmed) and no role on any other prefix.
"""

from __future__ import annotations

import pytest

from .harness import Connect, Server, unique
from .tokens import SigningKey
from .wsclient import Client, subscribed, unsubscribed


def _cannot(stream: str) -> str:
    return f'{{"success":{{"message":"cannot subscribe to {stream}"}}}}'


def _client(server: Server, connect: Connect, key: SigningKey | None, role: str) -> Client:
    headers = {} if key is None else {"Authorization": key.bearer(unique("ID"), role)}
    client = connect(server, "/public", headers=headers)
    assert client.recv() == subscribed()
    return client


@pytest.mark.parametrize("role", ["admin", "superadmin"])
def test_allowed_role_subscribes(
    server: Server, connect: Connect, rsa: SigningKey, role: str
) -> None:
    stream = f"admin.{unique()}.sys"
    client = _client(server, connect, rsa, role)
    assert client.subscribe(stream) == subscribed(stream)


@pytest.mark.parametrize("role", ["member", "Admin", "", "admin "])
def test_other_role_is_refused(
    server: Server, connect: Connect, rsa: SigningKey, role: str
) -> None:
    stream = f"admin.{unique()}.sys"
    client = _client(server, connect, rsa, role)
    assert client.subscribe(stream) == _cannot(stream)
    assert client.subscribe(f"{unique()}.trades").startswith('{"success":{"message":"subscribed"')


def test_anonymous_is_refused(server: Server, connect: Connect) -> None:
    stream = f"admin.{unique()}.sys"
    client = _client(server, connect, None, "")
    assert client.subscribe(stream) == _cannot(stream)


def test_prefix_without_rbac_entry_is_refused(
    server: Server, connect: Connect, rsa: SigningKey
) -> None:
    stream = f"ops.{unique()}.sys"
    client = _client(server, connect, rsa, "admin")
    assert client.subscribe(stream) == _cannot(stream)


def test_prefixed_message_drops_prefix_and_never_reaches_public(
    server: Server, connect: Connect, rsa: SigningKey
) -> None:
    market = unique()
    admin = _client(server, connect, rsa, "admin")
    public = _client(server, connect, None, "")
    assert admin.subscribe(f"admin.{market}.sys") == subscribed(f"admin.{market}.sys")
    assert public.subscribe(f"{market}.sys") == subscribed(f"{market}.sys")

    server.publish(f"admin.{market}.sys", '{"secret":1}')
    server.publish(f"public.{market}.sys", '{"public":1}')
    server.publish(f"admin.{market}.sys", '{"secret":2}')
    # The admin gets only the prefixed ones, under the name without the prefix (Rango).
    assert admin.recv_many(2) == [
        f'{{"{market}.sys":{{"secret":1}}}}',
        f'{{"{market}.sys":{{"secret":2}}}}',
    ]
    # Ruby Ranger leaked prefixed messages to public subscribers: the first frame must be public.
    assert public.recv() == f'{{"{market}.sys":{{"public":1}}}}'
    server.publish(f"public.{market}.sys", '{"public":2}')
    assert public.recv() == f'{{"{market}.sys":{{"public":2}}}}'


def test_unsubscribe_prefixed_removes_exactly_that_stream(
    server: Server, connect: Connect, rsa: SigningKey
) -> None:
    market = unique()
    prefixed, public = f"admin.{market}.sys", f"{market}.sys"
    client = _client(server, connect, rsa, "admin")
    assert client.subscribe(public, prefixed) == subscribed(public, prefixed)
    assert client.unsubscribe(prefixed) == unsubscribed(public)
    server.publish(f"admin.{market}.sys", '{"secret":1}')
    server.publish(f"public.{market}.sys", '{"public":1}')
    assert client.recv() == f'{{"{market}.sys":{{"public":1}}}}'


def test_unsubscribe_only_prefixed_keeps_connection(
    server: Server, connect: Connect, rsa: SigningKey
) -> None:
    # Rango crashes the whole process here (index out of range).
    prefixed = f"admin.{unique()}.sys"
    client = _client(server, connect, rsa, "admin")
    assert client.subscribe(prefixed) == subscribed(prefixed)
    assert client.unsubscribe(prefixed) == unsubscribed()
    client.assert_alive()
    other = _client(server, connect, None, "")
    other.assert_alive()
