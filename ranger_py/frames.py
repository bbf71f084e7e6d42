"""RFC 6455 framing: server frames out, client frames in. Pure: bytes in, values out.

Outbound frames are built here by hand because they are trivial and hot: a server frame is never
masked (RFC 6455 §5.1), so one encoded frame serves every subscriber of a message. A compressed
frame (permessage-deflate, RFC 7692) is deflated without context takeover, so it too is the same
bytes for every client that negotiated the same window.

Inbound frames are parsed by wsproto's sans-I/O ``FrameProtocol`` (maintained, RFC-checked): it
unmasks, reassembles fragments, validates UTF-8 incrementally and close payloads, and reports
violations with the close code the RFC names. We add the message size limit it lacks, and it
applies to what a compressed message inflates to. It is not wsproto's public API, so it is reached
only through wsproto_adapter.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

from ranger_py.errors import CloseCode, CloseConnection
from ranger_py.wsproto_adapter import Opcode, ParseFailed, new_parser, parser_idle

__all__ = [
    "PING",
    "Close",
    "DeflatedFrames",
    "FrameReader",
    "Message",
    "Ping",
    "Pong",
    "encode_binary",
    "encode_binary_deflated",
    "encode_close",
    "encode_pong",
    "encode_text",
    "encode_text_deflated",
]

_FIN_TEXT = 0x81
_FIN_BINARY = 0x82
_FIN_CLOSE = 0x88
_FIN_PONG = 0x8A
_RSV1 = 0x40  # RFC 7692 §6: "Per-Message Compressed", on a message's first frame
# RFC 7692 §7.2.1: what a sync flush ends with, stripped from every compressed message.
_SYNC_TAIL = b"\x00\x00\xff\xff"

# A server ping with no payload: the same two bytes every time.
PING = b"\x89\x00"


def _header(first: int, length: int) -> bytes:
    # RFC 6455 §5.2: 7-bit length, or 126 + 16-bit, or 127 + 64-bit; never the mask bit.
    if length < 126:
        return bytes((first, length))
    if length < 0x10000:
        return struct.pack("!BBH", first, 126, length)
    return struct.pack("!BBQ", first, 127, length)


def encode_text(payload: bytes) -> bytes:
    """One unfragmented text frame carrying ``payload`` (already UTF-8)."""
    return _header(_FIN_TEXT, len(payload)) + payload


def encode_binary(payload: bytes) -> bytes:
    return _header(_FIN_BINARY, len(payload)) + payload


def _deflate(payload: bytes, window_bits: int) -> bytes:
    # A fresh compressor per message: no context takeover, so no state outlives the call, and the
    # result does not depend on what this or any client was sent before.
    compressor = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -window_bits)
    data = compressor.compress(payload) + compressor.flush(zlib.Z_SYNC_FLUSH)
    return data[:-4] if data.endswith(_SYNC_TAIL) else data


def encode_text_deflated(payload: bytes, window_bits: int = 15) -> bytes:
    """One unfragmented compressed text frame (RSV1) carrying ``payload`` (already UTF-8)."""
    data = _deflate(payload, window_bits)
    return _header(_FIN_TEXT | _RSV1, len(data)) + data


def encode_binary_deflated(payload: bytes, window_bits: int = 15) -> bytes:
    data = _deflate(payload, window_bits)
    return _header(_FIN_BINARY | _RSV1, len(data)) + data


class DeflatedFrames:
    """Compressed text frames of payloads sent again and again (order-book replays), kept.

    Keyed by the payload's bytes, so equal payloads share an entry whatever object carries them
    (a bytes object computes its hash once). At most ``budget`` bytes of payloads and frames are
    held; past it the oldest entries go.
    """

    __slots__ = ("_budget", "_frames", "_held")

    def __init__(self, budget: int) -> None:
        self._budget = budget
        self._frames: dict[tuple[bytes, int], bytes] = {}
        self._held = 0

    def __len__(self) -> int:
        return len(self._frames)

    def frame(self, payload: bytes, window_bits: int) -> bytes:
        key = (payload, window_bits)
        found = self._frames.get(key)
        if found is not None:
            return found
        frame = encode_text_deflated(payload, window_bits)
        cost = len(payload) + len(frame)
        if cost > self._budget:
            return frame
        frames = self._frames
        while self._held + cost > self._budget:
            oldest = next(iter(frames))
            self._held -= len(oldest[0]) + len(frames.pop(oldest))
        frames[key] = frame
        self._held += cost
        return frame


def encode_pong(payload: bytes) -> bytes:
    return _header(_FIN_PONG, len(payload)) + payload


def encode_close(code: int, reason: str = "") -> bytes:
    """A close frame; the reason is cut to fit a control frame (125 bytes, §5.5)."""
    data = reason.encode("utf-8")[:123]
    # Never cut a UTF-8 sequence in half: the peer would fail us with 1007.
    data = data.decode("utf-8", "ignore").encode("utf-8")
    payload = struct.pack("!H", code) + data
    return _header(_FIN_CLOSE, len(payload)) + payload


@dataclass(frozen=True, slots=True)
class Message:
    """A complete data message: ``str`` for text frames, ``bytes`` for binary ones."""

    data: str | bytes


@dataclass(frozen=True, slots=True)
class Ping:
    payload: bytes


@dataclass(frozen=True, slots=True)
class Pong:
    payload: bytes


@dataclass(frozen=True, slots=True)
class Close:
    """The peer's close frame; ``code`` is 1005 when it carried none (§7.1.5)."""

    code: int
    reason: str


Event = Message | Ping | Pong | Close


class FrameReader:
    """Turns bytes from one client into events, enforcing ``max_size`` per message.

    With ``inflate``, compressed messages are inflated first; the limit counts inflated bytes.

    Raises ``CloseConnection`` with the RFC's code on any violation; the caller closes with it.
    """

    __slots__ = ("_failed", "_max_size", "_parts", "_protocol", "_size")

    def __init__(self, max_size: int, *, inflate: bool = False) -> None:
        # With permessage-deflate negotiated, RSV1 messages are inflated to at most max_size
        # bytes (then 1009); without it, RSV1 is a protocol error (1002).
        self._protocol = new_parser(max_size if inflate else None)
        self._max_size = max_size
        self._parts: list[str | bytes] = []
        self._size = 0
        self._failed = False

    @property
    def idle(self) -> bool:
        """No partial frame or message held: the reader can be dropped and made anew later.

        Asks wsproto's private decoder state (see wsproto_adapter) so that an idle connection
        keeps no parser at all: ~1 KB each, the largest part of its footprint.
        """
        if self._failed:
            return False  # kept, so that what follows the violation is never parsed again
        return not self._parts and parser_idle(self._protocol)

    def feed(self, data: bytes) -> Iterator[Event]:
        """Yield the events ``data`` completes, lazily: those before a violation still count.

        After a violation the stream has no frame boundaries any more: every later byte is
        dropped unread. (wsproto's parser stops at the failure but would keep buffering.)
        """
        if self._failed:
            return
        self._protocol.receive_bytes(data)
        try:
            for frame in self._protocol.received_frames():
                event = self._event(frame.opcode, frame.payload, frame.message_finished)
                if event is not None:
                    yield event
        except ParseFailed as exc:
            self._fail()
            code = CloseCode(int(exc.code))
            # An inflated message over the limit is reported by the extension, as wsproto's
            # generic "error in extension": say what it is, as for a plain message.
            reason = "message too big" if code is CloseCode.MESSAGE_TOO_BIG else str(exc)[:100]
            raise CloseConnection(code, reason) from exc
        except CloseConnection:
            self._fail()
            raise

    def _fail(self) -> None:
        self._failed = True
        self._parts = []
        self._protocol = new_parser()  # lets the old buffer go

    def _event(self, opcode: Opcode, payload: object, finished: bool) -> Event | None:
        if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
            assert isinstance(payload, (str, bytes))
            # Checked on every fragment, so an oversized message is refused before it is buffered
            # whole (wsproto streams partial frames). The limit is in bytes: text is counted as
            # the UTF-8 it arrived as, which is its length when it is ASCII.
            if type(payload) is str and not payload.isascii():
                self._size += len(payload.encode())
            else:
                self._size += len(payload)
            if self._size > self._max_size:
                raise CloseConnection(CloseCode.MESSAGE_TOO_BIG, "message too big")
            self._parts.append(payload)
            if not finished:
                return None
            parts, self._parts, self._size = self._parts, [], 0
            if opcode is Opcode.TEXT:
                return Message("".join(parts))  # type: ignore[arg-type]
            return Message(b"".join(parts))  # type: ignore[arg-type]
        if opcode is Opcode.PING:
            assert isinstance(payload, bytes)
            return Ping(payload)
        if opcode is Opcode.PONG:
            assert isinstance(payload, bytes)
            return Pong(payload)
        if opcode is Opcode.CLOSE:
            assert isinstance(payload, tuple)
            code, reason = payload
            return Close(int(code), reason)
        return None  # pragma: no cover - wsproto rejects every other opcode itself
