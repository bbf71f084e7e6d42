"""permessage-deflate (RFC 7692) as the benchmark's clients need it: the offer, reading the
server's answer, and inflating one message. Pure.

The clients only read compressed messages, they never send any, and inflate each message with a
fresh decompressor: that is right only when the server keeps no compression context between
messages, so an answer without ``server_no_context_takeover`` cannot serve them (§7.1.1.1).
"""

from __future__ import annotations

import zlib

__all__ = ["OFFER", "inflate", "judge_answer"]

# What the compression scenario's clients send in Sec-WebSocket-Extensions, as browsers do.
OFFER = "permessage-deflate; client_max_window_bits"
# §7.2.1: the sender removes this tail of the sync flush, the receiver puts it back.
_SYNC_TAIL = b"\x00\x00\xff\xff"
_EXTENSION = "permessage-deflate"
_FLAGS = ("server_no_context_takeover", "client_no_context_takeover")
_WINDOWS = ("server_max_window_bits", "client_max_window_bits")


def inflate(payload: bytes, limit: int = 1 << 20) -> bytes:
    """One compressed message's text, inflated with a decompressor of its own (§7.2.2).

    >>> compressor = zlib.compressobj(6, zlib.DEFLATED, -15)
    >>> data = compressor.compress(b'{"ts":12}' * 50) + compressor.flush(zlib.Z_SYNC_FLUSH)
    >>> data.endswith(b"\\x00\\x00\\xff\\xff")
    True
    >>> inflate(data[:-4])[:18]
    b'{"ts":12}{"ts":12}'
    >>> inflate(data[:-4], limit=100)
    Traceback (most recent call last):
    ...
    ValueError: inflates to more than 100 bytes
    >>> inflate(b"not deflate")
    Traceback (most recent call last):
    ...
    ValueError: not a raw deflate stream: invalid block type
    """
    decompressor = zlib.decompressobj(-15)
    try:
        text = decompressor.decompress(payload + _SYNC_TAIL, limit)
    except zlib.error as exc:
        reason = str(exc).rsplit(": ", 1)[-1]
        raise ValueError(f"not a raw deflate stream: {reason}") from exc
    if decompressor.unconsumed_tail:
        raise ValueError(f"inflates to more than {limit} bytes")
    return text


def _window(value: str | None) -> bool:
    return value is not None and value.isdigit() and 8 <= int(value) <= 15


def judge_answer(header: str | None) -> str:
    """How the server answered :data:`OFFER`: ``accepted``, ``declined`` (no extension), or
    ``unusable: <why>`` (an answer these clients cannot read, or that breaks RFC 7692).

    >>> judge_answer("permessage-deflate; server_no_context_takeover; client_no_context_takeover")
    'accepted'
    >>> judge_answer("Permessage-Deflate;server_no_context_takeover;server_max_window_bits=12")
    'accepted'
    >>> judge_answer(None), judge_answer("")
    ('declined', 'declined')
    >>> judge_answer("permessage-deflate")
    'unusable: the server keeps its compression context'
    >>> judge_answer("x-webkit-deflate-frame")
    'unusable: answered x-webkit-deflate-frame, not offered'
    >>> judge_answer("permessage-deflate; server_no_context_takeover, permessage-deflate")
    'unusable: answered 2 extensions'
    >>> judge_answer("permessage-deflate; server_no_context_takeover; server_max_window_bits=16")
    'unusable: bad server_max_window_bits=16'
    """
    if not header or not header.strip():
        return "declined"
    extensions = [part for part in header.split(",") if part.strip()]
    if len(extensions) != 1:
        return f"unusable: answered {len(extensions)} extensions"
    name, *params = (part.strip() for part in extensions[0].split(";"))
    if name.lower() != _EXTENSION:
        return f"unusable: answered {name[:40]}, not offered"
    seen = set()
    for param in params:
        key, sep, value = (part.strip() for part in param.partition("="))
        key = key.lower()
        if key in seen:
            return f"unusable: {key} twice"
        seen.add(key)
        if key in _FLAGS and not sep:
            continue
        if key in _WINDOWS and _window(value.strip('"')):
            continue
        return f"unusable: bad {param[:40]}"
    if "server_no_context_takeover" not in seen:
        return "unusable: the server keeps its compression context"
    return "accepted"
