"""The exception tree: every failure ranger-py knows, each carrying the answer it earns.

::

    RangerError
    ├── ConfigError          startup stops; names the environment variable
    ├── AuthError            a token was refused (401 on /private, anonymous elsewhere)
    ├── HandshakeError       plain HTTP answer before the upgrade (status + JSON reason)
    ├── ClientError          bad client message: JSON error reply, connection stays open
    │   ├── UnparsableMessage, InvalidEvent, NoStreams, StreamsNotStrings, TooManyStreams,
    │   ├── InvalidStreamName, NoToken, TokenNotString
    │   └── TokenRefused     an ``auth`` event's token refused; the old one stays in force
    └── CloseConnection      the websocket is closed with ``code`` and ``reason``

Client faults and our own bugs are kept apart: anything that is not a ``RangerError`` is a bug,
logged with its traceback, and the client only sees close code 1011 (PROTOCOL §2).
Stdlib only: every other module imports this one.
"""

from __future__ import annotations

import json
from enum import IntEnum

__all__ = [
    "AuthError",
    "ClientError",
    "CloseCode",
    "CloseConnection",
    "ConfigError",
    "HandshakeError",
    "InvalidEvent",
    "InvalidStreamName",
    "NoStreams",
    "NoToken",
    "RangerError",
    "StreamsNotStrings",
    "TokenNotString",
    "TokenRefused",
    "TooManyStreams",
    "UnparsableMessage",
]


class CloseCode(IntEnum):
    """Close codes ranger-py sends (RFC 6455 §7.4.1)."""

    NORMAL = 1000
    GOING_AWAY = 1001  # server shutdown, idle client
    PROTOCOL_ERROR = 1002
    INVALID_DATA = 1007  # bad UTF-8 (RFC 6455 §8.1)
    POLICY_VIOLATION = 1008  # slow client (PROTOCOL §2)
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    # RFC 6455 leaves 4000-4999 to applications: the token's exp (plus leeway) has passed, with
    # RANGER_TOKEN_EXPIRY=close (PROTOCOL §3).
    TOKEN_EXPIRED = 4001


class RangerError(Exception):
    """Base of every error ranger-py raises on purpose."""


class ConfigError(RangerError):
    """An environment variable has a value ranger-py cannot use; startup stops."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable
        self.problem = problem


class AuthError(RangerError):
    """A bearer token was refused; ``reason`` is safe to show the client (never the token)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class HandshakeError(RangerError):
    """A request answered with plain HTTP instead of an upgrade."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason

    @property
    def body(self) -> bytes:
        return json.dumps({"error": self.reason}, separators=(",", ":")).encode()


class ClientError(RangerError):
    """A client message ranger-py refuses; the client gets ``reply`` and stays connected."""

    message = "client error"

    @property
    def reply(self) -> bytes:
        return json.dumps({"error": self.message}, separators=(",", ":")).encode()


class UnparsableMessage(ClientError):
    """Not JSON, or not a JSON object."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.message = f"Could not parse message: {reason}"


class InvalidEvent(ClientError):
    message = "Could not parse Type: Invalid event"


class NoStreams(ClientError):
    message = "No streams provided"


class StreamsNotStrings(ClientError):
    """``streams`` is present but not a list of strings (Rango crashes on ``null`` and ``[1]``)."""

    message = "Streams must be an array of strings"


class TooManyStreams(ClientError):
    message = "Too many streams"


class InvalidStreamName(ClientError):
    """A stream name nothing can ever be published to (see ``protocol.valid_stream_name``)."""

    message = "Invalid stream name"


class NoToken(ClientError):
    """An ``auth`` event without a ``token``, or with an empty one."""

    message = "No token provided"


class TokenNotString(ClientError):
    message = "Token must be a string"


class TokenRefused(ClientError):
    """An ``auth`` event's token was refused (PROTOCOL §3); the connection keeps its old token.

    The text is the one ``/private`` answers 401 with, so a client reads both the same way.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.message = f"Authorization failed: {reason}"


class CloseConnection(RangerError):
    """The websocket must be closed with ``code`` and a short ``reason`` (≤ 123 bytes)."""

    def __init__(self, code: CloseCode, reason: str = "") -> None:
        super().__init__(f"{int(code)} {reason}")
        self.code = code
        self.reason = reason
