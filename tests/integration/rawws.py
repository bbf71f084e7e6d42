"""A websocket client on a plain socket, for what a well-behaved library will not do.

Hostile clients send pings without reading, trickle a handshake byte by byte, or flood frames;
``websockets`` would read for us, answer pings and refuse to misbehave. Here every frame is built
by hand (masked, as RFC 6455 §5.3 requires of a client) and server frames are read only when the
test asks for them.
"""

from __future__ import annotations

import base64
import os
import socket
import struct
import time
from collections.abc import Mapping

__all__ = ["RawSocket", "masked_frame"]

OPCODE_TEXT = 0x1
OPCODE_CLOSE = 0x8
OPCODE_PONG = 0xA


def masked_frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    """One client frame: ``opcode`` with ``payload``, masked with a random key."""
    first = (0x80 if fin else 0) | opcode
    n = len(payload)
    if n < 126:
        header = struct.pack("!BB", first, 0x80 | n)
    elif n < 0x10000:
        header = struct.pack("!BBH", first, 0x80 | 126, n)
    else:
        header = struct.pack("!BBQ", first, 0x80 | 127, n)
    mask = os.urandom(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return header + mask + body


class RawSocket:
    """An upgraded connection to the server under test, driven frame by frame."""

    def __init__(
        self,
        port: int,
        path: str = "/public",
        *,
        headers: Mapping[str, str] | None = None,
        receive_buffer: int | None = None,
        timeout: float = 5.0,
    ) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if receive_buffer is not None:
            # Set before connect, so the window the server sees is small from the start.
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self.sock.settimeout(timeout)
        self.sock.connect(("127.0.0.1", port))
        self.buffer = b""
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [
            f"GET {path} HTTP/1.1",
            f"Host: 127.0.0.1:{port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
            *(f"{name}: {value}" for name, value in (headers or {}).items()),
        ]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        head = self._read_until(b"\r\n\r\n", time.monotonic() + timeout)
        self.status = int(head.split(b" ", 2)[1])
        self.head = head.decode("latin-1")  # the response's status line and headers
        self.rsv1 = False  # of the last frame read: permessage-deflate's "compressed" bit

    def _read_until(self, marker: bytes, deadline: float) -> bytes:
        while marker not in self.buffer:
            self._fill(deadline)
        head, _, self.buffer = self.buffer.partition(marker)
        return head

    def _fill(self, deadline: float) -> None:
        self.sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError("the server closed the TCP connection")
        self.buffer += chunk

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def frame(self, timeout: float = 5.0) -> tuple[int, bytes]:
        """The next server frame (opcode, payload); server frames are never masked."""
        deadline = time.monotonic() + timeout
        while len(self.buffer) < 2:
            self._fill(deadline)
        opcode, length = self.buffer[0] & 0x0F, self.buffer[1] & 0x7F
        self.rsv1 = bool(self.buffer[0] & 0x40)
        offset = 2
        if length >= 126:
            offset = 4 if length == 126 else 10
            while len(self.buffer) < offset:
                self._fill(deadline)
            (length,) = struct.unpack("!H" if offset == 4 else "!Q", self.buffer[2:offset])
        while len(self.buffer) < offset + length:
            self._fill(deadline)
        payload = self.buffer[offset : offset + length]
        self.buffer = self.buffer[offset + length :]
        return opcode, payload

    def until_close(self, timeout: float = 30.0) -> tuple[list[tuple[int, bytes]], int, bytes]:
        """Read frames until the close frame: (frames before it, close code, close reason)."""
        frames: list[tuple[int, bytes]] = []
        deadline = time.monotonic() + timeout
        while True:
            opcode, payload = self.frame(timeout=max(0.01, deadline - time.monotonic()))
            if opcode == OPCODE_CLOSE:
                (code,) = struct.unpack("!H", payload[:2])
                return frames, code, payload[2:]
            frames.append((opcode, payload))

    def close(self) -> None:
        self.sock.close()
