"""Token expiry end to end (PROTOCOL §3): RANGER_TOKEN_EXPIRY=close, renewal, and the default.

Tokens expire a few seconds after the test starts; the server sweeps once a second, so a close
is expected within ``CLOSE_BOUND`` seconds of exp.
"""

from __future__ import annotations

import json
import time

import pytest

from .harness import Connect, Server, ServerPool, unique, wait_until
from .tokens import SigningKey, rsa_key
from .wsclient import Client, Closed, subscribed

AUTHENTICATED = '{"success":{"message":"authenticated"}}'
# The sweep's second, plus a margin for a loaded machine.
CLOSE_BOUND = 2.5


@pytest.fixture
def closing(pool: ServerPool, rsa: SigningKey) -> Server:
    return pool.shared({"JWT_PUBLIC_KEY": rsa.public_env, "RANGER_TOKEN_EXPIRY": "close"})


def _private(connect: Connect, server: Server, key: SigningKey, uid: str, exp: int) -> Client:
    client = connect(
        server, "/private?stream=order", headers={"Authorization": key.bearer(uid, exp=exp)}
    )
    assert client.recv() == subscribed("order")
    return client


def _renew(client: Client, token: str) -> str:
    return client.request(json.dumps({"event": "auth", "token": token}))


def _wait_past(moment: float) -> None:
    time.sleep(max(0.0, moment - time.time()))


def _closed_after(client: Client, exp: int) -> Closed:
    frames, closed = client.wait_closed(timeout=exp - time.time() + CLOSE_BOUND + 2)
    now = time.time()
    assert frames == []
    assert exp <= now <= exp + CLOSE_BOUND, now - exp
    return closed


def test_an_expired_token_closes_the_connection_with_4001(
    closing: Server, rsa: SigningKey, connect: Connect
) -> None:
    before = closing.scrape().value("ranger_token_expiry_closes_total")
    exp = int(time.time()) + 2
    client = _private(connect, closing, rsa, unique("ID"), exp)
    assert _closed_after(client, exp) == Closed(4001, "token expired")
    wait_until(
        lambda: closing.scrape().value("ranger_token_expiry_closes_total") == before + 1,
        timeout=5,
        what="the expiry close counted",
    )


def test_a_renewed_connection_stays_open_past_its_old_exp(
    closing: Server, rsa: SigningKey, connect: Connect
) -> None:
    uid = unique("ID")
    exp = int(time.time()) + 2
    client = _private(connect, closing, rsa, uid, exp)
    assert _renew(client, rsa.token(uid, exp=exp + 60)) == AUTHENTICATED
    _wait_past(exp + CLOSE_BOUND)
    closing.publish(f"private.{uid}.order", '{"id":1}')
    assert client.recv() == '{"order":{"id":1}}'
    client.assert_alive()


def test_refused_renewals_leave_the_old_exp_in_force(
    closing: Server, rsa: SigningKey, connect: Connect
) -> None:
    uid, stranger = unique("ID"), rsa_key()
    exp = int(time.time()) + 3
    client = _private(connect, closing, rsa, uid, exp)
    refusals = [
        (rsa.token(unique("ID"), exp=exp + 60), "uid does not match the connection"),
        (stranger.token(uid, exp=exp + 60), "invalid signature"),
        (rsa.token(uid, exp=exp - 1), "token does not expire later than the current one"),
    ]
    for token, reason in refusals:
        assert json.loads(_renew(client, token)) == {"error": f"Authorization failed: {reason}"}
    assert _closed_after(client, exp) == Closed(4001, "token expired")


def test_by_default_an_expired_token_keeps_its_connection(
    server: Server, rsa: SigningKey, connect: Connect
) -> None:
    uid = unique("ID")
    exp = int(time.time()) + 2
    client = _private(connect, server, rsa, uid, exp)
    _wait_past(exp + CLOSE_BOUND)
    server.publish(f"private.{uid}.order", '{"id":2}')
    assert client.recv() == '{"order":{"id":2}}'
    client.assert_alive()
