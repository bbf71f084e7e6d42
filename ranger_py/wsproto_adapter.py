"""Every use ranger-py makes of wsproto beyond its documented API (``WSConnection``), in one place.

The inbound frame parser is wsproto's sans-I/O ``FrameProtocol`` and the handshake answer is its
``generate_accept_token``: both work well, but neither module is part of wsproto's public API, so
a wsproto release may change them without notice. Each function below says what it relies on and
since which version; ``tests/unit/test_adapters.py`` checks each reliance and names the version
when an upgrade breaks it.
"""

from __future__ import annotations

import zlib
from typing import Any

# Relies on (wsproto 1.3.2): the hooks of wsproto.extensions.Extension as FrameProtocol's decoder
# calls them (see BoundedInflate).
from wsproto.extensions import Extension

# Relies on (wsproto 1.3.2): the undocumented module wsproto.frame_protocol, with
# FrameProtocol(client, extensions), .receive_bytes(data), .received_frames() yielding frames with
# .opcode, .payload (str for text, bytes for binary/ping/pong, (code, reason) for close) and
# .message_finished; ParseFailed carrying the close code the RFC names in .code; Opcode; and, for
# the extension's hooks, CloseReason, FrameDecoder and RsvBits.
from wsproto.frame_protocol import (
    CloseReason,
    FrameDecoder,
    FrameProtocol,
    Opcode,
    ParseFailed,
    RsvBits,
)

# Relies on (wsproto 1.3.2): wsproto.utilities.generate_accept_token(key) -> base64 bytes.
from wsproto.utilities import generate_accept_token

__all__ = [
    "BoundedInflate",
    "CloseReason",
    "Extension",
    "FrameProtocol",
    "Opcode",
    "ParseFailed",
    "RsvBits",
    "accept_token",
    "new_parser",
    "parser_idle",
]

# RFC 7692 §7.2.2: the tail the sender stripped from each compressed message.
_TAIL = b"\x00\x00\xff\xff"
_NO_RSV = RsvBits(False, False, False)
_RSV1 = RsvBits(True, False, False)


class BoundedInflate(Extension):
    """permessage-deflate for inbound messages, without context takeover, never over ``limit``.

    wsproto's own ``PerMessageDeflate`` inflates without a bound and keeps its decompressor
    between messages; this one makes a fresh decompressor per compressed message, asks it for at
    most ``limit`` bytes in all (a deflate bomb costs the limit, then 1009), and lets it go at the
    message's end, so a parser between messages holds no zlib state.

    Relies on (wsproto 1.3.2): ``FrameProtocol`` keeps the extensions whose ``enabled()`` is true,
    and its decoder calls, for every frame, control frames included, ``frame_inbound_header`` once
    the header is read (a returned ``RsvBits`` allows those bits, a ``CloseReason`` fails the
    connection with it), ``frame_inbound_payload_data`` with each unmasked chunk of the payload
    (its return replaces the chunk), and ``frame_inbound_complete`` when the frame ends (its bytes
    are appended): all before the message decoder checks UTF-8.
    """

    name = "permessage-deflate"

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._room = 0  # bytes the current message may still inflate to
        self._inflater: Any = None  # a zlib decompressor while a compressed message is read
        self._in_frame = False  # the frame being read belongs to a compressed message

    def enabled(self) -> bool:
        return True

    def offer(self) -> bool:
        return False  # server side only: the offer is answered in ranger_py.compression

    def frame_inbound_header(
        self, proto: FrameDecoder | FrameProtocol, opcode: Opcode, rsv: RsvBits, length: int
    ) -> CloseReason | RsvBits:
        if opcode.iscontrol():
            # RFC 7692 §6.1: never on a control frame; a control frame may come between the
            # fragments of a compressed message and leaves it as it is.
            self._in_frame = False
            return CloseReason.PROTOCOL_ERROR if rsv.rsv1 else _NO_RSV
        if opcode is Opcode.CONTINUATION:
            if rsv.rsv1:
                return CloseReason.PROTOCOL_ERROR  # §6.1: only on a message's first frame
        elif rsv.rsv1:
            self._inflater = zlib.decompressobj(-15)
            self._room = self._limit
        else:
            self._inflater = None
        self._in_frame = self._inflater is not None
        return _RSV1

    def frame_inbound_payload_data(
        self, proto: FrameDecoder | FrameProtocol, data: bytes
    ) -> bytes | CloseReason:
        if not self._in_frame:
            return data
        return self._inflate(data)

    def frame_inbound_complete(
        self, proto: FrameDecoder | FrameProtocol, fin: bool
    ) -> bytes | CloseReason | None:
        if not self._in_frame or not fin:
            return None
        data = self._inflate(_TAIL)
        self._inflater = None
        self._in_frame = False
        return data

    def _inflate(self, data: bytes) -> bytes | CloseReason:
        try:
            # One byte over the room tells "too big" from "exactly the limit"; never 0 (which
            # zlib reads as "no bound").
            out: bytes = self._inflater.decompress(data, self._room + 1)
        except zlib.error:
            self._inflater = None
            return CloseReason.INVALID_FRAME_PAYLOAD_DATA
        if len(out) > self._room:
            self._inflater = None
            return CloseReason.MESSAGE_TOO_BIG
        self._room -= len(out)
        return out


def new_parser(inflate_limit: int | None = None) -> FrameProtocol:
    """A parser for frames a client sends (masked); with ``inflate_limit``, permessage-deflate
    negotiated: compressed messages are inflated to at most that many bytes."""
    if inflate_limit is None:
        return FrameProtocol(client=False, extensions=[])
    return FrameProtocol(client=False, extensions=[BoundedInflate(inflate_limit)])


def parser_idle(parser: FrameProtocol) -> bool:
    """Whether ``parser`` holds no byte of a frame: dropping it now loses nothing.

    Relies on (wsproto 1.3.2): FrameProtocol's private ``_frame_decoder`` (a FrameDecoder), whose
    ``header`` is None between frames and whose ``buffer`` has a ``len`` of the bytes it holds.
    There is no public way to ask; a message split over frames is tracked by the caller.
    """
    decoder = parser._frame_decoder
    return decoder.header is None and not len(decoder.buffer)


def accept_token(key: bytes) -> bytes:
    """``Sec-WebSocket-Accept`` for a client's ``Sec-WebSocket-Key`` (RFC 6455 §4.2.2)."""
    return generate_accept_token(key)
