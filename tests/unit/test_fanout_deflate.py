"""The fan-out hot path: one frame per message, and with permessage-deflate one compressed frame."""

from __future__ import annotations

import zlib

from ranger_py.auth import ANONYMOUS, Auth
from ranger_py.fanout import Fanout
from ranger_py.frames import encode_text
from ranger_py.router import Router


class Metrics:
    def __init__(self) -> None:
        self.received = 0
        self.delivered = 0
        self.dropped: dict[str, int] = {}
        self.resyncs: dict[str, int] = {}

    def observe_fanout(self, seconds: float) -> None:
        pass


class Recipient:
    """What the fan-out sees of a websocket: its negotiated window and its queue."""

    auth: Auth = ANONYMOUS

    def __init__(self, deflate: int = 0) -> None:
        self.deflate = deflate
        self.frames: list[bytes] = []

    def queue(self, frame: bytes) -> None:
        self.frames.append(frame)


def fanout(
    recipients: list[Recipient], compress_from: int | None, deflating: int | None = None
) -> Fanout:
    router = Router({}, max_streams=10, max_increments=10, on_change=lambda *_: None)
    for recipient in recipients:
        router.subscribe(recipient, ["btcusd.trades"])
    # As Clients counts them, unless the test says otherwise.
    count = sum(bool(r.deflate) for r in recipients) if deflating is None else deflating
    return Fanout(
        router,
        lambda: None,
        Metrics(),
        every=64,
        pause=lambda: None,
        compress_from=compress_from,
        deflating=lambda: count,
    )


def inflated(frame: bytes, window_bits: int = 15) -> bytes:
    assert frame[0] == 0xC1  # FIN | RSV1 | text
    length = frame[1] if frame[1] < 126 else int.from_bytes(frame[2:4], "big")
    body = frame[2:] if frame[1] < 126 else frame[4:]
    assert len(body) == length
    return zlib.decompressobj(-window_bits).decompress(body + b"\x00\x00\xff\xff")


BODY = b'{"trades":[' + b'{"tid":1,"price":"42000.0","amount":"0.1"},' * 40 + b"{}]}"
PAYLOAD = b'{"btcusd.trades":' + BODY + b"}"


def test_compressed_once_the_same_bytes_to_every_compressing_recipient() -> None:
    plain = [Recipient() for _ in range(3)]
    compressing = [Recipient(15) for _ in range(3)]
    small_window = [Recipient(9) for _ in range(2)]
    fanout(plain + compressing + small_window, compress_from=1024).on_broker_message(
        "public.btcusd.trades", BODY
    )
    frames = {id(r.frames[0]) for r in compressing}
    assert len(frames) == 1  # one object, shared
    assert inflated(compressing[0].frames[0]) == PAYLOAD
    assert len({id(r.frames[0]) for r in small_window}) == 1  # one per window size in use
    assert small_window[0].frames[0] is not compressing[0].frames[0]
    assert inflated(small_window[0].frames[0], 9) == PAYLOAD
    assert len({id(r.frames[0]) for r in plain}) == 1
    assert plain[0].frames == [encode_text(PAYLOAD)]


def test_below_the_threshold_every_recipient_gets_the_plain_frame() -> None:
    recipients = [Recipient(15), Recipient()]
    fanout(recipients, compress_from=len(PAYLOAD) + 1).on_broker_message(
        "public.btcusd.trades", BODY
    )
    assert recipients[0].frames == recipients[1].frames == [encode_text(PAYLOAD)]


def test_at_the_threshold_it_is_compressed() -> None:
    recipient = Recipient(15)
    fanout([recipient], compress_from=len(PAYLOAD)).on_broker_message("public.btcusd.trades", BODY)
    assert inflated(recipient.frames[0]) == PAYLOAD


def test_while_no_client_negotiated_compression_the_plain_loop_asks_nothing() -> None:
    class Plain(Recipient):
        @property
        def deflate(self) -> int:
            raise AssertionError("the plain loop must not look at a recipient's window")

        @deflate.setter
        def deflate(self, value: int) -> None:
            pass

    recipients: list[Recipient] = [Plain(), Plain()]
    fanout(recipients, compress_from=0, deflating=0).on_broker_message("public.btcusd.trades", BODY)
    assert recipients[0].frames == [encode_text(PAYLOAD)]


def test_compression_off_never_compresses() -> None:
    recipient = Recipient(15)  # cannot happen with compression off; the fan-out does not ask
    fanout([recipient], compress_from=None).on_broker_message("public.btcusd.trades", BODY)
    assert recipient.frames == [encode_text(PAYLOAD)]
