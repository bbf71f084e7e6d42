"""ranger_py.fanout: a broker message through a real Router to subscribers that record frames."""

from __future__ import annotations

import pytest

from ranger_py.auth import ANONYMOUS, Auth
from ranger_py.fanout import Fanout, yield_every
from ranger_py.router import Router


def text_frame(payload: bytes) -> bytes:
    """An unmasked final text frame, as a server sends it (payloads under 126 bytes)."""
    assert len(payload) < 126
    return bytes((0x81, len(payload))) + payload


TRADE = b'{"tid":1,"price":"42000.0"}'
TRADE_FRAME = text_frame(b'{"btcusd.trades":{"tid":1,"price":"42000.0"}}')


class Subscriber:
    """What the fan-out needs of a websocket: ``auth`` for the router, ``queue`` for frames."""

    def __init__(self, auth: Auth = ANONYMOUS) -> None:
        self.auth = auth
        self.frames: list[bytes] = []

    def queue(self, frame: bytes) -> None:
        self.frames.append(frame)


class Counts:
    """The FanoutMetrics the fan-out bumps."""

    def __init__(self) -> None:
        self.received = 0
        self.delivered = 0
        self.dropped: dict[str, int] = {}
        self.resyncs: dict[str, int] = {}
        self.fanouts: list[float] = []

    def observe_fanout(self, seconds: float) -> None:
        self.fanouts.append(seconds)


class Rig:
    def __init__(self, every: int = 1000) -> None:
        self.router = Router({})
        self.metrics = Counts()
        self.flushes = 0
        self.pauses: list[int] = []  # messages received when each pause came
        self.fanout = Fanout(
            self.router, self.request_flush, self.metrics, every=every, pause=self.pause
        )

    def request_flush(self) -> None:
        self.flushes += 1

    def pause(self) -> None:
        self.pauses.append(self.metrics.received)

    def subscribers(self, n: int, stream: str, auth: Auth = ANONYMOUS) -> list[Subscriber]:
        made = [Subscriber(auth) for _ in range(n)]
        for subscriber in made:
            self.router.subscribe(subscriber, [stream])
        return made


def test_one_message_is_encoded_once_and_the_same_bytes_queued_to_every_recipient() -> None:
    rig = Rig()
    subscribers = rig.subscribers(5, "btcusd.trades")
    rig.fanout.on_broker_message("public.btcusd.trades", TRADE)
    frames = [s.frames for s in subscribers]
    assert all(len(got) == 1 for got in frames)
    first = frames[0][0]
    assert first == TRADE_FRAME
    assert all(got[0] is first for got in frames)


def test_only_the_streams_subscribers_get_it() -> None:
    rig = Rig()
    trades = rig.subscribers(2, "btcusd.trades")
    others = rig.subscribers(2, "ethusd.trades")
    rig.fanout.on_broker_message("public.btcusd.trades", TRADE)
    assert [s.frames for s in trades] == [[TRADE_FRAME], [TRADE_FRAME]]
    assert [s.frames for s in others] == [[], []]


def test_a_private_message_reaches_only_that_users_connections() -> None:
    rig = Rig()
    mine = rig.subscribers(2, "order", Auth(uid="ID1"))
    theirs = rig.subscribers(1, "order", Auth(uid="ID2"))
    rig.fanout.on_broker_message("private.ID1.order", b'{"id":7}')
    assert [s.frames for s in mine] == [[text_frame(b'{"order":{"id":7}}')]] * 2
    assert theirs[0].frames == []
    assert (rig.metrics.received, rig.metrics.delivered) == (1, 2)


def test_received_and_delivered_count_messages_and_recipients() -> None:
    rig = Rig()
    rig.subscribers(3, "btcusd.trades")
    rig.subscribers(2, "global.tickers")
    rig.fanout.on_broker_message("public.btcusd.trades", TRADE)
    rig.fanout.on_broker_message("global.tickers", b"{}")
    rig.fanout.on_broker_message("public.nobody.trades", b"{}")
    assert (rig.metrics.received, rig.metrics.delivered) == (3, 5)
    assert rig.metrics.dropped == {}
    # One fan-out timing per message that had recipients.
    assert len(rig.metrics.fanouts) == 2
    assert all(seconds >= 0 for seconds in rig.metrics.fanouts)


def test_dropped_messages_are_counted_by_reason() -> None:
    rig = Rig()
    rig.subscribers(1, "btcusd.ob-inc")
    rig.fanout.on_broker_message("nonsense", b"{}")
    rig.fanout.on_broker_message("public.btcusd.trades", b"{not json")
    rig.fanout.on_broker_message("public.btcusd.trades", b"\xff")
    rig.fanout.on_broker_message("public.btcusd.ob-inc", b'{"sequence":2}')  # no snapshot yet
    assert rig.metrics.dropped == {"bad_routing_key": 1, "bad_json": 2, "no_snapshot": 1}
    assert (rig.metrics.received, rig.metrics.delivered) == (4, 0)
    assert rig.metrics.fanouts == []


def test_request_flush_only_when_the_message_had_recipients() -> None:
    rig = Rig()
    rig.subscribers(2, "btcusd.trades")
    rig.fanout.on_broker_message("public.ethusd.trades", TRADE)  # nobody subscribed
    rig.fanout.on_broker_message("nonsense", TRADE)  # dropped
    assert rig.flushes == 0
    rig.fanout.on_broker_message("public.btcusd.trades", TRADE)
    assert rig.flushes == 1
    rig.fanout.on_broker_message("public.btcusd.trades", TRADE)
    assert rig.flushes == 2


def test_an_order_book_snapshot_is_cached_then_its_increments_are_fanned_out() -> None:
    rig = Rig()
    early = rig.subscribers(1, "btcusd.ob-inc")[0]
    rig.fanout.on_broker_message("public.btcusd.ob-snap", b'{"sequence":1}')
    rig.fanout.on_broker_message("public.btcusd.ob-snap", b'{"sequence":1}')  # cached only
    rig.fanout.on_broker_message("public.btcusd.ob-inc", b'{"sequence":2}')
    assert early.frames == [
        text_frame(b'{"btcusd.ob-snap":{"sequence":1}}'),
        text_frame(b'{"btcusd.ob-inc":{"sequence":2}}'),
    ]
    assert (rig.metrics.received, rig.metrics.delivered) == (3, 2)


def test_pause_comes_exactly_every_n_messages_whatever_became_of_them() -> None:
    rig = Rig(every=3)
    rig.subscribers(1, "btcusd.trades")
    for n in range(10):
        # Delivered, undeliverable and dropped messages alike.
        key = ("public.btcusd.trades", "public.nobody.trades", "nonsense")[n % 3]
        rig.fanout.on_broker_message(key, TRADE)
    assert rig.pauses == [3, 6, 9]


def test_every_one_pauses_after_each_message() -> None:
    rig = Rig(every=1)
    for _ in range(4):
        rig.fanout.on_broker_message("nonsense", b"{}")
    assert rig.pauses == [1, 2, 3, 4]


@pytest.mark.parametrize(
    ("queue_frames", "every"),
    [(0, 1), (1, 1), (2, 1), (3, 1), (4, 2), (10, 5), (127, 63), (128, 64), (129, 64), (10**6, 64)],
)
def test_yield_every_is_half_the_send_queue_at_least_one_at_most_64(
    queue_frames: int, every: int
) -> None:
    assert yield_every(queue_frames) == every
