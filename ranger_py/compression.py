"""permessage-deflate negotiation (RFC 7692 §7.1) on ``Sec-WebSocket-Extensions``. Pure.

ranger-py compresses a broadcast once, for every recipient, and inflates each client message on
its own, so it accepts an offer only on terms that need no compression state kept between
messages: its answer always carries ``server_no_context_takeover`` (§7.1.1.1 lets a server add it
unasked) and ``client_no_context_takeover`` (§7.1.1.2 lets a server add it to any answer). The
server's window is 15 bits unless the client asks for a smaller one (``server_max_window_bits``,
§7.1.2.1), which is then answered with that value and used for that client's frames.

An offer is declined, never failed: a header that cannot be parsed, an unknown or repeated
parameter or a bad value (§7) makes ranger-py answer without the extension, as before.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["EXTENSION", "MAX_WINDOW_BITS", "Deflate", "negotiate", "parse_offers"]

EXTENSION = "permessage-deflate"
MAX_WINDOW_BITS = 15
# zlib cannot compress with an 8-bit raw deflate window (it silently uses 9, which a peer that
# asked for 8 could not inflate), so an offer of server_max_window_bits=8 is declined.
_MIN_SERVER_WINDOW_BITS = 9

_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_PARAM = re.compile(
    rf'\s*(?P<name>{_TOKEN})\s*(?:=\s*(?:(?P<token>{_TOKEN})|"(?P<quoted>(?:[^"\\]|\\.)*)"))?\s*'
)
_NAME = re.compile(rf"\s*({_TOKEN})\s*")
_ESCAPE = re.compile(r"\\(.)")
# §7.1.2.1 and §7.1.2.2: a decimal integer from 8 to 15, without leading zeros.
_WINDOW_BITS = re.compile(r"[89]|1[0-5]")


@dataclass(frozen=True, slots=True)
class Deflate:
    """An accepted offer: the window the server compresses with, and the header it answers."""

    window_bits: int
    response: str


def _split(text: str, separator: str) -> list[str]:
    """``text`` cut at each ``separator`` outside a quoted string."""
    parts: list[str] = []
    start = 0
    quoted = escaped = False
    for i, char in enumerate(text):
        if escaped:
            escaped = False
        elif quoted and char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == separator and not quoted:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


Offer = tuple[str, list[tuple[str, str | None]]]


def _offer(element: str) -> Offer | None:
    """One extension of the list (RFC 6455 §9.1), or None when it is not well formed."""
    name, *raw_params = _split(element, ";")
    match = _NAME.fullmatch(name)
    if match is None:
        return None
    params: list[tuple[str, str | None]] = []
    for raw in raw_params:
        param = _PARAM.fullmatch(raw)
        if param is None:
            return None
        value = param["token"]
        if param["quoted"] is not None:
            value = _ESCAPE.sub(r"\1", param["quoted"])
        params.append((param["name"].lower(), value))
    return match[1].lower(), params


def parse_offers(header: str) -> list[Offer]:
    """Every well-formed extension offered, in order (several headers arrive comma-joined).

    Empty list elements are skipped (RFC 9110 §5.6.1); a malformed one is left out alone.
    """
    offers = []
    for element in _split(header, ","):
        if not element.strip():
            continue
        offer = _offer(element)
        if offer is not None:
            offers.append(offer)
    return offers


def _accept(params: list[tuple[str, str | None]]) -> Deflate | None:
    seen: set[str] = set()
    window_bits = MAX_WINDOW_BITS
    answer = [EXTENSION, "server_no_context_takeover", "client_no_context_takeover"]
    for name, value in params:
        if name in seen:
            return None  # §7: the same parameter twice
        seen.add(name)
        if name in ("server_no_context_takeover", "client_no_context_takeover"):
            if value is not None:
                return None
        elif name == "server_max_window_bits":
            if value is None or not _WINDOW_BITS.fullmatch(value):
                return None
            window_bits = int(value)
            if window_bits < _MIN_SERVER_WINDOW_BITS:
                return None
            # §7.1.2.1: accepting this parameter means answering it, here with the same value.
            answer.append(f"server_max_window_bits={window_bits}")
        elif name == "client_max_window_bits":
            # The client may compress with any window up to what it says: each message is
            # inflated with a fresh 15-bit window, which reads them all. Not answered (§7.1.2.2
            # makes that optional).
            if value is not None and not _WINDOW_BITS.fullmatch(value):
                return None
        else:
            return None  # §7: a parameter not defined for an offer
    return Deflate(window_bits, "; ".join(answer))


def negotiate(header: str | None) -> Deflate | None:
    """The first permessage-deflate offer of ``header`` that can be accepted, or None."""
    if not header:
        return None
    for name, params in parse_offers(header):
        if name == EXTENSION:
            accepted = _accept(params)
            if accepted is not None:
                return accepted
    return None
