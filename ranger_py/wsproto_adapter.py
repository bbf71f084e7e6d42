"""Every use ranger-py makes of wsproto beyond its documented API (``WSConnection``), in one place.

The inbound frame parser is wsproto's sans-I/O ``FrameProtocol`` and the handshake answer is its
``generate_accept_token``: both work well, but neither module is part of wsproto's public API, so
a wsproto release may change them without notice. Each function below says what it relies on and
since which version; ``tests/unit/test_adapters.py`` checks each reliance and names the version
when an upgrade breaks it.
"""

from __future__ import annotations

# Relies on (wsproto 1.3.2): the undocumented module wsproto.frame_protocol, with
# FrameProtocol(client, extensions), .receive_bytes(data), .received_frames() yielding frames with
# .opcode, .payload (str for text, bytes for binary/ping/pong, (code, reason) for close) and
# .message_finished; ParseFailed carrying the close code the RFC names in .code; and Opcode.
from wsproto.frame_protocol import FrameProtocol, Opcode, ParseFailed

# Relies on (wsproto 1.3.2): wsproto.utilities.generate_accept_token(key) -> base64 bytes.
from wsproto.utilities import generate_accept_token

__all__ = ["FrameProtocol", "Opcode", "ParseFailed", "accept_token", "new_parser", "parser_idle"]


def new_parser() -> FrameProtocol:
    """A parser for frames a client sends (masked, no extensions negotiated)."""
    return FrameProtocol(client=False, extensions=[])


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
