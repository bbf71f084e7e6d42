"""ranger_py.clients: the registry of one worker's websockets, over loopback TCP pairs.

Every websocket here is a real one on a real socket, driven by gevent's loop (no patching); the
loop the registry gets only counts the callbacks scheduled on it, to see how often a flush is.
"""

from __future__ import annotations

import logging
import socket
import struct
from collections.abc import Callable, Iterator
from typing import Any

import gevent
import gevent.socket
import pytest

from ranger_py.clients import Clients, Limits
from ranger_py.config import Config
from ranger_py.frames import encode_text
from ranger_py.websocket import State, WebSocket
from tests.unit.wsutil import Peer, masked, tcp_pair

GREETING = b"HTTP/1.1 101 Switching Protocols\r\n\r\n"


class SlowCount:
    def __init__(self) -> None:
        self.count = 0

    def slow_client(self) -> None:
        self.count += 1


class CountingLoop:
    """gevent's loop, with a count of the callbacks scheduled on it."""

    def __init__(self, loop: Any) -> None:
        self._loop = loop
        self.callbacks = 0

    def run_callback(self, func: Callable[[], None]) -> object:
        self.callbacks += 1
        return self._loop.run_callback(func)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loop, name)


class RecordingSocket:
    """The websocket's real socket, with every ``send`` argument kept."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.sends: list[bytes] = []

    def send(self, data: bytes) -> int:
        self.sends.append(bytes(data))
        return self._sock.send(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class Plain(WebSocket):
    """A websocket that remembers why it closed; ``flush_error`` makes its flush raise."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.closed_reasons: list[str] = []
        self.flush_error = False
        self.tick_error = False

    def on_message(self, data: str | bytes) -> None:
        pass

    def on_closed(self, reason: str) -> None:
        self.closed_reasons.append(reason)

    def flush(self) -> None:
        if self.flush_error:
            raise RuntimeError("flush bug")
        super().flush()

    def tick(
        self, now: float, ping_interval: float, idle_timeout: float, write_timeout: float
    ) -> None:
        if self.tick_error:
            raise RuntimeError("timer bug")
        super().tick(now, ping_interval, idle_timeout, write_timeout)


class Registry:
    """A Clients with the test's limits, and the peers of the websockets attached to it."""

    def __init__(self, **limits: Any) -> None:
        self.loop = CountingLoop(gevent.get_hub().loop)
        self.slow = SlowCount()
        # No rate limit: these tests are about the registry, not the budget.
        limits.setdefault("client_rate", 1e9)
        limits.setdefault("client_burst", 1_000_000_000)
        self.clients = Clients(Limits(**limits), self.loop, self.slow)
        self.peers: list[Peer] = []

    def attach(self, greeting: bytes = b"") -> tuple[Plain, Peer]:
        server, client = tcp_pair()
        ws = self.clients.attach(server.detach(), greeting, Plain)
        ws.sock = RecordingSocket(ws.sock)  # type: ignore[assignment]
        peer = Peer(gevent.socket.socket(fileno=client.detach()))
        peer.sock.settimeout(5)
        self.peers.append(peer)
        return ws, peer

    def close(self) -> None:
        self.clients.abort_all("test over")
        for peer in self.peers:
            peer.sock.close()


@pytest.fixture
def registry() -> Iterator[Registry]:
    made = Registry(queue_frames=8)
    yield made
    made.close()


def sends(ws: WebSocket) -> list[bytes]:
    sock = ws.sock
    assert isinstance(sock, RecordingSocket)
    return sock.sends


def nothing_arrives(peer: Peer, wait: float = 0.05) -> bool:
    """True when the peer gets no byte within ``wait`` seconds (the loop runs meanwhile)."""
    peer.sock.settimeout(wait)
    try:
        return not peer.sock.recv(1)
    except TimeoutError:
        return True
    finally:
        peer.sock.settimeout(5)


def close_frame(code: int, reason: bytes) -> tuple[int, bytes]:
    return 0x8, struct.pack("!H", code) + reason


# -- attach ----------------------------------------------------------------------------------


def test_attach_registers_the_websocket_and_queues_the_greeting_without_sending_it(
    registry: Registry,
) -> None:
    ws, peer = registry.attach(GREETING)
    assert registry.clients.connections == {ws}
    assert len(registry.clients) == 1
    assert registry.clients.dirty == [ws]
    assert nothing_arrives(peer)
    assert sends(ws) == []


def test_the_greeting_and_the_first_frames_leave_in_one_send(registry: Registry) -> None:
    ws, peer = registry.attach(GREETING)
    ws.queue(encode_text(b"first"))
    ws.queue(encode_text(b"second"))
    ws.flush()
    expected = GREETING + b"\x81\x05first" + b"\x81\x06second"
    assert sends(ws) == [expected]
    assert peer.read(len(expected)) == expected


def test_attach_sets_no_delay_and_the_fixed_send_buffer() -> None:
    made = Registry(send_buffer=32768)
    try:
        ws, _ = made.attach()
        assert ws.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        # Linux doubles the value it is given (socket(7)), for its bookkeeping.
        assert ws.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == 2 * 32768
        assert not ws.sock.getblocking()
    finally:
        made.close()


def test_websockets_get_ids_one_two_three(registry: Registry) -> None:
    assert [registry.attach()[0].id for _ in range(3)] == [1, 2, 3]


def test_full_at_max_connections_and_not_once_one_has_gone() -> None:
    made = Registry(max_connections=2)
    try:
        first, _ = made.attach()
        assert not made.clients.full
        made.attach()
        assert made.clients.full
        first.abort("gone")
        assert not made.clients.full
    finally:
        made.close()


def test_a_closed_websocket_leaves_the_registry(registry: Registry) -> None:
    ws, peer = registry.attach()
    other, _ = registry.attach()
    peer.sock.sendall(masked(0x8, struct.pack("!H", 1000)))
    assert peer.frame() == close_frame(1000, b"")
    with gevent.Timeout(5):
        while ws.state is not State.CLOSED:
            gevent.sleep(0.01)
    assert registry.clients.connections == {other}
    assert ws.closed_reasons == ["closed"]


# -- flushing --------------------------------------------------------------------------------


def test_request_flush_schedules_one_flush_however_often_asked(registry: Registry) -> None:
    ws, peer = registry.attach()
    ws.queue(encode_text(b"x"))
    before = registry.loop.callbacks
    for _ in range(5):
        registry.clients.request_flush()
    assert registry.loop.callbacks == before + 1
    gevent.sleep(0)  # one loop turn: the flush runs
    assert sends(ws) == [b"\x81\x01x"]
    # Once it has run, the next request schedules a new one.
    registry.clients.request_flush()
    assert registry.loop.callbacks == before + 2
    assert peer.frame() == (0x1, b"x")


def test_one_flush_writes_every_dirty_websocket_in_the_same_turn(registry: Registry) -> None:
    pairs = [registry.attach() for _ in range(3)]
    for n, (ws, _) in enumerate(pairs):
        ws.queue(encode_text(b"%d" % n))
    registry.clients.request_flush()
    gevent.sleep(0)
    assert [sends(ws) for ws, _ in pairs] == [[b"\x81\x01%d" % n] for n in range(3)]
    assert registry.clients.dirty == []
    assert [peer.frame() for _, peer in pairs] == [(0x1, b"%d" % n) for n in range(3)]


def test_a_websocket_whose_flush_raises_is_aborted_and_the_others_are_flushed(
    registry: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    broken, broken_peer = registry.attach()
    healthy, healthy_peer = registry.attach()
    broken.queue(encode_text(b"lost"))
    healthy.queue(encode_text(b"kept"))
    broken.flush_error = True
    with caplog.at_level(logging.ERROR, logger="ranger_py.clients"):
        registry.clients.request_flush()
        gevent.sleep(0)
    assert broken.state is State.CLOSED
    assert broken.closed_reasons == ["internal error"]
    assert registry.clients.connections == {healthy}
    assert healthy_peer.frame() == (0x1, b"kept")
    with pytest.raises(EOFError):
        broken_peer.frame()  # dropped, no close frame
    assert [r.getMessage() for r in caplog.records] == [f"connection {broken.id}: flush failed"]
    assert caplog.records[0].exc_info is not None


# -- the sweep -------------------------------------------------------------------------------


def test_tick_pings_then_closes_an_idle_client_with_1001() -> None:
    made = Registry(ping_interval=5.0, pong_timeout=60.0)
    try:
        ws, peer = made.attach()
        start = ws.last_seen
        made.clients.tick(start + 4.9)
        assert nothing_arrives(peer)
        made.clients.tick(start + 5.0)
        assert peer.frame() == (0x9, b"")
        made.clients.tick(start + 60.5)
        assert peer.frame() == close_frame(1001, b"ping timeout")
    finally:
        made.close()


def test_a_timer_that_raises_aborts_its_websocket_only(
    registry: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    broken, _ = registry.attach()
    healthy, peer = registry.attach()
    broken.tick_error = True
    with caplog.at_level(logging.ERROR, logger="ranger_py.clients"):
        registry.clients.tick(healthy.last_seen + registry.clients.limits.ping_interval)
    assert broken.closed_reasons == ["internal error"]
    assert registry.clients.connections == {healthy}
    assert peer.frame() == (0x9, b"")
    assert [r.getMessage() for r in caplog.records] == [f"connection {broken.id}: timer failed"]


# -- stopping --------------------------------------------------------------------------------


def test_close_all_sends_each_client_the_close_frame(registry: Registry) -> None:
    pairs = [registry.attach() for _ in range(3)]
    registry.clients.close_all(1001, "server shutdown")
    for ws, peer in pairs:
        assert ws.state is State.CLOSING
        assert peer.frame() == close_frame(1001, b"server shutdown")
    # Still registered until each peer answers or the socket is dropped.
    assert len(registry.clients) == 3


def test_abort_all_drops_every_socket_without_a_close_frame(registry: Registry) -> None:
    pairs = [registry.attach() for _ in range(2)]
    registry.clients.abort_all("shutdown timeout")
    assert len(registry.clients) == 0
    for ws, peer in pairs:
        assert ws.closed_reasons == ["shutdown timeout"]
        with pytest.raises(EOFError):
            peer.frame()


# -- slow clients ----------------------------------------------------------------------------


def test_a_slow_client_is_counted_once_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    made = Registry(queue_frames=2)
    try:
        ws, peer = made.attach()
        with caplog.at_level(logging.WARNING, logger="ranger_py.clients"):
            for n in range(5):  # nothing flushed: the third frame is past the bound
                ws.queue(encode_text(b"%d" % n))
        assert made.slow.count == 1
        assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
            (logging.WARNING, f"connection {ws.id}: send queue full, closing slow client")
        ]
        ws.flush()
        # The backlog is dropped: the client only gets the close frame.
        assert peer.frame() == close_frame(1008, b"slow client")
    finally:
        made.close()


# -- what websockets read of it --------------------------------------------------------------


def test_limits_come_from_the_configuration() -> None:
    config = Config.from_env(
        {
            "RANGER_MAX_CONNECTIONS": "7",
            "RANGER_SEND_QUEUE_SIZE": "32",
            "RANGER_SEND_QUEUE_BYTES": "65536",
            "RANGER_MAX_MESSAGE_SIZE": "1024",
            "RANGER_CLIENT_RATE": "4",
            "RANGER_CLIENT_BURST": "8",
            "RANGER_SEND_BUFFER": "0",
            "RANGER_PING_INTERVAL": "20",
            "RANGER_PONG_TIMEOUT": "30",
            "RANGER_WRITE_TIMEOUT": "3",
        }
    )
    assert Limits.from_config(config) == Limits(
        max_connections=7,
        queue_frames=32,
        queue_bytes=65536,
        max_message_size=1024,
        client_rate=4.0,
        client_burst=8,
        send_buffer=0,
        ping_interval=20.0,
        pong_timeout=30.0,
        write_timeout=3.0,
    )


def test_the_websockets_bounds_are_derived_from_the_limits() -> None:
    clients = Clients(
        Limits(
            max_message_size=100, queue_frames=3, queue_bytes=999, client_rate=4, client_burst=8
        ),
        gevent.get_hub().loop,
        SlowCount(),
    )
    assert (clients.max_message_size, clients.queue_frames, clients.max_queue_bytes) == (
        100,
        3,
        999,
    )
    assert clients.message_interval == 0.25
    assert clients.message_window == 8.5 / 4
