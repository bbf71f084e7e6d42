"""ranger_py.connection: the client protocol (PROTOCOL §4) over a loopback TCP pair.

Real Clients, real Router, real sockets driven by gevent's loop (no patching); the counts go to a
recorder of the test's own (ConnectionMetrics).
"""

from __future__ import annotations

import json
import logging
import socket
import struct
from collections.abc import Iterator
from typing import Any

import gevent
import gevent.socket
import pytest

from ranger_py.auth import ANONYMOUS, Auth, Authenticator
from ranger_py.bindings import STATIC_KEYS, Bindings
from ranger_py.clients import Clients, Limits
from ranger_py.connection import Connection, Tokens
from ranger_py.handshake import switching_protocols
from ranger_py.router import Delivery, Router
from ranger_py.websocket import State
from tests.unit.wsutil import Peer, masked, tcp_pair

GREETING = switching_protocols(b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
NOT_STRINGS = b'{"error":"Streams must be an array of strings"}'
USER = Auth(uid="IDUSER000001", role="member")


class Counts:
    def __init__(self) -> None:
        self.opened: list[bool] = []
        self.closed: list[bool] = []

    def connection_opened(self, authenticated: bool) -> None:
        self.opened.append(authenticated)

    def connection_closed(self, authenticated: bool) -> None:
        self.closed.append(authenticated)

    def slow_client(self) -> None:
        pass

    def auth_failure(self, reason: str) -> None:
        pass

    def token_expired(self) -> None:
        pass


class RecordingSocket:
    """The connection's real socket, with every ``send`` argument kept."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.sends: list[bytes] = []

    def send(self, data: bytes) -> int:
        self.sends.append(bytes(data))
        return self._sock.send(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class Worker:
    """The parts a connection talks to, as the gateway wires them."""

    def __init__(self, max_streams: int = 100, bindings: Bindings | None = None) -> None:
        self.metrics = Counts()
        self.router = Router(
            {"admin": frozenset({"admin"})}, max_streams=max_streams, bindings=bindings
        )
        self.clients = Clients(
            Limits(client_rate=1e9, client_burst=1_000_000_000),
            gevent.get_hub().loop,
            self.metrics,
        )
        self.peers: list[Peer] = []
        self.sent_at_open: list[bytes] = []

    def connect(
        self, streams: list[str] | None = None, *, auth: Auth = ANONYMOUS, path: str = "/public"
    ) -> tuple[Connection, Peer]:
        """A connection opened with ``?stream=`` ``streams``; its peer has read the 101."""
        server, client = tcp_pair()

        def make(clients: Clients, sock: socket.socket, conn_id: int) -> Connection:
            recording: Any = RecordingSocket(sock)
            return Connection(
                clients,
                recording,
                conn_id,
                auth=auth,
                path=path,
                router=self.router,
                metrics=self.metrics,
                # Tokens are not what these tests are about: test_token_expiry covers them.
                tokens=Tokens(Authenticator(None), None),
            )

        conn = self.clients.attach(server.detach(), GREETING, make)
        conn.open(streams or [])
        # What went out before the loop ran again: open's own flush.
        self.sent_at_open = list(conn.sock.sends)  # type: ignore[attr-defined]
        peer = Peer(gevent.socket.socket(fileno=client.detach()))
        peer.sock.settimeout(5)
        self.peers.append(peer)
        assert peer.read(len(GREETING)) == GREETING
        return conn, peer

    def close(self) -> None:
        self.clients.abort_all("test over")
        for peer in self.peers:
            peer.sock.close()


@pytest.fixture
def worker() -> Iterator[Worker]:
    made = Worker()
    yield made
    made.close()


def text(payload: bytes) -> tuple[int, bytes]:
    return 0x1, payload


def subscribed(*streams: str) -> tuple[int, bytes]:
    listing = json.dumps(list(streams), separators=(",", ":")).encode()
    return text(b'{"success":{"message":"subscribed","streams":' + listing + b"}}")


def ask(peer: Peer, message: bytes, opcode: int = 0x1) -> tuple[int, bytes]:
    peer.sock.sendall(masked(opcode, message))
    return peer.frame()


def wait_closed(conn: Connection) -> None:
    with gevent.Timeout(5):
        while conn.state is not State.CLOSED:
            gevent.sleep(0.01)


# -- open ------------------------------------------------------------------------------------


def test_open_sends_the_subscribed_reply_of_the_query_streams(worker: Worker) -> None:
    _, peer = worker.connect(["btcusd.trades", "global.tickers"])
    assert peer.frame() == subscribed("btcusd.trades", "global.tickers")


def test_open_without_streams_says_subscribed_to_nothing(worker: Worker) -> None:
    _, peer = worker.connect()
    assert peer.frame() == text(b'{"success":{"message":"subscribed","streams":[]}}')


def test_open_replays_a_cached_order_book_before_the_reply_all_with_the_101(
    worker: Worker,
) -> None:
    worker.router.route("public.btcusd.ob-snap", b'{"sequence":1}')
    worker.router.route("public.btcusd.ob-inc", b'{"sequence":2}')
    _, peer = worker.connect(["btcusd.ob-inc"])
    frames = [peer.frame() for _ in range(3)]
    assert frames == [
        text(b'{"btcusd.ob-snap":{"sequence":1}}'),
        text(b'{"btcusd.ob-inc":{"sequence":2}}'),
        subscribed("btcusd.ob-inc"),
    ]
    # One send, made by open itself: the 101, the replay and the reply.
    encoded = b"".join(bytes((0x81, len(payload))) + payload for _, payload in frames)
    assert worker.sent_at_open == [GREETING + encoded]


def test_open_counts_the_connection_by_auth(worker: Worker) -> None:
    worker.connect()
    worker.connect(auth=USER, path="/private")
    worker.connect(auth=Auth(role="admin"))  # a token without a uid is not private
    assert worker.metrics.opened == [False, True, False]
    assert worker.metrics.closed == []


def test_open_refuses_too_many_query_streams_with_the_error_reply() -> None:
    made = Worker(max_streams=2)
    try:
        conn, peer = made.connect(["a.b", "c.d", "e.f"])
        assert peer.frame() == text(b'{"error":"Too many streams"}')
        assert made.router.streams(conn) == []
        assert conn.state is State.OPEN
    finally:
        made.close()


def test_an_anonymous_client_is_not_subscribed_to_private_streams(worker: Worker) -> None:
    _, peer = worker.connect(["order", "btcusd.trades"])
    assert peer.frame() == subscribed("btcusd.trades")


def test_a_user_lists_private_streams_after_public_ones(worker: Worker) -> None:
    _, peer = worker.connect(["order", "btcusd.trades"], auth=USER, path="/private")
    assert peer.frame() == subscribed("btcusd.trades", "order")


# -- requests --------------------------------------------------------------------------------


def test_ping_gets_pong(worker: Worker) -> None:
    _, peer = worker.connect()
    peer.frame()
    assert ask(peer, b"ping") == text(b"pong")
    assert ask(peer, b"  ping\n") == text(b"pong")  # surrounding whitespace trimmed


def test_an_empty_message_is_ignored(worker: Worker) -> None:
    _, peer = worker.connect()
    peer.frame()
    peer.sock.sendall(masked(0x1, b"") + masked(0x1, b" \t "))
    # The next frame is this request's reply: nothing answered the empty ones.
    assert ask(peer, b'{"event":"subscribe","streams":["a.b"]}') == subscribed("a.b")


def test_subscribe_adds_streams_and_lists_all(worker: Worker) -> None:
    _, peer = worker.connect(["btcusd.trades"])
    peer.frame()
    reply = ask(peer, b'{"event":"subscribe","streams":["global.tickers","btcusd.trades"]}')
    assert reply == subscribed("btcusd.trades", "global.tickers")


def test_unsubscribe_lists_what_is_left(worker: Worker) -> None:
    _, peer = worker.connect(["btcusd.trades", "global.tickers"])
    peer.frame()
    reply = ask(peer, b'{"event":"unsubscribe","streams":["btcusd.trades","unknown.x"]}')
    assert reply == text(b'{"success":{"message":"unsubscribed","streams":["global.tickers"]}}')


def test_a_prefixed_stream_the_role_may_not_have_is_refused(worker: Worker) -> None:
    _, peer = worker.connect()
    peer.frame()
    peer.sock.sendall(masked(0x1, b'{"event":"subscribe","streams":["admin.btcusd.sys"]}'))
    assert peer.frame() == text(b'{"success":{"message":"cannot subscribe to admin.btcusd.sys"}}')
    assert peer.frame() == subscribed()


@pytest.mark.parametrize(
    ("message", "reply"),
    [
        (
            b"hello",
            b'{"error":"Could not parse message: Expecting value: line 1 column 1 (char 0)"}',
        ),
        (b"[1,2]", b'{"error":"Could not parse message: not a JSON object"}'),
        (b"null", b'{"error":"Could not parse message: not a JSON object"}'),
        (b'{"streams":["a.b"]}', b'{"error":"Could not parse Type: Invalid event"}'),
        (b'{"event":"join","streams":["a.b"]}', b'{"error":"Could not parse Type: Invalid event"}'),
        (b'{"event":"subscribe"}', b'{"error":"No streams provided"}'),
        (b'{"event":"subscribe","streams":null}', NOT_STRINGS),
        (b'{"event":"subscribe","streams":[1]}', NOT_STRINGS),
        (b'{"event":"unsubscribe","streams":["a.b",2]}', NOT_STRINGS),
        (b'{"event":"subscribe","streams":["\\ud800"]}', b'{"error":"Invalid stream name"}'),
    ],
)
def test_bad_requests_get_their_error_reply_and_the_connection_stays(
    worker: Worker, message: bytes, reply: bytes
) -> None:
    conn, peer = worker.connect(["btcusd.trades"])
    peer.frame()
    assert ask(peer, message) == text(reply)
    assert conn.state is State.OPEN
    assert worker.router.streams(conn) == ["btcusd.trades"]
    assert ask(peer, b"ping") == text(b"pong")


def test_too_many_streams_subscribes_none_of_the_request() -> None:
    made = Worker(max_streams=3)
    try:
        conn, peer = made.connect(["a.b", "c.d"])
        peer.frame()
        assert ask(peer, b'{"event":"subscribe","streams":["e.f","g.h"]}') == text(
            b'{"error":"Too many streams"}'
        )
        assert made.router.streams(conn) == ["a.b", "c.d"]
    finally:
        made.close()


def test_a_binary_frame_is_read_as_utf8_text(worker: Worker) -> None:
    _, peer = worker.connect()
    peer.frame()
    reply = ask(peer, '{"event":"subscribe","streams":["café.trades"]}'.encode(), opcode=0x2)
    assert reply == subscribed("café.trades")  # the reply escapes it: ASCII-only JSON
    assert reply[1] == b'{"success":{"message":"subscribed","streams":["caf\\u00e9.trades"]}}'
    assert ask(peer, b"ping", opcode=0x2) == text(b"pong")


def test_a_binary_frame_that_is_not_utf8_gets_the_parse_error(worker: Worker) -> None:
    conn, peer = worker.connect()
    peer.frame()
    reply = ask(peer, b'{"event":"\xff"}', opcode=0x2)
    assert reply == text(b'{"error":"Could not parse message: message is not valid UTF-8"}')
    assert conn.state is State.OPEN


# -- close -----------------------------------------------------------------------------------


def test_a_closed_connection_gets_nothing_more_and_is_counted_once(worker: Worker) -> None:
    conn, peer = worker.connect(["btcusd.trades"], auth=USER, path="/private")
    peer.frame()
    delivery = worker.router.route("public.btcusd.trades", b"{}")
    assert isinstance(delivery, Delivery) and set(delivery.recipients) == {conn}
    peer.sock.sendall(masked(0x8, struct.pack("!H", 1000)))
    assert peer.frame() == (0x8, struct.pack("!H", 1000))
    wait_closed(conn)
    delivery = worker.router.route("public.btcusd.trades", b"{}")
    assert isinstance(delivery, Delivery) and not delivery.recipients
    assert worker.router.streams(conn) == []
    conn.abort("again")  # a second end changes nothing
    assert worker.metrics.closed == [True]
    assert conn not in worker.clients.connections


def test_the_open_and_close_log_lines_carry_path_and_uid(
    worker: Worker, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="ranger_py.connection"):
        conn, peer = worker.connect(["order"], auth=USER, path="/private")
        peer.frame()
        peer.sock.sendall(masked(0x8, struct.pack("!H", 4000) + b"bye"))
        peer.frame()
        wait_closed(conn)
        anonymous, other = worker.connect(path="/")
        other.frame()
        anonymous.abort("connection lost")
    n, m = conn.id, anonymous.id
    assert [r.getMessage() for r in caplog.records if r.name == "ranger_py.connection"] == [
        f"connection {n} open path=/private uid=IDUSER000001",
        f"connection {n} closed path=/private uid=IDUSER000001: closed (close 4000)",
        f"connection {m} open path=/ uid=-",
        f"connection {m} closed path=/ uid=-: connection lost",
    ]


# -- subscriptions that wait for the broker (RANGER_BROKER_ROUTING=subscribed) ----------------


@pytest.fixture
def bound() -> Iterator[tuple[Worker, Bindings]]:
    bindings = Bindings(STATIC_KEYS, unbind_delay=30.0)
    bindings.consuming(bindings.declared())  # the consumer is consuming
    made = Worker(bindings=bindings)
    yield made, bindings
    made.close()


def broker_confirms(bindings: Bindings) -> None:
    """What the consumer does on its next iteration, and the broker's replies."""
    for _ in bindings.pending():
        bindings.confirmed()


def waiting_subscriber(worker: Worker) -> tuple[Connection, Peer]:
    """A client that has asked for a stream whose binding the broker has not confirmed."""
    conn, peer = worker.connect()
    assert peer.frame() == subscribed()
    peer.sock.sendall(masked(0x1, b'{"event":"subscribe","streams":["m.trades"]}'))
    return conn, peer


def nothing_arrives(peer: Peer) -> None:
    peer.sock.settimeout(0.2)
    with pytest.raises(TimeoutError):
        peer.frame()
    peer.sock.settimeout(5)


def test_a_subscribe_needing_a_binding_is_answered_once_the_broker_confirms_it(
    bound: tuple[Worker, Bindings],
) -> None:
    worker, bindings = bound
    conn, peer = waiting_subscriber(worker)
    peer.sock.sendall(masked(0x1, b"ping"))  # held behind it
    nothing_arrives(peer)
    assert worker.router.streams(conn) == []  # not subscribed before the binding is there
    broker_confirms(bindings)
    assert [peer.frame(), peer.frame()] == [subscribed("m.trades"), text(b"pong")]
    # Bound now: the next client's subscription is answered at once.
    _, other = worker.connect(["m.trades"])
    assert other.frame() == subscribed("m.trades")


def test_a_client_that_does_not_wait_for_its_reply_is_closed_with_1008(
    bound: tuple[Worker, Bindings],
) -> None:
    worker, _ = bound
    _, peer = waiting_subscriber(worker)
    for _ in range(101):
        peer.sock.sendall(masked(0x1, b"ping"))
    code, payload = peer.frame()
    assert (code, payload[:2]) == (0x8, struct.pack("!H", 1008))
    assert b"awaiting a subscription" in payload


def test_a_connection_closed_while_it_waits_is_never_subscribed(
    bound: tuple[Worker, Bindings],
) -> None:
    worker, bindings = bound
    conn, peer = waiting_subscriber(worker)
    nothing_arrives(peer)
    conn.abort("test")
    wait_closed(conn)
    broker_confirms(bindings)
    assert worker.router.streams(conn) == []
