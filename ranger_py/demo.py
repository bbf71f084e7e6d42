"""The demo feed: synthetic Peatio traffic, for trying ranger-py without an exchange behind it.

Owns three things:

* :class:`Feed`, the pure core: an endless series of ``(routing_key, body)`` pairs shaped as Peatio
  publishes them (``global.tickers``, ``public.<m>.trades``, ``public.<m>.kline-1m``,
  ``public.<m>.ob-snap`` / ``ob-inc`` and ``private.<uid>.order`` / ``trade``). Time comes from a
  clock and chance from a ``random.Random``, so a seed and a clock give the same series every time.
* the ``ranger-py demo`` command (:func:`add_arguments`, :func:`run`): the feed published to the
  configured broker, as Peatio would.
* :class:`WorkerFeed`, for ``RANGER_DEMO=on``: the feed published from a greenlet of the worker into
  kombu's in-memory transport, which the gateway's ordinary consumer reads, so everything after the
  broker is the production path.

kombu is imported only inside the two drivers: the command line may import this module in a
process that gevent has not patched yet, and kombu binds ``time.sleep`` when it is imported.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import random
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from ranger_py.config import Config, mask_url
from ranger_py.errors import ConfigError

__all__ = [
    "DEMO_UID",
    "MARKETS",
    "MEMORY_URL",
    "Feed",
    "InMemoryBroker",
    "Market",
    "WorkerFeed",
    "add_arguments",
    "main",
    "pace",
    "run",
]

log = logging.getLogger(__name__)

Message = tuple[str, bytes]

DEMO_UID: Final = "IDDEMO000001"
MEMORY_URL: Final = "memory://localhost/"  # a host, or kombu warns that it assumes one
# Messages per second: the command's default, and the in-server feed's (it has no setting).
DEFAULT_RATE: Final = 20.0
SERVER_RATE: Final = 20.0
# Levels kept on each side of a book; Peatio sends at most 301 per side in a snapshot.
MIN_LEVELS, MAX_LEVELS = 5, 20
# Peatio's engine sends a new snapshot before an increment when fewer than 20 increments followed
# the last one and it is 60 s old, or when 20 or more did and it is over 10 s old.
SNAPSHOT_AFTER_INCREMENTS = 20
SNAPSHOT_MIN_AGE, SNAPSHOT_MAX_AGE = 10.0, 60.0
# How far a paced publisher may fall behind before it gives up catching up (no bursts).
MAX_LAG = 1.0


@dataclass(frozen=True)
class Market:
    """A market of the feed. Prices are counted in ticks of ``10**-price_decimals``, amounts in
    units of ``10**-amount_decimals``; ``spacing`` is the usual distance between book levels."""

    name: str
    price_decimals: int
    amount_decimals: int
    start_price: int
    spacing: int
    min_amount: int
    max_amount: int


MARKETS: Final = (
    Market("btcusd", 1, 4, 420_000, 10, 10, 20_000),  # 42000.0, levels ~1 USD apart, 0.001-2 BTC
    Market("ethusd", 2, 4, 220_000, 10, 100, 300_000),  # 2200.00, ~0.10 apart, 0.01-30 ETH
)


def _decimal(value: int, decimals: int) -> str:
    """``value * 10**-decimals`` written exactly, as Peatio writes its decimals ("42000.5")."""
    sign = "-" if value < 0 else ""
    whole, fraction = divmod(abs(value), 10**decimals)
    return f"{sign}{whole}.{fraction:0{decimals}d}" if decimals else f"{sign}{whole}"


def _number(value: int, decimals: int) -> float:
    # Through the exact decimal, so 420001 ticks of 0.1 is 42000.1, not 42000.100000000006.
    return float(_decimal(value, decimals))


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(int(timestamp), UTC).isoformat()


def _json(payload: object) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()


@dataclass
class _Book:
    market: Market
    asks: dict[int, int]
    bids: dict[int, int]
    sequence: int = 1
    increments: int = 0  # since the last snapshot
    snapshot_at: float = 0.0

    def side(self, name: str) -> dict[int, int]:
        return self.asks if name == "asks" else self.bids


@dataclass
class _Stats:
    """A market's last 24 h as the tickers show them (here: since the feed started)."""

    open: int
    last: int
    low: int
    high: int
    volume: int = 0  # amount units
    quote: int = 0  # price ticks x amount units
    candle_start: int = 0
    candle: list[int] = field(default_factory=list)  # open, high, low, close, volume


@dataclass
class _Order:
    id: int
    market: Market
    side: str
    price: int
    volume: int
    created_at: float


class Feed:
    """Peatio's messages for ``markets`` and the private events of ``uid``, without end.

    Each step of the market (one to three messages) reads ``clock`` once, in seconds since the
    epoch; every random choice comes from ``rng``, none depends on the clock. Per book, the first
    message is an ``ob-snap`` and the ``ob-inc`` sequences that follow are consecutive; a later
    snapshot carries the sequence of the increment before it, as Peatio's engine does, so
    increments go on at snapshot + 1.
    """

    def __init__(
        self,
        rng: random.Random,
        clock: Callable[[], float],
        *,
        uid: str = DEMO_UID,
        markets: tuple[Market, ...] = MARKETS,
    ) -> None:
        if not markets:
            raise ValueError("the feed needs at least one market")
        self.rng = rng
        self.clock = clock
        self.uid = uid
        self.markets = markets
        self._now = clock()
        self._books = {market.name: self._new_book(market) for market in markets}
        self._stats = {
            market.name: _Stats(
                open=market.start_price,
                last=market.start_price,
                low=market.start_price,
                high=market.start_price,
            )
            for market in markets
        }
        self._orders: list[_Order] = []
        self._trade_ids = itertools.count(1)
        self._order_ids = itertools.count(1)
        self._pending: deque[Message] = deque()
        # Every book opens with its snapshot, then the tickers.
        for book in self._books.values():
            self._pending.append(self._snapshot(book))
        self._pending.append(self._tickers())

    def __iter__(self) -> Iterator[Message]:
        return self

    def __next__(self) -> Message:
        while not self._pending:
            self._now = self.clock()
            self._step()
        return self._pending.popleft()

    # -- what happens next -------------------------------------------------------------------

    def _step(self) -> None:
        rng = self.rng
        market = rng.choice(self.markets)
        event = rng.choices(
            ("book", "trade", "kline", "tickers", "private"), weights=(60, 14, 8, 5, 8)
        )[0]
        if event == "book":
            self._change_book(self._books[market.name])
        elif event == "trade":
            self._trade(market)
        elif event == "kline":
            self._pending.append(self._kline(market))
        elif event == "tickers":
            self._pending.append(self._tickers())
        else:
            self._private(market)

    def _change_book(self, book: _Book) -> None:
        rng = self.rng
        name = rng.choice(("asks", "bids"))
        levels = book.side(name)
        if len(levels) <= MIN_LEVELS:
            action = "add"
        elif len(levels) >= MAX_LEVELS:
            action = "remove"
        else:
            action = rng.choices(("update", "add", "remove"), weights=(5, 3, 2))[0]
        price = self._new_price(book, name) if action == "add" else None
        if price is not None:
            self._increment(book, name, price, self._amount(book.market))
        elif action == "remove":
            self._increment(book, name, rng.choice(sorted(levels)), 0)
        else:
            near_top = sorted(levels, reverse=name == "bids")[:8]
            self._increment(book, name, rng.choice(near_top), self._amount(book.market))

    def _new_price(self, book: _Book, name: str) -> int | None:
        """A free price for a new level of side ``name``; sometimes inside the spread, so the
        best prices wander. None if the draws found no room."""
        spacing = book.market.spacing
        best_ask, best_bid = min(book.asks), max(book.bids)
        for _ in range(5):
            offset = self.rng.randint(-2 * spacing, 12 * spacing)
            if name == "asks":
                price = best_ask + offset
                fits = price > best_bid
            else:
                price = best_bid - offset
                fits = 0 < price < best_ask
            if fits and price not in book.side(name):
                return price
        return None

    def _trade(self, market: Market) -> None:
        """A taker takes part of the best level of the other side: a trade, then its increment."""
        rng = self.rng
        book = self._books[market.name]
        taker = rng.choice(("buy", "sell"))
        name = "asks" if taker == "buy" else "bids"
        levels = book.side(name)
        price = min(levels) if name == "asks" else max(levels)
        amount = min(levels[price], self._amount(market))
        if len(levels) <= MIN_LEVELS:
            amount = min(amount, levels[price] - 1)  # the side is thin: leave the level in place
            if amount <= 0:
                self._pending.append(self._kline(market))
                return
        trade = {
            "tid": next(self._trade_ids),
            "taker_type": taker,
            "date": int(self._now),
            "price": _decimal(price, market.price_decimals),
            "amount": _decimal(amount, market.amount_decimals),
        }
        self._pending.append((f"public.{market.name}.trades", _json({"trades": [trade]})))
        self._increment(book, name, price, levels[price] - amount)
        self._record(market, price, amount)
        if rng.random() < 0.5:
            self._pending.append(self._kline(market))

    def _private(self, market: Market) -> None:
        """The demo user places an order, or one of theirs is filled or cancelled."""
        rng = self.rng
        if not self._orders or (len(self._orders) < 3 and rng.random() < 0.4):
            self._place(market)
            return
        order = self._orders.pop(rng.randrange(len(self._orders)))
        if rng.random() < 0.6:
            trade_id = next(self._trade_ids)
            self._pending.append(
                (f"private.{self.uid}.trade", _json(self._private_trade(order, trade_id)))
            )
            self._pending.append(
                (f"private.{self.uid}.order", _json(self._order(order, "done", order.volume)))
            )
        else:
            self._pending.append(
                (f"private.{self.uid}.order", _json(self._order(order, "cancel", 0)))
            )

    def _place(self, market: Market) -> None:
        book = self._books[market.name]
        side = self.rng.choice(("buy", "sell"))
        away = self.rng.randint(0, 5) * market.spacing
        price = max(book.bids) - away if side == "buy" else min(book.asks) + away
        order = _Order(
            id=next(self._order_ids),
            market=market,
            side=side,
            price=max(price, 1),
            volume=self._amount(market),
            created_at=self._now,
        )
        self._orders.append(order)
        self._pending.append((f"private.{self.uid}.order", _json(self._order(order, "wait", 0))))

    # -- book changes ------------------------------------------------------------------------

    def _increment(self, book: _Book, name: str, price: int, amount: int) -> None:
        """Set level ``price`` of side ``name`` to ``amount`` (0 removes it) and say so.

        A snapshot due by Peatio's rule goes first and shows the book before this change.
        """
        age = self._now - book.snapshot_at
        if (book.increments < SNAPSHOT_AFTER_INCREMENTS and age >= SNAPSHOT_MAX_AGE) or (
            book.increments >= SNAPSHOT_AFTER_INCREMENTS and age > SNAPSHOT_MIN_AGE
        ):
            self._pending.append(self._snapshot(book))
        levels = book.side(name)
        if amount > 0:
            levels[price] = amount
        else:
            del levels[price]
        book.sequence += 1
        book.increments += 1
        market = book.market
        # Peatio's increment is one flat [price, amount] pair, the amount "" for a removed level.
        level = [
            _decimal(price, market.price_decimals),
            _decimal(amount, market.amount_decimals) if amount > 0 else "",
        ]
        body = _json({name: level, "sequence": book.sequence})
        self._pending.append((f"public.{market.name}.ob-inc", body))

    def _new_book(self, market: Market) -> _Book:
        half = market.spacing // 2 or 1
        asks = {
            market.start_price + half + i * market.spacing: self._amount(market) for i in range(10)
        }
        bids = {
            market.start_price - half - i * market.spacing: self._amount(market) for i in range(10)
        }
        return _Book(market, asks, bids)

    def _amount(self, market: Market) -> int:
        # Log-uniform: many small orders, a few large ones.
        low, high = math.log(market.min_amount), math.log(market.max_amount)
        return max(market.min_amount, round(math.exp(self.rng.uniform(low, high))))

    def _record(self, market: Market, price: int, amount: int) -> None:
        candle = self._candle(market)  # first: a new minute opens at the price before this trade
        stats = self._stats[market.name]
        stats.last = price
        stats.low = min(stats.low, price)
        stats.high = max(stats.high, price)
        stats.volume += amount
        stats.quote += price * amount
        candle[1] = max(candle[1], price)
        candle[2] = min(candle[2], price)
        candle[3] = price
        candle[4] += amount

    def _candle(self, market: Market) -> list[int]:
        """The current minute's [open, high, low, close, volume]; a new minute opens at the last
        price."""
        stats = self._stats[market.name]
        minute = int(self._now) // 60 * 60
        if not stats.candle or stats.candle_start != minute:
            stats.candle_start = minute
            stats.candle = [stats.last, stats.last, stats.last, stats.last, 0]
        return stats.candle

    # -- message bodies ----------------------------------------------------------------------

    def _snapshot(self, book: _Book) -> Message:
        market = book.market
        book.increments = 0
        book.snapshot_at = self._now

        def levels(side: dict[int, int], descending: bool) -> list[list[str]]:
            return [
                [
                    _decimal(price, market.price_decimals),
                    _decimal(side[price], market.amount_decimals),
                ]
                for price in sorted(side, reverse=descending)
            ]

        body = {
            "asks": levels(book.asks, False),
            "bids": levels(book.bids, True),
            "sequence": book.sequence,
        }
        return f"public.{market.name}.ob-snap", _json(body)

    def _kline(self, market: Market) -> Message:
        # Peatio's kline: [period start, open, high, low, close, volume], numbers, not strings.
        candle = self._candle(market)
        decimals = market.price_decimals
        body = [
            self._stats[market.name].candle_start,
            *(_number(price, decimals) for price in candle[:4]),
            _number(candle[4], market.amount_decimals),
        ]
        return f"public.{market.name}.kline-1m", _json(body)

    def _tickers(self) -> Message:
        tickers = {}
        for market in self.markets:
            stats = self._stats[market.name]
            pd, ad = market.price_decimals, market.amount_decimals
            average = stats.quote // stats.volume if stats.volume else stats.last
            change = (stats.last - stats.open) * 100 / stats.open
            # Peatio's tickers are all strings, the change signed: "+1.25%".
            tickers[market.name] = {
                "at": str(int(self._now)),
                "avg_price": _decimal(average, pd),
                "high": _decimal(stats.high, pd),
                "last": _decimal(stats.last, pd),
                "low": _decimal(stats.low, pd),
                "open": _decimal(stats.open, pd),
                "price_change_percent": f"{change:+.2f}%",
                "volume": _decimal(stats.volume, ad),
                "amount": _decimal(stats.quote, pd + ad),
            }
        return "global.tickers", _json(tickers)

    def _order(self, order: _Order, state: str, executed: int) -> dict[str, Any]:
        market = order.market
        pd, ad = market.price_decimals, market.amount_decimals
        remaining = order.volume - executed
        return {
            "id": order.id,
            "market": market.name,
            "kind": "bid" if order.side == "buy" else "ask",
            "side": order.side,
            "ord_type": "limit",
            "price": _decimal(order.price, pd),
            "avg_price": _decimal(order.price if executed else 0, pd),
            "state": state,
            "origin_volume": _decimal(order.volume, ad),
            "remaining_volume": _decimal(remaining, ad),
            "executed_volume": _decimal(executed, ad),
            "at": int(order.created_at),
            "created_at": _iso(order.created_at),
            "updated_at": _iso(self._now),
            "trades_count": 1 if executed else 0,
        }

    def _private_trade(self, order: _Order, trade_id: int) -> dict[str, Any]:
        market = order.market
        pd, ad = market.price_decimals, market.amount_decimals
        return {
            "id": trade_id,
            "price": _decimal(order.price, pd),
            "amount": _decimal(order.volume, ad),
            "total": _decimal(order.price * order.volume, pd + ad),
            "market": market.name,
            "side": order.side,
            "taker_type": "sell" if order.side == "buy" else "buy",  # the user's order was resting
            "created_at": _iso(self._now),
            "order_id": order.id,
        }


# -- drivers -----------------------------------------------------------------------------------


def pace(
    messages: Iterator[Message],
    publish: Callable[[str, bytes], None],
    rate: float,
    stop: threading.Event,
    *,
    duration: float | None = None,
    ready: Callable[[], bool] | None = None,
) -> int:
    """Publish ``rate`` messages a second until ``stop`` is set or ``duration`` has passed.

    While ``ready`` says no, nothing is published (a message then would reach no queue and a book's
    increments would have no snapshot). Returns how many were published.
    """
    interval = 1.0 / rate
    deadline = math.inf if duration is None else time.monotonic() + duration
    due = time.monotonic()
    sent = 0
    while not stop.is_set():
        now = time.monotonic()
        if now >= deadline:
            break
        if due > now:
            stop.wait(min(due, deadline) - now)
            continue
        if ready is not None and not ready():
            stop.wait(0.1)
            due = time.monotonic()
            continue
        routing_key, body = next(messages)
        publish(routing_key, body)
        sent += 1
        due = max(due + interval, now - MAX_LAG)
    return sent


def _peatio_exchange(name: str) -> Any:
    from kombu.entity import Exchange  # noqa: PLC0415 (see the module docstring)

    # Peatio's flags: topic, not durable, not auto-deleted.
    return Exchange(name, type="topic", durable=False, auto_delete=False)  # type: ignore[no-untyped-call]


def _publisher(producer: Any) -> Callable[[str, bytes], None]:
    def publish(routing_key: str, body: bytes) -> None:
        # Raw bytes, as Peatio publishes its JSON.
        producer.publish(body, routing_key=routing_key)

    return publish


@dataclass(frozen=True)
class InMemoryBroker:
    """The consumer's broker settings in demo mode: kombu's in-memory transport."""

    exchange: str
    queue_max_length: int
    broker_heartbeat: int
    queue_expires: int
    broker_prefetch: int
    amqp_url: str = MEMORY_URL


class WorkerFeed:
    """``RANGER_DEMO=on``: the feed, published into this worker's in-memory transport.

    :meth:`run_forever` runs in a greenlet of the worker; its blocking calls are the standard
    library's, which gevent has patched by then. The consumer reads ``broker``.
    """

    def __init__(self, config: Config, *, rate: float = SERVER_RATE, uid: str = DEMO_UID) -> None:
        self.broker = InMemoryBroker(
            exchange=config.exchange,
            queue_max_length=config.queue_max_length,
            broker_heartbeat=config.broker_heartbeat,
            queue_expires=config.queue_expires,
            broker_prefetch=config.broker_prefetch,
        )
        self.rate = rate
        self.uid = uid
        self._stop = threading.Event()
        log.warning(
            "RANGER_DEMO is on: demo mode, no broker (RABBITMQ_* settings ignored);"
            " publishing a synthetic feed of %s and private events of %s, %.0f messages/s",
            ", ".join(market.name for market in MARKETS),
            uid,
            rate,
        )

    def stop(self) -> None:
        self._stop.set()

    def run_forever(self, ready: Callable[[], bool]) -> None:
        """Publish until :meth:`stop`, only while ``ready`` (the consumer is consuming)."""
        from kombu.connection import Connection  # noqa: PLC0415 (see the module docstring)

        feed = Feed(random.Random(), time.time, uid=self.uid)
        while not self._stop.is_set():
            try:
                with Connection(self.broker.amqp_url) as conn:  # type: ignore[no-untyped-call]
                    # The producer declares the exchange, as the consumer does: same flags.
                    producer = conn.Producer(exchange=_peatio_exchange(self.broker.exchange))
                    pace(feed, _publisher(producer), self.rate, self._stop, ready=ready)
            except Exception:
                # A bug here must not take the worker's clients down with it.
                log.exception("demo feed failed; restarting in 1 s")
                self._stop.wait(1.0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``ranger-py demo``."""
    parser.add_argument(
        "--rate",
        type=_positive,
        default=DEFAULT_RATE,
        help=f"messages per second, all markets together (default {DEFAULT_RATE:g})",
    )
    parser.add_argument(
        "--uid",
        default=DEMO_UID,
        help=f"the user whose private order and trade events are sent (default {DEMO_UID})",
    )
    parser.add_argument(
        "--duration",
        type=_positive,
        default=None,
        help="seconds to run (default: until Ctrl-C)",
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="the same seed gives the same series of events"
    )


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number > 0")
    return value


def _fail(message: str) -> int:
    print(f"ranger-py demo: {message}", file=sys.stderr)
    return 1


def run(args: argparse.Namespace) -> int:
    """``ranger-py demo``: publish the feed to the configured broker; the exit status.

    1 with one line when the broker cannot be reached or is lost, 2 on a configuration error,
    0 after ``--duration`` or Ctrl-C.
    """
    try:
        return _publish_to_broker(args)
    except KeyboardInterrupt:
        return 0


def _publish_to_broker(args: argparse.Namespace) -> int:
    try:
        config = Config.load()
    except ConfigError as exc:
        print(f"ranger-py demo: invalid configuration: {exc}", file=sys.stderr)
        return 2
    from kombu.connection import Connection  # noqa: PLC0415 (see the module docstring)
    from kombu.exceptions import OperationalError  # noqa: PLC0415

    url = mask_url(config.amqp_url)
    conn: Any = Connection(config.amqp_url, connect_timeout=5)  # type: ignore[no-untyped-call]
    lost = (*conn.connection_errors, OperationalError, OSError)
    healthy = False
    try:
        try:
            conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0)
        except lost as exc:
            return _fail(f"cannot reach the broker at {url}: {exc}")
        producer = _producer(conn, config.exchange)
        seed = args.seed if args.seed is not None else random.randrange(1 << 32)
        markets = ", ".join(market.name for market in MARKETS)
        print(
            f"ranger-py demo: publishing {markets} and private events of {args.uid} to exchange"
            f" {config.exchange!r} at {url}, {args.rate:g} messages/s (seed {seed}); Ctrl-C stops",
            file=sys.stderr,
        )
        feed = Feed(random.Random(seed), time.time, uid=args.uid)
        try:
            sent = pace(
                feed, _publisher(producer), args.rate, threading.Event(), duration=args.duration
            )
        except lost as exc:
            return _fail(f"lost the broker connection: {exc}")
        healthy = True
        print(f"ranger-py demo: published {sent} messages", file=sys.stderr)
        return 0
    finally:
        if healthy:
            conn.release()
        else:
            conn.collect()  # no goodbye handshake on a connection that may be dead


def _producer(conn: Any, exchange_name: str) -> Any:
    """A producer on ``exchange_name``, declared with Peatio's flags unless it already exists
    with others: then it is used as it is, as the server does."""
    from kombu.entity import Exchange  # noqa: PLC0415 (see the module docstring)

    exchange = _peatio_exchange(exchange_name)
    channel = conn.channel()
    try:
        exchange.declare(channel=channel)
    except conn.channel_errors as exc:
        print(f"ranger-py demo: using exchange {exchange_name!r} as it is ({exc})", file=sys.stderr)
        channel = conn.channel()  # the refused declaration closed the first one
        exchange = Exchange(exchange_name, type="topic", no_declare=True)  # type: ignore[no-untyped-call]
    return conn.Producer(channel=channel, exchange=exchange, auto_declare=False)


def main(argv: list[str] | None = None) -> int:
    """``python -m ranger_py.demo``: the same as ``ranger-py demo``."""
    parser = argparse.ArgumentParser(
        prog="ranger-py demo",
        description="Publish a synthetic Peatio feed to the configured broker (RABBITMQ_*, "
        "RABBITMQ_URL, RANGER_EXCHANGE).",
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
