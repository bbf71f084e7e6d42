"""Attacks on the server, end to end: what the attacker is told, and that nobody else noticed.

Every test opens a :class:`~.canary.Canary` (a public and a private bystander) before the attack,
publishes to it during the attack where that makes sense, and afterwards asserts the exact answer
the attacker got (HTTP status and JSON body, close code and reason, or error reply) and that the
canary received every message in order with the same server workers still running.

Malformed handshakes and frames are written by hand over plain sockets: a websocket library would
refuse to send them. Tokens are minted here with PyJWT, or byte by byte where PyJWT refuses.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import random
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

from .canary import Canary
from .harness import Connect, Server, ServerPool, StartServer, unique
from .tokens import SigningKey, rsa_key
from .wsclient import Client, subscribed

MAX_MESSAGE_SIZE = 4096  # the default inbound limit (PROTOCOL §2)
TIMEOUT = 5.0
KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455 §1.3's sample nonce: 16 bytes in base64
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


@pytest.fixture
def canary(server: Server, rsa: SigningKey) -> Iterator[Canary]:
    with Canary(server, rsa) as canary:
        yield canary


@pytest.fixture(scope="module")
def stranger() -> SigningKey:
    """An RSA key the server has never heard of."""
    return rsa_key()


def _json(error: str) -> bytes:
    return json.dumps({"error": error}, separators=(",", ":")).encode()


def _cannot(stream: str) -> str:
    return f'{{"success":{{"message":"cannot subscribe to {stream}"}}}}'


# -- raw HTTP ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class RawResponse:
    """What came back on a raw socket: ``status`` None when the server closed without a word."""

    status: int | None
    headers: dict[str, str]
    body: bytes
    closed: bool  # the server ended the connection after the response

    def __str__(self) -> str:
        return f"{self.status} {self.headers} {self.body[:200]!r} closed={self.closed}"


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except ConnectionResetError:
        return b""


def _read_head(sock: socket.socket, buffer: bytes = b"") -> tuple[bytes | None, bytes]:
    """The response head (status line and headers), and the bytes already read past it."""
    while b"\r\n\r\n" not in buffer:
        chunk = _recv(sock)
        if not chunk:
            return (None, buffer)
        buffer += chunk
    head, _, rest = buffer.partition(b"\r\n\r\n")
    return head, rest


def _read_exactly(sock: socket.socket, buffer: bytes, size: int) -> bytes:
    while len(buffer) < size:
        chunk = _recv(sock)
        if not chunk:
            raise AssertionError(f"connection ended {size - len(buffer)} bytes short")
        buffer += chunk
    return buffer


def _read_line(sock: socket.socket, buffer: bytes) -> tuple[bytes, bytes]:
    while b"\r\n" not in buffer:
        chunk = _recv(sock)
        if not chunk:
            raise AssertionError("connection ended inside a chunked body")
        buffer += chunk
    line, _, rest = buffer.partition(b"\r\n")
    return line, rest


def _read_body(sock: socket.socket, headers: dict[str, str], buffer: bytes) -> tuple[bytes, bytes]:
    if "content-length" in headers:
        size = int(headers["content-length"])
        buffer = _read_exactly(sock, buffer, size)
        return buffer[:size], buffer[size:]
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while True:
            line, buffer = _read_line(sock, buffer)
            size = int(line.split(b";")[0], 16)
            buffer = _read_exactly(sock, buffer, size + 2)
            body, buffer = body + buffer[:size], buffer[size + 2 :]
            if size == 0:
                return body, buffer
    while chunk := _recv(sock):
        buffer += chunk
    return buffer, b""


def _parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    status_line, *lines = head.decode("latin-1").split("\r\n")
    version, status, *_ = status_line.split(" ", 2)
    assert version.startswith("HTTP/1."), status_line
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status), headers


def raw_exchange(
    server: Server,
    data: bytes,
    *,
    end_after: bool = False,
    wait_close: bool = False,
    timeout: float = 10.0,
) -> RawResponse:
    """Send ``data`` on a fresh connection (and end our side if ``end_after``); read the answer.

    With ``wait_close``, also wait (a second at most) to see whether the server ends the
    connection after its response; else ``closed`` is only known when it did so at once.
    """
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
            if end_after:
                sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may answer and close before it has read everything
        head, rest = _read_head(sock)
        if head is None:
            return RawResponse(None, {}, rest, closed=True)
        status, headers = _parse_head(head)
        if status == 101:
            return RawResponse(status, headers, b"", closed=False)  # upgraded: no body to read
        body, rest = _read_body(sock, headers, rest)
        closed = False
        if wait_close and not rest:
            # Whatever the server does next, it must not be a second response to garbage.
            sock.settimeout(1.0)
            with contextlib.suppress(TimeoutError):
                closed = not _recv(sock)
        return RawResponse(status, headers, body, closed)


def upgrade_request(
    path: str = "/public",
    *,
    method: str = "GET",
    request_line: str | None = None,
    headers: Sequence[tuple[str, str]] = (),
    omit: Sequence[str] = (),
) -> bytes:
    """A websocket upgrade request; ``headers`` override or add, ``omit`` drops by name."""
    fields = {
        "Host": "127.0.0.1",
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": KEY,
        "Sec-WebSocket-Version": "13",
    }
    for name in omit:
        del fields[name]
    lines = [request_line if request_line is not None else f"{method} {path} HTTP/1.1"]
    lines += [f"{name}: {value}" for name, value in fields.items() if name not in dict(headers)]
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


# -- raw websocket frames ---------------------------------------------------------------------

CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    masked: bool = True,
    length: int | None = None,
    length_bytes: int | None = None,
) -> bytes:
    """One client frame, built by hand (RFC 6455 §5.2).

    ``rsv`` is the three RSV bits (4 = RSV1); ``length`` overrides the declared payload length;
    ``length_bytes`` forces the 0, 2 or 8 extended length bytes, minimal or not.
    """
    declared = len(payload) if length is None else length
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    mask_bit = 0x80 if masked else 0
    if length_bytes is None:
        length_bytes = 0 if declared < 126 else 2 if declared < 0x10000 else 8
    if length_bytes == 0:
        header = bytes((first, mask_bit | declared))
    elif length_bytes == 2:
        header = bytes((first, mask_bit | 126)) + struct.pack("!H", declared)
    else:
        header = bytes((first, mask_bit | 127)) + struct.pack("!Q", declared)
    if not masked:
        return header + payload
    mask = random.randbytes(4)
    masked_payload = bytes(byte ^ mask[index % 4] for index, byte in enumerate(payload))
    return header + mask + masked_payload


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return struct.pack("!H", code) + reason


@dataclass(frozen=True)
class ServerClose:
    """How the server ended a raw websocket."""

    frames: list[tuple[int, bytes]]  # data and control frames before its close frame
    code: int | None  # None: no close frame
    reason: str
    ended: bool  # the TCP connection ended after the close frame


class RawWebSocket:
    """A websocket over a plain socket after a real handshake, for frames no library would send."""

    def __init__(self, server: Server, path: str = "/public") -> None:
        self.sock = socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT)
        self.sock.sendall(upgrade_request(path))
        head, self._buffer = _read_head(self.sock)
        assert head is not None, "the server closed during the handshake"
        status, headers = _parse_head(head)
        assert status == 101, (status, headers)
        accept = base64.b64encode(hashlib.sha1(KEY.encode() + WS_GUID).digest()).decode()
        assert headers["sec-websocket-accept"] == accept

    def send(self, data: bytes) -> None:
        # The server may close as soon as it has seen enough; its close frame is read later.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.sock.sendall(data)

    def read_frame(self, timeout: float = TIMEOUT) -> tuple[int, bytes] | None:
        """The next server frame (opcode, payload), or None when the connection ends."""
        self.sock.settimeout(timeout)
        header = self._take(2)
        if header is None:
            return None
        assert header[0] & 0x70 == 0, f"server frame with RSV bits: {header!r}"
        assert header[1] & 0x80 == 0, "server frames are never masked (RFC 6455 §5.1)"
        assert header[0] & 0x80, "the server does not fragment"
        length = header[1] & 0x7F
        if length >= 126:
            extended = self._take(2 if length == 126 else 8)
            assert extended is not None, "connection ended inside a frame header"
            length = int.from_bytes(extended, "big")
        payload = self._take(length)
        assert payload is not None, "connection ended inside a frame"
        return header[0] & 0x0F, payload

    def _take(self, size: int) -> bytes | None:
        while len(self._buffer) < size:
            try:
                chunk = _recv(self.sock)
            except TimeoutError:
                raise AssertionError("no frame from the server in time") from None
            if not chunk:
                if self._buffer:
                    raise AssertionError(f"connection ended with {self._buffer!r} unread")
                return None
            self._buffer += chunk
        data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data

    def text(self, timeout: float = TIMEOUT) -> str:
        received = self.read_frame(timeout)
        assert received is not None and received[0] == TEXT, received
        return received[1].decode()

    def until_close_frame(self, timeout: float = TIMEOUT) -> ServerClose:
        """Read to the server's close frame; ``ended`` is not checked (False)."""
        frames: list[tuple[int, bytes]] = []
        while (received := self.read_frame(timeout)) is not None and received[0] != CLOSE:
            frames.append(received)
        if received is None:
            return ServerClose(frames, None, "", ended=True)
        code = struct.unpack("!H", received[1][:2])[0] if len(received[1]) >= 2 else None
        return ServerClose(frames, code, received[1][2:].decode(), ended=False)

    def until_close(self, timeout: float = TIMEOUT) -> ServerClose:
        """Read to the server's close frame, then check that it ends the connection."""
        closed = self.until_close_frame(timeout)
        if closed.code is None:
            return closed
        try:
            ended = self.read_frame(timeout) is None
        except AssertionError:
            ended = False
        return ServerClose(closed.frames, closed.code, closed.reason, ended)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw_ws(server: Server) -> Iterator[Callable[[str], RawWebSocket]]:
    opened: list[RawWebSocket] = []

    def open_raw(path: str = "/public") -> RawWebSocket:
        ws = RawWebSocket(server, path)
        opened.append(ws)
        return ws

    yield open_raw
    for ws in opened:
        ws.close()


# -- malformed handshakes -----------------------------------------------------------------------


@dataclass(frozen=True)
class Refusal:
    """The exact answer expected: a status, with the JSON body when the app answers itself."""

    status: int | None
    body: bytes | None = None
    headers: tuple[tuple[str, str], ...] = ()


def _random_bytes(seed: int, size: int) -> bytes:
    # Never CR or LF, so the server cannot mistake part of it for lines; ended as a request head.
    data = random.Random(seed).randbytes(size).replace(b"\r", b"?").replace(b"\n", b"?")
    return data + b"\r\n\r\n"


_BAD_KEY = Refusal(400, _json("Sec-WebSocket-Key must be 16 bytes in base64"))
_BAD_VERSION = Refusal(
    426, _json("Sec-WebSocket-Version must be 13"), (("sec-websocket-version", "13"),)
)
_NOT_GET = Refusal(405, _json("websocket upgrade must use GET"))

HANDSHAKES: dict[str, tuple[bytes, Refusal]] = {
    "random-bytes": (_random_bytes(6455, 512), Refusal(400)),
    "random-bytes-2": (_random_bytes(1, 64), Refusal(400)),
    # No line end ever comes: gunicorn waits for one, then the handshake timeout ends it.
    "tls-client-hello": (
        bytes.fromhex("16030100c4010000c00303") + bytes(32) + b"\x00\x00\x02\x13\x01\x01\x00",
        Refusal(None),
    ),
    "http2-preface": (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", Refusal(400)),
    "no-version": (upgrade_request(request_line="GET /public"), Refusal(400)),
    "bad-version": (upgrade_request(request_line="GET /public HTTP/7.1"), Refusal(400)),
    "extra-word": (upgrade_request(request_line="GET /public HTTP/1.1 x"), Refusal(400)),
    "no-key": (upgrade_request(omit=["Sec-WebSocket-Key"]), _BAD_KEY),
    "empty-key": (upgrade_request(headers=[("Sec-WebSocket-Key", "")]), _BAD_KEY),
    "key-15-bytes": (
        upgrade_request(headers=[("Sec-WebSocket-Key", base64.b64encode(bytes(15)).decode())]),
        _BAD_KEY,
    ),
    "key-17-bytes": (
        upgrade_request(headers=[("Sec-WebSocket-Key", base64.b64encode(bytes(17)).decode())]),
        _BAD_KEY,
    ),
    "key-not-base64": (
        upgrade_request(headers=[("Sec-WebSocket-Key", "not base64 at all!")]),
        _BAD_KEY,
    ),
    "key-twice": (
        upgrade_request(headers=[("Sec-WebSocket-Key", KEY), ("Sec-WebSocket-Key", KEY)]),
        _BAD_KEY,
    ),
    "ws-version-8": (upgrade_request(headers=[("Sec-WebSocket-Version", "8")]), _BAD_VERSION),
    "ws-version-14": (upgrade_request(headers=[("Sec-WebSocket-Version", "14")]), _BAD_VERSION),
    "ws-version-list": (
        upgrade_request(headers=[("Sec-WebSocket-Version", "13, 8")]),
        _BAD_VERSION,
    ),
    "no-ws-version": (upgrade_request(omit=["Sec-WebSocket-Version"]), _BAD_VERSION),
    "post": (upgrade_request(method="POST"), _NOT_GET),
    "put": (upgrade_request(method="PUT"), _NOT_GET),
    "no-upgrade-header": (
        upgrade_request(omit=["Upgrade"]),
        Refusal(400, _json("Upgrade header must be websocket")),
    ),
    "upgrade-h2c": (
        upgrade_request(headers=[("Upgrade", "h2c")]),
        Refusal(400, _json("Upgrade header must be websocket")),
    ),
    "no-connection-upgrade": (
        upgrade_request(headers=[("Connection", "keep-alive")]),
        Refusal(400, _json("Connection header must include Upgrade")),
    ),
    "request-line-too-long": (
        upgrade_request(f"/public?stream={'a' * 8192}"),
        Refusal(414),
    ),
    "too-many-headers": (
        upgrade_request(headers=[(f"X-Filler-{n}", "x") for n in range(200)]),
        Refusal(431),
    ),
    # gunicorn.conf.py allows header lines up to 16 KiB (long bearer tokens).
    "header-too-large": (upgrade_request(headers=[("X-Filler", "x" * 17000)]), Refusal(431)),
    "header-without-colon": (
        upgrade_request().replace(b"\r\n\r\n", b"\r\nX-No-Colon-Here\r\n\r\n"),
        Refusal(400),
    ),
    "header-name-with-space": (
        upgrade_request(headers=[("X Bad", "x")]),
        Refusal(400),
    ),
    "nul-in-header-value": (
        upgrade_request(headers=[("X-Nul", "a\x00b")]),
        Refusal(400),
    ),
}


@pytest.mark.parametrize(("data", "expected"), HANDSHAKES.values(), ids=HANDSHAKES.keys())
def test_malformed_handshake_is_refused(
    server: Server, canary: Canary, data: bytes, expected: Refusal
) -> None:
    canary.send(2)
    response = raw_exchange(server, data, wait_close=expected.body is None)
    canary.send(2)
    assert response.status == expected.status, str(response)
    if expected.body is not None:
        assert response.body == expected.body, str(response)
        assert response.headers["content-type"] == "application/json"
    for name, value in expected.headers:
        assert response.headers.get(name) == value, str(response)
    if response.status is not None and response.status != 101 and expected.body is None:
        # gunicorn's own refusals end the connection.
        assert response.closed, str(response)
    canary.expect()
    canary.check(3)


def test_405_names_the_allowed_method(server: Server, canary: Canary) -> None:
    response = raw_exchange(server, upgrade_request(method="POST"))
    assert response.status == 405
    canary.check(2)
    assert response.headers.get("allow") == "GET", str(response)


@pytest.mark.parametrize(
    "part",
    [
        b"GET /pub",
        b"GET /public HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnec",
        upgrade_request()[:-2],  # every header, but not the empty line that ends them
    ],
    ids=["in-request-line", "in-a-header", "before-the-blank-line"],
)
def test_half_sent_request_then_close(server: Server, canary: Canary, part: bytes) -> None:
    canary.send(2)
    response = raw_exchange(server, part, end_after=True, wait_close=True)
    # Nothing was asked completely: the server says nothing, or 400, and ends the connection.
    assert response.status in (None, 400), str(response)
    assert response.closed
    canary.expect()
    canary.check(3)


def test_half_sent_requests_abandoned_in_bulk(server: Server, canary: Canary) -> None:
    sockets = []
    try:
        for n in range(50):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT)
            sockets.append(sock)
            sock.sendall(upgrade_request()[: 20 + n])
        canary.check(3)  # served while 50 requests hang half-sent
    finally:
        for sock in sockets:
            sock.close()
    canary.check(3)


# -- malformed and oversized frames -------------------------------------------------------------


@dataclass(frozen=True)
class BadFrame:
    data: bytes
    code: int
    reason: str


def _invalid_utf8(data: bytes) -> str:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return str(exc)[:100]
    raise AssertionError(f"{data!r} is valid UTF-8")


_PROTOCOL_ERROR = 1002
_TOO_BIG = (1009, "message too big")

FRAMES: dict[str, BadFrame] = {
    "text-over-limit": BadFrame(frame(TEXT, b" " * (MAX_MESSAGE_SIZE - 3) + b"ping"), *_TOO_BIG),
    "binary-over-limit": BadFrame(frame(BINARY, b"x" * (MAX_MESSAGE_SIZE + 1)), *_TOO_BIG),
    "fragments-over-limit": BadFrame(
        frame(TEXT, b"x" * 3000, fin=False) + frame(CONTINUATION, b"x" * 3000), *_TOO_BIG
    ),
    "declares-1-tib": BadFrame(frame(TEXT, b"x" * 8192, length=1 << 40), *_TOO_BIG),
    "unmasked": BadFrame(
        frame(TEXT, b"ping", masked=False),
        _PROTOCOL_ERROR,
        "server received unexpected unmasked frame",
    ),
    "unmasked-close": BadFrame(
        frame(CLOSE, close_payload(1000), masked=False),
        _PROTOCOL_ERROR,
        "server received unexpected unmasked frame",
    ),
    "opcode-0x3": BadFrame(frame(0x3, b"x"), _PROTOCOL_ERROR, "Invalid opcode 0x3"),
    "opcode-0x7": BadFrame(frame(0x7, b"x"), _PROTOCOL_ERROR, "Invalid opcode 0x7"),
    "opcode-0xb": BadFrame(frame(0xB, b"x"), _PROTOCOL_ERROR, "Invalid opcode 0xb"),
    "opcode-0xf": BadFrame(frame(0xF), _PROTOCOL_ERROR, "Invalid opcode 0xf"),
    "rsv1": BadFrame(frame(TEXT, b"ping", rsv=4), _PROTOCOL_ERROR, "Reserved bit set unexpectedly"),
    "rsv2": BadFrame(frame(TEXT, b"ping", rsv=2), _PROTOCOL_ERROR, "Reserved bit set unexpectedly"),
    "rsv3-on-ping": BadFrame(frame(PING, rsv=1), _PROTOCOL_ERROR, "Reserved bit set unexpectedly"),
    "invalid-utf8": BadFrame(frame(TEXT, b"\xff"), 1007, _invalid_utf8(b"\xff")),
    "utf8-surrogate": BadFrame(
        frame(TEXT, b'{"event":"\xed\xa0\x80"}'), 1007, _invalid_utf8(b'{"event":"\xed\xa0\x80"}')
    ),
    "utf8-overlong": BadFrame(frame(TEXT, b"\xc0\xafping"), 1007, _invalid_utf8(b"\xc0\xafping")),
    "utf8-truncated-at-end": BadFrame(
        frame(TEXT, b"ping\xe2\x82"),
        1007,
        "'utf-8' codec can't decode bytes in position 4-5: unexpected end of data",
    ),
    "utf8-invalid-in-fragment": BadFrame(
        frame(TEXT, b"pi", fin=False) + frame(CONTINUATION, b"\xff", fin=False),
        1007,
        _invalid_utf8(b"\xff"),
    ),
    "fragmented-ping": BadFrame(
        frame(PING, b"x", fin=False), _PROTOCOL_ERROR, "Invalid attempt to fragment control frame"
    ),
    "fragmented-close": BadFrame(
        frame(CLOSE, close_payload(1000), fin=False),
        _PROTOCOL_ERROR,
        "Invalid attempt to fragment control frame",
    ),
    "ping-over-125": BadFrame(
        frame(PING, b"x" * 126), _PROTOCOL_ERROR, "Control frame with payload len > 125"
    ),
    "pong-over-125": BadFrame(
        frame(PONG, b"x" * 200), _PROTOCOL_ERROR, "Control frame with payload len > 125"
    ),
    "close-over-125": BadFrame(
        frame(CLOSE, close_payload(1000, b"x" * 124)),
        _PROTOCOL_ERROR,
        "Control frame with payload len > 125",
    ),
    "continuation-first": BadFrame(
        frame(CONTINUATION, b"ping"), _PROTOCOL_ERROR, "unexpected CONTINUATION"
    ),
    "continuation-after-message": BadFrame(
        frame(TEXT, b"   ") + frame(CONTINUATION, b"ping"),
        _PROTOCOL_ERROR,
        "unexpected CONTINUATION",
    ),
    "new-message-inside-fragmented": BadFrame(
        frame(TEXT, b"pi", fin=False) + frame(TEXT, b"ng"),
        _PROTOCOL_ERROR,
        "expected CONTINUATION, got <Opcode.TEXT: 1>",
    ),
    "length-not-minimal-2": BadFrame(
        frame(TEXT, b"ping", length_bytes=2),
        _PROTOCOL_ERROR,
        "Payload length used 2 bytes when 1 would have sufficed",
    ),
    "length-not-minimal-8": BadFrame(
        frame(TEXT, b"ping", length_bytes=8),
        _PROTOCOL_ERROR,
        "Payload length used 8 bytes when 2 would have sufficed",
    ),
    "length-msb-set": BadFrame(
        frame(TEXT, length=1 << 63), _PROTOCOL_ERROR, "8-byte payload length with non-zero MSB"
    ),
    "close-1-byte": BadFrame(frame(CLOSE, b"\x03"), _PROTOCOL_ERROR, "CLOSE with 1 byte payload"),
    "close-code-0": BadFrame(
        frame(CLOSE, close_payload(0)), _PROTOCOL_ERROR, "CLOSE with invalid code"
    ),
    "close-code-999": BadFrame(
        frame(CLOSE, close_payload(999)), _PROTOCOL_ERROR, "CLOSE with invalid code"
    ),
    "close-code-1004": BadFrame(
        frame(CLOSE, close_payload(1004)), _PROTOCOL_ERROR, "CLOSE with unknown reserved code"
    ),
    "close-code-1005": BadFrame(
        frame(CLOSE, close_payload(1005)), _PROTOCOL_ERROR, "remote CLOSE with local-only reason"
    ),
    "close-code-1006": BadFrame(
        frame(CLOSE, close_payload(1006)), _PROTOCOL_ERROR, "remote CLOSE with local-only reason"
    ),
    "close-code-1015": BadFrame(
        frame(CLOSE, close_payload(1015)), _PROTOCOL_ERROR, "remote CLOSE with local-only reason"
    ),
    "close-code-1016": BadFrame(
        frame(CLOSE, close_payload(1016)), _PROTOCOL_ERROR, "CLOSE with unknown reserved code"
    ),
    "close-code-2999": BadFrame(
        frame(CLOSE, close_payload(2999)), _PROTOCOL_ERROR, "CLOSE with unknown reserved code"
    ),
    "close-code-5000": BadFrame(
        frame(CLOSE, close_payload(5000)), _PROTOCOL_ERROR, "CLOSE with invalid code"
    ),
    "close-code-65535": BadFrame(
        frame(CLOSE, close_payload(65535)), _PROTOCOL_ERROR, "CLOSE with invalid code"
    ),
    "close-reason-invalid-utf8": BadFrame(
        frame(CLOSE, close_payload(1000, b"bye\xff")),
        1007,
        ("Error decoding CLOSE reason: " + _invalid_utf8(b"bye\xff"))[:100],
    ),
}


def test_raw_frames_are_well_formed(raw_ws: Callable[[str], RawWebSocket]) -> None:
    """The hand-built frames are right: the same builder's good frames are served."""
    ws = raw_ws("/public")
    assert ws.text() == subscribed()
    ws.send(frame(TEXT, b"ping"))
    assert ws.text() == "pong"
    ws.send(frame(TEXT, b" " * (MAX_MESSAGE_SIZE - 4) + b"ping", length_bytes=2))
    assert ws.text() == "pong"
    ws.send(frame(TEXT, b"pi", fin=False) + frame(PING, b"hi") + frame(CONTINUATION, b"ng"))
    assert ws.read_frame() == (PONG, b"hi")
    assert ws.text() == "pong"
    ws.send(frame(CLOSE, close_payload(1000, b"done")))
    closed = ws.until_close()
    assert (closed.frames, closed.code, closed.reason, closed.ended) == ([], 1000, "", True)


@pytest.mark.parametrize("bad", FRAMES.values(), ids=FRAMES.keys())
def test_bad_frame_closes_with_the_rfc_code(
    server: Server, canary: Canary, raw_ws: Callable[[str], RawWebSocket], bad: BadFrame
) -> None:
    ws = raw_ws("/public")
    assert ws.text() == subscribed()
    canary.send(2)
    ws.send(bad.data)
    closed = ws.until_close()
    canary.send(2)
    assert (closed.code, closed.reason) == (bad.code, bad.reason)
    assert closed.frames == []
    assert closed.ended, "the server must end the TCP connection after its close frame"
    canary.expect()
    canary.check(3)


def test_multibyte_text_over_the_byte_limit_closes_1009(
    canary: Canary, raw_ws: Callable[[str], RawWebSocket]
) -> None:
    ws = raw_ws("/public")
    assert ws.text() == subscribed()
    message = "€" * 1366
    assert len(message.encode()) == MAX_MESSAGE_SIZE + 2
    ws.send(frame(TEXT, message.encode()))
    received = ws.read_frame(timeout=2)
    canary.check(3)
    assert received == (CLOSE, close_payload(1009, b"message too big")), received


def test_binary_frame_with_invalid_utf8_gets_an_error_reply(
    canary: Canary, raw_ws: Callable[[str], RawWebSocket]
) -> None:
    # A binary frame is read as UTF-8 text (PROTOCOL §2); when it is not, the client is told and
    # stays connected: binary frames carry no UTF-8 promise, so this is not a 1007.
    ws = raw_ws("/public")
    assert ws.text() == subscribed()
    ws.send(frame(BINARY, b"\xff\xfeping"))
    assert ws.text() == '{"error":"Could not parse message: message is not valid UTF-8"}'
    ws.send(frame(TEXT, b"ping"))
    assert ws.text() == "pong"
    canary.check(3)


def test_frames_trickled_byte_by_byte(
    canary: Canary, raw_ws: Callable[[str], RawWebSocket]
) -> None:
    """A frame cut into single bytes (the reader is dropped and re-made between reads)."""
    ws = raw_ws("/public")
    assert ws.text() == subscribed()
    data = frame(TEXT, b"pi", fin=False) + frame(PING, b"!") + frame(CONTINUATION, b"ng")
    for byte in data:
        ws.send(bytes((byte,)))
        canary.send(1)
        time.sleep(0.002)
    assert ws.read_frame() == (PONG, b"!")
    assert ws.text() == "pong"
    canary.expect()


# -- JWT attacks ----------------------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _segment(document: object) -> str:
    return _b64url(json.dumps(document, separators=(",", ":")).encode())


def _claims(uid: str, **override: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iat": now,
        "exp": now + 3600,
        "sub": "session",
        "iss": "barong",
        "aud": ["peatio", "barong"],
        "jti": unique("J"),
        "uid": uid,
        "role": "admin",
        "level": 3,
    }
    claims.update(override)
    return claims


def _unsigned(alg: str | None) -> Callable[[SigningKey, SigningKey, str], str]:
    def token(key: SigningKey, stranger: SigningKey, uid: str) -> str:
        header = {"typ": "JWT"} if alg is None else {"alg": alg, "typ": "JWT"}
        return f"{_segment(header)}.{_segment(_claims(uid))}."

    return token


def _public_pem(key: SigningKey) -> bytes:
    return base64.b64decode(key.public_env)


def _hs256(secret: Callable[[SigningKey], bytes]) -> Callable[[SigningKey, SigningKey, str], str]:
    """The algorithm-confusion attack: HMAC keyed with what the server verifies with.

    PyJWT refuses to use a PEM as an HMAC secret, so these are signed by hand.
    """

    def token(key: SigningKey, stranger: SigningKey, uid: str) -> str:
        signing_input = f"{_segment({'alg': 'HS256', 'typ': 'JWT'})}.{_segment(_claims(uid))}"
        digest = hmac.new(secret(key), signing_input.encode(), hashlib.sha256).digest()
        return f"{signing_input}.{_b64url(digest)}"

    return token


def _public_der(key: SigningKey) -> bytes:
    pem = _public_pem(key).decode()
    return base64.b64decode("".join(line for line in pem.splitlines() if "-----" not in line))


def _signed(
    *,
    by: str = "server",
    algorithm: str = "RS256",
    headers: dict[str, Any] | None = None,
    **claims: Any,
) -> Callable[[SigningKey, SigningKey, str], str]:
    def token(key: SigningKey, stranger: SigningKey, uid: str) -> str:
        signer = key if by == "server" else stranger
        return jwt.encode(_claims(uid, **claims), signer.private_key, algorithm, headers=headers)

    return token


def _swap_uid(key: SigningKey, stranger: SigningKey, uid: str) -> str:
    header, _, signature = key.token(f"{uid}X").split(".")
    return f"{header}.{_segment(_claims(uid))}.{signature}"


def _cut_signature(chars: int) -> Callable[[SigningKey, SigningKey, str], str]:
    def token(key: SigningKey, stranger: SigningKey, uid: str) -> str:
        valid = key.token(uid)
        return valid[:-chars] if chars else valid[: valid.rindex(".") + 1]

    return token


def _foreign_ec(key: SigningKey, stranger: SigningKey, uid: str) -> str:
    return jwt.encode(_claims(uid), ec.generate_private_key(ec.SECP256R1()), "ES256")


def _embedded_jwk(key: SigningKey, stranger: SigningKey, uid: str) -> str:
    # CVE-2018-0114 style: the token carries the key that verifies it.
    private = stranger.private_key
    assert isinstance(private, RSAPrivateKey), "an RSA stranger"
    public = jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key(), as_dict=True)
    return jwt.encode(_claims(uid), stranger.private_key, "RS256", headers={"jwk": public})


def _nested_header(key: SigningKey, stranger: SigningKey, uid: str) -> str:
    return f"{_b64url(b'[' * 5000)}.{_segment(_claims(uid))}.{_b64url(b'x')}"


def _bearer(build: Callable[[SigningKey, SigningKey, str], str]) -> Callable[..., str]:
    return lambda key, stranger, uid: f"Bearer {build(key, stranger, uid)}"


def _literal(value: str) -> Callable[..., str]:
    return lambda key, stranger, uid: value


_FAR = int(time.time()) + 10 * 365 * 86400

# name -> (Authorization header builder, the reason in the 401 body)
BAD_TOKENS: dict[str, tuple[Callable[[SigningKey, SigningKey, str], str], str]] = {
    "alg-none": (_bearer(_unsigned("none")), "algorithm not allowed"),
    "alg-None": (_bearer(_unsigned("None")), "algorithm not allowed"),
    "alg-NONE": (_bearer(_unsigned("NONE")), "algorithm not allowed"),
    "alg-missing": (_bearer(_unsigned(None)), "algorithm not allowed"),
    "hs256-public-pem-as-secret": (_bearer(_hs256(_public_pem)), "algorithm not allowed"),
    "hs256-public-der-as-secret": (_bearer(_hs256(_public_der)), "algorithm not allowed"),
    "hs256-env-value-as-secret": (
        _bearer(_hs256(lambda key: key.public_env.encode())),
        "algorithm not allowed",
    ),
    "rs384-by-the-server-key": (_bearer(_signed(algorithm="RS384")), "algorithm not allowed"),
    "ps256-by-the-server-key": (_bearer(_signed(algorithm="PS256")), "algorithm not allowed"),
    "es256-foreign-key": (_bearer(_foreign_ec), "algorithm not allowed"),
    "expired": (_bearer(_signed(exp=int(time.time()) - 120)), "token expired"),
    "exp-not-a-number": (_bearer(_signed(exp=str(_FAR))), "invalid exp claim"),
    "exp-infinity": (_bearer(_signed(exp=float("inf"))), "invalid exp claim"),
    "nbf-in-the-future": (_bearer(_signed(nbf=_FAR)), "token not yet valid"),
    "iat-in-the-future": (_bearer(_signed(iat=_FAR)), "token issued in the future"),
    "another-rsa-key": (_bearer(_signed(by="stranger")), "invalid signature"),
    "uid-swapped": (_bearer(_swap_uid), "invalid signature"),
    "signature-cut-2": (_bearer(_cut_signature(2)), "invalid signature"),
    "signature-cut-1": (_bearer(_cut_signature(1)), "malformed token"),
    "signature-empty": (_bearer(_cut_signature(0)), "invalid signature"),
    "jwk-embedded": (_bearer(_embedded_jwk), "invalid signature"),
    "nested-header": (_bearer(_nested_header), "malformed token"),
    "no-scheme": (lambda key, stranger, uid: key.token(uid), "authorization scheme must be Bearer"),
    "lowercase-bearer": (
        lambda key, stranger, uid: f"bearer {key.token(uid)}",
        "authorization scheme must be Bearer",
    ),
    "token-scheme": (
        lambda key, stranger, uid: f"Token {key.token(uid)}",
        "authorization scheme must be Bearer",
    ),
    "basic": (_literal("Basic dXNlcjpwYXNz"), "authorization scheme must be Bearer"),
    # HTTP drops the trailing space: the server sees "Bearer" alone.
    "bearer-empty": (_literal("Bearer "), "authorization scheme must be Bearer"),
    "bearer-spaces": (_literal("Bearer   "), "authorization scheme must be Bearer"),
    "garbage": (_literal("Bearer garbage"), "malformed token"),
    "three-garbage-segments": (_literal("Bearer a.b.c"), "malformed token"),
    "dots-only": (_literal("Bearer .."), "malformed token"),
    "header-not-json": (
        _literal(f"Bearer {_b64url(b'not json')}.{_segment({})}.{_b64url(b'x')}"),
        "malformed token",
    ),
    "header-a-list": (
        _literal(f"Bearer {_segment(['RS256'])}.{_segment({})}.{_b64url(b'x')}"),
        "malformed token",
    ),
    "non-ascii": (_literal("Bearer ey\xe9.\xe9.\xe9"), "malformed token"),
    "huge-garbage": (_literal("Bearer " + "A" * 7000), "malformed token"),
}

# Validly signed by the server's key with headers that point elsewhere: ignored, never fetched.
POINTING_HEADERS: dict[str, dict[str, str]] = {
    "jku": {"jku": "JKU"},
    "x5u": {"x5u": "X5U"},
    "kid-url": {"kid": "KID"},
    "kid-path-traversal": {"kid": "../../../../../../dev/null"},
    "kid-sql": {"kid": "' OR '1'='1"},
    "all-at-once": {"jku": "JKU", "x5u": "X5U", "kid": "KID"},
}


class Sink:
    """A loopback listener that counts every connection made to it (nothing should come)."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _ = self._listener.accept()
            except TimeoutError:
                continue
            self.connections += 1
            connection.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._listener.close()


@pytest.fixture
def sink() -> Iterator[Sink]:
    sink = Sink()
    yield sink
    sink.close()


def _pointing(value: str, sink: Sink) -> str:
    return {
        "JKU": f"{sink.url}/.well-known/jwks.json",
        "X5U": f"{sink.url}/cert.pem",
        "KID": f"{sink.url}/keys/1",
    }.get(value, value)


def _upgrade_answer(server: Server, path: str, authorization: str) -> RawResponse:
    request = upgrade_request(path, headers=[("Authorization", authorization)])
    return raw_exchange(server, request)


def _assert_anonymous(server: Server, connect: Connect, authorization: str, uid: str) -> None:
    """On /public the token is ignored: connected, private streams silently not subscribed."""
    market = f"{unique()}.trades"
    client = connect(
        server, f"/public?stream=order&stream={market}", headers={"Authorization": authorization}
    )
    assert client.recv() == subscribed(market)
    assert client.subscribe("order", "trade") == subscribed(market)
    _subscribe_refused(client, f"admin.{unique()}.sys")  # the bad token's admin role counts not
    server.publish(f"private.{uid}.order", '{"leak":true}')
    server.publish(f"public.{market}", '{"sentinel":1}')
    assert client.recv() == f'{{"{market}":{{"sentinel":1}}}}'


@pytest.mark.parametrize(("build", "reason"), BAD_TOKENS.values(), ids=BAD_TOKENS.keys())
def test_bad_token(
    *,
    server: Server,
    rsa: SigningKey,
    stranger: SigningKey,
    canary: Canary,
    connect: Connect,
    build: Callable[[SigningKey, SigningKey, str], str],
    reason: str,
) -> None:
    uid = unique("ID")
    authorization = build(rsa, stranger, uid)
    offset = server.log_size()
    canary.send(2)
    response = _upgrade_answer(server, "/private", authorization)
    assert response.status == 401, str(response)
    assert response.body == _json(f"Authorization failed: {reason}")
    assert response.headers["content-type"] == "application/json"
    _assert_anonymous(server, connect, authorization, uid)
    canary.expect()
    canary.check(3)
    token = authorization.partition(" ")[2] or authorization
    if len(token) > 12:
        assert token not in server.log_text(offset), "a token was logged (PROTOCOL §3)"


@pytest.mark.parametrize("signer", ["server", "stranger"])
@pytest.mark.parametrize("headers", POINTING_HEADERS.values(), ids=POINTING_HEADERS.keys())
def test_token_headers_pointing_elsewhere_are_never_fetched(
    *,
    server: Server,
    rsa: SigningKey,
    stranger: SigningKey,
    canary: Canary,
    connect: Connect,
    sink: Sink,
    headers: dict[str, str],
    signer: str,
) -> None:
    uid = unique("ID")
    jose = {name: _pointing(value, sink) for name, value in headers.items()}
    key = rsa if signer == "server" else stranger
    authorization = f"Bearer {jwt.encode(_claims(uid), key.private_key, 'RS256', headers=jose)}"
    if signer == "server":
        # Validly signed by the real key: the header is simply ignored.
        client = connect(server, "/private?stream=order", headers={"Authorization": authorization})
        assert client.recv() == subscribed("order")
        server.publish(f"private.{uid}.order", '{"mine":1}')
        assert client.recv() == '{"order":{"mine":1}}'
    else:
        response = _upgrade_answer(server, "/private", authorization)
        assert response.status == 401, str(response)
        assert response.body == _json("Authorization failed: invalid signature")
        _assert_anonymous(server, connect, authorization, uid)
    canary.check(3)
    time.sleep(0.3)  # a fetch, if any, would be under way by now
    assert sink.connections == 0, "the server made a network request for a token header"


def test_private_without_authorization_is_401(server: Server, canary: Canary) -> None:
    response = raw_exchange(server, upgrade_request("/private"))
    assert response.status == 401
    assert response.body == _json("Authorization failed: missing bearer token")
    canary.check(3)


def test_issuer_and_audience_are_enforced_when_configured(
    start_server: StartServer, rsa: SigningKey, connect: Connect
) -> None:
    server = start_server(
        {
            "JWT_PUBLIC_KEY": rsa.public_env,
            "JWT_ISSUER": "barong",
            "JWT_AUDIENCE": "peatio, barong",
        },
        name="iss-aud",
    )
    cases: dict[str, tuple[dict[str, Any], str]] = {
        "wrong iss": ({"iss": "evil"}, "invalid issuer"),
        "iss case": ({"iss": "Barong"}, "invalid issuer"),
        "no iss": ({"iss": None}, "missing iss claim"),
        "wrong aud": ({"aud": ["evil"]}, "invalid audience"),
        "wrong aud string": ({"aud": "evil"}, "invalid audience"),
        "aud prefix": ({"aud": "peat"}, "invalid audience"),
        "no aud": ({"aud": None}, "missing aud claim"),
    }
    with Canary(server, rsa) as canary:
        for name, (claims, reason) in cases.items():
            uid = unique("ID")
            canary.send(1)
            response = _upgrade_answer(server, "/private", rsa.bearer(uid, **claims))
            assert (response.status, response.body) == (
                401,
                _json(f"Authorization failed: {reason}"),
            ), name
            _assert_anonymous(server, connect, rsa.bearer(uid, **claims), uid)
        canary.expect()
        # The right ones still pass, a string aud included (PROTOCOL §3).
        for claims in ({}, {"aud": "peatio"}, {"aud": ["other", "barong"]}):
            uid = unique("ID")
            client = connect(
                server,
                "/private?stream=order",
                headers={"Authorization": rsa.bearer(uid, **claims)},
            )
            assert client.recv() == subscribed("order"), claims
            server.publish(f"private.{uid}.order", '{"ok":1}')
            assert client.recv() == '{"order":{"ok":1}}'
        canary.check(3)


# -- cross-user isolation -------------------------------------------------------------------


def _subscribe_refused(client: Client, stream: str) -> None:
    """A refused prefixed stream: Rango's reply, then the subscribed list, which lacks it."""
    client.send(json.dumps({"event": "subscribe", "streams": [stream]}))
    refusal, listing = client.recv_many(2)
    assert refusal == _cannot(stream)
    reply = json.loads(listing)
    assert reply["success"]["message"] == "subscribed"
    assert stream not in reply["success"]["streams"]


def test_users_only_ever_get_their_own_private_messages(
    server: Server, rsa: SigningKey, canary: Canary, connect: Connect
) -> None:
    alice, bob = unique("ID"), unique("ID")
    market = f"{unique()}.trades"
    streams = "/private?stream=order&stream=trade"
    a = connect(server, streams, headers={"Authorization": rsa.bearer(alice)})
    b = connect(server, streams, headers={"Authorization": rsa.bearer(bob)})
    assert a.recv() == subscribed("order", "trade")
    assert b.recv() == subscribed("order", "trade")
    anonymous = connect(server, f"/public?stream=order&stream={market}")
    assert anonymous.recv() == subscribed(market)
    assert anonymous.subscribe("order", "trade", alice, bob) == subscribed(market)

    # An attacker holding a token for alice asks for bob's data every way it can be spelled.
    attacker = connect(
        server, f"/public?stream={market}", headers={"Authorization": rsa.bearer(alice)}
    )
    assert attacker.recv() == subscribed(market)
    attempts = [
        bob, f"{bob}.order", f"order.{bob}", f"private.{bob}", "private.*", "#", "*", "*.order",
        "#.order", f"{bob}.*", "order ", " order", "ORDER", "order\u0000", f"{bob}.order.x.y",
    ]  # fmt: skip
    for stream in attempts:
        reply = json.loads(attacker.subscribe(stream))
        assert reply["success"]["message"] == "subscribed", (stream, reply)
    # Two dots make a prefixed stream, under RBAC: no role may read the "private" prefix here.
    for stream in (
        f"private.{bob}.order", f"private.{bob}.trade", "private.*.order", "private.#.order",
        f"..{bob}", f"{bob}..order", f"{bob}.order.", f".{bob}.order",
    ):  # fmt: skip
        _subscribe_refused(attacker, stream)

    canary.send(2)
    for uid, who in ((alice, "alice"), (bob, "bob")):
        server.publish(f"private.{uid}.order", f'{{"owner":"{who}"}}')
        server.publish(f"private.{uid}.trade", f'{{"owner":"{who}","t":1}}')
    # Routing keys an attacker might hope are matched loosely: all are bob's or nobody's.
    for key in (
        f"private.{bob}.ORDER", f"private.{bob.lower()}.order", f"private.{bob}.order ",
        f"private.{bob}.{bob}", f"private.{bob}.order.x.y", "private..order",
    ):  # fmt: skip
        server.publish(key, '{"owner":"bob","loose":true}')
    server.publish(f"public.{market}", '{"sentinel":1}')

    sentinel = f'{{"{market}":{{"sentinel":1}}}}'
    assert a.recv_many(2) == ['{"order":{"owner":"alice"}}', '{"trade":{"owner":"alice","t":1}}']
    assert b.recv_many(2) == ['{"order":{"owner":"bob"}}', '{"trade":{"owner":"bob","t":1}}']
    assert anonymous.recv() == sentinel
    # The attacker gets what alice is owed on the names it holds, and never a byte of bob's.
    before = []
    while (frame_ := attacker.recv()) != sentinel:
        before.append(frame_)
    assert all('"owner":"alice"' in frame_ for frame_ in before), before
    for client in (a, b, anonymous, attacker):
        client.assert_alive()  # nothing else was queued for anyone
    canary.expect()
    canary.check(3)


def test_rbac_on_the_private_prefix_opens_no_other_user(
    start_server: StartServer, rsa: SigningKey, connect: Connect
) -> None:
    """Even an operator allowing every member on a ``private`` prefix leaks nobody's data."""
    server = start_server(
        {"JWT_PUBLIC_KEY": rsa.public_env, "RANGO_RBAC_PRIVATE": "member"}, name="rbac-private"
    )
    alice, bob = unique("ID"), unique("ID")
    with Canary(server, rsa) as canary:
        victim = connect(
            server, "/private?stream=order", headers={"Authorization": rsa.bearer(bob)}
        )
        assert victim.recv() == subscribed("order")
        attacker = connect(server, "/private", headers={"Authorization": rsa.bearer(alice)})
        assert attacker.recv() == subscribed()
        stream = f"private.{bob}.order"
        assert attacker.subscribe(stream) == subscribed(stream)
        canary.send(2)
        server.publish(f"private.{bob}.order", '{"owner":"bob"}')
        assert victim.recv() == '{"order":{"owner":"bob"}}'
        attacker.assert_alive()  # bob's message was routed to its recipients: none queued here
        canary.expect()
        canary.check(3)


# -- RBAC escalation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "role",
    ["member", None, "anonymous", "Admin", "ADMIN", " admin", "admin,superadmin", "*", ["admin"]],
    ids=repr,
)
def test_rbac_escalation_is_refused(
    server: Server, rsa: SigningKey, canary: Canary, connect: Connect, role: Any
) -> None:
    market = unique()
    prefixed, public = f"admin.{market}.sys", f"{market}.sys"
    # role None: a token with no role claim; a list is no role either (ranger_py/auth.py).
    headers = {} if role == "anonymous" else {"Authorization": rsa.bearer(unique("ID"), role)}
    attacker = connect(server, f"/public?stream={prefixed}", headers=headers)
    assert attacker.recv_many(2) == [_cannot(prefixed), subscribed()]
    for stream in (prefixed, f"ADMIN.{market}.sys", f"admin .{market}.sys", f".{market}.sys"):
        _subscribe_refused(attacker, stream)
    assert attacker.subscribe(public) == subscribed(public)
    _subscribe_refused(attacker, prefixed)  # holding the public one changes nothing

    admin_token = {"Authorization": rsa.bearer(unique("ID"), "admin")}
    admin = connect(server, f"/public?stream={prefixed}", headers=admin_token)
    assert admin.recv() == subscribed(prefixed)
    bystander = connect(server, f"/public?stream={public}")
    assert bystander.recv() == subscribed(public)

    canary.send(2)
    server.publish(f"admin.{market}.sys", '{"secret":1}')
    server.publish(f"public.{market}.sys", '{"public":1}')
    server.publish(f"admin.{market}.sys", '{"secret":2}')
    # The admin gets the prefixed messages, under the name without the prefix (Rango).
    assert admin.recv_many(2) == [
        f'{{"{public}":{{"secret":1}}}}',
        f'{{"{public}":{{"secret":2}}}}',
    ]
    for client in (attacker, bystander):
        assert client.recv() == f'{{"{public}":{{"public":1}}}}'
        client.assert_alive()
    admin.assert_alive()
    canary.expect()
    canary.check(3)


def test_authority_cannot_be_claimed_after_connect(
    server: Server, rsa: SigningKey, canary: Canary, connect: Connect
) -> None:
    """Tokens are read once, at connect (PROTOCOL §3): a subscribe message carries no authority."""
    prefixed = f"admin.{unique()}.sys"
    member = connect(server, "/public", headers={"Authorization": rsa.bearer(unique("ID"))})
    assert member.recv() == subscribed()
    admin_token = rsa.token(unique("ID"), "admin")
    message = json.dumps(
        {"event": "subscribe", "streams": [prefixed], "jwt": f"Bearer {admin_token}",
         "authorization": f"Bearer {admin_token}", "role": "admin", "uid": "someone"}
    )  # fmt: skip
    assert member.request(message) == _cannot(prefixed)
    assert member.recv() == subscribed()
    canary.check(3)


# -- floods -------------------------------------------------------------------------------------


def test_many_bad_clients_at_once(
    server: Server, canary: Canary, raw_ws: Callable[[str], RawWebSocket]
) -> None:
    """Every bad frame at once, on as many connections, and garbage handshakes, while the canary
    is being fed."""
    bad = list(FRAMES.values())
    sockets = [raw_ws("/public") for _ in bad]
    for ws in sockets:
        assert ws.text() == subscribed()
    for ws, attack in zip(sockets, bad, strict=True):
        ws.send(attack.data)
        canary.send(1)
    for n in range(20):
        assert raw_exchange(server, _random_bytes(n, 300)).status == 400
        canary.send(1)
    for ws, attack in zip(sockets, bad, strict=True):
        closed = ws.until_close()
        assert (closed.code, closed.reason) == (attack.code, attack.reason)
    canary.expect(deadline=10)
    canary.check(5)


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


PUMP_BYTES = 192 << 20  # what the attacker sends once the server has closed on it
PUMP_SECONDS = 3.0  # well inside the 5 s the server waits for the peer's close
RSS_GROWTH_MIB = 48


def _pump(ws: RawWebSocket) -> int:
    """Send junk as fast as the server takes it; returns how much went out."""
    junk = bytes(1 << 20)
    sent = 0
    deadline = time.monotonic() + PUMP_SECONDS
    ws.sock.settimeout(PUMP_SECONDS)
    try:
        while sent < PUMP_BYTES and time.monotonic() < deadline:
            ws.sock.sendall(junk)
            sent += len(junk)
    except (BrokenPipeError, ConnectionResetError, TimeoutError):
        pass  # the server stopped reading or ended the connection: what it should do
    return sent


def _close_by_bad_frame(ws: RawWebSocket) -> tuple[int, str]:
    ws.send(frame(0x3, b"x"))
    return (1002, "Invalid opcode 0x3")


def _close_by_size(ws: RawWebSocket) -> tuple[int, str]:
    ws.send(frame(BINARY, bytes(MAX_MESSAGE_SIZE + 1)))
    return _TOO_BIG


def _close_by_client(ws: RawWebSocket) -> tuple[int, str]:
    ws.send(frame(CLOSE, close_payload(1000)))
    return (1000, "")


def _close_by_rate(ws: RawWebSocket) -> tuple[int, str]:
    ws.send(frame(PING) * 500)
    return (1008, "too many messages")


CLOSERS = [
    pytest.param(_close_by_bad_frame, id="bad-frame"),
    pytest.param(_close_by_size, id="too-big"),
    pytest.param(_close_by_rate, id="too-many-messages"),
    pytest.param(_close_by_client, id="client-closed"),
]


@pytest.mark.parametrize("closer", CLOSERS)
def test_data_after_the_close_is_not_buffered(
    pool: ServerPool, rsa: SigningKey, closer: Callable[[RawWebSocket], tuple[int, str]]
) -> None:
    # A server of its own: the attack briefly costs the worker what it buffers.
    server = pool.shared({"JWT_PUBLIC_KEY": rsa.public_env, "LOG_LEVEL": "info"})
    (worker,) = server.worker_pids()
    with Canary(server, rsa) as canary:
        ws = RawWebSocket(server)
        try:
            assert ws.text() == subscribed()
            expected = closer(ws)
            closed = ws.until_close_frame()
            assert (closed.code, closed.reason) == expected
            before = _rss_mib(worker)
            canary.send(2)
            sent = _pump(ws)
            growth = _rss_mib(worker) - before
        finally:
            ws.close()
        canary.expect()
        canary.check(3)
        assert growth < RSS_GROWTH_MIB, (
            f"the worker grew by {growth:.0f} MiB while {sent >> 20} MiB came after the close"
        )


def test_ping_flood_is_cut_off(
    server: Server, canary: Canary, raw_ws: Callable[[str], RawWebSocket]
) -> None:
    """Pings sent without reading the pongs: the client is closed with 1008, others unharmed."""
    ws = raw_ws("/public")
    assert ws.text() == subscribed()
    canary.send(2)
    ws.send(frame(PING, b"p" * 125) * 2000)
    closed = ws.until_close()
    assert closed.code == 1008, closed
    assert closed.reason in ("too many messages", "slow client"), closed
    assert all(received == (PONG, b"p" * 125) for received in closed.frames)
    assert len(closed.frames) < 2000
    canary.expect()
    canary.check(3)
