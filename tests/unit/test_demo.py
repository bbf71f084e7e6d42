"""Tests for ranger_py.demo: the pure feed, its pacing, its setting, and the in-memory path.

The feed is driven with a fake clock; the last tests run the worker's feed and the real consumer
on kombu's in-memory transport, in threads (no gevent, no sockets).
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from decimal import Decimal
from typing import Any

import pytest

from ranger_py.config import Config, settings
from ranger_py.consumer import Consumer
from ranger_py.demo import (
    DEFAULT_RATE,
    DEMO_UID,
    MARKETS,
    MEMORY_URL,
    Feed,
    WorkerFeed,
    add_arguments,
    pace,
)
from ranger_py.errors import ConfigError
from tests.consumer_support import Recorder, running, wait_for

START = 1_700_000_000.0
STEP = 0.05  # the fake clock's advance per read: 20 messages/s or so
DECIMAL = re.compile(r"[0-9]+\.[0-9]+")
PERCENT = re.compile(r"[+-][0-9]+\.[0-9]{2}%")
ISO = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\+00:00")


def fake_clock(step: float = STEP) -> Callable[[], float]:
    ticks = itertools.count()
    return lambda: START + next(ticks) * step


def messages(count: int, seed: int = 1, step: float = STEP, **kwargs: Any) -> list[tuple[str, Any]]:
    """The first ``count`` messages of a seeded feed, bodies parsed (so invalid JSON fails)."""
    feed = Feed(random.Random(seed), fake_clock(step), **kwargs)
    return [(key, json.loads(body)) for key, body in itertools.islice(feed, count)]


def books(series: list[tuple[str, Any]]) -> dict[str, list[tuple[str, Any]]]:
    """Per market, its ob-snap and ob-inc messages in order, as ("snap" | "inc", body)."""
    found: dict[str, list[tuple[str, Any]]] = {market.name: [] for market in MARKETS}
    for key, body in series:
        scope, _, rest = key.partition(".")
        market, _, event = rest.partition(".")
        if event in ("ob-snap", "ob-inc"):
            assert scope == "public"
            found[market].append((event[3:], body))
    return found


def is_amount(text: str) -> bool:
    return bool(DECIMAL.fullmatch(text)) and Decimal(text) > 0


# The series


def test_bodies_are_json_and_routing_keys_are_peatios() -> None:
    names = "|".join(market.name for market in MARKETS)
    allowed = re.compile(
        rf"global\.tickers|public\.({names})\.(trades|kline-1m|ob-snap|ob-inc)"
        rf"|private\.{DEMO_UID}\.(order|trade)"
    )
    series = messages(5000)
    for key, _ in series:
        assert allowed.fullmatch(key), key
    seen = {key.replace(DEMO_UID, "<uid>") for key, _ in series}
    for market in MARKETS:
        for event in ("trades", "kline-1m", "ob-snap", "ob-inc"):
            assert f"public.{market.name}.{event}" in seen
    assert {"global.tickers", "private.<uid>.order", "private.<uid>.trade"} <= seen


def test_every_book_starts_with_a_snapshot_then_the_tickers() -> None:
    series = messages(len(MARKETS) + 1)
    assert [key for key, _ in series] == [
        *(f"public.{market.name}.ob-snap" for market in MARKETS),
        "global.tickers",
    ]


def test_increments_are_consecutive_and_later_snapshots_keep_the_sequence() -> None:
    for market, events in books(messages(6000)).items():
        assert events[0][0] == "snap", market
        sequence = events[0][1]["sequence"]
        snapshots = 0
        for kind, body in events[1:]:
            if kind == "inc":
                assert body["sequence"] == sequence + 1, (market, body)
                sequence += 1
            else:
                # Peatio's engine: a snapshot carries the current sequence; the next
                # increment is snapshot + 1.
                assert body["sequence"] == sequence, (market, body)
                snapshots += 1
        assert snapshots >= 3, market  # ~300 s of fake time: a snapshot every ~10 s


def test_increments_replayed_on_a_snapshot_give_the_next_snapshot() -> None:
    """A client applying the increments to a snapshot holds exactly the book of the next one."""
    for market, events in books(messages(6000)).items():
        held: dict[str, dict[str, str]] | None = None
        compared = 0
        for kind, body in events:
            if kind == "snap":
                snapshot = {side: dict(body[side]) for side in ("asks", "bids")}
                if held is not None:
                    assert held == snapshot, market
                    compared += 1
                held = snapshot
            else:
                assert held is not None
                (side,) = (name for name in ("asks", "bids") if name in body)
                price, amount = body[side]
                if amount == "":
                    assert price in held[side], (market, body)  # removes an existing level
                    del held[side][price]
                else:
                    held[side][price] = amount
        assert compared >= 2, market


def test_increment_and_snapshot_shapes() -> None:
    removals = 0
    for events in books(messages(4000)).values():
        for kind, body in events:
            if kind == "inc":
                assert len(body) == 2 and isinstance(body["sequence"], int)
                (side,) = set(body) - {"sequence"}
                assert side in ("asks", "bids")
                price, amount = body[side]  # Peatio's flat [price, amount] pair
                assert DECIMAL.fullmatch(price)
                assert amount == "" or is_amount(amount)
                removals += amount == ""
            else:
                assert set(body) == {"asks", "bids", "sequence"}
                asks = [Decimal(price) for price, _ in body["asks"]]
                bids = [Decimal(price) for price, _ in body["bids"]]
                assert asks == sorted(asks) and bids == sorted(bids, reverse=True)
                assert bids[0] < asks[0]  # never crossed
                assert 5 <= len(asks) <= 20 and 5 <= len(bids) <= 20
                assert all(is_amount(amount) for _, amount in body["asks"] + body["bids"])
    assert removals > 0


def test_trades_take_the_best_level_of_the_other_side() -> None:
    held: dict[str, dict[str, dict[Decimal, str]]] = {}
    tids = []
    for key, body in messages(3000):
        _, market, event = f"{key}..".split(".")[:3]
        if event == "ob-snap":
            held[market] = {
                side: {Decimal(price): amount for price, amount in body[side]}
                for side in ("asks", "bids")
            }
        elif event == "ob-inc":
            (side,) = set(body) - {"sequence"}
            price, amount = body[side]
            if amount:
                held[market][side][Decimal(price)] = amount
            else:
                del held[market][side][Decimal(price)]
        elif event == "trades":
            (trade,) = body["trades"]
            assert set(trade) == {"tid", "taker_type", "date", "price", "amount"}
            assert isinstance(trade["date"], int) and trade["date"] >= int(START)
            assert DECIMAL.fullmatch(trade["price"]) and is_amount(trade["amount"])
            book = held[market]
            if trade["taker_type"] == "buy":
                best = min(book["asks"])
                level = book["asks"][best]
            else:
                assert trade["taker_type"] == "sell"
                best = max(book["bids"])
                level = book["bids"][best]
            assert Decimal(trade["price"]) == best
            assert Decimal(trade["amount"]) <= Decimal(level)
            tids.append(trade["tid"])
    assert tids == sorted(set(tids)) and len(tids) > 50


def test_klines_are_peatios_number_arrays() -> None:
    klines = [body for key, body in messages(3000) if key.endswith(".kline-1m")]
    assert len(klines) > 50
    for start, open_, high, low, close, volume in klines:
        assert isinstance(start, int) and start % 60 == 0
        assert all(isinstance(value, float) for value in (open_, high, low, close, volume))
        assert low <= min(open_, close) <= max(open_, close) <= high
        assert volume >= 0


def test_tickers_are_strings_for_every_market() -> None:
    tickers = [body for key, body in messages(3000) if key == "global.tickers"]
    assert len(tickers) > 20
    fields = {"at", "avg_price", "high", "last", "low", "open", "price_change_percent", "volume"}
    for body in tickers:
        assert set(body) == {market.name for market in MARKETS}
        for ticker in body.values():
            assert fields <= set(ticker)
            assert all(isinstance(value, str) for value in ticker.values())
            assert PERCENT.fullmatch(ticker["price_change_percent"])
            low, last, high = (Decimal(ticker[name]) for name in ("low", "last", "high"))
            assert low <= last <= high


def test_private_events_tell_a_story_per_order() -> None:
    orders: dict[int, list[str]] = {}
    trades: dict[int, dict[str, Any]] = {}
    for key, body in messages(5000, uid="IDABC0000001"):
        if key == "private.IDABC0000001.order":
            assert body["kind"] == ("bid" if body["side"] == "buy" else "ask")
            assert ISO.fullmatch(body["created_at"]) and ISO.fullmatch(body["updated_at"])
            assert Decimal(body["origin_volume"]) == Decimal(body["remaining_volume"]) + Decimal(
                body["executed_volume"]
            )
            if body["state"] == "done":
                assert body["id"] in trades  # its trade came first
            orders.setdefault(body["id"], []).append(body["state"])
        elif key == "private.IDABC0000001.trade":
            assert set(body) == {
                "id",
                "price",
                "amount",
                "total",
                "market",
                "side",
                "taker_type",
                "created_at",
                "order_id",
            }
            assert Decimal(body["total"]) == Decimal(body["price"]) * Decimal(body["amount"])
            trades[body["order_id"]] = body
        else:
            assert not key.startswith("private."), key
    assert len(orders) > 20
    for states in orders.values():
        assert states in (["wait"], ["wait", "done"], ["wait", "cancel"])
    assert any(states[-1] == "done" for states in orders.values())
    assert any(states[-1] == "cancel" for states in orders.values())


def test_the_same_seed_gives_the_same_series() -> None:
    first = [raw for raw in itertools.islice(Feed(random.Random(7), fake_clock()), 2000)]
    again = [raw for raw in itertools.islice(Feed(random.Random(7), fake_clock()), 2000)]
    other = [raw for raw in itertools.islice(Feed(random.Random(8), fake_clock()), 2000)]
    assert first == again
    assert first != other


def test_no_snapshot_is_repeated_while_time_stands_still() -> None:
    series = messages(2000, step=0.0)
    assert sum(key.endswith(".ob-snap") for key, _ in series) == len(MARKETS)


def test_a_feed_needs_a_market() -> None:
    with pytest.raises(ValueError, match="market"):
        Feed(random.Random(1), time.time, markets=())


# Pacing


def test_pace_publishes_at_the_rate_for_the_duration() -> None:
    published: list[str] = []
    sent = pace(
        iter(Feed(random.Random(1), time.time)),
        lambda key, body: published.append(key),
        200.0,
        threading.Event(),
        duration=0.5,
    )
    assert sent == len(published)
    assert 80 <= sent <= 101


def test_pace_waits_while_not_ready_and_stops_when_told() -> None:
    stop = threading.Event()
    published: list[str] = []
    timer = threading.Timer(0.3, stop.set)
    timer.start()
    sent = pace(
        iter(Feed(random.Random(1), time.time)),
        lambda key, body: published.append(key),
        1000.0,
        stop,
        ready=lambda: False,
    )
    timer.join()
    assert sent == 0 and published == []


# The setting


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("on", True), ("ON", True), ("true", True), ("1", True), ("off", False), ("False", False)],
)
def test_ranger_demo_values(raw: str, expected: bool) -> None:
    assert Config.from_env({"RANGER_DEMO": raw}).demo is expected


def test_ranger_demo_needs_one_worker() -> None:
    with pytest.raises(ConfigError) as info:
        Config.from_env({"RANGER_DEMO": "on", "WEB_CONCURRENCY": "2"})
    assert info.value.variable == "RANGER_DEMO"
    assert "WEB_CONCURRENCY=1" in info.value.problem
    assert Config.from_env({"RANGER_DEMO": "off", "WEB_CONCURRENCY": "2"}).workers == 2
    assert Config.from_env({"RANGER_DEMO": "on", "WEB_CONCURRENCY": "1"}).demo


def test_ranger_demo_doc_names_the_markets_and_the_uid() -> None:
    (doc,) = (setting.doc for _, setting in settings() if setting.env == ("RANGER_DEMO",))
    assert DEMO_UID in doc
    for market in MARKETS:
        assert market.name in doc


# The command's options


def test_command_options() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([])
    assert (args.rate, args.uid, args.duration, args.seed) == (DEFAULT_RATE, DEMO_UID, None, None)
    args = parser.parse_args(["--rate", "5", "--uid", "U1", "--duration", "2.5", "--seed", "3"])
    assert (args.rate, args.uid, args.duration, args.seed) == (5.0, "U1", 2.5, 3)
    for bad in (["--rate", "0"], ["--rate", "x"], ["--duration", "-1"], ["--seed", "a"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


# RANGER_DEMO's path inside a worker, in threads: the worker's feed and the real consumer


def test_worker_feed_reaches_the_consumer_through_the_in_memory_transport() -> None:
    config = replace(Config(), exchange=f"demo.{uuid.uuid4().hex}", demo=True)
    feed = WorkerFeed(config, rate=200.0)
    assert feed.broker.amqp_url == MEMORY_URL
    recorder = Recorder()
    consumer = Consumer.from_config(feed.broker, recorder)
    thread = threading.Thread(target=feed.run_forever, args=(lambda: consumer.ready,))
    with running(consumer):
        thread.start()
        try:
            received = recorder.wait_for_count(100, timeout=10.0)
        finally:
            feed.stop()
            thread.join(5.0)
    assert not thread.is_alive()
    # Published only once the consumer was consuming: nothing was lost, books start with a snapshot.
    assert [key for key, _ in received[:3]] == [
        "public.btcusd.ob-snap",
        "public.ethusd.ob-snap",
        "global.tickers",
    ]
    assert all(isinstance(body, bytes) for _, body in received)
    series = [(key, json.loads(body)) for key, body in received]
    for market, events in books(series).items():
        sequences = [body["sequence"] for kind, body in events if kind == "inc"]
        assert sequences == list(range(2, 2 + len(sequences))), market


def test_worker_feed_holds_its_messages_while_the_consumer_is_not_ready() -> None:
    """A message published before the consumer's queue is bound would be lost: the first
    snapshots above all, without which a book's increments are dropped."""
    config = replace(Config(), exchange=f"demo.{uuid.uuid4().hex}", demo=True)
    feed = WorkerFeed(config, rate=1000.0)
    recorder = Recorder()
    consumer = Consumer.from_config(feed.broker, recorder)
    asked: list[bool] = []

    def not_ready() -> bool:
        asked.append(True)
        return False

    thread = threading.Thread(target=feed.run_forever, args=(not_ready,))
    with running(consumer):
        wait_for(lambda: consumer.ready, what="the consumer")
        thread.start()
        try:
            # It asks every 0.1 s; a feed that did not wait would have published ~300 by then.
            wait_for(lambda: len(asked) >= 4, what="the feed asking whether it may publish")
        finally:
            feed.stop()
            thread.join(5.0)
    assert not thread.is_alive()
    assert recorder.calls == []
