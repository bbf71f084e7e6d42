"""The websocket transport over a loopback TCP connection, driven by gevent's loop (no patching).

The server end is a raw non-blocking socket as in production; the test's end is a gevent socket,
so waiting for bytes lets the loop run the server's watchers and flushes (tests/unit/wsutil.py).
"""

from __future__ import annotations

import socket
import struct
import zlib
from collections.abc import Iterator
from typing import Any

import gevent
import gevent.socket
import pytest

from ranger_py.clients import Clients, Limits
from ranger_py.frames import encode_text
from ranger_py.websocket import State, WebSocket
from tests.unit.wsutil import Peer, masked, tcp_pair


class SlowCount:
    def __init__(self) -> None:
        self.count = 0

    def slow_client(self) -> None:
        self.count += 1


class Owner:
    """The production owner (Clients) with the test's limits, and what the test reads back."""

    def __init__(self, limits: Limits) -> None:
        self.slow = SlowCount()
        self.clients = Clients(limits, gevent.get_hub().loop, self.slow)
        self.closed_reasons: list[str] = []

    @property
    def slow_clients(self) -> int:
        return self.slow.count

    def request_flush(self) -> None:
        self.clients.request_flush()


class Latest(Owner):
    """The owner of the websocket the test made last (``make`` builds the owner with it)."""

    def __init__(self) -> None:
        self.owner: Owner | None = None

    def __getattribute__(self, name: str) -> Any:
        owner = object.__getattribute__(self, "owner")
        if name == "owner" or owner is None:
            return object.__getattribute__(self, name)
        return getattr(owner, name)


class Recorder(WebSocket):
    __slots__ = ("closed_reasons", "received")

    def __init__(self, *args: Any, closed_reasons: list[str]) -> None:
        super().__init__(*args)
        self.received: list[str | bytes] = []
        self.closed_reasons = closed_reasons

    def on_closed(self, reason: str) -> None:
        self.closed_reasons.append(reason)

    def on_message(self, data: str | bytes) -> None:
        self.received.append(data)
        if data == "hello":
            self.send(b"world")


@pytest.fixture
def pair() -> Iterator[tuple[Owner, Any, Peer]]:
    server, client = tcp_pair()
    server.setblocking(False)
    latest = Latest()

    def make(**kwargs: Any) -> Recorder:
        rate = kwargs.pop("rate", None)
        rated = {} if rate is None else {"client_rate": rate, "client_burst": kwargs.pop("burst")}
        limits = Limits(
            max_message_size=kwargs.pop("max_message_size", 4096),
            queue_bytes=kwargs.pop("max_queue_bytes", 1 << 20),
            queue_frames=kwargs.pop("queue_limit", 8),
            compression_threshold=kwargs.pop("compress_from", 1024),
            # No rate limit unless a test sets one.
            **rated or {"client_rate": 1e9, "client_burst": 1_000_000_000},
        )
        owner = latest.owner = Owner(limits)
        ws = owner.clients.attach(
            server.detach(),
            b"",  # no 101 here: the socket is already "upgraded"
            lambda clients, sock, conn_id: Recorder(
                clients, sock, conn_id, closed_reasons=owner.closed_reasons
            ),
            window_bits=kwargs.pop("window_bits", 0),
        )
        ws.flush()  # the empty greeting: the queue starts empty
        return ws

    peer = Peer(gevent.socket.socket(fileno=client.detach()))
    peer.sock.settimeout(5)
    yield latest, make, peer
    peer.sock.close()
    server.close()


def test_message_in_reply_out(pair: tuple[Owner, Any, Peer]) -> None:
    _owner, make, peer = pair
    ws = make()
    peer.sock.sendall(masked(0x1, b"hello"))
    assert peer.frame() == (0x1, b"world")
    assert ws.received == ["hello"]


def test_ping_gets_pong_with_its_payload(pair: tuple[Owner, Any, Peer]) -> None:
    _, make, peer = pair
    make()
    peer.sock.sendall(masked(0x9, b"abc"))
    assert peer.frame() == (0xA, b"abc")


def test_frames_queued_in_one_turn_arrive_in_order(pair: tuple[Owner, Any, Peer]) -> None:
    owner, make, peer = pair
    ws = make()
    for i in range(5):
        ws.queue(encode_text(b"%d" % i))
    owner.request_flush()
    assert [peer.frame() for _ in range(5)] == [(0x1, b"%d" % i) for i in range(5)]


def test_client_close_is_echoed_then_the_socket_closes(pair: tuple[Owner, Any, Peer]) -> None:
    owner, make, peer = pair
    ws = make()
    peer.sock.sendall(masked(0x8, struct.pack("!H", 4000) + b"bye"))
    assert peer.frame() == (0x8, struct.pack("!H", 4000))
    with pytest.raises(EOFError):
        peer.frame()
    assert ws.state is State.CLOSED
    assert owner.closed_reasons == ["closed"]


def test_oversized_message_closes_with_1009(pair: tuple[Owner, Any, Peer]) -> None:
    _, make, peer = pair
    ws = make(max_message_size=128)
    peer.sock.sendall(masked(0x1, b"x" * 128) + masked(0x1, b"y" * 129))
    assert peer.frame() == (0x8, struct.pack("!H", 1009) + b"message too big")
    assert ws.received == ["x" * 128]


def test_protocol_error_closes_with_1002(pair: tuple[Owner, Any, Peer]) -> None:
    _, make, peer = pair
    make()
    peer.sock.sendall(b"\x81\x02hi")  # unmasked client frame
    assert peer.frame()[1][:2] == struct.pack("!H", 1002)


def test_slow_client_is_closed_with_1008_and_others_never_wait(
    pair: tuple[Owner, Any, Peer],
) -> None:
    owner, make, peer = pair
    ws = make(queue_limit=4)
    ws.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    big = encode_text(b"z" * 60000)
    # The peer reads nothing: the kernel buffers fill, then the queue, then the bound trips.
    for _ in range(200):
        ws.queue(big)
        ws.flush()
        if ws.state is not State.OPEN:
            break
    assert ws.state is State.CLOSING
    assert owner.slow_clients == 1
    frames = []
    while True:
        opcode, payload = peer.frame()
        frames.append(opcode)
        if opcode == 0x8:
            break
    assert payload == struct.pack("!H", 1008) + b"slow client"
    assert set(frames[:-1]) == {0x1}


def test_idle_client_is_closed_and_pings_go_out(pair: tuple[Owner, Any, Peer]) -> None:
    _, make, peer = pair
    ws = make()
    now = ws.last_seen
    ws.tick(now + 5, ping_interval=5, idle_timeout=60, write_timeout=10)
    assert peer.frame() == (0x9, b"")
    ws.tick(now + 61, ping_interval=5, idle_timeout=60, write_timeout=10)
    opcode, payload = peer.frame()
    assert opcode == 0x8 and payload[:2] == struct.pack("!H", 1001)


def test_peer_vanishing_finishes_the_connection(pair: tuple[Owner, Any, Peer]) -> None:
    owner, make, peer = pair
    ws = make()
    peer.sock.close()
    with gevent.Timeout(5):
        while ws.state is not State.CLOSED:
            gevent.sleep(0.01)
    assert owner.closed_reasons == ["connection lost"]


def test_parser_exists_only_while_a_frame_is_in_flight(pair: tuple[Owner, Any, Peer]) -> None:
    _, make, peer = pair
    ws = make()
    assert ws._reader is None
    frame = masked(0x1, b"hello")
    peer.sock.sendall(frame[:4])
    with gevent.Timeout(5):
        while ws._reader is None:
            gevent.sleep(0.01)
    peer.sock.sendall(frame[4:])
    assert peer.frame() == (0x1, b"world")
    assert ws._reader is None


def _read_until_close(peer: Peer) -> tuple[list[int], bytes]:
    opcodes: list[int] = []
    while True:
        opcode, payload = peer.frame()
        if opcode == 0x8:
            return opcodes, payload
        opcodes.append(opcode)


def test_the_byte_bound_closes_a_client_that_queues_few_large_frames(
    pair: tuple[Owner, Any, Peer],
) -> None:
    owner, make, peer = pair
    ws = make(queue_limit=1000, max_queue_bytes=300_000)
    ws.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    big = encode_text(b"z" * 60000)
    for _ in range(200):
        ws.queue(big)
        ws.flush()
        if ws.state is not State.OPEN:
            break
    assert ws.state is State.CLOSING
    assert owner.slow_clients == 1
    assert len(ws._out) <= 2  # at most the half-sent frame and the close frame are left
    _, payload = _read_until_close(peer)
    assert payload == struct.pack("!H", 1008) + b"slow client"


def test_pongs_count_against_the_bound_of_a_client_that_does_not_read(
    pair: tuple[Owner, Any, Peer],
) -> None:
    # The ping flood of a client that reads slowly: every pong is queued for it, so past the bound
    # it is a slow client like any other instead of growing the worker's memory.
    owner, make, peer = pair
    ws = make(queue_limit=1_000_000, max_queue_bytes=200_000)
    ws.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    peer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    ping = masked(0x9, b"p" * 125)
    with gevent.Timeout(20):
        while ws.state is State.OPEN:
            peer.sock.sendall(ping * 50)
            gevent.sleep(0)
    assert owner.slow_clients == 1
    assert ws._queued <= 200_000
    opcodes, payload = _read_until_close(peer)
    assert payload == struct.pack("!H", 1008) + b"slow client"
    assert set(opcodes) == {0xA}


def test_a_client_past_its_rate_is_closed_with_1008(pair: tuple[Owner, Any, Peer]) -> None:
    owner, make, peer = pair
    ws = make(rate=10, burst=5)
    peer.sock.sendall(masked(0x1, b"hello") * 5)  # the burst: five messages answered
    for _ in range(5):
        assert peer.frame() == (0x1, b"world")
    peer.sock.sendall(masked(0x9, b"") * 3)  # then pings with no budget left
    opcode, payload = peer.frame()
    assert (opcode, payload) == (0x8, struct.pack("!H", 1008) + b"too many messages")
    assert ws.received == ["hello"] * 5
    assert owner.slow_clients == 0


def test_a_client_within_its_rate_is_never_closed(pair: tuple[Owner, Any, Peer]) -> None:
    _, make, peer = pair
    ws = make(rate=200, burst=2)
    for _ in range(20):
        peer.sock.sendall(masked(0x1, b"hello"))
        assert peer.frame() == (0x1, b"world")
        gevent.sleep(0.01)  # 100 a second, half the rate
    assert ws.state is State.OPEN


def test_a_client_that_negotiated_deflate_is_inflated_and_answered_compressed(
    pair: tuple[Owner, Any, Peer],
) -> None:
    owner, make, peer = pair
    ws = make(window_bits=15, compress_from=100)
    compressor = zlib.compressobj(wbits=-15)
    body = (compressor.compress(b"hello") + compressor.flush(zlib.Z_SYNC_FLUSH))[:-4]
    peer.sock.sendall(masked(0x40 | 0x1, body))  # RSV1: compressed
    assert peer.frame() == (0x1, b"world")  # under the threshold: plain
    assert not peer.rsv1
    assert ws.received == ["hello"]
    assert ws._reader is None  # no parser, so no zlib state, between messages

    def inflate(data: bytes) -> bytes:
        return zlib.decompressobj(-15).decompress(data + b"\x00\x00\xff\xff")

    big = b"x" * 500
    ws.send(big)
    opcode, data = peer.frame()
    assert (opcode, peer.rsv1, inflate(data)) == (0x1, True, big)
    ws.send_many([big, b"small", big])
    replay = [(*peer.frame(), peer.rsv1) for _ in range(3)]
    assert [(op, rsv1) for op, _, rsv1 in replay] == [(0x1, True), (0x1, False), (0x1, True)]
    assert [inflate(replay[0][1]), replay[1][1], inflate(replay[2][1])] == [big, b"small", big]
    assert len(owner.clients.deflated) == 1  # the replayed payload, compressed once
    assert owner.clients.deflating == 1
    ws.abort("test over")
    assert owner.clients.deflating == 0


def test_a_plain_client_sending_rsv1_is_closed_with_1002(pair: tuple[Owner, Any, Peer]) -> None:
    _, make, peer = pair
    make()
    peer.sock.sendall(masked(0x40 | 0x1, b"\xf2\x00"))
    opcode, payload = peer.frame()
    assert (opcode, payload[:2]) == (0x8, struct.pack("!H", 1002))
