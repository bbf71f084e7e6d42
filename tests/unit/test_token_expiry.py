"""Token expiry (PROTOCOL §3): the shared deadlines, and a Connection that closes or renews.

The connection tests run a real Connection over a loopback TCP pair as tests/unit/test_websocket.py
does, with the wall clock handed to ``Clients.expire`` by the test instead of waiting for it.
"""

from __future__ import annotations

import base64
import gc
import json
import struct
import time
import weakref
from collections.abc import Iterator
from functools import partial
from typing import Any

import gevent
import gevent.socket
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from ranger_py.auth import ANONYMOUS, Auth, Authenticator
from ranger_py.clients import Clients, Deadlines, Limits
from ranger_py.connection import Connection, Tokens
from ranger_py.protocol import AUTHENTICATED, subscribed_reply
from ranger_py.router import Router
from ranger_py.websocket import State
from tests.unit.wsutil import Peer, masked, tcp_pair

# -- Deadlines ---------------------------------------------------------------------------------


class Item:
    def __init__(self, item_id: int, deadline: float | None = None) -> None:
        self.id = item_id
        self.deadline = deadline

    def expired(self) -> None:
        raise AssertionError("Deadlines only returns due items; Clients.expire calls this")


def at(deadlines: Deadlines, item: Item, when: float | None) -> None:
    item.deadline = when
    deadlines.set(item)


def test_only_items_past_their_deadline_are_due() -> None:
    deadlines = Deadlines()
    early, late = Item(1), Item(2)
    at(deadlines, late, 200.0)
    at(deadlines, early, 100.0)
    assert deadlines.due(99.0) == []
    # Still accepted at exactly its deadline (auth.py: refused when now > exp + leeway).
    assert deadlines.due(100.0) == []
    assert deadlines.due(100.5) == [early]
    assert deadlines.due(150.0) == []  # each item is due once
    assert deadlines.due(1000.0) == [late]
    assert len(deadlines) == 0


def test_a_moved_deadline_replaces_the_old_one() -> None:
    deadlines = Deadlines()
    item = Item(1)
    at(deadlines, item, 100.0)
    at(deadlines, item, 300.0)
    assert deadlines.due(200.0) == []  # the old entry comes up and is skipped
    assert len(deadlines) == 1
    assert deadlines.due(301.0) == [item]


def test_an_item_without_a_deadline_is_not_held() -> None:
    deadlines = Deadlines()
    item = Item(1)
    deadlines.set(item)
    assert len(deadlines) == 0
    at(deadlines, item, 100.0)
    at(deadlines, item, None)  # its deadline went away: forgotten
    assert len(deadlines) == 0
    assert deadlines.due(1e12) == []


def test_a_discarded_item_is_never_due_nor_kept_alive() -> None:
    deadlines = Deadlines()
    item = Item(7)
    alive = weakref.ref(item)
    at(deadlines, item, 100.0)
    deadlines.discard(7)
    deadlines.discard(7)  # twice, or for an id never set: nothing happens
    deadlines.discard(8)
    del item
    gc.collect()
    assert alive() is None
    assert deadlines.due(1e12) == []


def test_churn_never_grows_the_heap_past_its_live_entries() -> None:
    # Connections that come and go (or renew) long before their tokens expire: each leaves a
    # stale heap entry, and the rebuild keeps them from piling up.
    deadlines = Deadlines()
    keep = [Item(i) for i in range(100)]
    for item in keep:
        at(deadlines, item, 1e9 + item.id)
    for i in range(1000, 21000):
        deadlines.set(Item(i, 1e9))
        deadlines.discard(i)
        at(deadlines, keep[i % 100], 1e9 + i)  # renewals move the deadlines of the kept ones
        assert len(deadlines._heap) <= 2 * len(deadlines) + Deadlines._SLACK + 1
    assert len(deadlines) == 100
    assert sorted(item.id for item in deadlines.due(2e9)) == list(range(100))
    assert deadlines._heap == []


def test_due_touches_only_due_entries() -> None:
    deadlines = Deadlines()
    items = [Item(i) for i in range(10_000)]
    for item in items:
        at(deadlines, item, 1000.0 + item.id)
    assert deadlines.due(1003.5) == items[:4]
    assert len(deadlines._heap) == 10_000 - 4


# -- a Connection over loopback TCP ---------------------------------------------------------


class Counts:
    """The worker metrics a connection and its Clients report to."""

    def __init__(self) -> None:
        self.expired = 0
        self.failures: list[str] = []

    def connection_opened(self, authenticated: bool) -> None:
        pass

    def connection_closed(self, authenticated: bool) -> None:
        pass

    def auth_failure(self, reason: str) -> None:
        self.failures.append(reason)

    def token_expired(self) -> None:
        self.expired += 1

    def slow_client(self) -> None:
        pass


@pytest.fixture(scope="module")
def key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def authenticator(key: ed25519.Ed25519PrivateKey) -> Authenticator:
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return Authenticator(base64.b64encode(pem).decode())


def token(key: ed25519.Ed25519PrivateKey, uid: str = "IDUSER000001", **claims: Any) -> str:
    payload = {"uid": uid, "role": "member", **claims}
    return jwt.encode(payload, key, algorithm="EdDSA")


class Setup:
    def __init__(self, authenticator: Authenticator, peer: Peer, server: Any) -> None:
        self.authenticator = authenticator
        self.peer = peer
        self._server = server
        self.counts = Counts()
        self.clients = Clients(
            Limits(client_rate=1e9, client_burst=1_000_000_000),
            gevent.get_hub().loop,
            self.counts,
        )

    def connect(self, auth: Auth, *, close: bool = True) -> Connection:
        tokens = Tokens(self.authenticator, self.clients.deadlines if close else None)
        make = partial(
            Connection,
            auth=auth,
            path="/private",
            router=Router({}),
            metrics=self.counts,
            tokens=tokens,
        )
        conn = self.clients.attach(self._server.detach(), b"", make)
        conn.open([])
        assert self.peer.frame() == (0x1, subscribed_reply([]))
        return conn

    def send(self, text: str) -> bytes:
        """Send one text message; the payload of the text frame that answers it."""
        self.peer.sock.sendall(masked(0x1, text.encode()))
        opcode, payload = self.peer.frame()
        assert opcode == 0x1
        return payload

    def renew(self, jwt_token: str) -> bytes:
        return self.send(json.dumps({"event": "auth", "token": jwt_token}))

    def closed_with(self) -> tuple[int, bytes]:
        opcode, payload = self.peer.frame()
        assert opcode == 0x8
        return struct.unpack("!H", payload[:2])[0], payload[2:]


@pytest.fixture
def setup(authenticator: Authenticator) -> Iterator[Setup]:
    server, client = tcp_pair()
    peer = Peer(gevent.socket.socket(fileno=client.detach()))
    peer.sock.settimeout(5)
    yield Setup(authenticator, peer, server)
    peer.sock.close()
    server.close()


def test_the_connection_closes_with_4001_once_its_token_expired(
    setup: Setup, key: ed25519.Ed25519PrivateKey, authenticator: Authenticator
) -> None:
    exp = int(time.time()) + 600
    conn = setup.connect(authenticator.verify(token(key, exp=exp)))
    setup.clients.expire(exp)
    assert setup.send("ping") == b"pong"
    setup.clients.expire(exp + 0.5)
    assert setup.closed_with() == (4001, b"token expired")
    assert conn.state is State.CLOSING
    assert setup.counts.expired == 1
    assert conn.close_note == "4001 token expired"  # what the close log line shows


def test_a_renewed_connection_outlives_its_old_expiry(
    setup: Setup, key: ed25519.Ed25519PrivateKey, authenticator: Authenticator
) -> None:
    exp = int(time.time()) + 600
    conn = setup.connect(authenticator.verify(token(key, exp=exp)))
    assert setup.renew(token(key, exp=exp + 600)) == AUTHENTICATED
    assert conn.auth == Auth("IDUSER000001", "member", expires=exp + 600)
    setup.clients.expire(exp + 1)
    assert setup.send("ping") == b"pong"
    setup.clients.expire(exp + 601)
    assert setup.closed_with() == (4001, b"token expired")
    assert setup.counts.expired == 1


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({"uid": "IDSOMEONE001"}, "uid does not match the connection"),
        ({"role": "admin"}, "role does not match the connection"),
        ({"exp_delta": -1}, "token does not expire later than the current one"),
        ({"exp_delta": None}, "missing exp claim"),
        ({"foreign": True}, "invalid signature"),
    ],
)
def test_a_refused_renewal_leaves_the_old_expiry_in_force(
    setup: Setup,
    key: ed25519.Ed25519PrivateKey,
    authenticator: Authenticator,
    claims: dict[str, Any],
    reason: str,
) -> None:
    exp = int(time.time()) + 600
    original = authenticator.verify(token(key, exp=exp))
    conn = setup.connect(original)
    signer = ed25519.Ed25519PrivateKey.generate() if claims.pop("foreign", False) else key
    delta = claims.pop("exp_delta", 600)
    fields = {"exp": None if delta is None else exp + delta, **claims}
    fields = {name: value for name, value in fields.items() if value is not None}
    reply = setup.renew(
        jwt.encode({"uid": "IDUSER000001", "role": "member", **fields}, signer, "EdDSA")
    )
    assert json.loads(reply) == {"error": f"Authorization failed: {reason}"}
    assert conn.auth == original
    assert setup.counts.failures == [reason]
    setup.clients.expire(exp + 0.5)
    assert setup.closed_with() == (4001, b"token expired")


def test_auth_parse_errors_are_replies(setup: Setup, authenticator: Authenticator) -> None:
    setup.connect(ANONYMOUS)
    assert setup.send('{"event":"auth"}') == b'{"error":"No token provided"}'
    assert setup.send('{"event":"auth","token":7}') == b'{"error":"Token must be a string"}'
    assert setup.send('{"event":"auth","token":"x"}') == (
        b'{"error":"Authorization failed: malformed token"}'
    )


def test_with_ignore_nothing_closes_and_renewal_still_answers(
    setup: Setup, key: ed25519.Ed25519PrivateKey, authenticator: Authenticator
) -> None:
    exp = int(time.time()) + 600
    conn = setup.connect(authenticator.verify(token(key, exp=exp)), close=False)
    assert len(setup.clients.deadlines) == 0
    setup.clients.expire(exp + 3600)
    assert setup.send("ping") == b"pong"
    assert setup.renew(token(key, exp=exp + 600)) == AUTHENTICATED
    assert conn.auth.expires == exp + 600
    assert len(setup.clients.deadlines) == 0
    assert conn.state is State.OPEN


def test_connections_without_an_expiring_token_have_no_deadline(
    setup: Setup, key: ed25519.Ed25519PrivateKey, authenticator: Authenticator
) -> None:
    setup.connect(authenticator.verify(token(key)))  # no exp
    assert len(setup.clients.deadlines) == 0
    setup.clients.expire(time.time() + 1e9)
    assert setup.send("ping") == b"pong"


def test_a_closed_connection_leaves_nothing_behind(
    setup: Setup, key: ed25519.Ed25519PrivateKey, authenticator: Authenticator
) -> None:
    exp = int(time.time()) + 600
    conn = setup.connect(authenticator.verify(token(key, exp=exp)))
    assert setup.renew(token(key, exp=exp + 600)) == AUTHENTICATED
    assert len(setup.clients.deadlines) == 1
    setup.peer.sock.close()
    with gevent.Timeout(5):
        while conn.state is not State.CLOSED:
            gevent.sleep(0.01)
    assert len(setup.clients.deadlines) == 0
    # What is left is stale (deadline, id) pairs, never the connection.
    assert all(type(entry[1]) is int for entry in setup.clients.deadlines._heap)
    setup.clients.expire(exp + 1e6)
    assert setup.counts.expired == 0
