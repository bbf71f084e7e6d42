"""What the adapters rely on in each library, checked one reliance at a time.

The libraries: wsproto, gevent, py-amqp and kombu, prometheus-client, and gunicorn.

Each test exercises exactly the internal its adapter uses, against the installed library. When an
upgrade breaks one, the failure names the library, the installed and pinned versions and the
adapter to fix, instead of surfacing later as a confusing failure somewhere in the server.
"""

from __future__ import annotations

import json
import os
import re
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import amqp
import gevent
import pytest
from amqp import spec
from amqp.basic_message import Message as AmqpMessage
from amqp.exceptions import error_for_code
from amqp.serialization import dumps
from amqp.transport import TCPTransport
from kombu.connection import Connection as KombuConnection
from kombu.mixins import ConsumerMixin
from kombu.transport import pyamqp
from prometheus_client import Histogram

from ranger_py import amqp_adapter, gevent_adapter, prometheus_adapter, wsproto_adapter
from ranger_py.metrics import FANOUT_BUCKETS
from ranger_py.wsproto_adapter import Opcode

ROOT = Path(__file__).resolve().parents[2]
REQUIREMENTS = ROOT / "requirements.txt"


def pinned(dist: str) -> str:
    match = re.search(rf"^{re.escape(dist)}==(\S+)", REQUIREMENTS.read_text(), re.MULTILINE)
    return match.group(1) if match else "(not pinned)"


@contextmanager
def relied_on(dist: str, what: str, adapter: str) -> Iterator[None]:
    """Turn any failure inside into one message: library, versions, reliance, adapter."""
    try:
        yield
    except Exception as exc:  # assertions included: each one checks the reliance named here
        pytest.fail(
            f"{dist} {version(dist)}: {what} no longer holds; ranger-py relies on it as of "
            f"{dist} {pinned(dist)} (requirements.txt): see ranger_py/{adapter}.py "
            f"[{type(exc).__name__}: {exc}]",
            pytrace=False,
        )


def test_a_broken_reliance_names_library_versions_and_adapter() -> None:
    with pytest.raises(pytest.fail.Exception) as info, relied_on("wsproto", "X", "wsproto_adapter"):
        raise AttributeError("'FrameDecoder' object has no attribute 'header'")
    message = str(info.value)
    assert f"wsproto {pinned('wsproto')}" in message
    assert "ranger_py/wsproto_adapter.py" in message
    assert "no attribute 'header'" in message
    assert pinned("wsproto") != "(not pinned)"


# -- wsproto ---------------------------------------------------------------------------------


def client_frame(opcode: int, payload: bytes, *, fin: bool = True, masked: bool = True) -> bytes:
    """A client frame of up to 125 bytes, built by hand (RFC 6455 §5.2)."""
    assert len(payload) < 126
    mask = b"\x01\x02\x03\x04"
    first = (0x80 if fin else 0) | opcode
    if not masked:
        return bytes((first, len(payload))) + payload
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes((first, 0x80 | len(payload))) + mask + body


def wsproto_relies(what: str) -> Any:
    return relied_on("wsproto", what, "wsproto_adapter")


def test_wsproto_frame_protocol_yields_frames_as_frames_py_reads_them() -> None:
    with wsproto_relies("FrameProtocol's frames (.opcode, .payload, .message_finished)"):
        parser = wsproto_adapter.new_parser()
        parser.receive_bytes(
            client_frame(0x1, "hé".encode(), fin=False)
            + client_frame(0x0, b"llo")
            + client_frame(0x2, b"\x00\xff")
            + client_frame(0x9, b"p")
            + client_frame(0xA, b"q")
            + client_frame(0x8, struct.pack("!H", 1001) + b"bye")
        )
        got = [(f.opcode, f.payload, f.message_finished) for f in parser.received_frames()]
        assert got == [
            (Opcode.TEXT, "hé", False),
            (Opcode.TEXT, "llo", True),  # a continuation is reported as its message's opcode
            (Opcode.BINARY, b"\x00\xff", True),
            (Opcode.PING, b"p", True),
            (Opcode.PONG, b"q", True),
            (Opcode.CLOSE, (1001, "bye"), True),
        ]


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (client_frame(0x1, b"x", masked=False), 1002),  # clients must mask
        (client_frame(0x3, b"x"), 1002),  # reserved opcode
        (client_frame(0x1, b"\xff"), 1007),  # not UTF-8
        (client_frame(0x8, b"\x03\xe8\xff"), 1007),  # close reason not UTF-8
    ],
    ids=["unmasked", "opcode", "utf8", "close-utf8"],
)
def test_wsproto_parse_failed_carries_the_rfc_close_code(data: bytes, code: int) -> None:
    with wsproto_relies(f"ParseFailed.code is the RFC's close code ({code})"):
        parser = wsproto_adapter.new_parser()
        parser.receive_bytes(data)
        with pytest.raises(wsproto_adapter.ParseFailed) as info:
            list(parser.received_frames())
        assert int(info.value.code) == code


def test_wsproto_decoder_header_and_buffer_tell_whether_a_frame_is_held() -> None:
    what = "FrameProtocol._frame_decoder.header (None between frames) and len(.buffer)"
    with wsproto_relies(what):
        parser = wsproto_adapter.new_parser()
        decoder = parser._frame_decoder
        frame = client_frame(0x1, b"hello")
        assert decoder.header is None and len(decoder.buffer) == 0
        assert wsproto_adapter.parser_idle(parser)

        parser.receive_bytes(frame[:1])  # half a header: held in the buffer
        assert list(parser.received_frames()) == []
        assert decoder.header is None and len(decoder.buffer) == 1
        assert not wsproto_adapter.parser_idle(parser)

        parser.receive_bytes(frame[1:6])  # the whole header, no payload: only .header says so
        assert list(parser.received_frames()) == []
        assert decoder.header is not None and len(decoder.buffer) == 0
        assert not wsproto_adapter.parser_idle(parser)

        parser.receive_bytes(frame[6:])
        assert [f.payload for f in parser.received_frames()] == ["hello"]
        assert decoder.header is None and len(decoder.buffer) == 0
        assert wsproto_adapter.parser_idle(parser)


def test_wsproto_accept_token_gives_the_rfc_example_answer() -> None:
    with wsproto_relies("utilities.generate_accept_token(key) -> base64 bytes"):
        # RFC 6455 §1.3's sample key and answer.
        token = wsproto_adapter.accept_token(b"dGhlIHNhbXBsZSBub25jZQ==")
        assert token == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


# -- gevent ----------------------------------------------------------------------------------


def gevent_relies(what: str) -> Any:
    return relied_on("gevent", what, "gevent_adapter")


def run_loop_until(done: Callable[[], bool], timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        gevent.sleep(0.005)
    return done()


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, peer = socket.socketpair()
    ours.setblocking(False)
    yield ours, peer
    ours.close()
    peer.close()


def test_gevent_hub_loop_is_the_hubs_loop() -> None:
    with gevent_relies("gevent.get_hub().loop with io, timer and run_callback"):
        loop = gevent_adapter.hub_loop()
        assert loop is gevent.get_hub().loop
        for method in ("io", "timer", "run_callback"):
            assert callable(getattr(loop, method)), method


def test_gevent_io_event_1_fires_on_readable_only(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, peer = pair
    received: list[bytes] = []
    with gevent_relies(f"loop.io(fd, {gevent_adapter.READ}) watches readability"):
        loop = gevent_adapter.hub_loop()
        watcher = gevent_adapter.read_watcher(
            loop, ours.fileno(), lambda: received.append(ours.recv(64))
        )
        try:
            gevent.sleep(0.05)
            assert received == [], "fired on a writable socket with nothing to read"
            peer.sendall(b"x")
            assert run_loop_until(lambda: bool(received)), "never fired on a readable socket"
            assert received == [b"x"]
        finally:
            gevent_adapter.close_watcher(watcher)
        peer.sendall(b"y")
        gevent.sleep(0.05)
        assert received == [b"x"], "fired after stop() and close()"


def test_gevent_io_event_2_fires_on_writable(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, _peer = pair
    calls: list[int] = []
    with gevent_relies(f"loop.io(fd, {gevent_adapter.WRITE}) watches writability"):
        loop = gevent_adapter.hub_loop()
        watcher = gevent_adapter.write_watcher(loop, ours.fileno(), lambda: calls.append(1))
        try:
            assert run_loop_until(lambda: bool(calls)), "never fired on a writable socket"
        finally:
            gevent_adapter.close_watcher(watcher)
        fired = len(calls)
        gevent.sleep(0.05)
        assert len(calls) == fired, "fired after stop() and close()"


def test_gevent_timer_repeats_until_closed() -> None:
    calls: list[int] = []
    with gevent_relies("loop.timer(after, repeat).start(callback) repeats"):
        loop = gevent_adapter.hub_loop()
        timer = gevent_adapter.repeating_timer(loop, 0.01, lambda: calls.append(1))
        try:
            assert run_loop_until(lambda: len(calls) >= 3), f"fired {len(calls)} times"
        finally:
            gevent_adapter.close_watcher(timer)
        fired = len(calls)
        gevent.sleep(0.05)
        assert len(calls) == fired, "fired after stop() and close()"


def test_gevent_run_callback_runs_on_the_next_turn() -> None:
    ran: list[int] = []
    with gevent_relies("loop.run_callback(func) runs func later, in the loop"):
        schedule = gevent_adapter.callback_scheduler(gevent_adapter.hub_loop())
        schedule(lambda: ran.append(1))
        assert ran == [], "ran at once, not on the loop's turn"
        assert run_loop_until(lambda: bool(ran)), "never ran"
        assert ran == [1]


# -- py-amqp and kombu -----------------------------------------------------------------------


def amqp_relies(what: str) -> Any:
    return relied_on("amqp", what, "amqp_adapter")


def kombu_relies(what: str) -> Any:
    return relied_on("kombu", what, "amqp_adapter")


def test_kombu_amqp_transport_connection_is_py_amqps() -> None:
    with kombu_relies("Connection.connection is py-amqp's Connection (and channel) for amqp://"):
        assert issubclass(pyamqp.Transport.Connection, amqp.Connection)
        assert issubclass(pyamqp.Transport.Connection.Channel, amqp.Channel)


def test_amqp_connection_sock_is_the_transports_socket() -> None:
    # A loopback listener is enough: the TCP connection is made, no AMQP is spoken.
    with socket.create_server(("127.0.0.1", 0)) as listener:
        host = f"127.0.0.1:{listener.getsockname()[1]}"
        with amqp_relies("Connection.sock is the transport's socket.socket"):
            conn = pyamqp.Transport.Connection(host=host)
            transport = TCPTransport(host, connect_timeout=2)
            transport.connect()
            try:
                conn.transport = transport
                amqp_adapter.set_socket_timeout(SimpleNamespace(connection=conn), 2.5)
                assert isinstance(conn.sock, socket.socket)
                assert conn.sock is transport.sock
                assert transport.sock.gettimeout() == 2.5
            finally:
                transport.close()


def test_kombu_memory_transport_has_no_socket() -> None:
    conn = KombuConnection("memory://")
    try:
        with kombu_relies("the memory:// connection has no .sock"):
            assert getattr(conn.connection, "sock", None) is None
            amqp_adapter.set_socket_timeout(conn, 1.0)  # nothing to do, and no error
    finally:
        conn.release()


def test_amqp_channel_auto_decode_is_read_on_each_delivery() -> None:
    with amqp_relies("Channel.auto_decode, read on every delivery, decides whether bodies decode"):
        conn = pyamqp.Transport.Connection(host="127.0.0.1:1")  # never connected
        channel = pyamqp.Transport.Connection.Channel(conn, channel_id=1)
        assert hasattr(channel, "auto_decode")
        delivered: list[object] = []
        channel.callbacks["tag"] = lambda message: delivered.append(message.body)
        deliver = struct.pack("!HH", *spec.Basic.Deliver) + dumps(
            "sLbss", ("tag", 1, False, "exchange", "key")
        )

        def one_delivery() -> None:
            body = AmqpMessage(body="café".encode(), content_encoding="utf-8")
            channel.dispatch_method(spec.Basic.Deliver, deliver, body)

        channel.auto_decode = True
        one_delivery()
        amqp_adapter.keep_bodies_raw(channel)  # on a channel already open, as consumer.py does
        one_delivery()
        assert delivered == ["café", "café".encode()]


def test_amqp_access_refused_carries_reply_code_403() -> None:
    with amqp_relies("errors carry .reply_code; a refused login is 403"):
        # What py-amqp raises when the broker closes the connection with ACCESS_REFUSED.
        exc = error_for_code(403, "ACCESS_REFUSED - Login was refused", (10, 40), ConnectionError)
        assert isinstance(exc, amqp.exceptions.AccessRefused)
        assert amqp_adapter.reply_code(exc) == amqp_adapter.ACCESS_REFUSED
        assert amqp_adapter.reply_code(ValueError("x")) is None


def test_kombu_consumer_mixin_connects_through_establish_connection() -> None:
    """consumer.py overrides ConsumerMixin.establish_connection; consume() must still use it."""

    class Probe(ConsumerMixin):
        def __init__(self) -> None:
            self.connection = KombuConnection("memory://")
            self.used = False

        @contextmanager
        def establish_connection(self) -> Iterator[Any]:
            self.used = True
            with self.create_connection() as conn:
                yield conn

        def get_consumers(self, make_consumer: Any, channel: Any) -> list[Any]:
            return []

        def on_consume_ready(self, *args: Any, **kwargs: Any) -> None:
            self.should_stop = True

    probe = Probe()
    with kombu_relies("ConsumerMixin.consume() opens its connection via establish_connection()"):
        for _ in probe.consume(limit=1, safety_interval=0.01):
            pass
        assert probe.used
    probe.connection.release()


# -- prometheus-client -----------------------------------------------------------------------


def prometheus_relies(what: str) -> Any:
    return relied_on("prometheus-client", what, "prometheus_adapter")


def test_prometheus_histogram_keeps_one_value_per_bucket_not_cumulative() -> None:
    with prometheus_relies("Histogram._buckets (one value per bound and +Inf, own bucket only)"):
        histogram = Histogram("probe", "p", buckets=FANOUT_BUCKETS, registry=None)
        assert len(histogram._buckets) == len(FANOUT_BUCKETS) + 1
        histogram.observe(FANOUT_BUCKETS[1])  # on a bound: counted in that bucket
        histogram.observe(FANOUT_BUCKETS[-1] * 2)  # past the last bound: +Inf
        counts = [bucket.get() for bucket in histogram._buckets]
        assert counts == [0, 1] + [0] * (len(FANOUT_BUCKETS) - 2) + [1]
        assert histogram._sum.get() == FANOUT_BUCKETS[1] + FANOUT_BUCKETS[-1] * 2
        prometheus_adapter.add_observations(histogram, [2] + [0] * len(FANOUT_BUCKETS), 0.5)
        assert histogram._buckets[0].get() == 2
        assert histogram._sum.get() == FANOUT_BUCKETS[1] + FANOUT_BUCKETS[-1] * 2 + 0.5


# Run with PROMETHEUS_MULTIPROC_DIR set before prometheus_client is first imported, as in a
# worker. Prints the exposition two ways: the documented collector over the whole directory,
# and the adapter's merge of the same files; each holds a histogram fed by observe() and one fed
# the same values by add_observations().
_MULTIPROCESS_PROBE = """
import bisect, glob, json, os, sys
from prometheus_client import CollectorRegistry, Histogram, generate_latest, multiprocess
from ranger_py import prometheus_adapter
from ranger_py.metrics import FANOUT_BUCKETS

values = json.loads(sys.argv[1])
theirs = Histogram("theirs", "h", buckets=FANOUT_BUCKETS, registry=None)
ours = Histogram("ours", "h", buckets=FANOUT_BUCKETS, registry=None)
counts = [0] * (len(FANOUT_BUCKETS) + 1)
for value in values:
    theirs.observe(value)
    counts[bisect.bisect_left(FANOUT_BUCKETS, value)] += 1
prometheus_adapter.add_observations(ours, counts, sum(values))

documented = CollectorRegistry()
multiprocess.MultiProcessCollector(documented)

class Merged:
    def collect(self):
        files = glob.glob(os.path.join(os.environ["PROMETHEUS_MULTIPROC_DIR"], "*.db"))
        return prometheus_adapter.merge_files(files)

merged = CollectorRegistry()
merged.register(Merged())
print(json.dumps([generate_latest(documented).decode(), generate_latest(merged).decode()]))
"""


def series(exposition: str, name: str) -> list[str]:
    """The sample lines of one metric, under a neutral name."""
    return sorted(
        line.replace(name, "h", 1) for line in exposition.splitlines() if line.startswith(name)
    )


def test_prometheus_multiprocess_buckets_added_at_once_scrape_as_observed(tmp_path: Path) -> None:
    values = [0.000001, 0.00001, 0.00002, 0.0003, 0.004, 0.5, 0.0099, 0.0099]
    with prometheus_relies("multiprocess mode: _buckets, _sum, MultiProcessCollector.merge"):
        probe = subprocess.run(
            [sys.executable, "-c", _MULTIPROCESS_PROBE, json.dumps(values)],
            env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert probe.returncode == 0, probe.stderr.strip().splitlines()[-1:]
        documented, merged = json.loads(probe.stdout)
        assert series(documented, "ours") == series(documented, "theirs")
        assert f"ours_count {float(len(values))}" in documented
        assert 'ours_bucket{le="0.01"} 7.0' in documented  # cumulative, as scraped
        assert merged == documented
