"""The exchange scenario's model: its markets, who follows which, and what is published how often.

Pure and seeded: the same profile gives the same clients and the same schedule on every run, so
runs differ only by the server under test. No numpy (the unit tests import this module with the
dev requirements alone) and no I/O. The rates and why they are what they are: bench/README.md,
"The exchange scenario".

* Markets ``mkt000usd`` .. ``mkt099usd`` are ranked: the lower the number, the more clients follow
  it and the more it trades (Zipf weights, :func:`zipf`).
* A :class:`Feed` is one routing key published at a fixed rate from a phase of its own, so that
  the 1,200 kline keys do not all fall due in the same instant.
* A public client follows 1-3 markets (``<m>.trades``, ``<m>.ob-inc``, ``<m>.kline-1m`` of each),
  some also ``global.tickers``; a private user holds ``order`` and ``trade``.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "CLIENT_EVENTS",
    "KLINE_PERIODS",
    "PRIVATE_EVENTS",
    "TICKERS",
    "Feed",
    "Profile",
    "category",
    "expected_frames",
    "market_names",
    "public_clients",
    "rate_by_key",
    "rates_by_category",
    "routing_key",
    "schedule",
    "zipf",
]

# docs/protocol.md §5: the periods Peatio publishes a candle of, each every ~2 s.
KLINE_PERIODS = ("1m", "5m", "15m", "30m", "1h", "2h", "4h", "6h", "12h", "1d", "3d", "1w")
# What a market page shows: its trades, its book and its chart.
CLIENT_EVENTS = ("trades", "ob-inc", "kline-1m")
PRIVATE_EVENTS = ("order", "trade")
TICKERS = "global.tickers"

# Body kinds of the publisher (bench.publisher.EXCHANGE_BODIES).
TRADE, KLINE, INC, SNAP, TICKER, ORDER, FILL = (
    "trade",
    "kline",
    "inc",
    "snap",
    "tickers",
    "order",
    "fill",
)


@dataclass(frozen=True)
class Profile:
    """The exchange: its size, its activity and its clients' habits."""

    markets: int = 100
    # Public trades of the whole exchange, spread over the markets by activity.
    trades_per_s: float = 15.0
    # Order-book changes per trade: the trade's own level, plus orders placed and cancelled.
    book_changes_per_trade: float = 4.0
    # Zipf exponent of market activity (trades, book changes): rank 1 trades most.
    activity_exponent: float = 1.0
    kline_every_s: float = 2.0
    kline_periods: tuple[str, ...] = KLINE_PERIODS
    tickers_every_s: float = 5.0
    # Each book's snapshot, carrying the sequence of its last increment.
    snapshot_every_s: float = 10.0
    # Zipf exponent of user activity: a few users (bots) place most orders.
    user_exponent: float = 1.0
    # Zipf exponent of market popularity among clients: a few markets hold most of them.
    popularity_exponent: float = 1.0
    markets_per_client: tuple[int, ...] = (1, 2, 3)
    ticker_share: float = 0.3
    seed: int = 20261208

    @property
    def private_orders_per_s(self) -> float:
        """An order event for every book change (an order placed, cancelled or filled changes
        one level) and for both orders of every trade; every trader counted as connected."""
        return self.trades_per_s * (self.book_changes_per_trade + 2)

    @property
    def private_trades_per_s(self) -> float:
        """A trade event to each side of every trade."""
        return self.trades_per_s * 2


@dataclass(frozen=True)
class Feed:
    """One routing key, ``rate`` messages a second, the first ``phase`` s after the start."""

    key: str
    kind: str
    rate: float
    subject: str  # the market, or the uid of a private event
    phase: float

    def count(self, duration: float) -> int:
        """Messages due in ``[0, duration)``: n with ``phase + n / rate < duration``.

        >>> Feed("k", "trade", 2.0, "m", 0.1).count(1.0), Feed("k", "trade", 0.2, "m", 4.9).count(3)
        (2, 0)
        """
        if duration <= self.phase:
            return 0
        n = int((duration - self.phase) * self.rate)
        # The float product may land on either side of a whole number: settle it exactly.
        while n > 0 and self.phase + (n - 1) / self.rate >= duration:
            n -= 1
        while self.phase + n / self.rate < duration:
            n += 1
        return n


def market_names(count: int) -> list[str]:
    """``mkt000usd``, ``mkt001usd``, ...: rank order, the most active first."""
    return [f"mkt{i:03d}usd" for i in range(count)]


def zipf(count: int, exponent: float) -> list[float]:
    """Weights of ranks 1..``count``, each ∝ 1 / rank^``exponent``, summing to 1.

    >>> [round(w, 3) for w in zipf(4, 1.0)]
    [0.48, 0.24, 0.16, 0.12]
    >>> zipf(3, 0.0)
    [0.3333333333333333, 0.3333333333333333, 0.3333333333333333]
    """
    raw = [1.0 / (rank**exponent) for rank in range(1, count + 1)]
    total = sum(raw)
    return [w / total for w in raw]


def routing_key(stream: str, uid: str | None = None) -> str:
    """The key Peatio publishes a stream's messages under (PROTOCOL §5).

    >>> routing_key("mkt001usd.trades"), routing_key("global.tickers"), routing_key("order", "ID1")
    ('public.mkt001usd.trades', 'global.tickers', 'private.ID1.order')
    """
    if "." not in stream:
        if uid is None:
            raise ValueError(f"private stream {stream!r} needs a uid")
        return f"private.{uid}.{stream}"
    if stream == TICKERS:
        return stream
    return f"public.{stream}"


def _phase(rng: random.Random, rate: float) -> float:
    return rng.random() / rate


def schedule(profile: Profile, uids: Sequence[str]) -> list[Feed]:
    """Every routing key the exchange publishes, at its rate (bench/README.md gives why).

    Per market: trades and book changes by activity rank, a snapshot of its book every
    ``snapshot_every_s``, a candle of every period every ``kline_every_s``; ``global.tickers``
    every ``tickers_every_s``; each user's ``order`` and ``trade`` events by its activity rank.
    Feeds with no activity (rate 0) are left out.
    """
    rng = random.Random(profile.seed)
    feeds: list[Feed] = []

    def add(key: str, kind: str, rate: float, subject: str) -> None:
        if rate > 0:
            feeds.append(Feed(key, kind, rate, subject, _phase(rng, rate)))

    activity = zipf(profile.markets, profile.activity_exponent)
    for market, share in zip(market_names(profile.markets), activity, strict=True):
        trades = profile.trades_per_s * share
        add(f"public.{market}.trades", TRADE, trades, market)
        add(f"public.{market}.ob-inc", INC, trades * profile.book_changes_per_trade, market)
        add(f"public.{market}.ob-snap", SNAP, 1.0 / profile.snapshot_every_s, market)
        for period in profile.kline_periods:
            add(f"public.{market}.kline-{period}", KLINE, 1.0 / profile.kline_every_s, market)
    add(TICKERS, TICKER, 1.0 / profile.tickers_every_s, "")
    weights = zipf(len(uids), profile.user_exponent) if uids else []
    for uid, share in zip(uids, weights, strict=True):
        add(f"private.{uid}.order", ORDER, profile.private_orders_per_s * share, uid)
        add(f"private.{uid}.trade", FILL, profile.private_trades_per_s * share, uid)
    return feeds


def _pick(rng: random.Random, weights: Sequence[float], count: int) -> list[int]:
    """``count`` distinct ranks, each draw weighted among those left."""
    left = list(range(len(weights)))
    picked: list[int] = []
    for _ in range(min(count, len(left))):
        (index,) = rng.choices(range(len(left)), weights=[weights[i] for i in left])
        picked.append(left.pop(index))
    return picked


def public_clients(profile: Profile, count: int) -> list[list[str]]:
    """The streams of each of ``count`` public clients: 1-3 markets by popularity, every
    :data:`CLIENT_EVENTS` of each, and ``global.tickers`` for ``ticker_share`` of them."""
    rng = random.Random(profile.seed + 1)
    names = market_names(profile.markets)
    popularity = zipf(profile.markets, profile.popularity_exponent)
    clients = []
    for _ in range(count):
        held = rng.choice(profile.markets_per_client)
        streams = [
            f"{names[rank]}.{event}"
            for rank in sorted(_pick(rng, popularity, held))
            for event in CLIENT_EVENTS
        ]
        if rng.random() < profile.ticker_share:
            streams.append(TICKERS)
        clients.append(streams)
    return clients


def rate_by_key(feeds: Iterable[Feed]) -> dict[str, float]:
    return {feed.key: feed.rate for feed in feeds}


def expected_frames(
    streams: Iterable[str], per_key: Mapping[str, float], uid: str | None = None
) -> float:
    """What one client should receive of ``per_key`` (a count or a rate per routing key).

    Snapshots are not among a client's streams: in sequence, a snapshot goes live to nobody who
    holds the book (PROTOCOL §6), and every client holds it from the first one on.

    >>> expected_frames(["m.trades", "order"], {"public.m.trades": 3, "private.U.order": 2}, "U")
    5
    """
    return sum(per_key.get(routing_key(stream, uid), 0) for stream in streams)


_CATEGORIES = {
    TRADE: "trades",
    INC: "ob-inc",
    SNAP: "ob-snap",
    TICKER: "global.tickers",
    ORDER: "private order",
    FILL: "private trade",
}


def category(feed: Feed) -> str:
    """What a feed is, for the rate table: candles of the period clients follow apart."""
    if feed.kind == KLINE:
        return "kline-1m" if feed.key.endswith(".kline-1m") else "kline, other periods"
    return _CATEGORIES[feed.kind]


def rates_by_category(feeds: Iterable[Feed]) -> dict[str, float]:
    """msg/s per :func:`category`, in the order they first come."""
    rates: dict[str, float] = {}
    for feed in feeds:
        name = category(feed)
        rates[name] = rates.get(name, 0.0) + feed.rate
    return rates
