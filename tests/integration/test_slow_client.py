"""A client that stops reading is closed with 1008 "slow client"; the others never wait for it
(PROTOCOL §2)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from .harness import Connect, StartServer, unique
from .wsclient import subscribed

BODY_PAD = 4000


def _bytes_to_overflow() -> int:
    """Enough to fill the slow client's socket buffers, the server's, and its send queue."""
    try:
        send_max = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    except (OSError, ValueError, IndexError):
        send_max = 4 * 1024 * 1024
    return 2 * send_max + 2 * 1024 * 1024


# A small queue (32) and one well above what a client reading at full speed ever has pending.
@pytest.mark.parametrize("send_queue_size", [32, 128])
def test_slow_client_is_closed_and_others_get_everything(
    start_server: StartServer, connect: Connect, send_queue_size: int
) -> None:
    server = start_server(
        {
            "RANGER_SEND_QUEUE_SIZE": str(send_queue_size),
            # Long enough that the server gives up because of the queue, not the write deadline.
            "RANGER_WRITE_TIMEOUT": "60",
            "LOG_LEVEL": "info",
        },
        name="slow",
    )
    stream = f"{unique()}.trades"
    small_buffer = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    small_buffer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    small_buffer.connect(("127.0.0.1", server.port))
    # max_queue=1: the client library stops reading the socket as soon as a frame waits.
    slow = connect(server, f"/?stream={stream}", sock=small_buffer, max_queue=1)
    normal = connect(server, f"/?stream={stream}", max_queue=None)
    assert normal.recv() == subscribed(stream)

    pad = "x" * BODY_PAD
    count = _bytes_to_overflow() // BODY_PAD + 1
    expected = [f'{{"{stream}":{{"n":{n},"pad":"{pad}"}}}}' for n in range(count)]
    for n in range(count):
        server.publish(f"public.{stream}", f'{{"n":{n},"pad":"{pad}"}}')

    for n in range(count):
        assert normal.recv(timeout=30) == expected[n], f"normal client, message {n}"

    # The server has routed every message, so it has given up on the slow client by now.
    frames, closed = slow.wait_closed(timeout=30)
    assert closed.code == 1008, closed
    assert closed.reason == "slow client"
    assert frames[0] == subscribed(stream)
    received = frames[1:]
    assert len(received) < count
    assert received == expected[: len(received)]  # in order, no gaps, until the cut
    normal.assert_alive()
