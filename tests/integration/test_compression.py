"""permessage-deflate end to end (PROTOCOL §2): negotiated with real clients, both directions."""

from __future__ import annotations

import json
import zlib
from typing import Any

import pytest
from websockets.extensions.permessage_deflate import PerMessageDeflate
from websockets.sync.client import ClientConnection, connect

from .harness import Server, StartServer, unique
from .rawws import OPCODE_TEXT, RawSocket, masked_frame
from .wsclient import subscribed

ANSWER = "permessage-deflate; server_no_context_takeover; client_no_context_takeover"


def _big_body(n: int = 60) -> str:
    trades = [
        {"tid": i, "taker_type": "buy", "date": 1700000000, "price": "42000.0", "amount": "0.1"}
        for i in range(n)
    ]
    return json.dumps({"trades": trades}, separators=(",", ":"))


class Spied:
    """A ``websockets`` client (its default offer) noting which frames carried RSV1 each way.

    The first frames arrive with the 101, before ``connect`` returns, so the spy sits on the
    extension's class for the test's duration.
    """

    def __init__(self, url: str, monkeypatch: pytest.MonkeyPatch) -> None:
        self.received: list[bool] = []
        self.sent: list[bool] = []
        decode, encode = PerMessageDeflate.decode, PerMessageDeflate.encode

        def spy_decode(extension: Any, frame: Any, *, max_size: int | None = None) -> Any:
            self.received.append(frame.rsv1)
            return decode(extension, frame, max_size=max_size)

        def spy_encode(extension: Any, frame: Any) -> Any:
            encoded = encode(extension, frame)
            self.sent.append(encoded.rsv1)
            return encoded

        monkeypatch.setattr(PerMessageDeflate, "decode", spy_decode)
        monkeypatch.setattr(PerMessageDeflate, "encode", spy_encode)
        self.ws: ClientConnection = connect(url, open_timeout=5, ping_interval=None, legacy=True)

    def recv(self) -> str:
        message = self.ws.recv(timeout=5)
        assert isinstance(message, str)
        return message


def test_websockets_client_gets_large_frames_compressed_and_sends_compressed(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    market = unique()
    client = Spied(server.url(f"/?stream={market}.trades"), monkeypatch)
    try:
        assert client.ws.response is not None
        assert client.ws.response.headers["Sec-WebSocket-Extensions"] == ANSWER
        assert client.recv() == subscribed(f"{market}.trades")
        body = _big_body()
        server.publish(f"public.{market}.trades", body)
        server.publish(f"public.{market}.trades", '{"small":1}')
        assert client.recv() == f'{{"{market}.trades":{body}}}'
        assert client.recv() == f'{{"{market}.trades":{{"small":1}}}}'
        # The reply and the small body are under RANGER_COMPRESSION_THRESHOLD (1024 bytes).
        assert client.received == [False, True, False]

        # The client compresses what it sends; the server inflates it and answers.
        client.ws.send(json.dumps({"event": "subscribe", "streams": [f"{market}.ob-inc"]}))
        assert client.sent == [True]
        assert client.recv() == subscribed(f"{market}.trades", f"{market}.ob-inc")
    finally:
        client.ws.close()


def test_order_book_replay_is_compressed(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    market = unique()
    asks = [[f"{42000 + i}.0", "1.5"] for i in range(200)]
    snapshot = json.dumps({"asks": asks, "bids": [], "sequence": 1}, separators=(",", ":"))
    server.publish(f"public.{market}.ob-snap", snapshot)
    server.sync()
    for _ in range(2):  # the second replay is served from the compressed-frame cache
        client = Spied(server.url(f"/?stream={market}.ob-inc"), monkeypatch)
        try:
            assert client.recv() == f'{{"{market}.ob-snap":{snapshot}}}'
            assert client.recv() == subscribed(f"{market}.ob-inc")
            assert client.received == [True, False]
        finally:
            client.ws.close()


def _deflated(payload: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=-15)
    return (compressor.compress(payload) + compressor.flush(zlib.Z_SYNC_FLUSH))[:-4]


def test_raw_offers_windows_and_a_deflate_bomb(server: Server) -> None:
    offer = {"Sec-WebSocket-Extensions": "foo, permessage-deflate; server_max_window_bits=10"}
    raw = RawSocket(server.port, "/public", headers=offer)
    try:
        assert raw.status == 101
        assert f"Sec-WebSocket-Extensions: {ANSWER}; server_max_window_bits=10" in raw.head
        assert raw.frame() == (OPCODE_TEXT, subscribed().encode())
        assert not raw.rsv1
        # 4 MB of zeros in a 4 KB frame: inflated only up to RANGER_MAX_MESSAGE_SIZE, then 1009.
        raw.send(masked_frame(0x40 | OPCODE_TEXT, _deflated(b" " * 4_000_000)))
        _, code, _ = raw.until_close()
        assert code == 1009
    finally:
        raw.close()


def test_a_bad_offer_is_declined_not_refused(server: Server) -> None:
    offer = {"Sec-WebSocket-Extensions": 'permessage-deflate; x="unterminated'}
    raw = RawSocket(server.port, "/public", headers=offer)
    try:
        assert raw.status == 101
        assert "Sec-WebSocket-Extensions" not in raw.head
        # RSV1 without the extension negotiated is a protocol error.
        assert raw.frame() == (OPCODE_TEXT, subscribed().encode())
        raw.send(masked_frame(0x40 | OPCODE_TEXT, _deflated(b"ping")))
        _, code, _ = raw.until_close()
        assert code == 1002
    finally:
        raw.close()


def test_compression_off_ignores_the_offer(
    start_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = start_server({"RANGER_COMPRESSION": "off"})
    client = Spied(server.url("/public"), monkeypatch)
    try:
        assert client.ws.response is not None
        assert "Sec-WebSocket-Extensions" not in client.ws.response.headers
        assert client.ws.protocol.extensions == []
    finally:
        client.ws.close()
