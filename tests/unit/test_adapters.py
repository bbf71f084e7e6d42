"""What the adapters rely on in each library, checked one reliance at a time.

The libraries: wsproto, gevent, py-amqp and kombu, prometheus-client, and gunicorn.

Each test exercises exactly the internal its adapter uses, against the installed library. When an
upgrade breaks one, the failure names the library, the installed and pinned versions and the
adapter to fix, instead of surfacing later as a confusing failure somewhere in the server.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import amqp
import gevent
import gevent.socket
import pytest
from amqp import spec
from amqp.basic_message import Message as AmqpMessage
from amqp.exceptions import error_for_code
from amqp.serialization import dumps, loads
from amqp.transport import TCPTransport
from gunicorn import systemd
from gunicorn.app.base import BaseApplication
from gunicorn.arbiter import Arbiter
from gunicorn.glogging import Logger
from gunicorn.workers.base import Worker
from gunicorn.workers.ggevent import GeventWorker
from kombu.connection import Connection as KombuConnection
from kombu.mixins import ConsumerMixin
from kombu.transport import pyamqp
from prometheus_client import Histogram

from ranger_py import (
    amqp_adapter,
    gevent_adapter,
    gunicorn_adapter,
    prometheus_adapter,
    wsproto_adapter,
)
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
    except (Exception, pytest.fail.Exception) as exc:
        # Assertions and pytest.raises's "DID NOT RAISE" too: each checks the reliance named here.
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


class _Recording(wsproto_adapter.Extension):
    """An extension that records each hook call and transforms nothing but what it is told."""

    name = "recording"

    def __init__(self) -> None:
        self.calls: list[tuple[object, ...]] = []

    def enabled(self) -> bool:
        return True

    def offer(self) -> bool:
        return False

    def frame_inbound_header(self, proto: Any, opcode: Any, rsv: Any, length: int) -> Any:
        self.calls.append(("header", opcode, rsv.rsv1, length))
        if opcode is Opcode.PONG:
            return wsproto_adapter.CloseReason.MESSAGE_TOO_BIG
        return wsproto_adapter.RsvBits(True, False, False)

    def frame_inbound_payload_data(self, proto: Any, data: bytes) -> bytes:
        self.calls.append(("data", data))
        return data.upper()

    def frame_inbound_complete(self, proto: Any, fin: bool) -> bytes | None:
        self.calls.append(("complete", fin))
        return b"!" if fin else None


def test_wsproto_extension_hooks_run_per_frame_as_bounded_inflate_expects() -> None:
    what = "Extension hooks: header per frame, unmasked payload chunks, completion appended"
    with wsproto_relies(what):
        extension = _Recording()
        parser = wsproto_adapter.FrameProtocol(client=False, extensions=[extension])
        first = client_frame(0x1, b"ab", fin=False)
        rsv1_first = bytes((first[0] | 0x40,)) + first[1:]  # RSV1, allowed by the header hook
        # A control frame between the fragments.
        parser.receive_bytes(rsv1_first + client_frame(0x9, b"p") + client_frame(0x0, b"cd"))
        got = [(f.opcode, f.payload, f.message_finished) for f in parser.received_frames()]
        # Each frame's payload is replaced by the hooks' output before the message decoder
        # reads it as UTF-8; the completion's bytes are appended to the frame that ends.
        assert got == [
            (Opcode.TEXT, "AB", False),
            (Opcode.PING, b"P!", True),
            (Opcode.TEXT, "CD!", True),
        ]
        assert extension.calls == [
            ("header", Opcode.TEXT, True, 2),
            ("data", b"ab"),
            ("complete", False),
            ("header", Opcode.PING, False, 1),
            ("data", b"p"),
            ("complete", True),
            ("header", Opcode.CONTINUATION, False, 2),
            ("data", b"cd"),
            ("complete", True),
        ]
        # A CloseReason from a hook fails the connection with that code.
        parser.receive_bytes(client_frame(0xA, b""))
        with pytest.raises(wsproto_adapter.ParseFailed) as info:
            list(parser.received_frames())
        assert int(info.value.code) == 1009


def test_wsproto_bounded_inflate_reads_compressed_messages() -> None:
    with wsproto_relies("FrameProtocol with the BoundedInflate extension"):
        compressor = zlib.compressobj(wbits=-15)
        body = (compressor.compress(b"hello") + compressor.flush(zlib.Z_SYNC_FLUSH))[:-4]
        frame = client_frame(0x1, body)
        parser = wsproto_adapter.new_parser(inflate_limit=100)
        parser.receive_bytes(bytes((frame[0] | 0x40,)) + frame[1:])
        assert [f.payload for f in parser.received_frames()] == ["hello"]
        assert wsproto_adapter.parser_idle(parser)


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


def test_amqp_binding_replies_reach_a_listener_while_nobody_waits_for_them() -> None:
    with amqp_relies("AbstractChannel._callbacks, consulted by dispatch_method for bind-ok"):
        conn = pyamqp.Transport.Connection(host="127.0.0.1:1")  # never connected
        channel = pyamqp.Transport.Connection.Channel(conn, channel_id=1)
        replies: list[str] = []
        assert amqp_adapter.listen_for_binding_replies(channel, lambda: replies.append("ok"))
        channel.dispatch_method(spec.Queue.BindOk, b"", None)
        channel.dispatch_method(spec.Queue.UnbindOk, b"", None)
        assert replies == ["ok", "ok"]


def test_amqp_send_binding_writes_what_queue_bind_writes_without_waiting() -> None:
    with amqp_relies("Channel.send_method writes one frame; queue.bind/unbind argument layouts"):
        conn = pyamqp.Transport.Connection(host="127.0.0.1:1")  # never connected
        channel = pyamqp.Transport.Connection.Channel(conn, channel_id=1)
        frames: list[tuple[object, bytes]] = []
        channel.connection = SimpleNamespace(
            frame_writer=lambda kind, chan, sig, args, content: frames.append((sig, args))
        )
        assert not amqp_adapter.send_binding(channel, True, "q", "ex", "*.m.trades")
        channel.queue_bind("q", "ex", "*.m.trades", nowait=True)  # py-amqp's own
        amqp_adapter.send_binding(channel, False, "q", "ex", "*.m.trades")
        channel.queue_unbind("q", "ex", "*.m.trades", nowait=True)
        (ours, args), (theirs, their_args), unbind, their_unbind = frames
        assert ours == theirs == spec.Queue.Bind
        # The same fields but the nowait bit: ours asks for the bind-ok.
        assert loads("BsssbF", args, 0)[0] == [0, "q", "ex", "*.m.trades", False, {}]
        assert loads("BsssbF", their_args, 0)[0] == [0, "q", "ex", "*.m.trades", True, {}]
        assert unbind == their_unbind
        assert unbind[0] == spec.Queue.Unbind


def test_kombu_memory_channel_binds_in_place() -> None:
    with (
        kombu_relies("virtual Channel.queue_bind/queue_unbind take effect at once"),
        KombuConnection("memory://") as conn,
    ):
        channel = conn.channel()
        exchange = f"probe.{os.getpid()}.{time.monotonic_ns()}"
        channel.exchange_declare(exchange, "topic")
        channel.queue_declare(exchange)
        assert amqp_adapter.send_binding(channel, True, exchange, exchange, "*.m.trades")
        channel.basic_publish(channel.prepare_message(b"1"), exchange, "public.m.trades")
        assert channel.basic_get(exchange) is not None
        assert amqp_adapter.send_binding(channel, False, exchange, exchange, "*.m.trades")
        channel.basic_publish(channel.prepare_message(b"2"), exchange, "public.m.trades")
        assert channel.basic_get(exchange) is None
        assert not amqp_adapter.listen_for_binding_replies(channel, lambda: None)


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


# -- gunicorn --------------------------------------------------------------------------------


def gunicorn_relies(what: str) -> Any:
    return relied_on("gunicorn", what, "gunicorn_adapter")


Wsgi = Callable[[dict[str, Any], Callable[..., Any]], Any]


def hello(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    start_response("200 OK", [("Content-Length", "2")])
    return [b"ok"]


class ProbeApp(BaseApplication):  # type: ignore[misc]
    """A gunicorn application with the default settings, serving ``wsgi``."""

    def __init__(self, wsgi: Wsgi = hello) -> None:
        self._wsgi = wsgi
        super().__init__()

    def load_config(self) -> None:
        pass

    def load(self) -> Wsgi:
        return self._wsgi


class Stop(Exception):
    """Raised by a hook to leave gunicorn's startup once the hook has seen what it needs."""


@pytest.fixture
def arbiter(monkeypatch: pytest.MonkeyPatch) -> Arbiter:
    monkeypatch.setenv("SERVER_SOFTWARE", "")  # the Arbiter sets it; restored afterwards
    for variable in ("GUNICORN_PID", "LISTEN_PID", "LISTEN_FDS"):
        monkeypatch.delenv(variable, raising=False)
    return Arbiter(ProbeApp())


def test_gunicorn_arbiter_runs_handle_int_looked_up_on_the_instance(arbiter: Arbiter) -> None:
    stops: list[bool] = []
    with gunicorn_relies(
        "the Arbiter calls handle_<signal>() found on the instance; TERM graceful"
    ):
        assert re.search(
            r"getattr\(\s*self\s*,\s*[\"']handle_%s[\"']\s*%\s*signame",
            inspect.getsource(Arbiter.run),
        ), "the main loop no longer looks signal handlers up on the instance"
        arbiter.stop = lambda graceful=True: stops.append(graceful)
        with pytest.raises(StopIteration):  # the main loop halts on it, stopping gracefully
            arbiter.handle_term()
        with pytest.raises(StopIteration):
            arbiter.handle_int()
        assert stops == [False], "handle_int is no longer the quick stop, handle_term the graceful"

        gunicorn_adapter.sigint_stops_master_gracefully(arbiter)
        stops.clear()
        with pytest.raises(StopIteration):
            arbiter.handle_int()
        assert stops == []
        # A second Ctrl-C during the graceful stop: the stop's own wait turns it into a quick one.
        assert "signal.SIGINT" in inspect.getsource(Arbiter.stop)


def test_gunicorn_master_pid_is_set_before_on_starting(
    arbiter: Arbiter, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[int, bool]] = []

    def on_starting(server: Any) -> None:
        seen.append((server.master_pid, gunicorn_adapter.inherits_listeners(server)))
        raise Stop

    with gunicorn_relies(
        "Arbiter.master_pid: 0, or the old master's pid after USR2, by on_starting"
    ):
        arbiter.cfg.set("on_starting", on_starting)
        with pytest.raises(Stop):
            arbiter.start()
        monkeypatch.setenv("GUNICORN_PID", "4242")  # what a USR2 re-exec's new master is given
        with pytest.raises(Stop):
            arbiter.start()
        assert seen == [(0, False), (4242, True)]


def test_gunicorn_systemd_listen_fds_counts_and_keeps_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with gunicorn_relies("systemd.listen_fds(unset_environment): the count; False keeps LISTEN_*"):
        monkeypatch.setenv("LISTEN_FDS", "2")
        monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
        assert systemd.listen_fds(False) == 2
        assert gunicorn_adapter.inherits_listeners(SimpleNamespace(master_pid=0))
        assert os.environ["LISTEN_FDS"] == "2", "gunicorn would no longer find its sockets"
        assert os.environ["LISTEN_PID"] == str(os.getpid())
        monkeypatch.setenv("LISTEN_PID", "1")  # passed to another process, not to this one
        assert not gunicorn_adapter.inherits_listeners(SimpleNamespace(master_pid=0))


# What app.py returns for a socket the gateway took over.
HANDED_OVER: list[bytes] = []


class HandOverProbe(GeventWorker):  # type: ignore[misc]
    """What worker.RangerWorker's is_already_handled does, on gunicorn's own GeventWorker."""

    def is_already_handled(self, respiter: Any) -> bool:
        if respiter is HANDED_OVER:
            gunicorn_adapter.leave_connection()
        return bool(super().is_already_handled(respiter))


@contextmanager
def gevent_worker(wsgi: Wsgi = hello) -> Iterator[tuple[HandOverProbe, Any]]:
    """A worker as gunicorn makes one (not forked), on a loopback listener, its wsgi loaded."""
    listener = gevent.socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    app = ProbeApp(wsgi)
    worker = HandOverProbe(0, os.getppid(), [listener], app, 30, app.cfg, Logger(app.cfg))
    try:
        worker.load_wsgi()
        yield worker, listener
    finally:
        listener.close()
        worker.tmp.close()


def test_gunicorn_gevent_worker_has_the_hooks_worker_py_overrides() -> None:
    shapes = {
        "load_wsgi": ["self"],
        "is_already_handled": ["self", "respiter"],
        "run": ["self"],
        "handle_exit": ["self", "sig", "frame"],
    }
    with gunicorn_relies("GeventWorker's load_wsgi, is_already_handled, run, handle_exit"):
        for name, parameters in shapes.items():
            assert list(inspect.signature(getattr(GeventWorker, name)).parameters) == parameters
        with gevent_worker() as (worker, _listener):
            assert worker.wsgi is hello, "load_wsgi no longer sets self.wsgi"
            assert float(worker.cfg.graceful_timeout) == 30.0  # the setting's default, seconds
            assert worker.alive
            worker.handle_exit(signal.SIGTERM, None)
            assert not worker.alive
        # handle_exit is what a worker runs on SIGTERM, the graceful stop.
        assert re.search(r"SIGTERM\s*,\s*self\.handle_exit", inspect.getsource(Worker.init_signals))


def test_gunicorn_keep_alive_loop_ends_on_stop_iteration_and_leaves_the_fd() -> None:
    """Two requests on one connection: the first is handed over, the second never read."""
    calls: list[str] = []
    taken: list[int] = []

    def take_socket(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        calls.append(environ["PATH_INFO"])
        taken.append(gunicorn_adapter.detach_socket(environ))
        return HANDED_OVER

    with (
        gunicorn_relies("StopIteration from is_already_handled ends AsyncWorker.handle's loop"),
        gevent_worker(take_socket) as (worker, listener),
    ):
        assert worker.cfg.keepalive, (
            "keepalive is on (gunicorn_conf.py): this must take the keep-alive loop"
        )
        client = gevent.socket.create_connection(listener.getsockname())
        try:
            client.sendall(
                b"GET /one HTTP/1.1\r\nHost: a\r\n\r\nGET /two HTTP/1.1\r\nHost: a\r\n\r\n"
            )
            conn, addr = listener.accept()
            worker.handle(listener, conn, addr)  # returns: the loop ended
            assert calls == ["/one"], "gunicorn read another request from a handed-over socket"
            assert isinstance(taken[0], int) and conn.fileno() == -1
            os.write(taken[0], b"ours")  # the fd is still open, and nothing was written before
            os.close(taken[0])
            client.settimeout(2)
            received = b""
            while chunk := client.recv(64):
                received += chunk
            assert received == b"ours"
        finally:
            client.close()


def test_gunicorn_gevent_worker_run_returns_once_it_stops_accepting() -> None:
    with (
        gunicorn_relies("GeventWorker.run() returns after handle_exit, its listener closed"),
        gevent_worker() as (worker, listener),
    ):
        address = listener.getsockname()
        running = gevent.spawn(worker.run)
        with gevent.socket.create_connection(address) as client:  # it serves
            client.sendall(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            client.settimeout(2)
            assert client.recv(64).startswith(b"HTTP/1.1 200")
        worker.handle_exit(signal.SIGTERM, None)
        running.join(timeout=5)  # it looks at alive once a second
        assert running.dead, "run() did not return after handle_exit"
        assert running.exception is None
        with pytest.raises(ConnectionRefusedError):  # run() closed the listener itself
            gevent.socket.create_connection(address, timeout=2)
