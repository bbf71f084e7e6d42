"""The client's end of a loopback websocket, for the unit tests that drive real server sockets.

The server end is a raw non-blocking socket handed to :class:`~ranger_py.clients.Clients` as in
production; the test's end is a gevent socket, so waiting for bytes lets gevent's loop run the
server's watchers and flushes (no monkey-patching needed).
"""

from __future__ import annotations

import socket
import struct

import gevent.socket

__all__ = ["Peer", "masked", "tcp_pair"]


def masked(opcode: int, payload: bytes) -> bytes:
    """One client frame (final, masked, as RFC 6455 requires of clients)."""
    mask = b"\x0a\x0b\x0c\x0d"
    n = len(payload)
    header = (
        bytes((0x80 | opcode, 0x80 | n)) if n < 126 else struct.pack("!BBH", 0x80 | opcode, 0xFE, n)
    )
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


class Peer:
    """The client end: reads server frames (unmasked) off a gevent socket."""

    def __init__(self, sock: gevent.socket.socket) -> None:
        self.sock = sock
        self.buffer = b""
        self.rsv1 = False  # of the last frame read

    def _fill(self, n: int) -> None:
        while len(self.buffer) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError
            self.buffer += chunk

    def read(self, n: int) -> bytes:
        """Exactly ``n`` raw bytes (an HTTP response before the frames, say)."""
        self._fill(n)
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def frame(self) -> tuple[int, bytes]:
        self.rsv1 = False
        self._fill(2)
        self.rsv1 = bool(self.buffer[0] & 0x40)
        opcode, length = self.buffer[0] & 0x0F, self.buffer[1] & 0x7F
        offset = 2
        if length == 126:
            self._fill(4)
            (length,) = struct.unpack("!H", self.buffer[2:4])
            offset = 4
        elif length == 127:
            self._fill(10)
            (length,) = struct.unpack("!Q", self.buffer[2:10])
            offset = 10
        self._fill(offset + length)
        payload = self.buffer[offset : offset + length]
        self.buffer = self.buffer[offset + length :]
        return opcode, payload


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Two ends of a loopback TCP connection (the registry sets TCP options on its end)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    return server, client
