"""Bodies of the exchange scenario's events, shaped like Peatio's (docs/protocol.md §5).

Every body starts with ``"ts"`` (the send time, CLOCK_MONOTONIC in µs) like every body of the
publisher, so that a client reads its latency with one search. Two shapes differ from Peatio's
for that: a candle, which Peatio sends as a bare array, comes as ``{"ts":..,"candle":[...]}``,
and the small ones (candles, book increments) are padded to :data:`MIN_BYTES` with a ``"pad"``
field, because the load generator tells data frames from replies by their size
(``bench.loadgen.MIN_BODY``). The gateway forwards each body byte for byte either way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from bench.exchange import FILL, INC, KLINE, ORDER, SNAP, TICKER, TRADE

__all__ = ["MIN_BYTES", "ExchangeBodies"]

MIN_BYTES = 100
_LEVELS = 10  # per side of a snapshot
_STATES = (b"wait", b"wait", b"done", b"cancel")


def _padded(head: bytes) -> bytes:
    """``head`` (a JSON object without its closing brace), padded to :data:`MIN_BYTES`."""
    if len(head) + 1 >= MIN_BYTES:
        return head + b"}"
    # ,"pad":"<x...>"} is 10 bytes around the x's.
    return head + b',"pad":"' + b"x" * max(0, MIN_BYTES - len(head) - 10) + b'"}'


def _price(n: int) -> bytes:
    """A price that wanders between 9800 and 9999.99 (the same for every market)."""
    return b"%d.%02d" % (9800 + (n * 37) % 200, (n * 13) % 100)


def _amount(n: int) -> bytes:
    return b"%d.%04d" % (n % 3, (n * 7919) % 10000)


class ExchangeBodies:
    """The body of the n-th message of one feed, by its kind (``bench.exchange`` kinds).

    ``build(kind, sent_us, n, subject, sequence)``: ``subject`` is the feed's market (or the
    user's uid for private events), ``sequence`` the book's sequence number (increments and
    snapshots; ignored otherwise), ``sent_us`` the send time. ``markets`` are the markets a
    ``global.tickers`` body lists.
    """

    def __init__(self, markets: Sequence[str]) -> None:
        self._markets = [m.encode() for m in markets]
        self._by_kind: dict[str, Callable[[int, int, bytes, int], bytes]] = {
            TRADE: self._trade,
            KLINE: self._kline,
            INC: self._increment,
            SNAP: self._snapshot,
            TICKER: self._tickers,
            ORDER: self._order,
            FILL: self._fill,
        }

    def build(self, kind: str, sent_us: int, n: int, subject: str, sequence: int = 0) -> bytes:
        return self._by_kind[kind](sent_us, n, subject.encode(), sequence)

    @staticmethod
    def _trade(sent_us: int, n: int, subject: bytes, sequence: int) -> bytes:
        side = b"buy" if n % 2 else b"sell"
        return (
            b'{"ts":%d,"trades":[{"tid":%d,"taker_type":"%s","date":%d,"price":"%s",'
            b'"amount":"%s"}]}'
            % (
                sent_us,
                n + 1,
                side,
                sent_us // 1_000_000,
                _price(n),
                _amount(n),
            )
        )

    @staticmethod
    def _kline(sent_us: int, n: int, subject: bytes, sequence: int) -> bytes:
        start = sent_us // 60_000_000 * 60
        low, high = 9800 + n % 50, 9900 + n % 50
        head = b'{"ts":%d,"candle":[%d,%d.5,%d.0,%d.0,%d.5,%d.%03d]' % (
            sent_us,
            start,
            low + 20,
            high,
            low,
            low + 40,
            n % 20,
            (n * 7) % 1000,
        )
        return _padded(head)

    @staticmethod
    def _increment(sent_us: int, n: int, subject: bytes, sequence: int) -> bytes:
        # One level of one side with its new total; an empty amount (every fifth) removes it.
        side = b"asks" if n % 2 else b"bids"
        amount = b"" if n % 5 == 4 else _amount(n)
        head = b'{"ts":%d,"%s":["%s","%s"],"sequence":%d' % (
            sent_us,
            side,
            _price(n),
            amount,
            sequence,
        )
        return _padded(head)

    @staticmethod
    def _snapshot(sent_us: int, n: int, subject: bytes, sequence: int) -> bytes:
        asks = b",".join(b'["%d.5","%d.25"]' % (9900 + i, i + 1) for i in range(_LEVELS))
        bids = b",".join(b'["%d.5","%d.75"]' % (9899 - i, i + 1) for i in range(_LEVELS))
        return b'{"ts":%d,"asks":[%s],"bids":[%s],"sequence":%d}' % (sent_us, asks, bids, sequence)

    def _tickers(self, sent_us: int, n: int, subject: bytes, sequence: int) -> bytes:
        at = sent_us // 1_000_000
        parts = [
            b'"%s":{"at":"%d","avg_price":"%s","high":"%d.0","last":"%s","low":"%d.0",'
            b'"open":"%s","price_change_percent":"+%d.%02d%%","volume":"%s","amount":"%d.%02d"}'
            % (
                market,
                at,
                _price(n + rank),
                10_000 + rank,
                _price(n + rank + 1),
                9_700 - rank,
                _price(rank),
                rank % 5,
                (n + rank) % 100,
                _amount(n + rank),
                1000 + rank * 17,
                rank % 100,
            )
            for rank, market in enumerate(self._markets)
        ]
        return b'{"ts":%d,%s}' % (sent_us, b",".join(parts))

    def _market(self, n: int) -> bytes:
        return self._markets[(n * 7) % len(self._markets)] if self._markets else b"btcusd"

    def _order(self, sent_us: int, n: int, subject: bytes, sequence: int) -> bytes:
        at = sent_us // 1_000_000
        state = _STATES[n % len(_STATES)]
        side, kind = (b"buy", b"bid") if n % 2 else (b"sell", b"ask")
        return (
            b'{"ts":%d,"id":%d,"market":"%s","kind":"%s","side":"%s","ord_type":"limit",'
            b'"price":"%s","avg_price":"0.0","state":"%s","origin_volume":"%s",'
            b'"remaining_volume":"%s","executed_volume":"0.0","at":%d,"created_at":%d,'
            b'"updated_at":%d,"trades_count":0}'
            % (
                sent_us,
                n + 1,
                self._market(n),
                kind,
                side,
                _price(n),
                state,
                _amount(n),
                _amount(n),
                at,
                at,
                at,
            )
        )

    def _fill(self, sent_us: int, n: int, subject: bytes, sequence: int) -> bytes:
        side = b"buy" if n % 2 else b"sell"
        return (
            b'{"ts":%d,"id":%d,"price":"%s","amount":"%s","total":"%d.00","market":"%s",'
            b'"side":"%s","taker_type":"%s","created_at":%d,"order_id":%d}'
            % (
                sent_us,
                n + 1,
                _price(n),
                _amount(n),
                (n * 31) % 10_000,
                self._market(n),
                side,
                side,
                sent_us // 1_000_000,
                n + 1,
            )
        )
