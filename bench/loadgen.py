"""The load generator: websocket clients on uvloop + picows, in a process of its own.

Run by the orchestrator as ``python -m bench.loadgen`` and driven over :mod:`bench.rpc`. Clients
live in named groups (``fanout``, ``slow``, ``book``...). Every data frame carries the publisher's
send time (``"ts"``, CLOCK_MONOTONIC in µs, the same clock in every process of the machine), so a
frame's latency is one subtraction. The per-frame path is kept to a size check for most clients
and a bytes search plus an integer parse for the latency probes, so that this process is not the
bottleneck; every reply carries this process's CPU time so the report can show when it was.

A step starts with ``begin``: counters restart, and a probe that sees a frame sent before it (a
straggler of an earlier step) counts it as ``late`` instead of taking its latency.
"""

from __future__ import annotations

import asyncio
import gc
import json
import resource
import socket
import struct
import time
from array import array
from collections import Counter
from typing import Any, cast

import uvloop
from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

from bench import rpc
from bench.bookcheck import BookCheck
from bench.deflate import inflate, judge_answer
from bench.stats import histogram

__all__ = [
    "MIN_BODY",
    "BookClient",
    "ExchangeClient",
    "Group",
    "StreamClient",
    "WireClient",
    "main",
    "ws_header_size",
]

_TEXT = WSMsgType.TEXT
_CLOSE = WSMsgType.CLOSE
_now_ns = time.monotonic_ns
_TS = b'"ts":'
_MAX_FAULTS = 5
# Data frames carry a body of at least this many bytes (the publisher's are ~200); anything
# shorter is a reply, a close or a control frame.
MIN_BODY = 100
_HANDSHAKE_TIMEOUT = 10.0
_EXTENSIONS = "Sec-WebSocket-Extensions"
_RSV1_UNASKED = "RSV1 frame without permessage-deflate"
_REPLY_PREFIXES = (b'{"success"', b'{"error"')


def _now_us() -> int:
    return _now_ns() // 1000


class Group:
    """Clients that are measured together, and their counters for the current step."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.clients: list[StreamClient] = []
        self.step_start_us = 0
        self.frames_at_begin = 0
        self.late = 0
        self.replies = 0
        self.latencies: array[int] = array("q")
        self.closes: Counter[int] = Counter()
        self.dropped = 0
        self.errors: Counter[str] = Counter()
        self.wire_at_begin = 0
        self.compressed_at_begin = 0

    def begin(self, step_start_us: int) -> None:
        self.step_start_us = step_start_us
        self.frames_at_begin = self.total_frames()
        self.wire_at_begin = sum(client.wire_bytes for client in self.clients)
        self.compressed_at_begin = sum(client.compressed for client in self.clients)
        self.late = self.replies = 0
        self.latencies = array("q")

    def total_frames(self) -> int:
        return sum(client.frames for client in self.clients)

    @property
    def frames(self) -> int:
        """Data frames received since ``begin``."""
        return self.total_frames() - self.frames_at_begin

    @property
    def wire_bytes(self) -> int:
        """Bytes of the data frames received since ``begin``, headers included (only
        :class:`WireClient` counts them)."""
        return sum(client.wire_bytes for client in self.clients) - self.wire_at_begin

    @property
    def compressed(self) -> int:
        """Data frames received with RSV1 since ``begin`` (only :class:`WireClient`)."""
        return sum(client.compressed for client in self.clients) - self.compressed_at_begin

    @property
    def open(self) -> int:
        return sum(1 for client in self.clients if client.is_open)


class StreamClient(WSListener):
    """A client that counts data frames; a *probe* client also records their latency.

    Counting must cost next to nothing (a 1000-client fan-out at 500 msg/s is half a million
    frames a second into one process), so a plain client only checks the payload size: data
    frames carry a body of at least ``MIN_BODY`` bytes, replies and close frames are shorter
    and take the slow path. Probes, one client in ``probe_every``, also parse the send time.
    """

    def __init__(self, group: Group, probe: bool = True) -> None:
        super().__init__()
        self.group = group
        self.probe = probe
        self.transport: WSTransport | None = None
        self.frames = 0
        # Counted by WireClient only: the plain hot path stays as it is.
        self.wire_bytes = 0
        self.compressed = 0
        self.streams: list[str] | None = None  # from the first "subscribed" reply
        self.close_code: int | None = None
        self.closed_at_us = 0
        self.disconnected = False
        self.closing = False  # we started the close
        self.index = -1  # its place in the urls of the connect call, over every process

    @property
    def is_open(self) -> bool:
        return self.transport is not None and not self.disconnected and self.close_code is None

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        # Hot path. frame.msg_type builds an Enum (slow); the payload size is a plain field.
        if frame.payload_size < MIN_BODY:
            self.on_short_frame(transport, frame)
            return
        self.frames += 1
        if self.probe:
            self.on_probe(frame.get_payload_as_bytes())

    def on_probe(self, data: bytes) -> None:
        """A probe's data frame: its latency, from the ``"ts"`` it carries."""
        i = data.find(_TS)
        if i < 0:
            return
        end = data.find(b",", i)
        if end < 0:
            end = data.find(b"}", i)
        sent = int(data[i + 5 : end])
        group = self.group
        if sent >= group.step_start_us:
            group.latencies.append(_now_ns() // 1000 - sent)
        else:
            group.late += 1

    def on_short_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        kind = frame.msg_type
        if kind is _TEXT:
            self.on_reply(frame.get_payload_as_bytes())
        elif kind is _CLOSE:
            self.on_close(transport, frame.get_payload_as_bytes())

    def on_reply(self, data: bytes) -> None:
        group = self.group
        group.replies += 1
        try:
            reply = json.loads(data)
        except ValueError:
            group.errors[f"unparsable frame {data[:60]!r}"] += 1
            return
        success = reply.get("success") if isinstance(reply, dict) else None
        if isinstance(success, dict) and success.get("message") == "subscribed":
            if self.streams is None:
                self.streams = list(success.get("streams") or [])
        elif isinstance(reply, dict) and "error" in reply:
            group.errors[f"error reply {reply['error']!r}"[:120]] += 1

    def on_close(self, transport: WSTransport, payload: bytes) -> None:
        code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
        if self.close_code is None:
            self.close_code = code
            self.closed_at_us = _now_us()
            if not self.closing:
                self.group.closes[code] += 1
        if not self.closing:
            transport.send_close(WSCloseCode.OK)
        transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.disconnected = True
        if self.close_code is None and not self.closing:
            self.group.dropped += 1
            self.closed_at_us = _now_us()


def ws_header_size(payload_size: int) -> int:
    """Bytes of an unmasked frame header (server to client, RFC 6455 §5.2) for this payload.

    >>> ws_header_size(125), ws_header_size(126), ws_header_size(65535), ws_header_size(65536)
    (2, 4, 4, 10)
    """
    return 2 if payload_size < 126 else 4 if payload_size < 65536 else 10


class WireClient(StreamClient):
    """A fan-out client that also counts the bytes of its data frames and reads RSV1.

    ``offered``: the client sent :data:`bench.deflate.OFFER`; ``deflate``: the server accepted
    it. Every data frame adds its header and payload size to ``wire_bytes``; only a probe
    inflates a compressed frame (with a fresh decompressor, RFC 7692 §7.2.2) to read its
    ``"ts"``, the others just count, so inflating does not make this process the bottleneck.
    RSV1 on a connection that did not negotiate compression is an error.
    """

    def __init__(self, group: Group, probe: bool = True) -> None:
        super().__init__(group, probe)
        self.offered = False
        self.deflate = False
        self.answer = "not connected"

    def on_ws_connected(self, transport: WSTransport) -> None:
        super().on_ws_connected(transport)
        # Several header lines mean one comma-separated list (RFC 9110 §5.3).
        header = ",".join(transport.response.headers.getall(_EXTENSIONS, []))
        if self.offered:
            self.answer = judge_answer(header)
            self.deflate = self.answer == "accepted"
        else:
            self.answer = "not offered" if not header else "answered without an offer"

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        size = frame.payload_size
        if size < MIN_BODY:
            self.on_short_frame(transport, frame)
            return
        self.frames += 1
        # ws_header_size, inlined: one call more per frame shows at half a million frames/s.
        self.wire_bytes += size + (2 if size < 126 else 4 if size < 65536 else 10)
        rsv1 = frame.rsv1
        if rsv1:
            self.compressed += 1
            if not self.deflate:
                self.group.errors[_RSV1_UNASKED] += 1
                return
        if not self.probe:
            return
        data = frame.get_payload_as_bytes()
        if rsv1:
            try:
                data = inflate(data)
            except ValueError as exc:
                self.group.errors[f"compressed frame: {exc}"] += 1
                return
        self.on_probe(data)

    def on_short_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if not frame.rsv1:
            super().on_short_frame(transport, frame)
        elif not self.deflate:
            self.group.errors[_RSV1_UNASKED] += 1
        elif frame.msg_type is _TEXT:
            try:
                self.on_reply(inflate(frame.get_payload_as_bytes()))
            except ValueError as exc:
                self.group.errors[f"compressed frame: {exc}"] += 1


class ExchangeClient(StreamClient):
    """A client of the exchange scenario: several streams, so a subscribed reply that may be
    longer than ``MIN_BODY``.

    Until that reply has come, frames take the slow path (a reply is told by its first bytes,
    anything else counts as data); afterwards it is a plain :class:`StreamClient`.
    """

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if self.streams is not None:
            super().on_ws_frame(transport, frame)
            return
        kind = frame.msg_type
        if kind is _CLOSE:
            self.on_close(transport, frame.get_payload_as_bytes())
        elif kind is _TEXT:
            data = frame.get_payload_as_bytes()
            if data.startswith(_REPLY_PREFIXES) or len(data) < MIN_BODY:
                self.on_reply(data)
            else:
                self.frames += 1
                if self.probe:
                    self.on_probe(data)


class BookClient(StreamClient):
    """A late order-book subscriber; :class:`bench.bookcheck.BookCheck` judges its frames.

    PROTOCOL §6: a new subscriber of ``<m>.<x>-inc`` receives the cached snapshot, every cached
    increment in order, then the ``subscribed`` reply, then live increments.
    """

    def __init__(self, group: Group, probe: bool = True) -> None:
        super().__init__(group, probe)
        self.book = BookCheck()
        self.other_faults: list[str] = []  # frames that are no book frame at all

    def _fault(self, text: str) -> None:
        if len(self.other_faults) < _MAX_FAULTS:
            self.other_faults.append(text)

    def on_reply(self, data: bytes) -> None:
        super().on_reply(data)
        reply = json.loads(data)
        success = reply.get("success") if isinstance(reply, dict) else None
        streams = success.get("streams") if isinstance(success, dict) else None
        if isinstance(streams, list) and any(
            isinstance(s, str) and s.endswith("-inc") for s in streams
        ):
            self.book.reply()

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type is _CLOSE:
            self.on_close(transport, frame.get_payload_as_bytes())
            return
        if frame.msg_type is not _TEXT:
            return
        data = frame.get_payload_as_bytes()
        try:
            message = json.loads(data)
        except ValueError:
            self._fault(f"unparsable frame {data[:60]!r}")
            return
        if not isinstance(message, dict) or len(message) != 1:
            self._fault(f"unexpected frame {data[:80]!r}")
            return
        if "success" in message or "error" in message:
            self.on_reply(data)
            return
        ((key, body),) = message.items()
        self.frames += 1
        sequence = body.get("sequence") if isinstance(body, dict) else None
        if not isinstance(sequence, int):
            self._fault(f"no sequence in {key}")
        elif key.endswith("-snap"):
            self.book.frame("snap", sequence, live=self.book.replied)
        elif key.endswith("-inc"):
            self.book.frame("inc", sequence, live=self.book.replied)
            sent = body.get("ts")
            # Replayed increments were published before this client subscribed: only live
            # ones (after the subscribed reply) say something about latency.
            if self.book.replied and isinstance(sent, int):
                self.group.latencies.append(_now_us() - sent)
        else:
            self._fault(f"unexpected stream {key}")


_KINDS: dict[str, type[StreamClient]] = {
    "stream": StreamClient,
    "book": BookClient,
    "wire": WireClient,
    "exchange": ExchangeClient,
}


def _socket_factory(rcvbuf: int) -> Any:
    def make(_url: Any) -> socket.socket:
        # A small receive buffer set before connecting (it also turns off autotuning), so a
        # stalled reader backs up into the server within seconds, not after megabytes.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        return sock

    return make


def _describe(exc: BaseException) -> str:
    text = str(exc).split("\n", 1)[0][:100]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class LoadGen:
    """This process's clients, and the commands that the orchestrator sends."""

    def __init__(self) -> None:
        self.groups: dict[str, Group] = {}
        self.loop = asyncio.get_running_loop()

    @staticmethod
    def _clock() -> dict[str, float]:
        return {"cpu_s": time.process_time(), "mono_s": time.monotonic()}

    def _group(self, name: str) -> Group:
        group = self.groups.get(name)
        if group is None:
            group = self.groups[name] = Group(name)
        return group

    def _selected(self, groups: list[str] | None) -> list[Group]:
        return [self.groups[n] for n in groups] if groups else list(self.groups.values())

    async def connect(
        self,
        *,
        group: str,
        urls: list[str],
        tokens_file: str | None = None,
        token_offset: int = 0,
        concurrency: int = 100,
        rcvbuf: int | None = None,
        kind: str = "stream",
        expect_streams: int | None = None,
        reply_timeout: float = 10.0,
        probe_every: int = 1,
        deflate_offer: str | None = None,
    ) -> dict[str, Any]:
        """Open ``len(urls)`` clients, at most ``concurrency`` handshakes in flight.

        ``deflate_offer``: the ``Sec-WebSocket-Extensions`` each client sends (``kind="wire"``
        only); the reply counts how the server answered, in ``extensions``.
        """
        target = self._group(group)
        cls = _KINDS[kind]
        if deflate_offer is not None and cls is not WireClient:
            raise ValueError("only wire clients offer compression")

        def make(probe: bool, index: int) -> StreamClient:
            client = cls(target, probe)
            client.index = token_offset + index
            if isinstance(client, WireClient):
                client.offered = deflate_offer is not None
            return client

        tokens: list[str] = []
        if tokens_file is not None:
            with open(tokens_file, encoding="ascii") as lines:
                tokens = lines.read().split()[token_offset : token_offset + len(urls)]
            if len(tokens) < len(urls):
                raise ValueError(f"{tokens_file} has too few tokens for {len(urls)} clients")
        factory = _socket_factory(rcvbuf) if rcvbuf else None
        gate = asyncio.Semaphore(concurrency)
        failures: Counter[str] = Counter()
        clients: list[StreamClient] = []

        async def open_one(index: int) -> None:
            headers = {"Authorization": f"Bearer {tokens[index]}"} if tokens else {}
            if deflate_offer is not None:
                headers[_EXTENSIONS] = deflate_offer
            async with gate:
                try:
                    _, client = await ws_connect(
                        lambda: make(index % probe_every == 0, index),
                        urls[index],
                        extra_headers=headers or None,
                        socket_factory=factory,
                        websocket_handshake_timeout=_HANDSHAKE_TIMEOUT,
                        read_buffer_init_size=4096,
                        max_redirects=0,
                    )
                except Exception as exc:
                    failures[_describe(exc)] += 1
                    return
            clients.append(cast(StreamClient, client))

        cpu0 = time.process_time()
        start = time.monotonic()
        await asyncio.gather(*(open_one(i) for i in range(len(urls))))
        elapsed = time.monotonic() - start
        cpu = time.process_time() - cpu0
        target.clients.extend(clients)

        # Every client first hears the reply to its ?stream= subscription (PROTOCOL §4).
        deadline = time.monotonic() + reply_timeout
        while any(c.streams is None and c.is_open for c in clients):
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.01)
        replied = [c for c in clients if c.streams is not None]
        wrong = (
            sum(1 for c in replied if len(c.streams or ()) != expect_streams)
            if expect_streams is not None
            else 0
        )
        extensions = Counter(c.answer for c in clients if isinstance(c, WireClient))
        gc.collect()
        gc.freeze()  # the clients live to the end: keep them out of every later collection
        return {
            "extensions": dict(extensions),
            "requested": len(urls),
            "connected": len(clients),
            "failed": sum(failures.values()),
            "errors": dict(failures.most_common(5)),
            "elapsed_s": elapsed,
            "connect_cpu_s": cpu,
            "subscribed": len(replied),
            "subscribed_wrong_streams": wrong,
            **self._clock(),
        }

    async def begin(self, step_start_us: int, groups: list[str] | None = None) -> dict[str, Any]:
        for group in self._selected(groups):
            group.begin(step_start_us)
        return self._clock()

    async def count(self, groups: list[str] | None = None) -> dict[str, Any]:
        selected = self._selected(groups)
        return {
            "frames": sum(g.frames for g in selected),
            "by_group": {g.name: g.frames for g in selected},
            **self._clock(),
        }

    async def snapshot(self, groups: list[str] | None = None) -> dict[str, Any]:
        """This step's figures per group; the latencies are dropped afterwards."""
        result: dict[str, Any] = {}
        for group in self._selected(groups):
            latencies = group.latencies
            result[group.name] = {
                "clients": len(group.clients),
                "open": group.open,
                "frames": group.frames,
                "wire_bytes": group.wire_bytes,
                "compressed": group.compressed,
                "late": group.late,
                "replies": group.replies,
                "histogram": histogram(latencies),
                "max_us": max(latencies) if latencies else None,
                "min_us": min(latencies) if latencies else None,
                "closes": {str(code): n for code, n in group.closes.items()},
                "dropped": group.dropped,
                "errors": dict(group.errors.most_common(5)),
            }
            group.latencies = array("q")
        return {"groups": result, **self._clock()}

    async def pause(self, group: str, seconds: float | None = None) -> dict[str, Any]:
        """Stop reading on every open client of ``group`` (for ``seconds``, or until resumed)."""
        paused = 0
        for client in self.groups[group].clients:
            if client.is_open and client.transport is not None:
                client.transport.underlying_transport.pause_reading()
                paused += 1
        if seconds is not None:
            self.loop.call_later(seconds, self._resume, group)
        return {"paused": paused, **self._clock()}

    def _resume(self, group: str) -> int:
        resumed = 0
        for client in self.groups[group].clients:
            if not client.disconnected and client.transport is not None:
                client.transport.underlying_transport.resume_reading()
                resumed += 1
        return resumed

    async def resume(self, group: str) -> dict[str, Any]:
        return {"resumed": self._resume(group), **self._clock()}

    async def ports(self, group: str) -> dict[str, Any]:
        """The local TCP port of each open client of ``group`` (to find it in ``ss``)."""
        ports = []
        for client in self.groups[group].clients:
            if client.is_open and client.transport is not None:
                name = client.transport.underlying_transport.get_extra_info("sockname")
                if name:
                    ports.append(int(name[1]))
        return {"ports": ports, **self._clock()}

    async def split(self, group: str, into: str, owners: dict[str, str]) -> dict[str, Any]:
        """Move each client of ``group`` to the group ``<into>@<owner>``, its owner found by
        its local TCP port in ``owners`` (``"?"`` when it is not there: gone, or unknown).

        Returns each new group's client indices (``StreamClient.index``). Counters a client
        brought along from ``group`` (closes, errors) stay there: split before measuring.
        """
        moved: dict[str, list[int]] = {}
        old = self.groups[group]
        for client in old.clients:
            port = None
            if client.transport is not None and not client.disconnected:
                name = client.transport.underlying_transport.get_extra_info("sockname")
                port = str(name[1]) if name else None
            target = self._group(f"{into}@{owners.get(port or '', '?')}")
            client.group = target
            target.clients.append(client)
            moved.setdefault(target.name, []).append(client.index)
        old.clients = []
        return {"groups": moved, **self._clock()}

    async def send(self, group: str, text: str) -> dict[str, Any]:
        """Send one text message from every open client of ``group``."""
        sent = 0
        payload = text.encode()
        for client in self.groups[group].clients:
            if client.is_open and client.transport is not None:
                client.transport.send(_TEXT, payload)
                sent += 1
        return {"sent": sent, **self._clock()}

    async def outcomes(self, group: str) -> dict[str, Any]:
        """How each client of ``group`` ended up: close code, dropped, or still open."""
        tally: Counter[str] = Counter()
        frames = []
        for client in self.groups[group].clients:
            frames.append(client.frames)
            if client.close_code is not None:
                tally[f"closed {client.close_code}"] += 1
            elif client.disconnected:
                tally["dropped without close frame"] += 1
            else:
                tally["open"] += 1
        return {"outcomes": dict(tally), "frames": frames, **self._clock()}

    async def book_report(
        self, group: str, final_seq: int, skipped: int | None = None
    ) -> dict[str, Any]:
        """Order-book verification of every client of ``group`` (PROTOCOL §6).

        ``skipped``: the sequence number the publisher left out on purpose, if it did.
        """
        clients = [c for c in self.groups[group].clients if isinstance(c, BookClient)]
        ok = 0
        problems: Counter[str] = Counter()
        for client in clients:
            issues = client.other_faults + client.book.issues(final_seq, skipped)
            if not client.is_open:
                issues.append(f"closed ({client.close_code})")
            if issues:
                problems[issues[0]] += 1
            else:
                ok += 1
        books = [c.book for c in clients]
        return {
            "clients": len(clients),
            "verified": ok,
            "failed": len(clients) - ok,
            "problems": dict(problems.most_common(5)),
            "increments_received": sum(b.increments for b in books),
            "replayed_increments": sum(b.replayed_increments for b in books),
            "replay_gaps": sum(b.replay_gaps for b in books),
            "empty_replays": sum(b.empty_replay for b in books),
            "saw_gap_live": sum(bool(b.live_gaps) for b in books),
            "resynced_live": sum(b.resyncs > 0 for b in books),
            "histogram": histogram(self.groups[group].latencies),
            **self._clock(),
        }

    async def close(self, groups: list[str] | None = None, wait: float = 10.0) -> dict[str, Any]:
        """Close every open client with 1000 and wait (bounded) until they are gone."""
        clients = [c for g in self._selected(groups) for c in g.clients]
        for client in clients:
            if client.is_open and client.transport is not None:
                client.closing = True
                client.transport.send_close(WSCloseCode.OK)
        deadline = time.monotonic() + wait
        while any(not c.disconnected for c in clients) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        forced = 0
        for client in clients:
            if not client.disconnected and client.transport is not None:
                client.transport.disconnect(graceful=False)
                forced += 1
        await asyncio.sleep(0)
        for group in self._selected(groups):
            group.clients.clear()
        gc.unfreeze()
        gc.collect()
        return {"closed": len(clients), "forced": forced, **self._clock()}


async def _main() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    gen = LoadGen()
    await rpc.serve_async(
        {
            "connect": gen.connect,
            "begin": gen.begin,
            "count": gen.count,
            "snapshot": gen.snapshot,
            "pause": gen.pause,
            "resume": gen.resume,
            "ports": gen.ports,
            "send": gen.send,
            "split": gen.split,
            "outcomes": gen.outcomes,
            "book_report": gen.book_report,
            "close": gen.close,
        }
    )


def main() -> None:
    uvloop.run(_main())


if __name__ == "__main__":
    main()
