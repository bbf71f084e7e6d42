"""The client protocol as pure functions: stream names, inbound requests, reply frames.

Owns PROTOCOL §4 (what a client may send and the exact bytes it gets back) and the
``?stream=`` part of §2. No I/O: text in, values or bytes out, client faults raised as the
:mod:`ranger_py.errors` classes that carry their own error reply.

Reply frames are compact JSON with ASCII-only output (``ensure_ascii=True``). Rango writes
non-ASCII characters as raw UTF-8; both forms are the same JSON value to any client, and the
escaped form can always be encoded: a stream name may hold a lone surrogate (JSON input can
spell one as ``"\\ud800"``), which has no UTF-8 encoding.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal
from urllib.parse import parse_qsl

from ranger_py.errors import (
    InvalidEvent,
    NoStreams,
    NoToken,
    StreamsNotStrings,
    TokenNotString,
    UnparsableMessage,
)

__all__ = [
    "AUTHENTICATED",
    "PONG",
    "AuthRequest",
    "Request",
    "StreamKind",
    "cannot_subscribe_reply",
    "parse_request",
    "stream_kind",
    "streams_from_query",
    "subscribed_reply",
    "unsubscribed_reply",
    "valid_stream_name",
]

PONG: bytes = b"pong"
"""The answer to the text ``ping``: raw text, not JSON (Ranger and Rango)."""

AUTHENTICATED: bytes = b'{"success":{"message":"authenticated"}}'
"""The answer to an ``auth`` event whose token was accepted (PROTOCOL §3)."""


class StreamKind(enum.Enum):
    """What a client's stream name refers to; the value is the metrics ``type`` label (§7)."""

    PUBLIC = "public"
    PRIVATE = "private"
    PREFIXED = "prefixed"


def stream_kind(name: str) -> StreamKind:
    """Classify a stream name by its number of dots (PROTOCOL §4, as Rango).

    0 dots is private (``order``), exactly 2 is prefixed (``admin.eurusd.sys``, under RBAC),
    anything else is public (``eurusd.trades``, ``global.tickers``, and names with 3+ dots,
    which nothing is ever published to).
    """
    dots = name.count(".")
    if dots == 0:
        return StreamKind.PRIVATE
    if dots == 2:
        return StreamKind.PREFIXED
    return StreamKind.PUBLIC


# An AMQP routing key is a short string: at most 255 bytes. A longer name could never be delivered.
MAX_STREAM_NAME_BYTES = 255


def valid_stream_name(name: str) -> bool:
    """Whether a client may hold ``name``: text some routing key could deliver to.

    A routing key is at most 255 bytes of UTF-8, so a longer name, or one with no UTF-8 form at
    all (a lone surrogate, which JSON input can spell as ``"\\ud800"``), can never receive
    anything; it would only be held in memory and listed in replies for nothing. Which names may
    appear on a dashboard is the metrics' own, stricter, rule.
    """
    if len(name) <= MAX_STREAM_NAME_BYTES // 4:
        return name.isprintable() or _encodable(name)  # short: the common case, no encoding
    try:
        return len(name.encode()) <= MAX_STREAM_NAME_BYTES
    except UnicodeEncodeError:
        return False


def _encodable(name: str) -> bool:
    try:
        name.encode()
    except UnicodeEncodeError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class Request:
    """A valid subscribe or unsubscribe message.

    ``streams`` holds no empty names and no duplicates, in the order the client sent them.
    """

    event: Literal["subscribe", "unsubscribe"]
    streams: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class AuthRequest:
    """A valid ``auth`` message: a fresh token for the connection (PROTOCOL §3)."""

    token: str

    def __repr__(self) -> str:
        return "AuthRequest(token=***)"  # a token never reaches a log line


def parse_request(text: str) -> Request | AuthRequest:
    """Parse one inbound message that is neither empty nor ``ping`` (the caller handles those).

    Raises:
        UnparsableMessage: not JSON, or not a JSON object (``null`` included).
        InvalidEvent: ``event`` missing, not a string, or not subscribe/unsubscribe/auth.
        NoStreams: no ``streams`` key.
        StreamsNotStrings: ``streams`` is not a list of strings (Rango crashes on ``null``
            and ``[1]``; Ranger closes with 3000: §4 answers with an error reply instead).
        NoToken: an ``auth`` event without ``token``, or with ``""``.
        TokenNotString: an ``auth`` event whose ``token`` is not a string.
    """
    try:
        data = json.loads(text)
    except ValueError as exc:  # JSONDecodeError, and int() refusing a 4300+ digit number
        raise UnparsableMessage(str(exc)) from None
    except RecursionError:  # "[[[[..." deeper than the interpreter's recursion limit
        raise UnparsableMessage("nesting too deep") from None
    if type(data) is not dict:
        raise UnparsableMessage("not a JSON object")
    # Checked in Rango's order: event first, then streams.
    event = data.get("event")
    if event == "subscribe":
        kind: Literal["subscribe", "unsubscribe"] = "subscribe"
    elif event == "unsubscribe":
        kind = "unsubscribe"
    elif event == "auth":
        return _auth_request(data)
    else:
        raise InvalidEvent()
    if "streams" not in data:
        raise NoStreams()
    streams = data["streams"]
    if type(streams) is not list or any(type(name) is not str for name in streams):
        raise StreamsNotStrings()
    # Ranger skips "" (Rango would file it as a private stream named ""); dict keeps first order.
    return Request(kind, tuple(dict.fromkeys(name for name in streams if name)))


def _auth_request(data: dict[str, object]) -> AuthRequest:
    token = data.get("token")
    if token is None or token == "":  # absent, null or empty: nothing to check
        raise NoToken()
    if type(token) is not str:
        raise TokenNotString()
    return AuthRequest(token)


def streams_from_query(query_string: str) -> list[str]:
    """The streams named in a raw (still percent-encoded) query string (PROTOCOL §2).

    ``stream=a&stream=b`` and ``stream=a,b`` both give ``["a", "b"]``: Rango splits on commas,
    Ranger percent-decodes; we do both, decoding first. Empty values are skipped, other
    parameters ignored, duplicates collapse keeping the first position.
    """
    found: dict[str, None] = {}
    for key, value in parse_qsl(query_string, keep_blank_values=True):
        if key == "stream":
            for name in value.split(","):
                if name:
                    found[name] = None
    return list(found)


def _compact(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def subscribed_reply(streams: Sequence[str]) -> bytes:
    """``{"success":{"message":"subscribed","streams":[...]}}``, listing every current stream."""
    return _compact({"success": {"message": "subscribed", "streams": list(streams)}})


def unsubscribed_reply(streams: Sequence[str]) -> bytes:
    """``{"success":{"message":"unsubscribed","streams":[...]}}``, listing every current stream."""
    return _compact({"success": {"message": "unsubscribed", "streams": list(streams)}})


def cannot_subscribe_reply(stream: str) -> bytes:
    """The RBAC refusal; a *success* envelope, as Rango sends it (PROTOCOL §4)."""
    return _compact({"success": {"message": f"cannot subscribe to {stream}"}})
