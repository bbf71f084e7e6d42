"""The exchange scenario's pure parts: its model, bodies, topic matching, health answers, verdicts.

No numpy here (a bench requirement, not a dev one); the load generator's part, which needs
picows, imports it inside its test.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections import Counter
from typing import Any

import pytest

from bench import health, report
from bench.events import MIN_BYTES, ExchangeBodies
from bench.exchange import (
    CLIENT_EVENTS,
    KLINE_PERIODS,
    PRIVATE_EVENTS,
    TICKERS,
    Feed,
    Profile,
    category,
    expected_frames,
    market_names,
    public_clients,
    rate_by_key,
    rates_by_category,
    routing_key,
    schedule,
    zipf,
)
from bench.procs import parse_owners
from bench.publisher import Publisher
from bench.routing import Bindings, matches, queue_worker
from bench.verdicts import exchange_summary, routing_verdict

UIDS = [f"ID{i:010X}" for i in range(50)]


# -- the model -------------------------------------------------------------------------------


def test_zipf_weights_sum_to_one_and_fall_with_rank() -> None:
    weights = zipf(100, 1.0)
    assert sum(weights) == pytest.approx(1.0)
    assert all(a > b for a, b in itertools.pairwise(weights))
    assert weights[0] / weights[9] == pytest.approx(10.0)
    assert zipf(5, 0.0) == [pytest.approx(0.2)] * 5


@pytest.mark.parametrize(
    ("rate", "phase", "duration"),
    [(2.0, 0.1, 1.0), (3.0, 0.0, 1.0), (0.2, 4.9, 3.0), (0.5, 1.99, 2.0), (7.3, 0.05, 2.5)],
)
def test_a_feeds_count_is_the_messages_due_before_the_end(
    rate: float, phase: float, duration: float
) -> None:
    due = [n for n in range(1000) if phase + n / rate < duration]
    assert Feed("k", "trade", rate, "m", phase).count(duration) == len(due)


def test_the_schedule_publishes_the_profiles_rates() -> None:
    profile = Profile()
    feeds = schedule(profile, UIDS)
    assert len({f.key for f in feeds}) == len(feeds)
    rates = rates_by_category(feeds)
    assert rates["trades"] == pytest.approx(profile.trades_per_s)
    assert rates["ob-inc"] == pytest.approx(profile.trades_per_s * profile.book_changes_per_trade)
    assert rates["ob-snap"] == pytest.approx(profile.markets / profile.snapshot_every_s)
    assert rates["kline-1m"] == pytest.approx(profile.markets / profile.kline_every_s)
    others = len(KLINE_PERIODS) - 1
    assert rates["kline, other periods"] == pytest.approx(others * profile.markets / 2.0)
    assert rates["global.tickers"] == pytest.approx(1 / profile.tickers_every_s)
    assert rates["private order"] == pytest.approx(profile.private_orders_per_s)
    assert rates["private trade"] == pytest.approx(2 * profile.trades_per_s)
    assert all(0 <= f.phase < 1 / f.rate for f in feeds)
    assert schedule(profile, UIDS) == feeds  # seeded


def test_popular_markets_and_active_users_publish_more() -> None:
    rates = rate_by_key(schedule(Profile(), UIDS))
    trades = [rates[f"public.{m}.trades"] for m in market_names(100)]
    assert trades == sorted(trades, reverse=True) and trades[0] > 50 * trades[-1]
    orders = [rates[f"private.{u}.order"] for u in UIDS]
    assert orders == sorted(orders, reverse=True)


def test_a_feed_without_activity_is_left_out() -> None:
    feeds = schedule(Profile(markets=3, trades_per_s=0.0), [])
    assert {category(f) for f in feeds} == {
        "ob-snap",
        "kline-1m",
        "kline, other periods",
        "global.tickers",
    }


def test_public_clients_follow_one_to_three_markets_most_of_them_the_popular_ones() -> None:
    profile = Profile()
    clients = public_clients(profile, 2000)
    assert clients == public_clients(profile, 2000)  # seeded
    held: Counter[str] = Counter()
    with_tickers = 0
    for streams in clients:
        markets = [s.split(".")[0] for s in streams if s != TICKERS]
        distinct = sorted(set(markets))
        assert 1 <= len(distinct) <= 3
        assert sorted(streams[: len(markets)]) == sorted(
            f"{m}.{e}" for m in distinct for e in CLIENT_EVENTS
        )
        with_tickers += TICKERS in streams
        held.update(distinct)
    names = market_names(profile.markets)
    assert sum(held[m] for m in names[:10]) > sum(held[m] for m in names[10:])
    assert 0.2 < with_tickers / len(clients) < 0.4


def test_routing_keys_and_what_a_client_should_receive() -> None:
    assert routing_key("mkt001usd.ob-inc") == "public.mkt001usd.ob-inc"
    assert routing_key(TICKERS) == TICKERS
    assert routing_key("trade", "ID1") == "private.ID1.trade"
    with pytest.raises(ValueError, match="uid"):
        routing_key("order")
    counts = {"public.a.trades": 4, "public.a.ob-inc": 9, "public.a.ob-snap": 2, TICKERS: 1}
    assert expected_frames(["a.trades", "a.ob-inc", TICKERS], counts) == 14
    assert expected_frames(PRIVATE_EVENTS, {"private.U.order": 3, "private.V.trade": 5}, "U") == 3


# -- the bodies ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["trade", "kline", "inc", "snap", "tickers", "order", "fill"])
def test_every_body_is_json_with_ts_first_and_long_enough_to_count_as_data(kind: str) -> None:
    bodies = ExchangeBodies(market_names(100))
    for n in range(12):
        body = bodies.build(kind, 1_234_567_890, n, "mkt007usd", 1000 + n)
        assert body.startswith(b'{"ts":1234567890,')
        assert len(body) >= MIN_BYTES
        value = json.loads(body)
        if kind in ("inc", "snap"):
            assert value["sequence"] == 1000 + n
    tickers = json.loads(bodies.build("tickers", 1, 0, "", 0))
    assert list(tickers)[1:] == market_names(100)


class Channel:
    """py-amqp's channel, as far as the publisher uses it."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []

    def basic_publish(self, message: Any, exchange: str, routing_key: str) -> None:
        self.sent.append((routing_key, json.loads(message.body)))


def test_the_exchange_publisher_keeps_each_feeds_schedule_and_its_books_in_sequence() -> None:
    feeds = [
        Feed("public.a.ob-inc", "inc", 40.0, "a", 0.0),
        Feed("public.a.ob-snap", "snap", 8.0, "a", 0.01),
        Feed("public.b.ob-inc", "inc", 20.0, "b", 0.02),
        Feed("public.b.ob-snap", "snap", 0.5, "b", 1.5),  # not due in the step
        Feed("public.a.trades", "trade", 30.0, "a", 0.005),
    ]
    wire = [[f.key, f.kind, f.rate, f.subject, f.phase] for f in feeds]
    publisher = Publisher()
    publisher.channel = channel = Channel()
    first = publisher.exchange(
        exchange="x", feeds=wire, markets=["a", "b"], duration=0.3, open_books=True
    )
    second = publisher.exchange(exchange="x", feeds=wire, markets=["a", "b"], duration=0.3)
    assert first["opening_snapshots"] == 2 and second["opening_snapshots"] == 0
    for reply in (first, second):
        assert not reply["stopped_early"]
        assert reply["by_key"] == {f.key: f.count(0.3) for f in feeds if f.count(0.3)}
        assert reply["published"] == sum(f.count(0.3) for f in feeds)
    assert [key for key, _ in channel.sent[:2]] == ["public.a.ob-snap", "public.b.ob-snap"]
    for market in ("a", "b"):
        last = None
        for key, body in channel.sent:
            if key == f"public.{market}.ob-inc":
                assert last is not None and body["sequence"] == last + 1
                last = body["sequence"]
            elif key == f"public.{market}.ob-snap":
                # A snapshot carries its book's last sequence: nothing lost, nothing twice.
                assert last is None or body["sequence"] == last
                last = body["sequence"]


# -- topic matching --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("binding", "key", "expected"),
    [
        ("public.a.trades", "public.a.trades", True),
        ("public.a.trades", "public.b.trades", False),
        ("*.a.trades", "global.a.trades", True),
        ("*.a.trades", "a.trades", False),
        ("private.U.*", "private.U.order", True),
        ("private.U.*", "private.U.order.x", False),
        ("#", "", True),
        ("#", "a.b.c", True),
        ("a.#", "a", True),
        ("a.#.z", "a.z", True),
        ("a.#.z", "a.b.c.z", True),
        ("a.#.z", "a.b.c", False),
        ("#.ob-inc", "public.a.ob-inc", True),
        ("*.*", "a", False),
        ("a.*.#", "a", False),
        ("a.*.#", "a.b", True),
    ],
)
def test_amqp_topic_rules(binding: str, key: str, expected: bool) -> None:
    assert matches(binding, key) is expected
    assert (key in Bindings([binding])) is expected


def test_a_queues_bindings_find_what_one_by_one_matching_finds() -> None:
    patterns = [
        "public.*.ob-inc",
        "*.m1.trades",
        "global.tickers",
        "private.U1.*",
        "a.#",
        "*.*.*.*.*.*.*.*.*.x",
    ]
    words = ["public", "global", "private", "m1", "m2", "trades", "ob-inc", "U1", "a", "x"]
    keys = [".".join(p) for n in (1, 2, 3) for p in itertools.product(words, repeat=n)]
    keys += ["w." * 9 + "x", "w." * 10 + "x"]  # past the lookup's length: matched one by one
    for count in range(len(patterns) + 1):
        chosen = patterns[:count]
        queue = Bindings(chosen)
        for key in keys:
            assert (key in queue) == any(matches(p, key) for p in chosen), (chosen, key)


def test_a_queues_share_counts_each_message_once() -> None:
    queue = Bindings(["public.*.ob-inc", "*.a.ob-inc", "private.U.*"])
    per_key = {"public.a.ob-inc": 5, "public.b.ob-inc": 2, "private.U.order": 3, "private.V.x": 7}
    assert queue.share(per_key) == 10
    assert Bindings(["#"]).share(per_key) == 17


def test_a_ranger_py_queue_names_its_worker() -> None:
    assert queue_worker("ranger-py.web-1.example.org.31337.deadbeef") == 31337
    assert queue_worker("ranger-py.host.notapid.deadbeef") is None
    assert queue_worker("amq.gen-JzTY20BRgKO") is None


def test_ss_lines_give_each_clients_server_process() -> None:
    out = (
        '0 0 127.0.0.1:8080 127.0.0.1:40001 users:(("gunicorn",pid=11,fd=9))\n'
        '0 0 127.0.0.1:8080 127.0.0.1:40002 users:(("gunicorn",pid=12,fd=9),("x",pid=1,fd=3))\n'
        "0 0 127.0.0.1:8080 127.0.0.1:40003\n"
    )
    assert parse_owners(out) == {40001: 11, 40002: 12}


# -- health answers ---------------------------------------------------------------------------


def test_a_health_answer_without_both_counts_gives_nothing() -> None:
    assert health.parse(b'{"status":"ok","worker":7,"received":0}') == (7, 0)
    for body in (b"OK", b"[]", b'{"worker":7}', b'{"worker":"7","received":1}', b"{"):
        assert health.parse(body) is None


def _asker(answers: list[health.Answer | None]) -> tuple[list[int], Any]:
    asked = [0]

    def ask() -> health.Answer | None:
        asked[0] += 1
        return answers.pop(0) if answers else None

    return asked, ask


def test_health_is_asked_until_every_worker_has_answered() -> None:
    asked, ask = _asker([(1, 10), (1, 11), None, (2, 20), (1, 12)])
    assert health.collect(ask, {1, 2}, tries=50) == {1: 10, 2: 20}
    assert asked[0] == 4


def test_health_asking_stops_at_its_bound_and_gives_up_on_a_gateway_without_counts() -> None:
    asked, ask = _asker([(1, 10)] * 100)
    assert health.collect(ask, {1, 2}, tries=20) == {1: 10}
    assert asked[0] == 20
    asked, ask = _asker([])
    assert health.collect(ask, {1, 2}, tries=20) == {}
    assert asked[0] == 3


# -- verdicts --------------------------------------------------------------------------------


def test_each_worker_must_receive_its_share_within_the_tolerance() -> None:
    rows = [
        {"worker": 1, "received": 3000, "share": 3000},
        {"worker": 2, "received": 2440, "share": 2400},
    ]
    verdict = routing_verdict(rows, published=10000, tolerance=0.02)
    assert verdict["passed"] is True and verdict["distinct"] is True
    assert [r["share_of_total"] for r in verdict["workers"]] == [0.3, 0.24]
    rows[1]["received"] = 2500
    verdict = routing_verdict(rows, published=10000, tolerance=0.02)
    assert verdict["passed"] is False
    assert [r["within"] for r in verdict["workers"]] == [True, False]


def test_a_worker_without_a_count_or_a_queue_is_not_measured() -> None:
    rows: list[dict[str, Any]] = [
        {"worker": 1, "received": None, "share": 300},
        {"worker": 2, "received": 5, "share": 5},
    ]
    verdict = routing_verdict(rows, published=1000, tolerance=0.02)
    assert verdict["passed"] is None and "1" in verdict["not_measured"]
    assert routing_verdict([], published=1000, tolerance=0.02)["passed"] is None


def test_a_share_that_is_the_whole_exchange_tells_nothing() -> None:
    rows = [{"worker": 1, "received": 1000, "share": 1000}]
    verdict = routing_verdict(rows, published=1000, tolerance=0.02)
    assert verdict["passed"] is True and verdict["distinct"] is False


def _run(routing: str | None, received: int, share: int, published: int) -> dict[str, Any]:
    rows = [{"worker": 9, "received": received, "share": share}]
    return {"routing": routing, "verdict": routing_verdict(rows, published, 0.02)}


def test_the_scenario_passes_only_when_every_subscribed_run_does() -> None:
    runs = {"w1 subscribed": _run("subscribed", 300, 300, 1000), "w1 all": _run("all", 5, 5, 5)}
    summary = exchange_summary(runs)
    assert summary["passed"] is True and summary["failures"] == []
    assert summary["share_of_total"] == {"w1 subscribed": [0.3], "w1 all": [1.0]}
    runs["w2 subscribed"] = _run("subscribed", 1000, 300, 1000)
    summary = exchange_summary(runs)
    assert summary["passed"] is False
    assert summary["failures"] == ["w2 subscribed: 9 received 3.3333x its share"]
    runs["w2 subscribed"] = _run("subscribed", 1000, 1000, 1000)
    assert exchange_summary(runs)["passed"] is False  # the whole exchange: not distinct
    own = exchange_summary({"w1 own routing": _run(None, 7, 7, 7)})
    assert own["passed"] is None and "no run with" in own["failures"][0]


def test_the_report_prints_each_run_and_the_headline_rows(
    capsys: pytest.CaptureFixture[str],
) -> None:
    step = {"rate": 800.0, "delivered_per_s": 40000, "sustained": True, "p99_ms": 9.5}
    run = {**_run("subscribed", 300, 300, 1000), "step": step, "bindings": {"9": 320}}
    data = {
        "markets": 100,
        "public_clients": 5000,
        "private_users": 1000,
        "duration_s": 15.0,
        "tolerance": 0.02,
        "published_per_s": 805.2,
        "rates_per_s": {"trades": 15.0, "ob-inc": 60.0},
        "expected_deliveries_per_s": 47000,
        "runs": {"w2 subscribed": run},
        "summary": exchange_summary({"w2 subscribed": run}),
    }
    report.print_tables({"scenario": "exchange", "server": "ranger-py", "result": data})
    printed = capsys.readouterr().out
    assert "published 805.2 msg/s: trades 15, ob-inc 60" in printed
    assert "verdict (routing=subscribed): PASS" in printed
    rows = {r["what"]: r for r in report.headline([{"scenario": "exchange", **_as(data)}], "x")}
    assert rows["exchange: each worker receives its bindings' share"]["measured"] == "yes"
    assert rows["exchange, 2 workers: received / total"]["measured"] == "0.30"


def _as(data: dict[str, Any]) -> dict[str, Any]:
    return {"server": "x", "result": data}


# -- the load generator's exchange clients -----------------------------------------------------


def test_exchange_clients_read_a_long_subscribed_reply_and_split_by_their_port() -> None:
    pytest.importorskip("picows")
    from bench import loadgen  # noqa: PLC0415 (needs picows)
    from tests.unit.playing_gateway import playing_gateway, wait_frames  # noqa: PLC0415

    streams = [f"mkt{i:03d}usd.{e}" for i in range(3) for e in CLIENT_EVENTS] + [TICKERS]
    reply = json.dumps({"success": {"message": "subscribed", "streams": streams}}).encode()
    assert len(reply) >= loadgen.MIN_BODY  # what a plain client would count as data
    body = ExchangeBodies(["mkt000usd"]).build("inc", loadgen._now_us(), 1, "mkt000usd", 1001)
    data = b'{"mkt000usd.ob-inc":' + body + b"}"

    async def run() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        async with playing_gateway([(reply, False)] + [(data, False)] * 3) as url:
            gen = loadgen.LoadGen()
            connect = await gen.connect(
                group="g", urls=[url] * 3, kind="exchange", token_offset=10, reply_timeout=5.0
            )
            await wait_frames(gen, 9)
            ports = (await gen.ports("g"))["ports"]
            owners = {str(ports[0]): "101", str(ports[1]): "102"}
            split = await gen.split("g", "pub", owners)
            counted = await gen.count()
            await gen.close(wait=2.0)
        return connect, split, counted

    connect, split, counted = asyncio.run(run())
    assert connect["connected"] == 3 and connect["subscribed"] == 3, connect
    assert counted["by_group"]["g"] == 0  # every client moved
    groups = split["groups"]
    assert sorted(groups) == ["pub@101", "pub@102", "pub@?"]
    assert sorted(i for indices in groups.values() for i in indices) == [10, 11, 12]
    assert sum(counted["by_group"][g] for g in groups) == 9
